"""The cache engine: lookup, retrieve and store chunked prefix KV. Knows nothing about models or devices.

KV travels as one tensor per chunk, laid out [layers, 2 (K, V), kv_heads, tokens, head_dim], with keys
already rotated for their absolute positions (prefix reuse keeps positions, so nothing is re-rotated).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kvshelf.cache.device_decode import READ_CALLS, READ_LAYERS, READ_PROCESSES, DeviceDecoding
from kvshelf.cache.fingerprint import ModelFingerprint
from kvshelf.cache.keys import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, ChunkKey, chain_root, chunk_keys
from kvshelf.errors import ConfigError
from kvshelf.storage.base import ChunkMeta, OpenedRanges, StorageBackend, StoredChunk
from kvshelf.storage.expect import Expected, expecting
from kvshelf.storage.tier import budget_until, tier_budget_until

log = logging.getLogger(__name__)


@dataclass
class EngineStats:
    lookups: int = 0
    requested_tokens: int = 0
    hit_tokens: int = 0
    stored_tokens: int = 0
    stored_bytes: int = 0
    retrieved_bytes: int = 0
    rejected_chunks: int = 0  # stored objects that failed verification and were deleted
    blend_lookups: int = 0  # position-independent chunk lookups (CacheBlend)
    blend_hits: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Retrieved:
    num_tokens: int
    kv: torch.Tensor | None  # [layers, 2, kv_heads, num_tokens, head_dim] or None on a full miss


def validate_chunk_size(chunk_size: int) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise ConfigError(f"chunk_size must be an integer, got {chunk_size!r}")
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ConfigError(f"chunk_size must be between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE} tokens, got {chunk_size}")
    return chunk_size


class CacheEngine:
    def __init__(
        self,
        fingerprint: ModelFingerprint,
        backend: StorageBackend,
        *,
        chunk_size: int = 256,
        save_unfull_chunk: bool = True,
        pin_memory: bool = True,
    ):
        self.fingerprint = fingerprint
        self._fp_digest = fingerprint.digest()
        self.backend = backend
        self.chunk_size = validate_chunk_size(chunk_size)
        self.save_unfull_chunk = save_unfull_chunk
        # Host copies of GPU KV go to page-locked memory: faster, asynchronous-capable copies back.
        self.pin_memory = pin_memory
        # Streamed device decoding: layers per range read after the first group; 0 reads whole objects
        # (kvshelf.cache.device_decode.read_groups)
        self.read_layers = READ_LAYERS
        # Streamed device decoding: calls the heads, and each layer range of every chunk, are read in (READ_CALLS)
        self.read_calls = READ_CALLS
        # Streamed device decoding: worker processes reading the disk tier's ranges, 0 none (READ_PROCESSES)
        self.read_processes = READ_PROCESSES
        self.stats = EngineStats()
        self._stats_lock = threading.Lock()

    # -- keys -------------------------------------------------------------------------------------
    def keys(self, tokens: Sequence[int], salt: str | None = None) -> list[ChunkKey]:
        return chunk_keys(tokens, self.chunk_size, chain_root(self._fp_digest, salt), include_unfull_chunk=True)

    def _expected_shape(self, num_tokens: int) -> tuple[int, ...]:
        fp = self.fingerprint
        return (fp.num_layers, 2, fp.num_kv_heads, num_tokens, fp.head_dim)

    def _expect(self, num_tokens: int, position: int | None) -> Expected:
        """What a read of this chunk must find; byte tiers check it before decoding (issue #15)."""
        fp = self.fingerprint
        return Expected(
            fp.num_layers,
            fp.num_kv_heads,
            fp.head_dim,
            fp.dtype,
            num_tokens,
            position=position,
            fingerprint=self._fp_digest,
        )

    def _verified(self, key: ChunkKey, chunk, *, position: int | None = None, any_position: bool = False):
        """The chunk (or chunk reader) if it is exactly what this key promises; otherwise delete it and
        report a miss. Its KV must have been computed at RoPE position `position` on (default: key.start,
        where a prefix chunk sits), or anywhere with `any_position`."""
        if chunk is None:
            return None
        meta = chunk.meta
        kv = chunk.kv
        position = key.start if position is None else position
        problem = None
        if meta.fingerprint == b"":  # a byte tier read without this engine's expectation: a bug, not damage
            log.error(
                "chunk %s from %s was read without the engine's expectation; a miss", key.hex(), self.backend.name
            )
            return None
        if meta.fingerprint != self._fp_digest:
            problem = "model fingerprint differs"
        elif meta.num_tokens != key.num_tokens:
            problem = f"holds {meta.num_tokens} tokens, key covers {key.num_tokens}"
        elif meta.position != position and not any_position:
            problem = f"computed at position {meta.position}, key wants {position}"
        elif tuple(meta.shape) != self._expected_shape(key.num_tokens) or (
            kv is not None and tuple(kv.shape) != tuple(meta.shape)
        ):
            problem = f"shape {tuple(meta.shape)} != expected {self._expected_shape(key.num_tokens)}"
        elif (kv is not None and kv.dtype != meta.dtype) or str(meta.dtype).removeprefix(
            "torch."
        ) != self.fingerprint.dtype:
            problem = f"dtype {meta.dtype} != {self.fingerprint.dtype}"
        if problem is None:
            return chunk
        log.warning("rejecting cached chunk %s from %s: %s", key.hex(), self.backend.name, problem)
        self.backend.delete(key.digest)
        with self._stats_lock:
            self.stats.rejected_chunks += 1
        return None

    # -- verbs ------------------------------------------------------------------------------------
    def lookup(self, tokens: Sequence[int], salt: str | None = None) -> int:
        """How many leading tokens of `tokens` have cached KV (chunk granular)."""
        hit = 0
        keys = self.keys(tokens, salt)
        for key, present in zip(keys, self.backend.contains_many([k.digest for k in keys]), strict=True):
            if not present:
                break
            hit = key.end
        return hit

    def plan(self, tokens: Sequence[int], salt: str | None = None, *, max_tokens: int | None = None) -> dict[str, int]:
        """Tokens of the longest cached prefix, per tier that holds them (for deciding whether to load)."""
        limit = len(tokens) if max_tokens is None else min(max_tokens, len(tokens))
        keys = [k for k in self.keys(tokens, salt) if k.start < limit]
        if not keys:
            return {}
        digests = [k.digest for k in keys]
        where = self.backend.locate(digests)
        plan: dict[str, int] = {}
        for key, tier in zip(keys, where, strict=True):
            if tier is None:
                break
            plan[tier] = plan.get(tier, 0) + min(key.end, limit) - key.start
        return plan

    def retrieve_chunks(
        self, tokens: Sequence[int], salt: str | None = None, *, max_tokens: int | None = None
    ) -> Iterator[tuple[ChunkKey, torch.Tensor]]:
        """Yield (key, kv) for the longest cached prefix, stopping at the first miss or at `max_tokens`.

        The last chunk is sliced when `max_tokens` falls inside it. Stats count what was actually yielded.
        """
        limit = len(tokens) if max_tokens is None else min(max_tokens, len(tokens))
        hit = 0
        try:
            for key in self.keys(tokens, salt):
                if key.start >= limit:
                    break
                with expecting(self._expect(key.num_tokens, key.start)):
                    chunk = self._verified(key, self.backend.get(key.digest))
                if chunk is None:
                    break
                kv = chunk.kv
                if key.end > limit:
                    kv = kv[:, :, :, : limit - key.start]
                    key = ChunkKey(key.digest, key.start, limit)
                hit = key.end
                with self._stats_lock:
                    self.stats.retrieved_bytes += kv.numel() * kv.element_size()
                yield key, kv
        finally:
            with self._stats_lock:
                self.stats.lookups += 1
                self.stats.requested_tokens += limit
                self.stats.hit_tokens += hit

    def retrieve_layerwise(
        self, tokens: Sequence[int], salt: str | None = None, *, max_tokens: int | None = None, device=None
    ) -> LayerwiseRetrieval | None:
        """Open the longest cached prefix for layer-by-layer loading; None on a full miss.

        Chunks are fetched and verified now (bytes tiers read their objects), layers decode as the
        caller asks for them, in order, so loading layer i+1 can overlap computing layer i. With `device`,
        where every chunk of the prefix lies in one byte tier whose codec decodes on that device, nothing
        is read now: the loader reads and verifies the chunks' heads and then their layer ranges itself
        (retrieval.device_decoding), so the caller's compute starts at once; a chunk or range that then
        fails makes that request recompute.
        """
        limit = len(tokens) if max_tokens is None else min(max_tokens, len(tokens))
        keys = [k for k in self.keys(tokens, salt) if k.start < limit]
        where = self.backend.locate([k.digest for k in keys]) if keys else []
        present = len(keys) if None not in where else where.index(None)
        streamed = self._streamed(keys[:present], where[:present], limit, device) if device is not None else None
        if streamed is not None:
            opened = streamed.keys
        else:
            opened = []
            for key in keys[:present]:
                with expecting(self._expect(key.num_tokens, key.start)):
                    reader = self._verified(key, self.backend.open(key.digest))
                if reader is None:
                    break
                opened.append((ChunkKey(key.digest, key.start, min(key.end, limit)), reader))
        hit = opened[-1][0].end if opened else 0
        with self._stats_lock:
            self.stats.lookups += 1
            self.stats.requested_tokens += limit
            self.stats.hit_tokens += hit
        if not opened:
            return None
        return LayerwiseRetrieval(opened, self.fingerprint.num_layers, self._stats_lock, self.stats, streamed)

    def _streamed(self, keys: list[ChunkKey], where: list, limit: int, device) -> _Streamed | None:
        """A streamed device-decoding plan for `keys` (all located), or None where the chunks do not all lie in
        one byte tier whose codec decodes on `device`."""
        if not keys or any(w != where[0] for w in where):
            return None
        codec = self.backend.tier_codec(where[0])
        if codec is None or not codec.decodes_on(device):
            return None
        fp = self.fingerprint
        dtype = getattr(torch, fp.dtype)
        used = [(ChunkKey(k.digest, k.start, min(k.end, limit)), None) for k in keys]
        specs = [
            (codec, k.start, u.end, k.start, (2, fp.num_kv_heads, k.num_tokens, fp.head_dim), dtype, fp.num_layers)
            for k, (u, _) in zip(keys, used, strict=True)
        ]
        until = budget_until()  # the request's tier budget, carried to the loader thread that reads
        read_layers, read_calls, processes = self.read_layers, self.read_calls, self.read_processes
        whole = read_layers == 0

        def opener():
            expected = [self._expect(k.num_tokens, k.start) for k in keys]
            with tier_budget_until(until):
                heads = self.backend.open_many(
                    [k.digest for k in keys], expected, tier=where[0], ranges=not whole, calls=read_calls
                )
                try:
                    for key, chunk in zip(keys, heads, strict=False):
                        chunk = self._verified(key, chunk)
                        if whole and chunk is not None:  # read whole: its ranges are cut from it
                            encoded = chunk.encoded_payload()
                            chunk = None if encoded is None else OpenedRanges(chunk.meta, *encoded)
                        yield chunk
                finally:
                    heads.close()

        def fetch(calls: list):
            with tier_budget_until(until):
                reads = self.backend.run_many(calls, tier=where[0])
                try:
                    yield from reads
                finally:
                    reads.close()

        return _Streamed(
            used, DeviceDecoding.streamed(specs, device, opener, fetch, read_layers, read_calls, processes)
        )

    def retrieve(self, tokens: Sequence[int], salt: str | None = None, *, max_tokens: int | None = None) -> Retrieved:
        parts = [kv for _, kv in self.retrieve_chunks(tokens, salt, max_tokens=max_tokens)]
        if not parts:
            return Retrieved(0, None)
        kv = torch.cat(parts, dim=3) if len(parts) > 1 else parts[0]
        return Retrieved(kv.shape[3], kv)

    def store(self, tokens: Sequence[int], kv: torch.Tensor, salt: str | None = None, *, start: int = 0) -> int:
        """Store the chunks of `tokens` whose KV is in `kv`; return how many tokens were newly stored.

        `kv` is [layers, 2, kv_heads, T, head_dim] on any device, covering tokens[0:T] (T may exceed
        len(tokens)); chunks ending at or before `start`, and chunks already cached, are skipped.
        """
        if kv.dim() != 5 or kv.shape[3] < len(tokens):
            raise ValueError(f"kv must be [layers, 2, heads, >= {len(tokens)} tokens, dim], got {tuple(kv.shape)}")
        expected = self._expected_shape(kv.shape[3])
        if tuple(kv.shape) != expected:
            raise ValueError(f"kv shape {tuple(kv.shape)} does not match the model fingerprint {expected}")
        keys = self.keys_to_store(tokens, salt, start=start)
        hosts = [self._to_host(kv[:, :, :, key.start : key.end]) for key in keys]
        return self.put_chunks(keys, hosts)

    def keys_to_store(self, tokens: Sequence[int], salt: str | None = None, *, start: int = 0) -> list[ChunkKey]:
        """Chunks of `tokens` ending after `start` that no tier holds yet (partial ones only if configured)."""
        keys = [k for k in self.keys(tokens, salt) if k.end > start]
        if not self.save_unfull_chunk:
            keys = [k for k in keys if k.num_tokens == self.chunk_size]
        present = self.backend.contains_many([k.digest for k in keys]) if keys else []
        return [k for k, already in zip(keys, present, strict=True) if not already]

    def _to_host(self, piece: torch.Tensor) -> torch.Tensor:
        """A CPU copy of `piece` to keep: pinned when it comes from a GPU (fast copies back)."""
        host = torch.empty(piece.shape, dtype=piece.dtype, device="cpu", pin_memory=self.pin_memory and piece.is_cuda)
        return host.copy_(piece)

    def put_chunks(self, keys: list[ChunkKey], hosts: list[torch.Tensor], *, position: int = 0) -> int:
        """Store host tensors [layers, 2, heads, key.num_tokens, dim] under their keys; tokens stored.
        Each chunk's KV was computed at RoPE positions from `key.start + position` on."""
        stored_tokens = stored_bytes = 0
        for key, host in zip(keys, hosts, strict=True):
            meta = ChunkMeta(self._fp_digest, key.num_tokens, tuple(host.shape), host.dtype, key.start + position)
            chunk = StoredChunk(meta, host)
            if self.backend.put(key.digest, chunk):
                stored_tokens += key.num_tokens
                stored_bytes += chunk.nbytes
        with self._stats_lock:
            self.stats.stored_tokens += stored_tokens
            self.stats.stored_bytes += stored_bytes
        return stored_tokens

    # -- position-independent chunks (CacheBlend) -------------------------------------------------
    def blend_key(
        self, tokens: Sequence[int], salt: str | None = None, *, prefix: Sequence[int] = (), in_prompt: bool = False
    ) -> bytes:
        """Key of a chunk's KV computed on its own after `prefix` (the BOS; its first token then sits at
        position len(prefix)): depends on its tokens and that context, not on what precedes it in a prompt.
        `in_prompt`: the key of the chunk's KV as some earlier prompt computed it (after `prefix` and whatever
        came before it there, at the position it had there): another cache of the same tokens."""
        ids = np.asarray(tokens, dtype="<i8")
        before = np.asarray(prefix, dtype="<i8")
        h = hashlib.blake2b(digest_size=16, person=b"kvshelf-blend")
        h.update(chain_root(self._fp_digest, salt))
        if in_prompt:
            h.update(b"in-prompt")
        h.update(len(before).to_bytes(4, "little"))
        h.update(before.tobytes())
        h.update(len(ids).to_bytes(4, "little"))
        h.update(ids.tobytes())
        return h.digest()

    def get_blend_chunk(self, key: bytes, num_tokens: int, *, position: int | None = 0) -> StoredChunk | None:
        """The chunk under a blend key, if its KV was computed at `position` (where its key says); None: at
        whatever position its header names (an in-prompt key: the reader re-rotates from there)."""
        with expecting(self._expect(num_tokens, position)):
            chunk = self._verified(
                ChunkKey(key, 0, num_tokens), self.backend.get(key), position=position, any_position=position is None
            )
        with self._stats_lock:
            self.stats.blend_lookups += 1
            if chunk is not None:
                self.stats.blend_hits += 1
                self.stats.retrieved_bytes += chunk.nbytes
        return chunk

    def put_blend_chunk(self, key: bytes, kv: torch.Tensor, position: int = 0) -> bool:
        """Store a chunk's KV computed on its own, its first token at RoPE position `position`."""
        if tuple(kv.shape) != self._expected_shape(kv.shape[3]):
            raise ValueError(f"kv shape {tuple(kv.shape)} does not match the model fingerprint")
        return self.put_chunks([ChunkKey(key, 0, kv.shape[3])], [self._to_host(kv)], position=position) > 0

    def clear(self) -> None:
        self.backend.clear()

    def close(self) -> None:
        self.backend.close()


@dataclass
class _Streamed:
    keys: list  # (ChunkKey, None): located, not read yet
    decoding: DeviceDecoding


class LayerwiseRetrieval:
    """The cached prefix of one request, readable one layer at a time (all chunks of layer i together)."""

    def __init__(
        self,
        chunks: list,
        num_layers: int,
        stats_lock: threading.Lock,
        stats: EngineStats,
        streamed: _Streamed | None = None,
    ):
        self.chunks = chunks  # (ChunkKey, reader); readers are None while streamed (the loader reads them)
        self.num_layers = num_layers
        self.num_tokens = chunks[-1][0].end
        self._stats_lock, self._stats = stats_lock, stats
        self._streamed = streamed

    def in_memory(self) -> list[tuple[int, torch.Tensor, int]] | None:
        """(first token, whole chunk tensor, tokens used) when every chunk is already a tensor in memory
        (the CPU tier), for loaders that copy straight from it; None when some chunk needs decoding."""
        if self._streamed is not None:
            return None
        out = []
        for key, reader in self.chunks:
            kv = reader.kv
            if not isinstance(kv, torch.Tensor):
                return None
            out.append((key.start, kv, key.num_tokens))
        return out

    def device_decoding(self, device) -> DeviceDecoding | None:
        """A plan to decode every chunk on `device` itself, group of layers by group (where the chunks' codec
        decodes there: calibrated cachegen on a CUDA GPU); None where they decode on the CPU. A streamed
        retrieval (not read yet) has its plan already, for the device it was made for."""
        if self._streamed is not None:
            if torch.device(device) != self._streamed.decoding.device:
                raise ValueError(f"this retrieval streams onto {self._streamed.decoding.device}, not {device}")
            return self._streamed.decoding
        return DeviceDecoding.plan(self.chunks, device)

    def count_retrieved(self, nbytes: int) -> None:
        with self._stats_lock:
            self._stats.retrieved_bytes += nbytes

    def layer_parts(self, i: int, j: int | None = None) -> list[tuple[int, int, torch.Tensor]]:
        """Layers i..j-1 (default: layer i alone) chunk by chunk, without concatenating:
        (start, end, [j - i, 2, kv_heads, end - start, head_dim])."""
        if self._streamed is not None:
            raise RuntimeError("a streamed retrieval decodes on its device only (device_decoding)")
        j = i + 1 if j is None else j
        parts = []
        for key, reader in self.chunks:
            part = reader.layers(i, j)[:, :, :, : key.num_tokens]
            parts.append((key.start, key.end, part))
        with self._stats_lock:
            self._stats.retrieved_bytes += sum(p.numel() * p.element_size() for _, _, p in parts)
        return parts
