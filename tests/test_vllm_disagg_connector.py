"""The vLLM connector façade's wiring of kv_role and tensor-parallel ranks, with a fake vLLM config (no
vLLM engine): ranks' engines and lookup sockets, the scheduler's least hit, the roles."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_vllm_connector import BS, DIM, LAYERS, request
from test_vllm_disagg import fake_vllm_config

from kvshelf.errors import ConfigError


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"fake weights")
    return folder


# -- the connector façade's wiring (roles, ranks), with a fake vLLM config --------------------------------
def connector_config_for(model_dir, *, role: str, total_heads: int, tp: int, engine_id: str):
    config = fake_vllm_config(model_dir, total_heads=total_heads, tp=tp)
    config.kv_transfer_config = SimpleNamespace(
        kv_connector_extra_config={"chunk_size": 64},
        engine_id=engine_id,
        kv_role=role,
        kv_load_failure_policy="recompute",
    )
    config.cache_config.block_size = BS
    return config


@pytest.fixture
def connectors(monkeypatch):
    import shutil
    import tempfile

    from vllm.distributed import parallel_state

    from kvshelf.integrations.vllm.connector import KVConnectorRole, KVShelfConnector

    short = tempfile.mkdtemp(prefix="kvs")  # this test's own lookup sockets (a socket path has ~100 bytes)
    monkeypatch.setenv("XDG_RUNTIME_DIR", short)
    made = []

    def make(config, role, rank=0):
        monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_rank", lambda: rank)
        made.append(KVShelfConnector(config, role))
        return made[-1]

    yield make, KVConnectorRole
    for connector in reversed(made):
        connector.shutdown()
    shutil.rmtree(short)


def test_the_connector_wires_tp_ranks_and_the_least_hit(model_dir, connectors):
    make, Role = connectors
    config = connector_config_for(model_dir, role="kv_both", total_heads=2, tp=2, engine_id="tp-test")
    ranks = [make(config, Role.WORKER, rank) for rank in (0, 1)]
    scheduler = make(config, Role.SCHEDULER)
    assert ranks[0].engine is not ranks[1].engine  # one engine per head shard
    assert [r.engine.fingerprint.extra["tp"]["kv_heads"] for r in ranks] == [[0, 1], [1, 2]]
    tokens = list(range(129))
    ranks[0].engine.store(tokens[:128], torch.randn(LAYERS, 2, 1, 128, DIM))
    # rank 1 holds nothing (its own CPU tier here): the scheduler's answer is the least over the ranks
    assert scheduler.get_num_new_matched_tokens(request("a", tokens), 0) == (0, False)
    ranks[1].engine.store(tokens[:128], torch.randn(LAYERS, 2, 1, 128, DIM))
    assert scheduler.get_num_new_matched_tokens(request("b", tokens), 0) == (128, False)


def test_the_connector_stores_a_replicated_head_from_its_first_rank_only(model_dir, connectors, tmp_path, redis_server):
    make, Role = connectors
    config = connector_config_for(model_dir, role="kv_both", total_heads=1, tp=2, engine_id="tp-rep")
    config.kv_transfer_config.kv_connector_extra_config["remote_url"] = redis_server.url
    ranks = [make(config, Role.WORKER, rank) for rank in (0, 1)]
    assert ranks[0].engine.fingerprint == ranks[1].engine.fingerprint  # the same keys
    assert [r._worker.stores for r in ranks] == [True, False]  # rank 1 loads what rank 0 put in Redis
    # CPU and disk tiers only: each rank process has its own view of them (a disk tier's index is the
    # process's), so every rank stores, or rank 1 would never hit
    config = connector_config_for(model_dir, role="kv_both", total_heads=1, tp=2, engine_id="tp-rep-local")
    config.kv_transfer_config.kv_connector_extra_config["local_disk"] = str(tmp_path / "disk")
    assert [make(config, Role.WORKER, rank)._worker.stores for rank in (0, 1)] == [True, True]


def test_the_connector_wires_the_roles(model_dir, connectors):
    make, Role = connectors
    producer_config = connector_config_for(model_dir, role="kv_producer", total_heads=2, tp=1, engine_id="prod")
    producer_worker = make(producer_config, Role.WORKER)
    producer = make(producer_config, Role.SCHEDULER)
    assert producer_worker._worker.publish and producer_worker._worker.published is not None
    tokens = list(range(129))
    producer_worker.engine.store(tokens[:128], torch.randn(LAYERS, 2, 2, 128, DIM))
    assert producer.get_num_new_matched_tokens(request("a", tokens), 0) == (0, False)  # never loads

    consumer_config = connector_config_for(model_dir, role="kv_consumer", total_heads=2, tp=1, engine_id="cons")
    consumer_worker = make(consumer_config, Role.WORKER)
    consumer = make(consumer_config, Role.SCHEDULER)
    assert not consumer_worker._worker.publish and consumer_worker._worker.published is not None
    assert consumer._scheduler.loads and not consumer._scheduler.stores
    both = make(connector_config_for(model_dir, role="kv_both", total_heads=2, tp=1, engine_id="both"), Role.WORKER)
    assert both._worker.published is None

    with pytest.raises(ConfigError, match="kv_role 'kv_sender'"):
        make(connector_config_for(model_dir, role="kv_sender", total_heads=2, tp=1, engine_id="bad"), Role.SCHEDULER)


def test_the_connectors_counters_are_on_kvshelfs_metrics(model_dir, connectors):
    from prometheus_client import generate_latest

    from kvshelf.integrations.vllm.shared import owned_by

    make, Role = connectors
    config = connector_config_for(model_dir, role="kv_consumer", total_heads=2, tp=1, engine_id="metrics")
    worker = make(config, Role.WORKER)
    worker._worker.stats.loaded_tokens += 384
    worker._worker.stats.failed_loads += 1
    page = generate_latest(owned_by(worker.engine).metrics.registry).decode()
    # what a kv_consumer loaded into vLLM's cache (the engine's own counters miss published layers)
    assert "kvshelf_vllm_loaded_tokens_total 384.0" in page
    assert "kvshelf_vllm_failed_loads_total 1.0" in page
