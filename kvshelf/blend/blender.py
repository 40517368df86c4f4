"""CacheBlend on kvshelf's model runner: reuse the KV of chunks at any position, recompute the few
tokens whose KV deviates most.

Each chunk's KV is cached on its own, computed as `prefix + chunk + sep` (the prefix is the BOS token,
the attention sink every real prompt starts with; the separator that follows every chunk is cached with
it) and keyed by those tokens alone, so it serves the chunk wherever it appears. For a prompt
`prefix, chunk, sep, chunk, sep, ..., suffix`:

1. every chunk's KV is loaded (or computed alone and stored, on a miss) and its keys re-rotated from the
   position it was computed at (stored with it, and part of its key) to the chunk's position here;
2. layers below the first check layer run on every token, so the check layer's fresh K and V are exact;
3. at each check layer, fresh K and V of the active tokens (projections only) are compared with the
   cached ones (squared error, K and V each normalised by their mean energy) and only the top `ratio`
   fraction of all chunk tokens stays active for the rest of the layer and above; the prefix and the
   suffix always do;
4. later layers compute only active tokens, attending over the fused KV: fresh where computed, cached
   elsewhere. The fused KV is what decoding continues from.

Fused KV is approximate, so it is never stored under prefix-cache keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kvshelf.blend.segment import Segmented
from kvshelf.cache.engine import CacheEngine
from kvshelf.metrics import Metrics
from kvshelf.model.kv_buffer import KVBuffer
from kvshelf.model.runner import ModelRunner


@dataclass
class BlendInfo:
    chunks: int = 0
    chunk_hits: int = 0
    chunk_tokens: int = 0
    reused_tokens: int = 0  # chunk tokens whose cached KV survived to the last layer
    recomputed_tokens: int = 0  # chunk tokens recomputed in the last layer
    computed_alone: int = 0  # chunks that missed and were computed on their own first
    loaded_bytes: int = 0
    selected_per_check: list[int] = field(default_factory=list)


class Blender:
    def __init__(
        self,
        runner: ModelRunner,
        engine: CacheEngine | None,
        *,
        check_layers: list[int],
        ratios: list[float],
        metrics: Metrics | None = None,
    ):
        if len(ratios) not in (1, len(check_layers)):
            raise ValueError(
                f"blend_recompute_ratios has {len(ratios)} values for {len(check_layers)} check layers; "
                "give one ratio, or one per check layer"
            )
        bad = [c for c in check_layers if not 0 <= c < runner.num_layers]
        if bad or not check_layers:
            raise ValueError(f"blend_check_layers must be within 0..{runner.num_layers - 1}, got {check_layers}")
        self.runner = runner
        self.engine = engine
        self.check_layers = sorted(check_layers)
        self.ratios = ratios * len(check_layers) if len(ratios) == 1 else ratios
        self.metrics = metrics if metrics is not None else Metrics()

    # -- chunk KV ----------------------------------------------------------------------------------------
    def _chunk_kv(self, seg: Segmented, chunk: list[int], salt, info: BlendInfo) -> tuple[torch.Tensor, int]:
        """The chunk's KV as cached and the position its first token was computed at, computing it (after
        the prefix, at position len(prefix)) on a miss."""
        info.chunks += 1
        position = len(seg.prefix)
        key = self.engine.blend_key(chunk, salt, prefix=seg.prefix) if self.engine is not None else None
        if key is not None:
            cached = self.engine.get_blend_chunk(key, len(chunk), position=position)
            if cached is not None:
                info.chunk_hits += 1
                info.loaded_bytes += len(chunk) * self.runner.kv_bytes_per_token
                return cached.kv, cached.meta.position
        info.computed_alone += 1
        alone = self.runner.new_kv(position + len(chunk))
        self.runner.forward(seg.prefix + chunk, 0, alone)
        kv = alone.data[:, :, :, position:]
        if key is not None:
            self.engine.put_blend_chunk(key, kv, position=position)
        return kv, position

    def place_chunks(self, seg: Segmented, kv: KVBuffer, salt, info: BlendInfo) -> torch.Tensor:
        """Write every chunk's cached KV into `kv` at its place in this prompt, keys rotated from the
        position they were computed at to the new one; the mask of chunk tokens."""
        runner = self.runner
        chunk_mask = torch.zeros(len(seg.token_ids), dtype=torch.bool)
        for start, end in self._cached_spans(seg):
            chunk_mask[start:end] = True
            cached, computed_at = self._chunk_kv(seg, seg.token_ids[start:end], salt, info)
            cached = cached.to(runner.device)
            for layer in range(runner.num_layers):
                kv.data[layer, 0, :, start:end] = runner.rerotate(cached[layer, 0], start - computed_at, layer)
                kv.data[layer, 1, :, start:end] = cached[layer, 1]
        return chunk_mask

    # -- the blended prefill -------------------------------------------------------------------------------
    def prefill(self, seg: Segmented, kv: KVBuffer, salt: str | None = None) -> tuple[torch.Tensor, BlendInfo]:
        runner, info = self.runner, BlendInfo()
        chunk_mask = self.place_chunks(seg, kv, salt, info)
        info.chunk_tokens = int(chunk_mask.sum())
        self.metrics.blend_lookups.inc(info.chunks)
        self.metrics.blend_hits.inc(info.chunk_hits)
        checks = dict(zip(self.check_layers, self.ratios, strict=True))
        is_chunk = chunk_mask.to(runner.device)  # of the tokens still computed

        def select(layer: int, hidden: torch.Tensor, positions: torch.Tensor, rope: dict) -> torch.Tensor | None:
            # Fresh K and V of every active token (projections only: cheap), compared with the cached
            # ones; the full layer then runs only for the tokens that stay active. The others keep their
            # fresh K and V at this layer and their cached KV above it.
            nonlocal is_chunk
            ratio = checks.get(layer)
            if ratio is None or not info.chunk_tokens:
                return None
            cached = kv.data[layer, :, :, positions[is_chunk]].clone()
            runner.write_kv(layer, hidden, positions, kv, rope)
            keep = self._select(kv.data[layer, :, :, positions[is_chunk]], cached, is_chunk, ratio, info)
            is_chunk = is_chunk[keep]
            return keep

        logits = runner.forward(seg.token_ids, 0, kv, select_tokens=select)
        info.recomputed_tokens = int(is_chunk.sum())
        info.reused_tokens = info.chunk_tokens - info.recomputed_tokens
        return logits, info

    @staticmethod
    def _cached_spans(seg: Segmented) -> list[tuple[int, int]]:
        """Each chunk together with the separator after it: the separator is the same after every chunk,
        so it is cached with the chunk instead of being recomputed in every layer of every request."""
        spans, layout = [], seg.layout()
        for k, (kind, start, end) in enumerate(layout):
            if kind == "chunk":
                if k + 1 < len(layout) and layout[k + 1][0] == "sep":
                    end = layout[k + 1][2]
                spans.append((start, end))
        return spans

    def _select(self, fresh, cached, is_chunk, ratio: float, info: BlendInfo) -> torch.Tensor:
        """Indices (into the active tokens) that stay active: every non-chunk token, plus the chunk tokens
        with the largest KV deviation, `ratio` of all chunk tokens."""
        fresh, cached = fresh.float(), cached.float()  # [2, heads, chunk tokens, dim]
        energy = cached.pow(2).mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
        deviation = ((fresh - cached).pow(2) / energy).sum(dim=(0, 1, 3))  # per chunk token
        budget = min(len(deviation), math.ceil(ratio * info.chunk_tokens))
        chosen = torch.topk(deviation, budget).indices if budget else deviation.new_empty(0, dtype=torch.long)
        keep_chunk = torch.zeros(len(deviation), dtype=torch.bool, device=deviation.device)
        keep_chunk[chosen] = True
        keep = ~is_chunk.clone()
        keep[is_chunk] = keep_chunk
        info.selected_per_check.append(budget)
        return keep.nonzero().view(-1)
