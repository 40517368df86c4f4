import pytest

from kvshelf.config import load_config, load_config_with_sources, parse_assignments
from kvshelf.errors import ConfigError


def test_defaults():
    cfg = load_config(environ={})
    assert cfg.chunk_size == 256 and cfg.local_cpu and cfg.model == "gemma3-270m"


def test_precedence_file_env_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("chunk_size: 64\nmax_local_cpu_size: 2\nlocal_cpu: true\n")
    cfg = load_config(path, environ={"LMCACHE_CHUNK_SIZE": "128", "KVSHELF_LOCAL_CPU": "false"})
    assert cfg.chunk_size == 128 and cfg.max_local_cpu_size == 2 and not cfg.local_cpu
    assert load_config(path, environ={"LMCACHE_CHUNK_SIZE": "128"}, overrides={"chunk_size": 32}).chunk_size == 32
    # KVSHELF_ beats LMCACHE_ when both are set; the file may come from the env too.
    cfg = load_config(
        environ={"LMCACHE_CHUNK_SIZE": "128", "KVSHELF_CHUNK_SIZE": "512", "KVSHELF_CONFIG_FILE": str(path)}
    )
    assert cfg.chunk_size == 512 and cfg.max_local_cpu_size == 2


def test_unknown_key_names_key_and_source(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("chunk_sise: 64\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'chunk_sise'.*c.yaml.*chunk_size"):
        load_config(path, environ={})


def test_bad_value_names_key(tmp_path):
    with pytest.raises(ConfigError, match=r"'max_local_cpu_size' \(from environment\)"):
        load_config(environ={"KVSHELF_MAX_LOCAL_CPU_SIZE": "lots"})


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml", environ={})
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path, environ={})


def test_nested_form_maps_to_flat_keys(tmp_path):
    path = tmp_path / "nested.yaml"
    path.write_text(
        """
storage:
  cpu: {enabled: true, size: 3, eviction: lfu}
  disk: {enabled: true, path: /tmp/kv, size: 7, compression: none}
  remote: {enabled: true, url: "redis://localhost:6379", compression: int8, ttl: 60}
compression: {quantization_bits: 8}
server: {port: 9001}
metrics: {prefix: lmcache_}
extra_config: {anything: [1, 2]}
"""
    )
    cfg, sources = load_config_with_sources(path, environ={})
    assert (cfg.max_local_cpu_size, cfg.cpu_eviction, cfg.local_disk, cfg.max_local_disk_size) == (
        3,
        "lfu",
        "/tmp/kv",
        7,
    )
    assert (cfg.local_disk_codec, cfg.remote_url, cfg.remote_ttl_s, cfg.port) == (
        "none",
        "redis://localhost:6379",
        60,
        9001,
    )
    assert cfg.metrics_prefix == "lmcache_" and cfg.extra_config == {"anything": [1, 2]}
    assert sources["remote_url"] == f"file {path}" and sources["chunk_size"] == "default"


def test_nested_switches_and_unknown_nested_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("storage:\n  disk: {enabled: false, path: /tmp/x}\n")
    assert load_config(path, environ={}).local_disk is None
    path.write_text("storage:\n  disk: {enabled: true}\n")
    with pytest.raises(ConfigError, match="storage.disk.enabled is true but storage.disk.path"):
        load_config(path, environ={})
    path.write_text("storage:\n  disk: {pth: /tmp/x}\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'storage.disk.pth'.*storage.disk.path"):
        load_config(path, environ={})


def test_lmcache_flat_names_and_env_lists():
    env = {
        "LMCACHE_LOCAL_DISK": "file:///tmp/d",
        "LMCACHE_MAX_LOCAL_DISK_SIZE": "3",
        "LMCACHE_REMOTE_SERDE": "naive",
        "LMCACHE_ENABLE_BLENDING": "false",
        "LMCACHE_BLEND_CHECK_LAYERS": "1,2",
        "LMCACHE_BLEND_RECOMPUTE_RATIOS": "[0.1, 0.2]",
        "KVSHELF_REMOTE_TTL_S": "none",
    }
    cfg, sources = load_config_with_sources(environ=env)
    assert cfg.local_disk == "file:///tmp/d" and cfg.remote_serde == "naive"
    assert cfg.blend_check_layers == [1, 2] and cfg.blend_recompute_ratios == [0.1, 0.2]
    assert sources["blend_check_layers"] == "env LMCACHE_BLEND_CHECK_LAYERS"


def test_bad_values_name_the_key():
    for overrides, key in [
        ({"remote_serde": "zip"}, "remote_serde"),
        ({"blend_recompute_ratios": [1.5]}, "blend_recompute_ratios"),
        ({"metrics_prefix": "bad-prefix"}, "metrics_prefix"),
        ({"quantization_bits": 4}, "quantization_bits"),
        ({"cpu_eviction": "fifo"}, "cpu_eviction"),
    ]:
        with pytest.raises(ConfigError, match=key):
            load_config(environ={}, overrides=overrides)


def test_cli_assignments():
    assert parse_assignments(["chunk_size=64", "blend_check_layers=[1, 3]", "remote_url=redis://h:1"]) == {
        "chunk_size": 64,
        "blend_check_layers": [1, 3],
        "remote_url": "redis://h:1",
    }
    with pytest.raises(ConfigError, match="key=value"):
        parse_assignments(["oops"])
