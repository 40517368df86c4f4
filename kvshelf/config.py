"""kvshelf's configuration: one definitions table, read from a YAML file, env vars and CLI overrides.

Precedence: defaults < YAML file < environment (KVSHELF_<NAME>, or LMCACHE_<NAME> for LMCache's names)
< explicit overrides (CLI flags). Unknown keys and bad values fail with the key's name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kvshelf.cache.keys import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE
from kvshelf.codecs import CODEC_NAMES
from kvshelf.errors import ConfigError

GB = 1 << 30


class KVShelfConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: str = Field("gemma3-270m", description="local HF model folder, or 'gemma3-270m' (the default model)")
    device: str = Field("auto", description="'cpu', 'cuda', 'cuda:N' or 'auto'")
    dtype: str = Field("auto", description="float32, bfloat16, float16 or auto (fp32 on CPU, bf16 on CUDA)")
    chunk_size: int = Field(256, ge=MIN_CHUNK_SIZE, le=MAX_CHUNK_SIZE, description="tokens per KV chunk")
    local_cpu: bool = Field(True, description="keep KV chunks in CPU memory")
    max_local_cpu_size: float = Field(5.0, gt=0, description="CPU tier capacity in GB")
    cpu_eviction: Literal["lru", "lfu"] = Field("lru", description="CPU tier eviction policy: lru or lfu")
    pin_memory: bool = Field(True, description="keep CPU copies of GPU KV in pinned (page-locked) memory")
    save_unfull_chunk: bool = Field(True, description="also store a prompt's trailing partial chunk")
    store_generated: bool = Field(True, description="also store the KV of generated tokens (multi-turn reuse)")
    cache_salt: str | None = Field(None, description="default tenant salt mixed into every key")
    # -- tiers -------------------------------------------------------------------------------------
    local_disk: str | None = Field(None, description="disk tier directory (path or file:// URL); off when unset")
    max_local_disk_size: float = Field(20.0, gt=0, description="disk tier capacity in GB (LRU)")
    local_disk_codec: str = Field("int8", description=f"disk tier codec: {', '.join(CODEC_NAMES)}")
    disk_fsync: bool = Field(False, description="fsync each disk write (durable across power loss, slower)")
    remote_url: str | None = Field(
        None,
        description="remote tier: redis://, rediss://, unix://, valkey://, redis-cluster://h:p,h:p, s3://bucket/prefix",
    )
    remote_serde: str = Field("int8", description=f"remote tier codec: {', '.join(CODEC_NAMES)}")
    remote_ttl_s: int | None = Field(None, gt=0, description="expire remote (Redis) chunks after this many seconds")
    remote_timeout_s: float = Field(2.0, gt=0, description="remote tier connect/read timeout in seconds")
    redis_part_bytes: int = Field(32 << 20, ge=1024, description="split Redis values above this size into parts")
    redis_ssl_ca_certs: str | None = Field(None, description="CA bundle for rediss:// (TLS) connections")
    s3_concurrency: int = Field(8, ge=1, le=64, description="parallel S3 transfers")
    write_queue_size: int = Field(64, ge=1, description="chunks waiting for write-behind to disk/remote tiers")
    write_block_ms: float = Field(20.0, ge=0, description="longest a request waits on a full write queue, then drops")
    breaker_failures: int = Field(3, ge=1, description="consecutive tier failures that open its circuit breaker")
    breaker_reset_s: float = Field(5.0, gt=0, description="seconds an open breaker waits before retrying the tier")

    @field_validator("local_disk_codec", "remote_serde")
    @classmethod
    def _known_codec(cls, value: str, info) -> str:
        if value not in CODEC_NAMES:
            raise ValueError(f"unknown codec {value!r}; known: {', '.join(CODEC_NAMES)}")
        return value

    @property
    def cpu_capacity_bytes(self) -> int:
        return int(self.max_local_cpu_size * GB)

    @property
    def disk_capacity_bytes(self) -> int:
        return int(self.max_local_disk_size * GB)


def _format_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(root)"
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(KVShelfConfig.model_fields)
            lines.append(f"unknown config key {key!r} (from {source}); known keys: {allowed}")
        else:
            lines.append(f"config key {key!r} (from {source}): {e['msg']}, got {e.get('input')!r}")
    return "; ".join(lines)


def _env_values(environ: dict[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in KVShelfConfig.model_fields:
        for prefix in ("LMCACHE_", "KVSHELF_"):  # KVSHELF_ wins when both are set
            raw = environ.get(prefix + name.upper())
            if raw is not None:
                values[name] = raw
    return values


def load_config(
    path: str | os.PathLike | None = None,
    *,
    environ: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> KVShelfConfig:
    environ = dict(os.environ if environ is None else environ)
    path = path or environ.get("KVSHELF_CONFIG_FILE") or environ.get("LMCACHE_CONFIG_FILE")
    merged: dict[str, Any] = {}
    layers: list[tuple[str, dict]] = []
    if path:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file {str(file)!r} does not exist")
        data = yaml.safe_load(file.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(file)!r} must hold a mapping of keys to values")
        layers.append((str(file), data))
    layers.append(("environment", _env_values(environ)))
    layers.append(("overrides", {k: v for k, v in (overrides or {}).items() if v is not None}))
    for source, values in layers:
        merged.update(values)
        try:
            KVShelfConfig.model_validate(merged)
        except ValidationError as err:
            raise ConfigError(_format_error(err, source)) from None
    return KVShelfConfig.model_validate(merged)
