"""KVShelfConnector: kvshelf's tiers and codecs behind vLLM v1's KV connector interface.

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KVShelfConnector",
        "kv_connector_module_path": "kvshelf.integrations.vllm", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute", "kv_connector_extra_config": {"local_disk": "/var/cache/kv"}}'

The scheduler half answers how many prompt tokens kvshelf holds and plans each step's loads and saves;
the worker half owns kvshelf's engine and moves KV between vLLM's paged blocks and kvshelf chunks
(worker.py). The scheduler asks the worker's engine directly when both share a process, and over the
worker's lookup socket when vLLM runs them apart (lookup.py).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvshelf.assembly.engine import min_cached_tokens
from kvshelf.errors import ConfigError
from kvshelf.integrations.vllm.blending import BlendWorker, check_blend_settings, start_blending
from kvshelf.integrations.vllm.lookup import LookupClient, LookupServer, engine_paths, read_key
from kvshelf.integrations.vllm.prompt_documents import keeps_every_token
from kvshelf.integrations.vllm.published import PublishedLayers, publishes_layers
from kvshelf.integrations.vllm.scheduler import LoadSpec, SaveSpec, SchedulerSide, StepPlan, least_hit, role_flags
from kvshelf.integrations.vllm.shared import (
    acquire_engine,
    connector_config,
    model_folder,
    owned_by,
    release_engine,
    shares_tiers,
    stores_shard,
    vllm_fingerprint,
)
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

# Worker halves of this process by vLLM engine id: the scheduler half looks up in-process when its
# worker lives here (single-process engines), over the worker's socket otherwise.
_workers: dict[str, WorkerSide] = {}
_blends: dict[str, BlendWorker] = {}  # their CacheBlend halves, when enable_blending is on


def compute_missing_documents() -> int:
    """Compute and store now the documents this process's connectors found missing (vLLM computes them one
    per step otherwise). Only while an in-process engine is idle, e.g. between `LLM.generate` calls."""
    return sum(blend.compute_pending() for blend in list(_blends.values()))


def lookup_id(engine_id: str, rank: int) -> str:
    """The name of a tensor-parallel rank's lookup socket (rank 0 keeps the engine id: TP=1 unchanged)."""
    return engine_id if rank == 0 else f"{engine_id}#tp{rank}"


def connector_stats() -> dict:
    """Counters summed over this process's kvshelf connectors (worker side)."""
    total: dict[str, int] = {}
    for name_of, worker in _workers.items():
        counters = worker.stats.as_dict()
        if (blend := _blends.get(name_of)) is not None:
            counters |= blend.stats
        for name, value in counters.items():
            total[name] = total.get(name, 0) + value
    return total


class _ConnectorCollector:
    """The connectors' own counters on kvshelf's /metrics (metrics_port) as <prefix>vllm_<name>: what
    this process loaded into and saved from vLLM's paged cache (the engine's counters do not show a
    kv_consumer's loads of published layers, nor which loads vLLM had to recompute)."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        for name, value in connector_stats().items():
            yield CounterMetricFamily(self.prefix + "vllm_" + name, f"kvshelf connector: {name}", value=value)


_watched_registries: weakref.WeakSet = weakref.WeakSet()


def _export_connector_stats(metrics) -> None:
    if metrics.registry not in _watched_registries:  # once per registry: the collector sums all workers
        _watched_registries.add(metrics.registry)
        metrics.registry.register(_ConnectorCollector(metrics.prefix))


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
        self._tp_size = vllm_config.parallel_config.tensor_parallel_size
        rank = 0
        if role != KVConnectorRole.SCHEDULER and self._tp_size > 1:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            rank = get_tensor_model_parallel_rank()
        fingerprint = vllm_fingerprint(vllm_config, rank)  # checks the settings in both roles
        # Saves (and blend documents taken from a prompt) read a prompt's KV out of its blocks by the scheduler's
        # block ids: only sound while the blocks keep every token (one full-attention group). vLLM 0.32 turns its
        # hybrid KV manager off for a connector without SupportsHMA (this one), which makes Gemma 3's sliding
        # layers one full-attention group; a model whose every layer slides keeps a sliding-window group, whose
        # blocks outside the window vLLM frees as a prefill advances: then only prompts computed in one step are
        # stored (worker.py) and documents are computed alone. None: built outside vLLM's engine (tests), no KV manager to ask.
        self._keeps_every_token = kv_cache_config is None or keeps_every_token(kv_cache_config)
        if self.config.enable_blending:
            check_blend_settings(vllm_config, self.config)
        self._blend: BlendWorker | None = None
        self._engine_id = str(transfer.engine_id)
        loads, stores = role_flags(transfer.kv_role)  # kv_producer: stores only; kv_consumer: loads only
        self._stores = stores
        self._lookup_id = lookup_id(self._engine_id, rank)
        block_size = vllm_config.cache_config.block_size
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        self._server: LookupServer | None = None
        self._clients: dict[int, LookupClient] = {}
        self.engine = None
        if role == KVConnectorRole.SCHEDULER:
            if transfer.kv_load_failure_policy != "recompute":
                # A cache miss must never fail a request: a chunk that cannot be loaded is recomputed.
                log.warning(
                    "kvshelf: setting kv_load_failure_policy='recompute' (was %r)", transfer.kv_load_failure_policy
                )
                transfer.kv_load_failure_policy = "recompute"
            self._scheduler = SchedulerSide(
                self._lookup,
                block_size=block_size,
                min_cached_tokens=min_cached_tokens(self.config),
                default_salt=self.config.cache_salt,
                loads=loads,
                stores=stores,
            )
        else:
            mc = vllm_config.model_config
            model = model_folder(str(mc.model), mc.revision)
            self.engine = acquire_engine(fingerprint, self.config, model, tp_rank=rank)
            # kv_both stays as it was; a producer publishes layers (unless publish_layers is off), a
            # consumer reads them (see published.py)
            published = None
            if not stores or (not loads and publishes_layers(self.config)):
                published = PublishedLayers(self.engine, wait_s=self.config.published_layer_wait_s)
            self._worker = WorkerSide(
                self.engine,
                block_size=block_size,
                use_layerwise=self.config.use_layerwise,
                use_async_load=self.config.use_async_load,
                buffer_size=self.config.buffer_size,
                metrics=owned_by(self.engine).metrics,
                stores=stores_shard(
                    self._tp_size,
                    vllm_config.model_config.get_total_num_kv_heads(),
                    rank,
                    shared_tier=shares_tiers(self.config),
                ),
                published=published,
                publish=not loads,
                keeps_every_token=self._keeps_every_token,
            )
            if not self._keeps_every_token:
                log.warning(
                    "kvshelf: vLLM's KV cache here has a sliding-window group (%s): only prompts vLLM computes "
                    "whole in one step are stored (vLLM frees the blocks outside the window as a prefill advances)",
                    ", ".join(type(g.kv_cache_spec).__name__ for g in kv_cache_config.kv_cache_groups),
                )
            _export_connector_stats(owned_by(self.engine).metrics)
            self._server = LookupServer.for_engine(self._lookup_id, self._worker.lookup, key=self._configured_key())
            _workers[self._lookup_id] = self._worker

    def _lookup(self, tokens: list[int], salt: str | None) -> int:
        """Tokens every tensor-parallel rank holds (each rank keeps its own head shard): the least hit."""
        return least_hit(self._rank_lookup(rank, tokens, salt) for rank in range(self._tp_size))

    def _rank_lookup(self, rank: int, tokens: list[int], salt: str | None) -> int:
        name = lookup_id(self._engine_id, rank)
        worker = _workers.get(name)
        if worker is not None:  # the worker shares this process (and its CPU tier)
            return worker.lookup(tokens, salt)
        if rank not in self._clients:
            path, key_file = engine_paths(name)
            key = self._configured_key()
            self._clients[rank] = LookupClient(path, key if key is not None else lambda: read_key(key_file))
        return self._clients[rank].lookup(tokens, salt)

    def _configured_key(self) -> bytes | None:
        """A lookup key from the config (extra_config.lookup_key, 64 hex digits), when one is set there;
        otherwise the worker makes one and shares it through a 0600 file."""
        key = self.config.extra_config.get("lookup_key")
        if key is None:
            return None
        try:
            raw = bytes.fromhex(str(key))
        except ValueError:
            raw = b""
        if len(raw) != 32:
            raise ConfigError("extra_config.lookup_key must be 64 hex digits (32 random bytes)")
        return raw

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
        if self.config.enable_blending:
            attention_layers = [context[name] for name in self._worker.names]
            self._blend = start_blending(
                self._vllm_config,
                self.config,
                self.engine,
                self._worker,
                attention_layers,
                stores=self._stores,
                keeps_every_token=self._keeps_every_token,
            )
            _blends[self._lookup_id] = self._blend

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        # Bound before the forward; vLLM calls start_load_kv after it when no load is due this step, so
        # the saves, which collect layers during the forward, are set up here.
        if self._worker is not None and isinstance(connector_metadata, KVShelfConnectorMetadata):
            self._worker.start_saves(connector_metadata.plan())
            if self._blend is not None:
                self._blend.step_started(connector_metadata.saves if self._worker.stores else [])

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVShelfConnectorMetadata)
        plan = meta.plan()
        if self._blend is not None:  # blended regions are computed here, before vLLM's forward
            for spec in (s for s in plan.loads if s.blend):
                self._blend.load(spec)
            plan = StepPlan([s for s in plan.loads if not s.blend], plan.saves)
        self._worker.start_load(plan)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self._worker.wait_layer(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        self._worker.save_layer(layer_name, kv_layer)
        if self._blend is not None and (index := self._worker.index.get(layer_name)) is not None:
            self._blend.save_layer(index, kv_layer)

    def wait_for_save(self) -> None:
        self._worker.finish_loads()
        self._worker.finish_saves()
        if self._blend is not None:
            self._blend.step_finished()

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_failed_blocks() if self._worker is not None else set()

    def shutdown(self) -> None:
        for client in self._clients.values():
            client.close()
        if self._blend is not None:
            _blends.pop(self._lookup_id, None)
        if self._worker is not None:
            self._server.close()
            self._worker.close()
            if _workers.get(self._lookup_id) is self._worker:
                del _workers[self._lookup_id]
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
