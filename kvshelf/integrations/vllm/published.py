"""Layer-by-layer publication of a prefill instance's KV (disaggregated prefill, vLLM kv_role).

A producer (kv_producer) publishes layer i of each new chunk of a prompt as soon as vLLM has computed
layer i (`save_kv_layer`), under that layer's own key; at the end of the step it stores the whole chunks
as every instance does. A consumer (kv_consumer) that finds the whole chunks loads them as usual; one that
finds only published layers (the producer is still computing) loads those, each layer when the loader
needs it, waiting for layers not yet published up to a deadline: transfer overlaps the producer's prefill.

The per-layer objects go through the same tier stack, codecs and checks as whole chunks: layer i of a
model is stored as the one layer of a one-layer "model" whose fingerprint names the real model's
fingerprint and the layer index, so a layer object can never be read as anything else (a different
key), and the presence of a layer's chunk object is its completion marker. A layer that does not come in
time fails the load: its blocks are recomputed by vLLM, as for any chunk that cannot be loaded.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import torch

from kvshelf.cache.engine import CacheEngine
from kvshelf.cache.fingerprint import ModelFingerprint
from kvshelf.cache.keys import ChunkKey
from kvshelf.config import KVShelfConfig
from kvshelf.errors import ConfigError


def cachegen_tiers(config: KVShelfConfig) -> list[str]:
    """Tiers that code with cachegen: its bits per layer and calibrated transforms depend on the layer's
    index, which a one-layer object does not carry (it would be coded as layer 0 of 1)."""
    tiers = []
    if config.local_disk and config.local_disk_codec == "cachegen":
        tiers.append("local_disk")
    if config.remote_url and config.remote_serde == "cachegen":
        tiers.append("remote")
    return tiers


def publishes_layers(config: KVShelfConfig) -> bool:
    """Whether a kv_producer publishes layers: `publish_layers`, by default on unless a tier codes with
    cachegen (then whole chunks only); asking for it with a cachegen tier is refused."""
    coded = cachegen_tiers(config)
    if config.publish_layers and coded:
        raise ConfigError(
            f"publish_layers needs a tier codec other than cachegen ({', '.join(coded)} codes with cachegen, "
            "whose bits depend on the layer index); set publish_layers: false or use int8/none there"
        )
    return not coded if config.publish_layers is None else config.publish_layers


class LayerNotPublished(RuntimeError):
    """The producer did not publish a layer within the wait: the load fails, vLLM recomputes."""


def layer_fingerprint(fp: ModelFingerprint, layer: int) -> ModelFingerprint:
    """The namespace of layer `layer` of `fp`'s chunks: one layer, tied to the whole model's fingerprint."""
    if not 0 <= layer < fp.num_layers:
        raise ValueError(f"layer {layer} is outside 0..{fp.num_layers - 1}")
    return dataclasses.replace(fp, num_layers=1, extra={**fp.extra, "published_layer": [layer, fp.hex()]})


class PublishedLayers:
    """One engine per layer over the whole engine's tiers (never closed here: the tiers are the engine's)."""

    def __init__(self, engine: CacheEngine, *, wait_s: float = 10.0, poll_s: float = 0.005):
        self.engine, self.wait_s, self.poll_s = engine, wait_s, poll_s
        fp = engine.fingerprint
        self.num_layers = fp.num_layers
        self.layers = [
            CacheEngine(
                layer_fingerprint(fp, i),
                engine.backend,
                chunk_size=engine.chunk_size,
                save_unfull_chunk=engine.save_unfull_chunk,
                pin_memory=engine.pin_memory,
            )
            for i in range(fp.num_layers)
        ]

    def publish(
        self, layer: int, tokens: Sequence[int], salt: str | None, keys: list[ChunkKey], hosts: list[torch.Tensor]
    ) -> int:
        """Store layer `layer` of the chunks `keys` (host copies [layers, 2, heads, tokens, dim], that layer
        written) under the layer's keys; returns the tokens published."""
        eng = self.layers[layer]
        by_start = {k.start: k for k in eng.keys(tokens, salt)}  # same chunk size: the same boundaries
        mine = [by_start[k.start] for k in keys]
        # A copy of the one layer: the host buffer goes on being written (and is stored whole later).
        return eng.put_chunks(mine, [host[layer : layer + 1].clone() for host in hosts])

    def extend(self, tokens: Sequence[int], salt: str | None, start: int) -> int:
        """End of the run of chunks from token `start` (a chunk boundary: where the whole chunks end) whose
        first layer is published (the producer is under way; later layers may follow)."""
        eng = self.layers[0]
        keys = [k for k in eng.keys(tokens, salt) if k.start >= start]
        hit = start
        for key, here in zip(keys, eng.backend.contains_many([k.digest for k in keys]) if keys else [], strict=True):
            if not here:
                break
            hit = key.end
        return hit

    def lookup(self, tokens: Sequence[int], salt: str | None = None) -> int:
        """Tokens held as whole chunks, then as published layers."""
        return self.extend(tokens, salt, self.engine.lookup(tokens, salt))

    def open(self, tokens: Sequence[int], salt: str | None, end: int, prefix=None) -> PublishedRetrieval | None:
        """A loader source for tokens [0, end) of `tokens`: the whole chunks of `prefix` (an opened
        `LayerwiseRetrieval`, or None), then published layers; None if no layer follows the prefix."""
        start = prefix.num_tokens if prefix is not None else 0
        tokens = list(tokens[:end])
        got = self.extend(tokens, salt, start)
        if got <= start:
            return None
        return PublishedRetrieval(self, tokens[:got], salt, start, prefix, deadline=time.monotonic() + self.wait_s)


class PublishedRetrieval:
    """What `layerwise.LayerwiseLoader` reads (like `cache.engine.LayerwiseRetrieval`): layer i of the
    request's whole chunks (the prefix), then of its published chunks, each read when the loader asks for
    it after waiting for the producer to publish it (until one deadline for the whole load)."""

    def __init__(
        self, published: PublishedLayers, tokens: list[int], salt: str | None, start: int, prefix, *, deadline: float
    ):
        self.published, self.tokens, self.salt, self.start = published, tokens, salt, start
        self.prefix, self.deadline = prefix, deadline
        self.num_layers = published.num_layers
        self.num_tokens = len(tokens)

    def in_memory(self) -> None:
        return None  # read layer by layer, never as whole chunks

    def count_retrieved(self, nbytes: int) -> None:
        pass  # each engine counts what it reads

    def _layer(self, i: int) -> list[tuple[int, int, torch.Tensor]]:
        eng = self.published.layers[i]
        keys = [k for k in eng.keys(self.tokens, self.salt) if k.start >= self.start]
        while not all(eng.backend.contains_many([k.digest for k in keys])):
            if time.monotonic() >= self.deadline:
                raise LayerNotPublished(
                    f"layer {i} of tokens {self.start}..{self.num_tokens} was not published within "
                    f"{self.published.wait_s} s"
                )
            time.sleep(self.published.poll_s)
        parts = []
        for key in keys:  # read and checked like any chunk: fingerprint (model and layer), tokens, position
            chunk = eng.get_blend_chunk(key.digest, key.num_tokens, position=key.start)
            if chunk is None:  # evicted or damaged between the check and the read
                raise LayerNotPublished(f"layer {i}: tokens {key.start}..{key.end} could not be read")
            parts.append((key.start, key.end, chunk.kv))
        return parts

    def layer_parts(self, i: int, j: int | None = None) -> list[tuple[int, int, torch.Tensor]]:
        """Layers i..j-1 chunk by chunk: (start, end, [j - i, 2, heads, end - start, dim])."""
        j = i + 1 if j is None else j
        parts = self.prefix.layer_parts(i, j) if self.prefix is not None else []
        per_layer = [self._layer(k) for k in range(i, j)]
        parts += [
            (pieces[0][0], pieces[0][1], torch.cat([kv for _, _, kv in pieces], dim=0))
            for pieces in zip(*per_layer, strict=True)
        ]
        return parts
