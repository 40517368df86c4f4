"""LMCache's config keys: mapped where kvshelf has the feature, refused with a reason where it has not."""

import pytest

from kvshelf.config import load_config, load_config_with_sources
from kvshelf.errors import ConfigError
from kvshelf.lmcache_compat import UNSUPPORTED


def test_cache_policy_maps_to_cpu_eviction(tmp_path):
    path = tmp_path / "lmcache.yaml"
    path.write_text("chunk_size: 128\ncache_policy: LFU\nsave_decode_cache: false\n")
    cfg, sources = load_config_with_sources(path, environ={})
    assert cfg.cpu_eviction == "lfu" and cfg.store_generated is False and cfg.chunk_size == 128
    assert sources["cpu_eviction"].startswith("file")
    assert load_config(overrides={"cache_policy": "lru"}, environ={}).cpu_eviction == "lru"


def test_env_vars_map_too():
    cfg = load_config(environ={"LMCACHE_CACHE_POLICY": "LFU", "LMCACHE_SAVE_DECODE_CACHE": "false"})
    assert cfg.cpu_eviction == "lfu" and cfg.store_generated is False


def test_unsupported_eviction_policy_names_what_kvshelf_offers():
    with pytest.raises(ConfigError, match=r"'cache_policy'.*'FIFO'.*cpu_eviction: lru \| lfu"):
        load_config(overrides={"cache_policy": "FIFO"}, environ={})


@pytest.mark.parametrize(
    ("key", "feature", "offer"),
    [
        ("enable_p2p", "peer-to-peer", "shared remote tier"),
        ("enable_pd", "disaggregation", "shared remote tier"),
        ("nixl_role", "NIXL", "remote_url"),
        ("enable_controller", "controller", "/api/v1/cache/stats"),
        ("use_gds", "GPU Direct Storage", "local_disk"),
        ("blend_thresholds", "thresholds", "blend_recompute_ratios"),
    ],
)
def test_unsupported_features_are_refused_with_a_reason(key, feature, offer):
    with pytest.raises(ConfigError) as err:
        load_config(overrides={key: True}, environ={})
    msg = str(err.value)
    assert f"LMCache key {key!r}" in msg and "not supported by kvshelf because" in msg
    assert feature in msg and offer in msg


def test_unsupported_features_switched_off_are_accepted():
    cfg = load_config(overrides={"enable_p2p": False, "enable_controller": "false", "nixl_role": None}, environ={})
    assert cfg.local_cpu is True


def test_lmcache_remote_url_from_the_environment_is_refused():
    with pytest.raises(ConfigError, match="lm://.*from environment"):
        load_config(environ={"LMCACHE_REMOTE_URL": "lm://localhost:65432"})


def test_kvshelf_names_win_over_mapped_lmcache_keys():
    cfg = load_config(environ={"LMCACHE_SAVE_DECODE_CACHE": "false", "KVSHELF_STORE_GENERATED": "true"})
    assert cfg.store_generated is True


def test_env_refusal_names_the_environment():
    with pytest.raises(ConfigError, match="enable_p2p.*from environment"):
        load_config(environ={"LMCACHE_ENABLE_P2P": "True"})


@pytest.mark.parametrize("url", ["lm://localhost:65432", "mooncakestore://host:50051", "infinistore://h:1"])
def test_lmcache_remote_urls_are_refused(url):
    with pytest.raises(ConfigError, match="not supported by kvshelf because.*redis://"):
        load_config(overrides={"remote_url": url}, environ={})


def test_every_refusal_has_a_reason_and_an_offer():
    for key, (feature, why, offer) in UNSUPPORTED.items():
        assert feature and why and offer, key
