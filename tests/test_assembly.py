"""The assembly (issue #14): per-tier codec specs, one table of URL schemes, runtimes that refuse keys
they ignore, and shelves that own their state (two in one process do not interfere)."""

import pytest
from helpers import key, make_chunk

from kvshelf.assembly import Owned, check_runtime, open_engine
from kvshelf.assembly.tiers import build_tiers
from kvshelf.cache.fingerprint import ModelFingerprint
from kvshelf.config import KVShelfConfig, load_config
from kvshelf.errors import ConfigError
from kvshelf.storage.urls import REMOTE_SCHEMES


def test_a_cachegen_remote_with_six_bits_is_accepted_without_a_disk_tier(redis_server):
    """The bug: the int8 check looked at the disk codec (int8 by default) although there was no disk tier."""
    cfg = load_config(
        environ={},
        overrides={"remote_url": redis_server.url, "remote_serde": "cachegen", "quantization_bits": 6},
    )
    assert cfg.tier_codecs()["remote"].level == 6 and "disk" not in cfg.tier_codecs()
    tiers = build_tiers(cfg.model_copy(update={"codec_calibration": "off"}))
    try:
        codec = tiers.tiers[-1].backend.codec
        assert codec.name == "cachegen" and codec.bits == 6
    finally:
        tiers.close()


def test_levels_apply_per_tier_and_a_level_an_int8_tier_cannot_use_is_refused(tmp_path):
    both = {"local_disk": str(tmp_path), "remote_url": "redis://h:1", "remote_serde": "cachegen"}
    cfg = load_config(environ={}, overrides={**both, "quantization_bits": 6})  # reaches the cachegen tier only
    assert cfg.tier_codecs()["disk"].level is None and cfg.tier_codecs()["remote"].level == 6
    nested = {**both, "local_disk_codec": "cachegen", "local_disk_codec_level": 3, "remote_serde_level": 7}
    specs = load_config(environ={}, overrides=nested).tier_codecs()
    assert (specs["disk"].level, specs["remote"].level) == (3, 7)
    with pytest.raises(ConfigError, match="local_disk_codec_level=4: .*int8"):
        load_config(environ={}, overrides={**both, "local_disk_codec_level": 4})
    with pytest.raises(ConfigError, match="quantization_bits"):
        load_config(environ={}, overrides={"local_disk": str(tmp_path), "quantization_bits": 4})


def test_nested_yaml_sets_each_tiers_codec(tmp_path):
    path = tmp_path / "kvshelf.yaml"
    path.write_text(
        f"""
storage:
  disk: {{path: {tmp_path / "d"}, codec: {{name: cachegen, level: 6, calibration: "off"}}}}
  remote: {{url: "redis://cache:6379", codec: {{name: int8}}}}
"""
    )
    specs = load_config(path, environ={}).tier_codecs()
    assert (specs["disk"].name, specs["disk"].level, specs["disk"].calibration) == ("cachegen", 6, "off")
    assert specs["remote"].name == "int8" and specs["remote"].level is None


def test_valkey_cluster_urls_reach_the_cluster_client(redis_cluster):
    """The bug: storage/redis.py handled valkey-cluster:// but the factory refused it."""
    assert REMOTE_SCHEMES["valkey-cluster"].cluster
    url = redis_cluster.url.replace("redis-cluster://", "valkey-cluster://", 1)
    assert url.startswith("valkey-cluster://")
    cfg = load_config(environ={}, overrides={"local_cpu": False, "remote_url": url, "remote_serde": "none"})
    tiers = build_tiers(cfg)
    try:
        backend = tiers.tiers[0].backend
        assert type(backend.client).__name__ == "RedisCluster"
        assert backend.put(key(1), make_chunk()) and backend.contains(key(1))
    finally:
        tiers.close()
    with pytest.raises(ConfigError, match="remote_url.*unsupported scheme"):
        load_config(environ={}, overrides={"remote_url": "ftp://x"})


def test_a_key_the_runtime_ignores_is_refused_in_one_line():
    from kvshelf.integrations.vllm.shared import connector_config

    with pytest.raises(ConfigError, match="'store_generated'.*`vllm` does not use it") as err:
        connector_config({"store_generated": False, "local_disk": "/tmp/x"})
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="'host'"):
        connector_config({"host": "0.0.0.0"})
    connector_config({"local_cpu": True, "min_cached_tokens": 64, "use_layerwise": True})  # honoured there
    connector_config({"store_generated": True, "guard": True})  # set to their defaults: nothing is ignored
    cfg = load_config(environ={}, overrides={"host": "0.0.0.0", "api_key": "k" * 16})
    check_runtime(cfg, "serve")
    with pytest.raises(ConfigError, match="'api_key' \\(and host\\).*`generate`"):
        check_runtime(cfg, "generate")
    with pytest.raises(ConfigError, match="'local_disk'.*`calibrate`"):
        check_runtime(load_config(environ={}, overrides={"local_disk": "/tmp/x"}), "calibrate")
    check_runtime(load_config(environ={}), "calibrate")  # defaults are never "set"


def test_two_shelves_in_one_process_do_not_interfere(tmp_path):
    fp = ModelFingerprint("m", "w", "float32", 3, 2, 8)
    a_cfg = KVShelfConfig(metrics_prefix="first_", local_cpu=False, local_disk=str(tmp_path / "a"), chunk_size=16)
    b_cfg = KVShelfConfig(
        metrics_prefix="second_",
        local_cpu=False,
        local_disk=str(tmp_path / "b"),
        local_disk_codec="cachegen",
        codec_calibration="off",
        codec_workers=2,
        chunk_size=16,
    )
    a, b = Owned.for_config(a_cfg), Owned.for_config(b_cfg)
    engine_a, engine_b = open_engine(a_cfg, fp, owned=a), open_engine(b_cfg, fp, owned=b)
    a.metrics.watch_engine(engine_a)
    b.metrics.watch_engine(engine_b)
    try:
        disk_a, disk_b = engine_a.backend.tiers[0].backend, engine_b.backend.tiers[0].backend
        assert disk_a.codec.name == "int8" and disk_b.codec.processes is b.codec_processes
        assert (a.codec_processes.workers, b.codec_processes.workers) == (0, 2)
        assert disk_a.metrics is a.metrics and disk_b.metrics is b.metrics
        disk_a.put(key(1), make_chunk(tokens=16))
        disk_a.get(key(1))
        names_a = {f.name for f in a.metrics.registry.collect()}
        names_b = {f.name for f in b.metrics.registry.collect()}
        assert all(n.startswith("first_") for n in names_a) and all(n.startswith("second_") for n in names_b)
        assert a.metrics.registry.get_sample_value("first_codec_input_bytes_total", {"codec": "int8"}) > 0
        assert b.metrics.registry.get_sample_value("second_codec_input_bytes_total", {"codec": "int8"}) is None
        # b's codec processes run and stop without touching a's (none) or another shelf's settings
        disk_b.put(key(2), make_chunk(tokens=16, layers=3))
        assert disk_b.get(key(2)) is not None
        b.close()
        assert a.codec_processes.workers == 0 and disk_a.get(key(1)) is not None
    finally:
        engine_a.close()
        engine_b.close()
        a.close()
        b.close()
