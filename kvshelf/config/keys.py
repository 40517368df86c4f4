"""The config definitions table: every key kvshelf reads from YAML, env vars (KVSHELF_<KEY>, LMCACHE_<KEY>)
and the CLI (`--set key=value`), with its type, default, bounds and meaning; and the nested YAML names that
set the flat keys.

Adding keys: a block of fields at the end of `ConfigKeys` (just before `extra_config`) under a comment naming
the issue, and nested YAML names, if any, in NESTED_KEYS. A check that a type or bound cannot express goes in
kvshelf.config.validation (KVShelfConfig is this table with its checks).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kvshelf.cache.keys import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE
from kvshelf.codecs import CODEC_NAMES
from kvshelf.storage.urls import REMOTE_SCHEMES


class ConfigKeys(BaseModel):
    """The keys, their defaults and docs (`kvshelf config show` prints them); use KVShelfConfig, which checks them."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # -- model and chunking ------------------------------------------------------------------------
    model: str = Field("gemma3-270m", description="local HF model folder, or 'gemma3-270m' (the default model)")
    device: str = Field("auto", description="'cpu', 'cuda', 'cuda:N' or 'auto'")
    dtype: str = Field("auto", description="float32, bfloat16, float16 or auto (fp32 on CPU, bf16 on CUDA)")
    chunk_size: int = Field(256, ge=MIN_CHUNK_SIZE, le=MAX_CHUNK_SIZE, description="tokens per KV chunk")
    save_unfull_chunk: bool = Field(True, description="also store a prompt's trailing partial chunk")
    store_generated: bool = Field(True, description="also store the KV of generated tokens (multi-turn reuse)")
    cache_salt: str | None = Field(None, description="default tenant salt mixed into every key")
    # -- CPU tier ----------------------------------------------------------------------------------
    local_cpu: bool = Field(True, description="keep KV chunks in CPU memory")
    max_local_cpu_size: float = Field(5.0, gt=0, description="CPU tier capacity in GB")
    cpu_eviction: Literal["lru", "lfu"] = Field("lru", description="CPU tier eviction policy: lru or lfu")
    pin_memory: bool = Field(True, description="keep CPU copies of GPU KV in pinned (page-locked) memory")
    # -- disk tier ---------------------------------------------------------------------------------
    local_disk: str | None = Field(None, description="disk tier directory (path or file:// URL); off when unset")
    max_local_disk_size: float = Field(20.0, gt=0, description="disk tier capacity in GB (LRU)")
    local_disk_codec: str = Field("int8", description=f"disk tier codec: {', '.join(CODEC_NAMES)}")
    disk_fsync: bool = Field(False, description="fsync each disk write (durable across power loss, slower)")
    # -- remote tier -------------------------------------------------------------------------------
    remote_url: str | None = Field(
        None,
        description="remote tier URL, one of "
        + ", ".join(f"{s}://" for s in REMOTE_SCHEMES)
        + " (clusters: redis-cluster://h:p,h:p; S3: s3://bucket/prefix)",
    )
    remote_serde: str = Field("int8", description=f"remote tier codec: {', '.join(CODEC_NAMES)}")
    quantization_bits: int | None = Field(
        None,
        ge=2,
        le=8,
        description="cachegen level of every cachegen tier without its own (local_disk_codec_level, "
        "remote_serde_level); default 5 (calibrated: each level halves the step; uncalibrated: bits of "
        "late layers, early layers get one more)",
    )
    codec_calibration: str = Field(
        "auto",
        description="cachegen calibration of every cachegen tier without its own: auto (computed from the "
        "model once, kept in the cache folder), off (uncalibrated cachegen), or the path of a .kvcal file "
        "(e.g. from `kvshelf calibrate`)",
    )
    codec_workers: int = Field(
        0, ge=0, le=64, description="codec processes for cachegen's entropy coding (0: in the calling process)"
    )
    remote_ttl_s: int | None = Field(None, gt=0, description="expire remote (Redis) chunks after this many seconds")
    remote_timeout_s: float = Field(2.0, gt=0, description="remote tier connect/read timeout in seconds")
    redis_part_bytes: int = Field(32 << 20, ge=1024, description="split Redis values above this size into parts")
    redis_ssl_ca_certs: str | None = Field(None, description="CA bundle for rediss:// (TLS) connections")
    s3_concurrency: int = Field(8, ge=1, le=64, description="parallel S3 transfers")
    # -- issue #14: each tier's codec spec (name above; level and calibration here, else the shared ones) --
    local_disk_codec_level: int | None = Field(
        None, ge=2, le=8, description="the disk tier's cachegen level (default: quantization_bits)"
    )
    local_disk_codec_calibration: str | None = Field(
        None,
        description="the disk tier's cachegen calibration: auto, off or a .kvcal path (default: codec_calibration)",
    )
    remote_serde_level: int | None = Field(
        None, ge=2, le=8, description="the remote tier's cachegen level (default: quantization_bits)"
    )
    remote_serde_calibration: str | None = Field(
        None,
        description="the remote tier's cachegen calibration: auto, off or a .kvcal path (default: codec_calibration)",
    )
    # -- issue #15: shared tiers that trust no one (stored objects) ---------------------------------
    remote_auth_key: str | None = Field(
        None,
        min_length=16,
        description="secret shared by trusted instances: every object in the disk and remote tiers carries "
        "a MAC keyed from it, and objects without a valid one are misses (deleted); unset: the remote "
        "tier is trusted as is",
    )
    # -- write-behind and faults -------------------------------------------------------------------
    write_queue_size: int = Field(64, ge=1, description="chunks waiting for write-behind to disk/remote tiers")
    write_block_ms: float = Field(20.0, ge=0, description="longest a request waits on a full write queue, then drops")
    breaker_failures: int = Field(3, ge=1, description="consecutive tier failures that open its circuit breaker")
    breaker_reset_s: float = Field(5.0, gt=0, description="seconds an open breaker waits before retrying the tier")
    # -- issue #15: deadlines on the disk and remote tiers, write-behind bounded in bytes ----------------
    tier_deadline_s: float | None = Field(
        None,
        gt=0,
        description="longest one read or lookup of the disk/remote tier may take in total, however slowly "
        "it trickles (default: 2x remote_timeout_s); an overrun is a miss and a tier fault",
    )
    tier_write_deadline_s: float | None = Field(
        None, gt=0, description="the same for one write-behind (default: 5x tier_deadline_s)"
    )
    tier_slow_s: float | None = Field(
        None, gt=0, description="a read slower than this counts against the tier's breaker (default: off)"
    )
    tier_workers: int = Field(
        4, ge=1, le=64, description="calls in flight per disk/remote tier; all busy (stuck) means the tier is skipped"
    )
    write_queue_bytes: int = Field(
        256 << 20, ge=1 << 20, description="bytes of chunks waiting for write-behind (besides write_queue_size)"
    )
    # -- blending and layerwise --------------------------------------------------------------------------
    enable_blending: bool = Field(False, description="CacheBlend: reuse the KV of documents anywhere in a prompt")
    blend_special_str: str = Field("<|CHUNK_SEP|>", description="separator between blendable documents")
    blend_check_layers: list[int] = Field([1], description="layers where fresh and cached KV are compared")
    # 0.3, not 0.15 (issue #18): on unseen RAG data 15% lost answers that full prefill got (BENCHMARKS.md).
    blend_recompute_ratios: list[float] = Field(
        [0.15],  # issue #18, fifth session: with documents cached from their first prompt, 15% answered as full prefill
        description="fraction of tokens recomputed per check layer",
    )
    use_layerwise: bool = Field(False, description="load and store KV one layer at a time")
    use_async_load: bool = Field(True, description="layerwise: prefetch later layers in the background")
    buffer_size: int = Field(4, ge=1, description="layerwise: layers loaded ahead of the compute (>= 1 layer)")
    layerwise_store: bool = Field(
        False,
        description="layerwise: copy new KV out layer by layer during the prefill (default: after the first token)",
    )
    # -- the never-slower guard -------------------------------------------------------------------
    guard: bool = Field(True, description="use the cache per request only where measured costs say it pays")
    min_cached_tokens: int | None = Field(
        None, ge=1, description="prompts shorter than this skip the cache (default: one chunk)"
    )
    # -- server and metrics ------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="server bind address (loopback unless you mean otherwise)")
    port: int = Field(8000, ge=1, le=65535, description="server port")
    api_key: str | None = Field(None, description="require 'Authorization: Bearer <key>' on the server")
    served_model_name: str | None = Field(None, description="model name the server reports; default: the folder")
    metrics_prefix: str = Field("kvshelf_", pattern=r"^[a-zA-Z_][a-zA-Z0-9_]*_$", description="Prometheus prefix")
    metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="inside vLLM: serve kvshelf's /metrics on this port (on `host`; tensor-parallel rank r: this port + r)",
    )
    # -- issue #16: a server safe to expose (tenants, limits, cancellation, honest metrics) ----------
    api_keys_file: str | None = Field(
        None, description="YAML/JSON file of API keys: {key: tenant} or {key: {tenant: name, admin: bool}}"
    )
    tenant_secret: str | None = Field(
        None,
        description="server secret for tenants' cache salts (default: one made once per host in the cache folder; set the same on instances that share a remote tier)",
    )
    usage_details: bool = Field(False, description="add usage.kvshelf (cached tokens, ttft) to responses")
    server_docs: bool = Field(False, description="serve /docs, /redoc and /openapi.json")
    server_metrics_port: int | None = Field(
        None, ge=1, le=65535, description="serve /metrics on this port of metrics_host instead of the API port"
    )
    metrics_host: str = Field("127.0.0.1", description="bind address of server_metrics_port")
    max_body_bytes: int = Field(8 << 20, ge=1024, description="largest request body the server reads (413 above)")
    read_timeout_s: float = Field(
        30.0, gt=0, description="longest a client may take to send a request's head, then its body"
    )
    max_waiting_requests: int = Field(32, ge=0, description="requests queued for the model before 429s")
    request_timeout_s: float = Field(600.0, gt=0, description="per-request deadline, queueing included (504)")
    max_prompt_tokens: int | None = Field(None, ge=1, description="longest prompt accepted (default: model context)")
    max_output_tokens: int = Field(4096, ge=1, description="largest max_tokens a request may ask for")
    # -- issue #20: disaggregated prefill inside vLLM (kv_role kv_producer / kv_consumer) -------------
    publish_layers: bool | None = Field(
        None,
        description="inside vLLM as kv_producer: publish each layer of a prompt's new chunks as it is computed, so a kv_consumer can load it before the prefill ends (default: on unless a tier codes with cachegen, whose bit allocation depends on the layer)",
    )
    published_layer_wait_s: float = Field(
        10.0,
        gt=0,
        description="inside vLLM as kv_consumer: longest a load waits for layers the producer has not published yet (then vLLM recomputes)",
    )
    # -- issue #18: CacheBlend quality on unseen RAG data (selection, repair, the cold request) ---------
    blend_min_cached_share: float = Field(
        0.25,  # issue #18, fourth session: blends at 26-58% cached took 0.58-0.92x (median 0.68x) of a plain prefill
        ge=0.0,
        le=1.0,
        description="blend only when at least this share of a prompt's document tokens is cached; below it the prompt is prefilled exactly and its documents are computed after the first token",
    )
    blend_head_tokens: int = Field(
        0, ge=0, description="each cached document's first tokens always recomputed in a blend (inside the ratio)"
    )
    blend_per_document: bool = Field(
        False, description="share a blend's recompute budget over documents by size instead of one global top-k"
    )
    blend_selection_signal: str = Field(
        "kv",
        description="how a blend picks the tokens it recomputes: kv (K and V deviation), k, v, question (the question's attention) or kv+question (deviation weighted by it)",
    )
    # -- issue #18, third session: question-aware CacheBlend selection ----------------------------------
    blend_question_weight: float = Field(
        1.0, ge=0.0, description="kv+question: deviation x (1 + weight x the token's share of the question's attention)"
    )
    blend_question_span: int = Field(
        0,
        ge=0,
        description="question signals: each token also credited with the share of the tokens this far before it",
    )
    blend_question_pass: bool = Field(
        False,
        description="question signals: read the question's attention in a pass of the question over the cached KV (every layer) instead of at the check layer",
    )
    blend_question_budget: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="signal question: this share of the recompute budget goes to the tokens the question attends to, the rest to the largest K and V deviation",
    )
    blend_prefix_documents: int = Field(
        0,
        ge=0,
        description="the first N documents of a blended prompt (an instruction) join its always-computed prefix; the others are cached behind it instead of behind BOS alone",
    )

    # -- issue #18 (fourth session): APE-style reweighting of the question's attention over placed documents -
    blend_context_temperature: float = Field(
        1.0,
        gt=0.0,
        description="CacheBlend: the question's attention over placed documents computed with this temperature (< 1 sharpens); 1 is plain attention (kvshelf's own runner only, not inside vLLM)",
    )
    blend_context_mass: float = Field(
        1.0,
        gt=0.0,
        description="CacheBlend: the placed documents' share of the question's attention multiplied by this (as odds against the prefix and the question); 1 is plain attention (kvshelf's own runner only)",
    )
    blend_context_distance_bias: float = Field(
        0.0,
        description="CacheBlend: each placed document key's logit in the question's attention + this x (1 - its position / the question's), so earlier documents count more; 0 is plain attention (kvshelf's own runner only)",
    )
    blend_context_layers: Literal["all", "global"] = Field(
        "all",
        description="CacheBlend: the layers where blend_context_temperature and _mass apply: all, or global (no sliding window)",
    )

    # -- issue #17: cachegen calibrated inside vLLM without a manual step (codec_calibration: auto) ---
    codec_calibration_pending: Literal["uncalibrated", "raw"] = Field(
        "uncalibrated", description="inside vLLM, auto: how cachegen tiers write until the calibration exists"
    )
    codec_calibration_threads: int = Field(2, ge=1, le=256, description="CPU threads computing an auto calibration")
    codec_calibration_tokens: int = Field(2048, ge=64, description="tokens of text an auto calibration is made from")

    # -- issue #17 (eleventh session): memory of CPU-decoded chunks recycled ----------------------------
    codec_output_pool_mb: int = Field(
        256,
        ge=0,
        le=1 << 20,
        description="MB of freed CPU-decoded (calibrated cachegen) chunks kept for the next decoded chunks of the "
        "same size (no page faults on fresh memory; 0: none kept)",
    )

    # -- issue #17: layerwise loading of a GPU-decoded tier reads its chunks side by side ------------
    tier_read_window: int = Field(
        2,
        ge=1,
        le=64,
        description="layerwise, chunks decoded on the GPU: reads of one request in flight at once on a tier "
        "(at most tier_workers; the rest stay free for other requests)",
    )

    # -- issue #18 (fifth session): which KV a blend document is cached with -------------------------------
    blend_document_context: Literal["alone", "prompt"] = Field(
        "prompt",  # issue #18, fifth session: answer-token KL at 15% 0.291 -> 0.216 (dev), 0.25 -> 0.16 (held-out)
        description="CacheBlend: a missing document is cached with its KV computed alone behind BOS (alone, after "
        "the first token) or with its slice of the prompt that first held it (prompt: no extra compute; inside vLLM "
        "the slice of vLLM's own prefill, issue #19)",
    )

    # -- issue #18 (ninth session): long prompts recompute a smaller share ---------------------------------
    blend_ratio_tokens: int | None = Field(
        2048,
        ge=1,
        description="CacheBlend: placed document tokens the recompute ratios apply to in full; past them each "
        "token counts blend_ratio_beyond_share (null: the ratios over every token)",
    )
    blend_ratio_beyond_share: float = Field(
        # issue #18, eleventh session: 0.25 -> 0.4 (3.75% -> 6% past 2,048 tokens): at 4-8K the same answers pooled
        # over three sets (53 of 78), answer-token KL lower on each, 6.6-6.7x instead of 7.2-7.3x (BENCHMARKS.md)
        0.4,
        ge=0,
        le=1,
        description="CacheBlend: how much a placed token past blend_ratio_tokens counts toward the recompute "
        "budget (1: the ratio everywhere; 0.4: 15% of 2,048 tokens then 6% of the rest)",
    )

    # -- issue #18 (tenth session): long prompts pick the recomputed tokens by the question pass ------------
    blend_long_question_pass: bool = Field(
        True,  # tenth session: at 4-8K answer-token KL -62 to -68%, as many answers or 2 more of 24, ~7.2x (BENCHMARKS.md)
        description="CacheBlend, kvshelf's own runner: past blend_ratio_tokens placed tokens pick the recomputed "
        "tokens by a pass of the question over the cached KV (what it attends to in every layer) instead of "
        "blend_selection_signal (inside vLLM the question is computed after the blend: not used there)",
    )
    blend_long_question_budget: float = Field(
        1.0,  # tenth session: 0.5 answered as 1.0 at 4-8K (lower KL), one fewer on ~2K prompts past 2,048 tokens
        ge=0,
        le=1,
        description="CacheBlend, blend_long_question_pass: this share of a long prompt's recompute budget goes to "
        "the tokens the question attends to, the rest to the largest K and V deviation",
    )

    # -- issue #18 (twelfth session): a near tie of the blend's answer is served by an exact prefill ------------
    blend_fallback_margin: float = Field(
        0.0,  # off: at 0.15, held-out seed 21 (BENCHMARKS.md, twelfth session)
        ge=0,
        allow_inf_nan=False,
        description="CacheBlend, kvshelf's own runner: a blended request whose first answer token is picked by "
        "less than this top-1 over top-2 log-probability margin (nats) is served by an exact prefill instead "
        "(that request costs a blend plus a full prefill; 0: never; not inside vLLM)",
    )
    extra_config: dict[str, Any] = Field({}, description="free-form settings passed through to integrations")


# Nested YAML keys and the flat key each one sets. `enabled: false` under disk/remote unsets the tier.
NESTED_KEYS: dict[str, str] = {
    "storage.cpu.enabled": "local_cpu",
    "storage.cpu.size": "max_local_cpu_size",
    "storage.cpu.eviction": "cpu_eviction",
    "storage.cpu.pin_memory": "pin_memory",
    "storage.disk.path": "local_disk",
    "storage.disk.size": "max_local_disk_size",
    "storage.disk.compression": "local_disk_codec",
    "storage.disk.codec.name": "local_disk_codec",
    "storage.disk.codec.level": "local_disk_codec_level",
    "storage.disk.codec.calibration": "local_disk_codec_calibration",
    "storage.disk.fsync": "disk_fsync",
    "storage.remote.url": "remote_url",
    "storage.remote.compression": "remote_serde",
    "storage.remote.codec.name": "remote_serde",
    "storage.remote.codec.level": "remote_serde_level",
    "storage.remote.codec.calibration": "remote_serde_calibration",
    "storage.remote.ttl": "remote_ttl_s",
    "storage.remote.timeout": "remote_timeout_s",
    "compression.algorithm": "remote_serde",
    "compression.quantization_bits": "quantization_bits",
    "compression.workers": "codec_workers",
    "compression.calibration": "codec_calibration",
    "blending.enabled": "enable_blending",
    "blending.special_str": "blend_special_str",
    "blending.check_layers": "blend_check_layers",
    "blending.recompute_ratios": "blend_recompute_ratios",
    "blending.min_cached_share": "blend_min_cached_share",
    "blending.head_tokens": "blend_head_tokens",
    "blending.per_document": "blend_per_document",
    "blending.selection_signal": "blend_selection_signal",
    "blending.question_weight": "blend_question_weight",
    "blending.question_span": "blend_question_span",
    "blending.question_pass": "blend_question_pass",
    "blending.prefix_documents": "blend_prefix_documents",
    "blending.question_budget": "blend_question_budget",
    "blending.context_temperature": "blend_context_temperature",
    "blending.context_mass": "blend_context_mass",
    "blending.context_layers": "blend_context_layers",
    "blending.context_distance_bias": "blend_context_distance_bias",
    "blending.document_context": "blend_document_context",
    "blending.long_question_pass": "blend_long_question_pass",
    "blending.long_question_budget": "blend_long_question_budget",
    "blending.fallback_margin": "blend_fallback_margin",
    "layerwise.enabled": "use_layerwise",
    "layerwise.async_load": "use_async_load",
    "layerwise.buffer_size": "buffer_size",
    "layerwise.store": "layerwise_store",
    "server.host": "host",
    "server.port": "port",
    "server.api_key": "api_key",
    "server.api_keys_file": "api_keys_file",
    "metrics.prefix": "metrics_prefix",
    "metrics.port": "metrics_port",
}
