"""What a prefill strategy is given and what it returns: one request and one outcome type for all."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from kvshelf.blend.blender import BlendInfo
from kvshelf.blend.segment import Segmented
from kvshelf.cache.engine import CacheEngine
from kvshelf.model.kv_buffer import KVBuffer

if TYPE_CHECKING:
    from kvshelf.layerwise.saver import LayerwiseSaver


@dataclass
class PrefillRequest:
    ids: list[int]  # the whole prompt
    salt: str | None
    engine: CacheEngine | None  # None: no cache for this request (off, or a prompt too short to pay)
    load: bool = True  # False: the guard predicted loading slower than recomputing; look nothing up
    documents: Segmented | None = None  # the prompt cut into CacheBlend documents (blend only)


@dataclass
class PrefillOutcome:
    logits: torch.Tensor = field(repr=False)  # float32 [vocab]: the logits that choose the first token
    hit_tokens: int = 0  # prompt tokens whose KV came from the cache
    loaded_bytes: int = 0  # KV bytes loaded from the cache (tokens x the model's KV bytes per token)
    exact: bool = True  # the KV equals a plain prefill's; approximate KV (blend) is never stored as prefix KV
    load_s: float | None = None  # time spent reading cached KV; None when no load was tried
    compute_s: float = 0.0  # time of the forward that produced `logits`
    saver: LayerwiseSaver | None = None  # new chunks already being stored layer by layer: finish, not store
    blend: BlendInfo | None = None
    store_prefix: bool = True  # False: exact KV that is not worth keeping under prefix keys (a cold blend)
    # Work that must not delay the first token (a cold blend's documents computed alone): the generator runs
    # one step after each token it streams, and the rest once the answer is complete.
    deferred: Iterator[None] | None = field(default=None, repr=False)

    @property
    def store_from(self) -> int | None:
        """The first prompt token to store after the prefill: None when nothing may be stored."""
        return self.hit_tokens if self.exact and self.store_prefix else None


class PrefillStrategy(Protocol):
    """Fills `kv` with the prompt's KV (loaded, computed or both) and returns the last token's logits."""

    def prefill(self, request: PrefillRequest, kv: KVBuffer) -> PrefillOutcome: ...
