"""Layerwise prefill: the cached prefix is loaded layer by layer behind the compute, and the new chunks
are stored layer by layer behind it (kvshelf.layerwise). A load that fails mid-way is recomputed from
scratch: never partial KV."""

from __future__ import annotations

import logging
import time

from kvshelf.generation.outcome import PrefillOutcome, PrefillRequest
from kvshelf.layerwise.loader import LayerLoadError, LayerwiseLoader, prioritized
from kvshelf.layerwise.saver import LayerwiseSaver
from kvshelf.layerwise.stats import LayerwiseStats
from kvshelf.metrics import Metrics
from kvshelf.model.kv_buffer import KVBuffer
from kvshelf.model.runner import ModelRunner

log = logging.getLogger(__name__)


class LayerwisePrefill:
    def __init__(
        self,
        runner: ModelRunner,
        *,
        buffer_size: int,
        use_async_load: bool,
        layerwise_store: bool,
        stats: LayerwiseStats,
        metrics: Metrics,
    ):
        self.runner = runner
        self.buffer_size, self.use_async_load, self.layerwise_store = buffer_size, use_async_load, layerwise_store
        self.stats, self.metrics = stats, metrics

    def prefill(self, request: PrefillRequest, kv: KVBuffer) -> PrefillOutcome:
        engine, ids, salt = request.engine, request.ids, request.salt
        if engine is None:
            raise ValueError("a layerwise prefill needs a cache engine")
        t0 = time.perf_counter()
        loader_s0 = sum(self.stats.load_s)
        retrieval = (
            # device: where the chunks decode on the KV's device, the loader reads them (the compute starts now)
            engine.retrieve_layerwise(ids, salt, max_tokens=len(ids) - 1, device=kv.device) if request.load else None
        )
        hit = retrieval.num_tokens if retrieval is not None else 0
        t1 = time.perf_counter()
        saver = LayerwiseSaver(engine, ids, salt, hit, kv) if self.layerwise_store else None
        log.debug("layerwise: opened %d cached tokens in %.1f ms", hit, (t1 - t0) * 1e3)
        on_layer = saver.on_layer if saver is not None else None
        try:
            if retrieval is None:  # planned but nothing opened in time still counts as a load tried
                t2 = time.perf_counter()
                logits = self.runner.forward(ids, 0, kv, layer_hook=on_layer)
                load_s = (t1 - t0) if request.load else None
                return PrefillOutcome(logits, load_s=load_s, compute_s=time.perf_counter() - t2, saver=saver)
            self.stats.count(requests=1)
            failed: LayerLoadError | None = None
            with prioritized(kv.device):  # the forward's kernels before the loader's decode kernels
                loader = LayerwiseLoader(
                    retrieval,
                    kv,
                    buffer_size=self.buffer_size,
                    stats=self.stats,
                    use_async_load=self.use_async_load,
                    metrics=self.metrics,
                    decoding=retrieval.device_decoding(kv.device),  # cachegen on a GPU: decoded there
                )
                t2 = time.perf_counter()
                try:
                    logits = self.runner.forward(ids[hit:], hit, kv, layer_pre_hook=loader.wait, layer_hook=on_layer)
                except LayerLoadError as err:
                    failed = err
                finally:
                    loader.close()  # once, before anything else writes this KV
            load_s = (t1 - t0) + sum(self.stats.load_s) - loader_s0
        except BaseException:
            if saver is not None:
                saver.abort()
            raise
        if failed is None:
            return PrefillOutcome(
                logits,
                hit_tokens=hit,
                loaded_bytes=hit * kv.token_nbytes,
                load_s=load_s,
                compute_s=time.perf_counter() - t2,
                saver=saver,
            )
        log.warning("layerwise load failed (%s): recomputing the whole prompt", failed)
        self.stats.count(fallbacks=1)
        if saver is not None:
            saver.abort()
        t2 = time.perf_counter()
        logits = self.runner.forward(ids, 0, kv)  # stored whole, after the first token
        return PrefillOutcome(logits, load_s=load_s, compute_s=time.perf_counter() - t2)
