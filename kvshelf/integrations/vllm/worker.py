"""The connector's worker side: copy KV between vLLM's paged cache and kvshelf's chunks.

Loads go through kvshelf's layerwise loader (a background thread that stays `buffer_size` layers ahead
when `use_layerwise` and `use_async_load` are on; otherwise everything is loaded before the forward), with
vLLM's paged blocks as the target. A load that fails is never half-used: the blocks from the first token
that could not be loaded onwards are reported to vLLM, which recomputes them.
Saves copy each layer's new KV out right after vLLM computed it (`save_kv_layer`) into the same
layer-by-layer host copies as the HF path (`layerwise.saver.HostChunks`) and hand whole chunks to the
engine at the end of the step, never a chunk with a layer nobody wrote.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from kvshelf.cache.engine import CacheEngine
from kvshelf.integrations.vllm.paged import CacheWriter, PagedLayout, PagedView
from kvshelf.integrations.vllm.published import PublishedLayers
from kvshelf.integrations.vllm.scheduler import LoadSpec, SaveSpec, StepPlan
from kvshelf.kvmath.strided_copy import ChunkRowCopier
from kvshelf.layerwise.loader import LayerLoadError, LayerwiseLoader
from kvshelf.layerwise.saver import HostChunks, IncompleteSaveError
from kvshelf.layerwise.stats import LayerwiseStats
from kvshelf.metrics import Metrics

log = logging.getLogger(__name__)

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def layer_order(names: list[str]) -> list[str]:
    """vLLM's attention layer names ('model.layers.7.self_attn.attn') in model order."""

    def index(name: str) -> int:
        found = _LAYER_INDEX.findall(f".{name}.")
        if not found:
            raise ValueError(f"cannot tell the layer index of KV cache {name!r}")
        return int(found[0])

    ordered = sorted(names, key=index)
    if len({index(n) for n in ordered}) != len(ordered):
        raise ValueError(f"several KV caches share a layer index: {ordered}")
    return ordered


@dataclass
class ConnectorStats:
    load_requests: int = 0
    loaded_tokens: int = 0
    failed_loads: int = 0
    failed_blocks: int = 0
    saved_requests: int = 0
    stored_tokens: int = 0
    # prompts not stored because vLLM's KV manager may have freed blocks of them (a sliding-window group)
    saves_skipped_window: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class PagedTarget:
    """The loader's target for one request: cached tokens land in the request's blocks, in every layer;
    tokens before `skip` (vLLM computed them itself) are not touched."""

    def __init__(self, layers: list[torch.Tensor], view: PagedView):
        self.layers, self.view = layers, view
        self.device = layers[0].device

    def write_layers(self, i: int, j: int, start: int, part: torch.Tensor, *, non_blocking: bool = False) -> None:
        lo = max(start, self.view.start)
        hi = min(start + part.shape[3], self.view.end)
        if lo >= hi:
            return
        for k in range(i, j):
            self.view.scatter(self.layers[k], part[k - i, :, :, lo - start : hi - start], first=lo - self.view.start)

    def row_copier(self, chunks: list[tuple[int, torch.Tensor, int]]) -> ChunkRowCopier | None:
        return None  # paged blocks are not one strided slice: the loader writes layer groups


class _ActiveLoad:
    def __init__(self, spec: LoadSpec, loader: LayerwiseLoader | None, got: int):
        self.spec, self.loader, self.got = spec, loader, got
        self.reported_from: int | None = None  # first token whose blocks went back to vLLM as failed
        self.loader_failed = False  # the loader itself broke: nothing it wrote may be used


class _ActiveSave:
    def __init__(self, spec: SaveSpec, view: PagedView, chunks: HostChunks):
        self.spec, self.view, self.chunks = spec, view, chunks


class WorkerSide:
    def __init__(
        self,
        engine: CacheEngine,
        *,
        block_size: int,
        use_layerwise: bool,
        use_async_load: bool,
        buffer_size: int,
        metrics: Metrics | None = None,
        stores: bool = True,
        published: PublishedLayers | None = None,
        publish: bool = False,
        keeps_every_token: bool = True,
    ):
        self.engine = engine
        # Whether a request's blocks hold every prompt token of every layer until the request ends
        # (prompt_documents.keeps_every_token). Saves read a prompt's KV out of its blocks by the block ids the
        # scheduler handed out; a sliding-window KV group frees (and reuses) the blocks outside the window as
        # a chunked prefill advances (and gives loaded or prefix-cached tokens outside it no block), so with one
        # only a prompt computed whole in one step (`SaveSpec.one_step`) is stored; other saves are counted.
        self.keeps_every_token = keeps_every_token
        self._warned_window = False
        # Disaggregated prefill: a producer publishes each layer as it is computed (`publish`); a consumer
        # loads published layers when the whole chunks are not there yet (`published` without `publish`).
        self.published, self.publish = published, publish and published is not None
        # False on a tensor-parallel rank whose KV heads another rank holds too (replicated heads: the
        # same keys, the same KV): the first of those ranks stores them, every one of them loads.
        self.stores = stores
        self.block_size = block_size
        self.use_layerwise, self.use_async_load, self.buffer_size = use_layerwise, use_async_load, buffer_size
        self.metrics = metrics or Metrics()  # the shelf's
        self.names: list[str] = []
        self.index: dict[str, int] = {}
        self.layers: list[torch.Tensor] = []
        self.layout: PagedLayout | None = None
        self.stats = ConnectorStats()
        self.layer_stats = LayerwiseStats(engine.fingerprint.num_layers)
        self._loads: list[_ActiveLoad] = []
        self._saves: list[_ActiveSave] = []
        self._failed_blocks: set[int] = set()
        self._lock = threading.Lock()
        self.blend_lookup: Callable[[list[int], str | None], int | None] | None = None  # set with CacheBlend on

    # -- set-up ---------------------------------------------------------------------------------------
    def register(self, kv_caches: Mapping[str, torch.Tensor], write: CacheWriter) -> None:
        fp = self.engine.fingerprint
        self.names = layer_order(list(kv_caches))
        if len(self.names) != fp.num_layers:
            raise ValueError(f"vLLM has {len(self.names)} KV cache layers, the model config says {fp.num_layers}")
        self.index = {name: i for i, name in enumerate(self.names)}
        self.layers = [kv_caches[name] for name in self.names]
        dtype = str(self.layers[0].dtype).removeprefix("torch.")
        if dtype != fp.dtype:
            raise ValueError(f"vLLM's KV cache is {dtype}, kvshelf's fingerprint says {fp.dtype}")
        # Block 0 is vLLM's null block: never handed to a request, so probing it disturbs nothing.
        self.layout = PagedLayout.probe(
            write, self.layers[0], block_size=self.block_size, num_heads=fp.num_kv_heads, head_dim=fp.head_dim
        )
        shapes = {tuple(t.shape) for t in self.layers}
        if len(shapes) != 1:
            raise ValueError(f"KV cache layers differ in shape: {sorted(shapes)}")
        log.info(
            "kvshelf connector: %d layers, %d blocks of %d tokens, layout mapped",
            len(self.layers),
            self.layers[0].shape[0],
            self.block_size,
        )

    def lookup(self, tokens: list[int], salt: str | None) -> int:
        """Cached tokens: whole chunks, or on a consumer also a producer's published first layer; with
        CacheBlend on, a prompt holding documents is answered by the blend lookup (blending.py) instead."""
        if self.blend_lookup is not None and (region := self.blend_lookup(tokens, salt)) is not None:
            return region
        hit = self.engine.lookup(tokens, salt)
        if self.published is not None and not self.publish and hit < len(tokens):
            hit = self.published.extend(tokens, salt, hit)
        return hit

    # -- loading --------------------------------------------------------------------------------------
    def start_load(self, plan: StepPlan) -> None:
        for spec in plan.loads:
            self._loads.append(self._open_load(spec))

    def _open_load(self, spec: LoadSpec) -> _ActiveLoad:
        self.stats.load_requests += 1
        try:
            retrieval = self.engine.retrieve_layerwise(spec.tokens, spec.salt, max_tokens=spec.end)
        except Exception as err:
            log.warning("kvshelf: opening cached KV for request %s failed: %s", spec.req_id, err)
            retrieval = None
        got = retrieval.num_tokens if retrieval is not None else 0
        if got < spec.end and self.published is not None and not self.publish:
            try:  # the producer may still be computing: load the layers it publishes as they come
                published = self.published.open(spec.tokens, spec.salt, spec.end, prefix=retrieval)
            except Exception as err:
                log.warning("kvshelf: opening published layers for request %s failed: %s", spec.req_id, err)
                published = None
            if published is not None and published.num_tokens > got:
                retrieval, got = published, published.num_tokens
        load = _ActiveLoad(spec, None, got)
        if got < spec.end:  # evicted or damaged since the scheduler's lookup: vLLM recomputes the rest
            self._fail(load, max(got, spec.start), "not all of it is cached any more")
        if retrieval is None or got <= spec.start:
            return load
        view = self.layout.view(spec.block_ids, spec.start, min(got, spec.end), device=self.layers[0].device)
        self.layer_stats.count(requests=1)
        load.loader = LayerwiseLoader(
            retrieval,
            PagedTarget(self.layers, view),
            buffer_size=self.buffer_size if self.use_layerwise else retrieval.num_layers,
            stats=self.layer_stats,
            use_async_load=self.use_layerwise and self.use_async_load,
            metrics=self.metrics,
        )
        return load

    def fail_load(self, spec: LoadSpec, from_token: int, why: str) -> None:
        """Report a load done elsewhere (CacheBlend) as failed from `from_token`: vLLM recomputes it."""
        self._fail(_ActiveLoad(spec, None, 0), from_token, why)

    def _fail(self, load: _ActiveLoad, from_token: int, why: str) -> None:
        """Report every block of the request holding tokens >= from_token among those meant to load."""
        spec = load.spec
        if load.reported_from is not None and load.reported_from <= from_token:
            return  # already reported
        # This step's KV of the request is computed over blocks that were not loaded: never store it. The
        # scheduler plans the save again once vLLM has recomputed the blocks.
        self._saves = [save for save in self._saves if save.spec.req_id != spec.req_id]
        first = from_token // self.block_size
        last = -(-spec.end // self.block_size)
        blocks = set(spec.block_ids[first:last])
        with self._lock:
            self._failed_blocks |= blocks
        if load.reported_from is None:
            self.stats.failed_loads += 1
            self.metrics.load_failures.labels("vllm").inc()
        load.reported_from = from_token
        self.stats.failed_blocks += len(blocks)
        log.warning(
            "kvshelf: request %s: tokens %d..%d not loaded (%s); vLLM recomputes %d block(s)",
            spec.req_id,
            from_token,
            spec.end,
            why,
            len(blocks),
        )

    def wait_layer(self, name: str) -> None:
        i = self.index.get(name)
        if i is None:
            return
        for load in self._loads:
            if load.loader is None or load.loader_failed:
                continue
            try:
                load.loader.wait(i)
            except LayerLoadError as err:
                load.loader_failed = True
                self._fail(load, load.spec.start, str(err))

    def finish_loads(self) -> None:
        for load in self._loads:
            if load.loader is not None:
                load.loader.close()
                if load.loader.error is not None:
                    load.loader_failed = True
                    self._fail(load, load.spec.start, str(load.loader.error))
                if not load.loader_failed:
                    self.stats.loaded_tokens += min(load.got, load.spec.end) - load.spec.start
        self._loads.clear()

    def take_failed_blocks(self) -> set[int]:
        with self._lock:
            failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    # -- saving ---------------------------------------------------------------------------------------
    def start_saves(self, plan: StepPlan) -> None:
        fp = self.engine.fingerprint
        saves = plan.saves if self.stores else []
        if not self.keeps_every_token and any(not spec.one_step for spec in saves):
            self.stats.saves_skipped_window += sum(not spec.one_step for spec in saves)
            saves = [spec for spec in saves if spec.one_step]
            if not self._warned_window:
                self._warned_window = True
                log.warning(
                    "kvshelf: a prompt vLLM computed in several steps (or partly loaded) is not stored: its KV "
                    "cache group frees blocks outside a sliding window (counted as saves_skipped_window)"
                )
        for spec in saves:
            try:
                keys = self.engine.keys_to_store(spec.tokens, spec.salt)
            except Exception as err:
                log.warning("kvshelf: cannot plan storing request %s: %s", spec.req_id, err)
                continue
            if not keys:
                continue
            lo, hi = keys[0].start, keys[-1].end
            view = self.layout.view(spec.block_ids, lo, hi, device=self.layers[0].device)
            chunks = HostChunks(
                self.engine,
                keys,
                num_layers=fp.num_layers,
                num_kv_heads=fp.num_kv_heads,
                head_dim=fp.head_dim,
                dtype=self.layers[0].dtype,
                pin=self.engine.pin_memory and self.layers[0].is_cuda,
            )
            self._saves.append(_ActiveSave(spec, view, chunks))

    def save_layer(self, name: str, layer: torch.Tensor) -> None:
        i = self.index.get(name)
        if i is None or not self._saves:
            return
        for save in self._saves:
            save.chunks.write_layer(i, save.view.gather(layer), save.view.start, non_blocking=not self.publish)
            if self.publish:  # the host copy is complete (a blocking copy): publish this layer now
                try:
                    self.published.publish(i, save.spec.tokens, save.spec.salt, save.chunks.keys, save.chunks.hosts)
                except Exception as err:  # a consumer then waits, and computes the prompt itself
                    log.warning("kvshelf: publishing layer %d of request %s failed: %s", i, save.spec.req_id, err)

    def finish_saves(self) -> None:
        if not self._saves:
            return
        if self.layers and self.layers[0].is_cuda:
            torch.cuda.current_stream(self.layers[0].device).synchronize()  # host copies complete
        for save in self._saves:
            try:
                stored = save.chunks.store()
            except IncompleteSaveError as err:  # never store a chunk with layers nobody wrote
                log.warning("kvshelf: not storing request %s: %s", save.spec.req_id, err)
                continue
            except Exception as err:
                log.warning("kvshelf: storing request %s failed: %s", save.spec.req_id, err)
                continue
            self.stats.saved_requests += 1
            self.stats.stored_tokens += stored
        self._saves.clear()

    def close(self) -> None:
        self.finish_loads()
        self._saves.clear()
