import pytest

from kvshelf.config import load_config
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
