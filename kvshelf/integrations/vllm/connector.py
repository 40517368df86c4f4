"""KVShelfConnector: kvshelf's tiers and codecs behind vLLM v1's KV connector interface.

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KVShelfConnector",
        "kv_connector_module_path": "kvshelf.integrations.vllm", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute", "kv_connector_extra_config": {"local_disk": "/var/cache/kv"}}'

The scheduler half answers how many prompt tokens kvshelf holds and plans each step's loads and saves;
the worker half moves KV between vLLM's paged blocks and kvshelf chunks (worker.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvshelf.integrations.vllm.scheduler import LoadSpec, SaveSpec, SchedulerSide, StepPlan
from kvshelf.integrations.vllm.shared import acquire_engine, connector_config, release_engine, vllm_fingerprint
from kvshelf.integrations.vllm.worker import WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

# Worker halves of this process, for `connector_stats()` (tests, benchmarks, the stats endpoint).
_workers: list[WorkerSide] = []


def connector_stats() -> dict:
    """Counters summed over this process's kvshelf connectors (worker side)."""
    total: dict[str, int] = {}
    for worker in _workers:
        for name, value in worker.stats.as_dict().items():
            total[name] = total.get(name, 0) + value
    return total


@dataclass
class KVShelfConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)

    def plan(self) -> StepPlan:
        return StepPlan(self.loads, self.saves)


class KVShelfConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        transfer = vllm_config.kv_transfer_config
        self.config = connector_config(transfer.kv_connector_extra_config)
        self.engine = acquire_engine(vllm_fingerprint(vllm_config), self.config)
        block_size = vllm_config.cache_config.block_size
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            if transfer.kv_load_failure_policy != "recompute":
                # A cache miss must never fail a request: a chunk that cannot be loaded is recomputed.
                log.warning(
                    "kvshelf: setting kv_load_failure_policy='recompute' (was %r)", transfer.kv_load_failure_policy
                )
                transfer.kv_load_failure_policy = "recompute"
            self._scheduler = SchedulerSide(
                self.engine,
                block_size=block_size,
                min_tokens=self.config.min_cached_tokens or self.config.chunk_size,
                default_salt=self.config.cache_salt,
            )
        else:
            self._worker = WorkerSide(
                self.engine,
                block_size=block_size,
                layerwise=self.config.use_layerwise,
                async_load=self.config.use_async_load,
                buffer_layers=self.config.buffer_size,
            )
            _workers.append(self._worker)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a dropped save is only a future miss

    # -- worker side ------------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        context = self._vllm_config.compilation_config.static_forward_context
        first = next(iter(kv_caches))
        attention = context[first]

        def write(key, value, cache, slots):
            attention.impl.do_kv_cache_update(attention, key, value, cache, slots)

        self._worker.register(kv_caches, write)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        # Bound before the forward; vLLM calls start_load_kv after it when no load is due this step, so
        # the saves, which collect layers during the forward, are set up here.
        if self._worker is not None and isinstance(connector_metadata, KVShelfConnectorMetadata):
            self._worker.start_saves(connector_metadata.plan())

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVShelfConnectorMetadata)
        self._worker.start_load(meta.plan())

    def wait_for_layer_load(self, layer_name: str) -> None:
        self._worker.wait_layer(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        self._worker.save_layer(layer_name, kv_layer)

    def wait_for_save(self) -> None:
        self._worker.finish_loads()
        self._worker.finish_saves()

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_failed_blocks() if self._worker is not None else set()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()
            if self._worker in _workers:
                _workers.remove(self._worker)
        release_engine(self.engine)

    # -- scheduler side ---------------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._scheduler.num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        self._scheduler.after_alloc(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        plan = self._scheduler.build_plan(scheduler_output)
        return KVShelfConnectorMetadata(plan.loads, plan.saves)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        if connector_output.invalid_block_ids:
            self._scheduler.blocks_failed(set(connector_output.invalid_block_ids))

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._scheduler.finished(request.request_id)
        return False, None
