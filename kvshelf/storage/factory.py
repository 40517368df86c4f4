"""Build the tier stack a configuration asks for: CPU memory, then local disk, then one remote store."""

from __future__ import annotations

from kvshelf.codecs import get_codec
from kvshelf.config import KVShelfConfig
from kvshelf.errors import ConfigError
from kvshelf.storage.base import StorageBackend
from kvshelf.storage.tiers import TierManager


def uses_cachegen(config: KVShelfConfig) -> bool:
    return "cachegen" in (
        config.local_disk_codec if config.local_disk else None,
        config.remote_serde if config.remote_url else None,
    )


def tier_codec(config: KVShelfConfig, name: str, key: str, calibration: str | None = None):
    """A tier's codec; `quantization_bits` sets cachegen's precision, `calibration` (a digest) its mode."""
    params = {}
    if name == "cachegen":
        if config.quantization_bits:
            params["bits"] = config.quantization_bits
        if calibration:
            params["calibration"] = calibration
    return get_codec(name, params, key=key)


REDIS_SCHEMES = ("redis", "rediss", "unix", "valkey", "valkeys", "redis-cluster", "rediss-cluster")


def remote_backend(config: KVShelfConfig, calibration: str | None = None) -> StorageBackend:
    url = config.remote_url or ""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    codec = tier_codec(config, config.remote_serde, "remote_serde", calibration)
    if scheme in REDIS_SCHEMES:
        from kvshelf.storage.redis import RedisBackend

        return RedisBackend(
            url,
            codec,
            ttl_s=config.remote_ttl_s,
            part_bytes=config.redis_part_bytes,
            timeout_s=config.remote_timeout_s,
            ssl_ca_certs=config.redis_ssl_ca_certs,
        )
    if scheme == "s3":
        from kvshelf.storage.s3 import S3Backend

        return S3Backend.from_url(url, codec, concurrency=config.s3_concurrency, timeout_s=config.remote_timeout_s)
    raise ConfigError(f"remote_url: unsupported scheme in {url!r}; use one of {', '.join(REDIS_SCHEMES)}, s3")


def build_tiers(config: KVShelfConfig, calibration: str | None = None) -> TierManager | None:
    """The tiers; cachegen tiers code with the calibration of this digest when one is given."""
    from kvshelf.codecs import pool

    pool.configure(config.codec_workers)
    backends: list[StorageBackend] = []
    if config.local_cpu:
        from kvshelf.storage.memory import MemoryBackend

        backends.append(MemoryBackend(config.cpu_capacity_bytes, policy=config.cpu_eviction))
    if config.local_disk:
        from kvshelf.storage.disk import DiskBackend

        path = config.local_disk.removeprefix("file://")
        codec = tier_codec(config, config.local_disk_codec, "local_disk_codec", calibration)
        backends.append(DiskBackend(path, config.disk_capacity_bytes, codec, fsync=config.disk_fsync))
    if config.remote_url:
        backends.append(remote_backend(config, calibration))
    if not backends:
        return None
    return TierManager(
        backends,
        write_queue_size=config.write_queue_size,
        write_queue_bytes=config.write_queue_bytes,
        write_block_s=config.write_block_ms / 1000,
        breaker_failures=config.breaker_failures,
        breaker_reset_s=config.breaker_reset_s,
        deadline_s=config.tier_deadline_s or 2 * config.remote_timeout_s,  # a connect and a read
        write_deadline_s=config.tier_write_deadline_s,
        slow_s=config.tier_slow_s,
        workers=config.tier_workers,
    )
