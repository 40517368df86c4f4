"""What makes KV reusable: the model, its weights, the KV layout and dtype. Part of every chunk key.

Two runs may share KV only if every field here is equal; any difference gives different keys, so another
model's KV is a miss by construction, never a load.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

# Bump when the meaning of stored KV changes (tensor layout, rope convention, ...).
KV_LAYOUT_VERSION = 1


@dataclass(frozen=True)
class ModelFingerprint:
    model_id: str
    weights_digest: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    # Anything else that changes K/V for the same tokens: rope bases and scaling, sliding windows, ...
    extra: dict = field(default_factory=dict)
    layout_version: int = KV_LAYOUT_VERSION

    def digest(self) -> bytes:
        """32-byte digest of every field; stable across processes and machines."""
        blob = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.blake2b(blob.encode(), digest_size=32).digest()

    def hex(self) -> str:
        return self.digest().hex()
