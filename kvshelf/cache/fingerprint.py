"""What makes KV reusable: the model, its weights, the KV layout and dtype. Part of every chunk key.

Two runs may share KV only if every field here is equal; any difference gives different keys, so another
model's KV is a miss by construction, never a load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

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


# -- digests of weights, computed once and kept by the files' identity ---------------------------------------

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_READ = 1 << 20


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint files of a model folder (weights and the configs that shape the model), sorted."""
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES]
    files += [folder / n for n in ("config.json", "generation_config.json") if (folder / n).is_file()]
    return sorted(files)


def file_identity(paths: list[Path]) -> list[list]:
    """(resolved path, size, mtime in ns, inode) per file: changes whenever a file is replaced or rewritten."""
    out = []
    for p in paths:
        st = p.stat()
        out.append([str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ino])
    return out


def hash_files(paths: list[Path]) -> str:
    """BLAKE2b over every byte of every file (with its name and size), in order."""
    h = hashlib.blake2b(digest_size=32, person=b"kvshelf-files")
    buf = bytearray(_READ)
    view = memoryview(buf)
    for p in paths:
        h.update(f"{p.name}:{p.stat().st_size}\0".encode())
        with p.open("rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(view[:n])
    return h.hexdigest()


def cached_digest(kind: str, identity: object, compute: Callable[[], str]) -> str:
    """`compute()`, remembered in the kvshelf cache folder under `identity` (any JSON value that changes
    whenever the digest could): a digest of gigabytes is computed once, not at every start."""
    from kvshelf.paths import cache_root

    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    name = hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()
    path = cache_root() / "digests" / f"{kind}-{name}.json"
    try:
        saved = json.loads(path.read_text())
        if saved.get("identity") == json.loads(blob) and isinstance(saved.get("digest"), str):
            return saved["digest"]
    except (OSError, ValueError, AttributeError):
        pass  # absent or unreadable: compute again
    digest = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"identity": json.loads(blob), "digest": digest}))
        os.replace(tmp, path)
    except OSError as err:
        log.warning("could not keep the weights digest in %s: %s", path, err)
    return digest
