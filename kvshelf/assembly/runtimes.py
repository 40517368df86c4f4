"""Which config keys each runtime honours. A key that was set (in a file, the environment or on the
command line) to something other than its default, but that the runtime would ignore, is refused with
one line naming it: a setting must never be silently without effect."""

from __future__ import annotations

from kvshelf.config import KVShelfConfig
from kvshelf.errors import ConfigError

MODEL = frozenset({"model", "device", "dtype"})
# The cache engine and its tiers (every runtime with a cache honours these).
CACHE = frozenset(
    {
        "chunk_size",
        "save_unfull_chunk",
        "local_cpu",
        "max_local_cpu_size",
        "cpu_eviction",
        "pin_memory",
        "local_disk",
        "max_local_disk_size",
        "local_disk_codec",
        "local_disk_codec_level",
        "local_disk_codec_calibration",
        "disk_fsync",
        "remote_url",
        "remote_serde",
        "remote_serde_level",
        "remote_serde_calibration",
        "quantization_bits",
        "codec_calibration",
        "codec_workers",
        "codec_output_pool_mb",
        "remote_ttl_s",
        "remote_timeout_s",
        "redis_part_bytes",
        "redis_ssl_ca_certs",
        "s3_concurrency",
        "remote_auth_key",
        "write_queue_size",
        "write_queue_bytes",
        "write_block_ms",
        "breaker_failures",
        "breaker_reset_s",
        "tier_deadline_s",
        "tier_write_deadline_s",
        "tier_slow_s",
        "tier_workers",
        "metrics_prefix",
    }
)
# kvshelf's own generation loop (transformers): what the request path does with the cache.
GENERATION = frozenset(
    {
        "store_generated",
        "enable_blending",
        "blend_special_str",
        "blend_check_layers",
        "blend_recompute_ratios",
        "blend_min_cached_share",
        "blend_head_tokens",
        "blend_per_document",
        "blend_selection_signal",
        "blend_question_weight",  # issue #18, third session
        "blend_question_span",
        "blend_question_pass",
        "blend_prefix_documents",
        "blend_question_budget",
        "blend_context_temperature",  # issue #18, fourth session: not inside vLLM (vLLM computes the question)
        "blend_context_mass",
        "blend_context_layers",
        "blend_context_distance_bias",
        "blend_document_context",  # issue #18, fifth session
        "blend_ratio_tokens",  # issue #18, ninth session
        "blend_ratio_beyond_share",
        "blend_long_question_pass",  # issue #18, tenth session: not inside vLLM (vLLM computes the question)
        "blend_long_question_budget",
        "blend_fallback_margin",  # issue #18, twelfth session: not inside vLLM (vLLM picks the first token)
        "use_layerwise",
        "use_async_load",
        "buffer_size",
        "layerwise_store",
        "guard",
        "min_cached_tokens",
    }
)
SERVER = frozenset(
    {
        "host",
        "port",
        "api_key",
        "api_keys_file",
        "tenant_secret",
        "cache_salt",
        "served_model_name",
        "usage_details",
        "server_docs",
        "server_metrics_port",
        "metrics_host",
        "max_body_bytes",
        "read_timeout_s",
        "max_waiting_requests",
        "request_timeout_s",
        "max_prompt_tokens",
        "max_output_tokens",
    }
)
# Inside vLLM: vLLM runs the model and schedules; kvshelf stores, loads (layer by layer if asked) and
# answers lookups.
VLLM = (
    CACHE
    | {"use_layerwise", "use_async_load", "buffer_size", "min_cached_tokens", "cache_salt"}
    | {"metrics_port", "metrics_host", "extra_config"}
    | {"publish_layers", "published_layer_wait_s"}  # issue #20: kv_producer / kv_consumer
    # issue #19: CacheBlend inside vLLM (kvshelf.integrations.vllm.blending)
    | {"enable_blending", "blend_special_str", "blend_check_layers", "blend_recompute_ratios"}
    | {"blend_min_cached_share", "blend_head_tokens", "blend_per_document", "blend_selection_signal"}  # issue #18
    | {"codec_calibration_pending", "codec_calibration_threads", "codec_calibration_tokens"}  # issue #17
    | {"blend_ratio_tokens", "blend_ratio_beyond_share"}  # issue #18, ninth session: the budget of long prompts
    | {"blend_document_context"}  # issue #19, ninth session: documents from vLLM's own prefill
    # issue #19, tenth session: the question pass (the question alone over the placed KV before the blend)
    | {"blend_question_pass", "blend_question_weight", "blend_question_span", "blend_question_budget"}
)

RUNTIMES: dict[str, frozenset[str]] = {
    "serve": MODEL | CACHE | GENERATION | SERVER,
    "generate": MODEL | CACHE | GENERATION,
    "library": MODEL | CACHE | GENERATION,  # open_shelf from Python: the README's examples
    "demo": MODEL | CACHE | GENERATION,
    "bench": MODEL | CACHE | GENERATION,
    "advise": MODEL | CACHE | GENERATION,  # the base of the candidates it measures
    "calibrate": MODEL,
    "vllm": frozenset(VLLM),
}
assert all(keys <= set(KVShelfConfig.model_fields) for keys in RUNTIMES.values())


def check_runtime(config: KVShelfConfig, runtime: str) -> None:
    """Refuse keys set in `config` that `runtime` ignores (one line, naming the first such key)."""
    honoured = RUNTIMES[runtime]
    fields = KVShelfConfig.model_fields
    # A key set to its default changes nothing either way (LMCache files often say `enable_blending:
    # false`): only a value that would have an effect, were it honoured, is refused.
    ignored = sorted(
        k
        for k in set(config.model_fields_set) - honoured
        if getattr(config, k) != fields[k].get_default(call_default_factory=True)
    )
    if ignored:
        key = ignored[0]
        more = f" (and {', '.join(ignored[1:])})" if len(ignored) > 1 else ""
        raise ConfigError(f"config key {key!r}{more} is set but `{runtime}` does not use it; unset it for this runtime")
