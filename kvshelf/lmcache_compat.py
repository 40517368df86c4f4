"""LMCache's configuration keys that kvshelf does not use under the same name: mapped where kvshelf has
the same feature, refused with a reason and kvshelf's alternative where it has not.

LMCache keys that kvshelf shares by name (chunk_size, local_cpu, max_local_cpu_size, local_disk,
max_local_disk_size, remote_url, remote_serde, save_unfull_chunk, enable_blending, blend_special_str,
blend_check_layers, blend_recompute_ratios, use_layerwise, extra_config) need nothing here. A refused
feature that is switched off (`enable_p2p: false`) is accepted: it asks for nothing kvshelf lacks.
"""

from __future__ import annotations

import logging
from typing import Any

from kvshelf.errors import ConfigError

log = logging.getLogger(__name__)

_OFF = {False, None, "", "false", "False", "0", "no", "off", "none", "None"}

# LMCache key -> (what it is in LMCache, why kvshelf lacks it, what kvshelf offers instead).
_P2P = (
    "peer-to-peer KV transfer between instances",
    "kvshelf instances do not fetch KV from each other directly",
    "a shared remote tier that every instance reads and writes (remote_url: redis://..., valkey://... or s3://...)",
)
_PD = (
    "prefill/decode disaggregation (KV sent from a prefill to a decode instance over NIXL)",
    "kvshelf has no NIXL transport or prefill/decode roles",
    "a shared remote tier: a prefill instance stores the prompt's KV and a decode instance loads it "
    "(vLLM connector with kv_role kv_both and remote_url)",
)
_CONTROLLER = (
    "the LMCache controller (a central service that tracks and moves KV across instances)",
    "kvshelf has no controller; instances find shared KV by its key (model fingerprint + tokens)",
    "/api/v1/cache/stats, POST /api/v1/cache/clear and /metrics on `kvshelf serve`, and metrics_port inside vLLM",
)
_GDS = (
    "GPU Direct Storage",
    "kvshelf reads disk through the CPU",
    "the disk tier (local_disk, local_disk_codec)",
)
_PLUGINS = (
    "storage and runtime plugins",
    "kvshelf's tiers are built in",
    "CPU, disk, Redis/Valkey and S3 tiers (local_cpu, local_disk, remote_url)",
)
_API = (
    "LMCache's internal API server",
    "kvshelf has no per-worker control server",
    "`kvshelf serve` (/api/v1/cache/stats, POST /api/v1/cache/clear, /metrics), or metrics_port inside vLLM",
)

UNSUPPORTED: dict[str, tuple[str, str, str]] = {
    **dict.fromkeys(["enable_p2p", "p2p_host", "p2p_init_ports", "p2p_lookup_ports"], _P2P),
    **dict.fromkeys(
        [
            "enable_pd",
            "enable_xpyd",
            "pd_role",
            "pd_buffer_size",
            "pd_buffer_device",
            "pd_peer_host",
            "pd_peer_init_port",
            "pd_peer_alloc_port",
            "pd_peer_query_port",
            "pd_proxy_host",
            "pd_proxy_port",
            "pd_backend_mode",
            "transfer_channel",
            "nixl_backends",
            "nixl_buffer_size",
            "nixl_buffer_device",
            "nixl_role",
            "nixl_peer_host",
            "nixl_peer_init_port",
            "nixl_peer_alloc_port",
            "nixl_proxy_host",
            "nixl_proxy_port",
        ],
        _PD,
    ),
    **dict.fromkeys(
        [
            "enable_controller",
            "controller_url",
            "controller_pull_url",
            "controller_reply_url",
            "lmcache_worker_port",
            "lmcache_worker_ports",
            "lmcache_worker_ids",
            "lmcache_worker_heartbeat_time",
            "lmcache_worker_heartbeat_delay_time",
        ],
        _CONTROLLER,
    ),
    "lmcache_instance_id": (
        "an instance id for the controller",
        "kvshelf instances need no id: they share KV by key, whoever wrote it",
        "served_model_name for the name the server reports",
    ),
    **dict.fromkeys(["use_gds", "gds_path", "gds_path_sharding", "gds_buffer_size", "gds_backend"], _GDS),
    **dict.fromkeys(
        [
            "runtime_plugin_locations",
            "plugin_locations",
            "storage_plugins",
            "external_backends",
            "remote_storage_plugins",
            "external_lookup_client",
        ],
        _PLUGINS,
    ),
    **dict.fromkeys(
        [
            "internal_api_server_enabled",
            "internal_api_server_host",
            "internal_api_server_port_start",
            "internal_api_server_include_index_list",
            "internal_api_server_socket_path_prefix",
        ],
        _API,
    ),
    "local_cpu_use_hugepages": (
        "huge pages for the CPU tier",
        "kvshelf's CPU tier holds ordinary tensors",
        "pin_memory (page-locked copies of GPU KV) and max_local_cpu_size",
    ),
    "reserve_local_cpu_size": (
        "a reserved CPU memory pool",
        "kvshelf's CPU tier allocates per chunk up to its capacity",
        "max_local_cpu_size",
    ),
    "numa_mode": ("NUMA-aware CPU buffers", "kvshelf does not place memory per NUMA node", "max_local_cpu_size"),
    "local_disk_path_sharding": (
        "one disk folder per GPU",
        "a kvshelf disk folder belongs to one process",
        "one local_disk path per instance, or a shared remote tier",
    ),
    "maru_path": ("the Maru CXL shared-memory tier", "kvshelf has no CXL tier", "local_cpu, local_disk, remote_url"),
    "maru_pool_size": ("the Maru CXL shared-memory tier", "kvshelf has no CXL tier", "local_cpu, local_disk"),
    "blend_thresholds": (
        "CacheBlend's deviation thresholds",
        "kvshelf picks the tokens to recompute by ratio only",
        "blend_recompute_ratios (a fraction per check layer)",
    ),
    "blend_min_tokens": (
        "a minimum prompt length for CacheBlend",
        "kvshelf blends every prompt that holds blend_special_str",
        "min_cached_tokens for prefix reuse; leave the separator out of prompts not to blend",
    ),
    "enable_async_loading": (
        "asynchronous KV loading in the scheduler",
        "kvshelf loads ahead of the compute only layer by layer",
        "use_layerwise with use_async_load and buffer_size",
    ),
    "min_retrieve_tokens": (
        "a minimum cache hit before loading",
        "kvshelf decides per request from measured costs instead",
        "guard (load only when predicted faster than recomputing) and min_cached_tokens",
    ),
    "lookup_timeout_ms": (
        "the scheduler's lookup timeout",
        "kvshelf's lookups are bounded by each tier's timeout",
        "remote_timeout_s and the circuit breaker (breaker_failures, breaker_reset_s)",
    ),
    "blocking_timeout_secs": (
        "a blocking wait on stores",
        "kvshelf stores to disk and remote tiers behind the request",
        "write_queue_size and write_block_ms",
    ),
    "pre_caching_hash_algorithm": (
        "the choice of prefix hash",
        "kvshelf's keys are always BLAKE2b chains rooted in the model fingerprint (never a guessable hash)",
        "cache_salt to separate tenants",
    ),
    "priority_limit": (
        "caching only requests up to a priority",
        "kvshelf has no request priorities",
        "guard and min_cached_tokens",
    ),
    "retrieve_locations": (
        "choosing tiers per request",
        "kvshelf looks up its tiers in order (CPU, disk, remote)",
        "local_cpu, local_disk, remote_url",
    ),
    "store_location": (
        "choosing the tier to store in",
        "kvshelf stores in every configured tier",
        "local_cpu, local_disk, remote_url",
    ),
    "audit_actual_remote_url": ("the audit backend", "kvshelf has none", "/metrics and tier statistics"),
    **dict.fromkeys(
        ["cost_aware_half_life_seconds", "cost_aware_ewma_alpha"],
        ("cost-aware eviction", "kvshelf's CPU tier evicts by lru or lfu", "cpu_eviction: lru | lfu"),
    ),
    **dict.fromkeys(
        ["mp_host", "mp_port"],
        ("LMCache's multi-process server for SGLang", "kvshelf has no SGLang integration", "the vLLM connector"),
    ),
    "py_enable_gc": ("turning Python's garbage collector off", "kvshelf leaves the interpreter alone", "nothing"),
    "hit_miss_ratio": ("simulated hit ratios for testing", "kvshelf has none", "nothing"),
}

# Remote URL schemes of LMCache's own backends that kvshelf has no tier for.
_REMOTE_SCHEMES = {
    "lm": "LMCache's own cache server (lm://)",
    "mooncakestore": "the Mooncake store",
    "infinistore": "InfiniStore",
    "blackhole": "the black-hole test backend",
    "external": "an external backend plugin",
    "sagemaker-hyperpod": "SageMaker HyperPod",
}
_REMOTE_OFFER = "redis://, rediss://, unix://, valkey://, redis-cluster:// and s3:// remote tiers"


def _cache_policy(value: Any, source: str) -> dict[str, Any]:
    policy = str(value).strip().lower()
    if policy in ("lru", "lfu"):
        return {"cpu_eviction": policy}
    raise ConfigError(
        f"LMCache key 'cache_policy' (from {source}) is {value!r}, which kvshelf does not support because its "
        "CPU tier evicts by lru or lfu only; kvshelf offers cpu_eviction: lru | lfu (cache_policy LRU and LFU map to it)"
    )


# LMCache key -> function(value, source) giving the kvshelf keys it sets.
MAPPED = {
    "cache_policy": _cache_policy,
    # LMCache stores the KV of decoded tokens with save_decode_cache; kvshelf's name is store_generated.
    "save_decode_cache": lambda value, source: {"store_generated": value},
    # Old LMCache configs switch the v1 engine on; kvshelf has one engine.
    "use_experimental": lambda value, source: {},
}


def lmcache_env(environ: dict[str, str]) -> dict[str, Any]:
    """LMCACHE_<KEY> variables naming LMCache keys that kvshelf maps or refuses."""
    return {
        key: environ[f"LMCACHE_{key.upper()}"] for key in [*MAPPED, *UNSUPPORTED] if f"LMCACHE_{key.upper()}" in environ
    }


def translate(values: dict[str, Any], source: str) -> dict[str, Any]:
    """`values` with LMCache's keys mapped to kvshelf's; a ConfigError for LMCache features kvshelf lacks."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in MAPPED:
            out.update(MAPPED[key](value, source))
        elif key in UNSUPPORTED:
            if value == [] or (not isinstance(value, list | dict) and value in _OFF):
                log.info("LMCache key %r (from %s) is off: nothing to do in kvshelf", key, source)
                continue
            feature, why, offer = UNSUPPORTED[key]
            raise ConfigError(
                f"LMCache key {key!r} (from {source}) is not supported by kvshelf because it configures {feature} "
                f"and {why}; kvshelf offers {offer}"
            )
        else:
            out[key] = value
    url = out.get("remote_url")
    if isinstance(url, str) and "://" in url:
        scheme = url.split("://", 1)[0].lower()
        if scheme in _REMOTE_SCHEMES:
            raise ConfigError(
                f"LMCache remote_url {url!r} (from {source}) is not supported by kvshelf because it names "
                f"{_REMOTE_SCHEMES[scheme]}, which kvshelf cannot talk to; kvshelf offers {_REMOTE_OFFER}"
            )
    return out
