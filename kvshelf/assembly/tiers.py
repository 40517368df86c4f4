"""Build the tier stack a configuration asks for: CPU memory, then local disk, then one remote store.

This reads the config; storage/ itself never does (it gets codecs, paths and numbers).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import urlsplit

from kvshelf.codecs import get_codec
from kvshelf.codecs.calibration import Calibration, Calibrations
from kvshelf.codecs.pool import CodecProcesses
from kvshelf.config import KVShelfConfig, TierCodec
from kvshelf.errors import ConfigError
from kvshelf.metrics import Metrics
from kvshelf.storage.auth import ObjectAuth
from kvshelf.storage.base import StorageBackend
from kvshelf.storage.tiers import TierManager
from kvshelf.storage.urls import remote_scheme

log = logging.getLogger(__name__)

# What a tier's cachegen calibration resolved to: a Calibration, a digest (tools, tests) or None.
TierCalibration = Calibration | str | None


def _redacted(url: str) -> str:
    """The URL without credentials, for logs."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return f"{parts.scheme}://{host}{parts.path}"


def uses_cachegen(config: KVShelfConfig) -> bool:
    return config.uses_cachegen()


def tier_codec(
    spec: TierCodec,
    calibration: TierCalibration = None,
    *,
    processes: CodecProcesses | None = None,
    calibrations: Calibrations | None = None,
):
    """A tier's codec from its spec; `calibration` sets cachegen's calibrated mode."""
    params = {}
    if spec.name == "cachegen":
        if spec.level:
            params["bits"] = spec.level
        if calibration is not None:
            params["calibration"] = calibration
    return get_codec(spec.name, params, key=spec.codec_key, processes=processes, calibrations=calibrations)


def check_disk_path(raw: str) -> Path:
    """The disk tier's folder, or a one-line ConfigError saying why it cannot be one."""
    path = Path(raw.removeprefix("file://")).expanduser().absolute()
    for virtual in ("/proc", "/sys", "/dev"):
        if path == Path(virtual) or Path(virtual) in path.parents:
            raise ConfigError(f"local_disk: {str(path)!r} is under {virtual}, which cannot hold files")
    existing = path
    while not existing.exists():
        if existing.is_symlink():
            raise ConfigError(f"local_disk: {str(existing)!r} is a broken symbolic link")
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == path else f"is under {str(existing)!r}, which is a file"
        raise ConfigError(f"local_disk: {str(path)!r} {what}, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"local_disk: {str(existing)!r} is not writable by this user")
    return path


def warn_if_unreachable(backend: StorageBackend, url: str) -> bool:
    """One warning line when the remote tier does not answer now (it is still used: it may come back)."""
    try:
        backend.contains_many([bytes(16)])
    except Exception as err:  # any failure: refused, timeout, DNS, auth
        log.warning(
            "remote tier %s is unreachable at start-up (%s: %s); requests recompute until it answers",
            _redacted(url),
            type(err).__name__,
            str(err).splitlines()[0] if str(err) else "",
        )
        return False
    return True


def object_auth(config: KVShelfConfig) -> ObjectAuth | None:
    """The keys of `remote_auth_key` (issue #15), or None: then the remote tier is trusted as is."""
    return ObjectAuth.from_secret(config.remote_auth_key) if config.remote_auth_key else None


def remote_backend(config: KVShelfConfig, codec, metrics: Metrics | None = None) -> StorageBackend:
    url = config.remote_url or ""
    auth = object_auth(config)
    try:
        scheme = remote_scheme(url)
    except ValueError as err:
        raise ConfigError(f"remote_url: {err}") from None
    if scheme.store == "redis":
        from kvshelf.storage.redis import RedisBackend

        return RedisBackend(
            url,
            codec,
            ttl_s=config.remote_ttl_s,
            part_bytes=config.redis_part_bytes,
            timeout_s=config.remote_timeout_s,
            ssl_ca_certs=config.redis_ssl_ca_certs,
            auth=auth,
            metrics=metrics,
        )
    from kvshelf.storage.s3 import S3Backend

    return S3Backend.from_url(
        url, codec, concurrency=config.s3_concurrency, timeout_s=config.remote_timeout_s, auth=auth, metrics=metrics
    )


def build_tiers(
    config: KVShelfConfig,
    calibration: TierCalibration | dict[str, TierCalibration] = None,
    *,
    metrics: Metrics | None = None,
    processes: CodecProcesses | None = None,
    calibrations: Calibrations | None = None,
) -> TierManager | None:
    """The tiers; `calibration` (one for every cachegen tier, or one per tier name: disk, remote) sets
    cachegen's calibrated mode. `metrics`, `processes` and `calibrations` are the owner's, passed down."""
    specs = config.tier_codecs()
    processes = processes or CodecProcesses(config.codec_workers, config.codec_output_pool_mb << 20)
    per_tier = calibration if isinstance(calibration, dict) else dict.fromkeys(specs, calibration)

    def codec(tier: str):
        return tier_codec(specs[tier], per_tier.get(tier), processes=processes, calibrations=calibrations)

    backends: list[StorageBackend] = []
    if config.local_cpu:
        from kvshelf.storage.memory import MemoryBackend

        backends.append(MemoryBackend(config.cpu_capacity_bytes, policy=config.cpu_eviction))
    if config.local_disk:
        from kvshelf.storage.disk import DiskBackend

        path = check_disk_path(config.local_disk)
        # No MAC on the disk tier: its folder belongs to this process on this host, and whoever can
        # write it can write the model and the code as well; a MAC there would cost (measured, see
        # BENCHMARKS.md) without guarding a boundary. Its reads are bounded and checked like any tier's.
        backends.append(
            DiskBackend(path, config.disk_capacity_bytes, codec("disk"), fsync=config.disk_fsync, metrics=metrics)
        )
    if config.remote_url:
        if not config.remote_auth_key:
            log.warning(
                "remote tier %s is trusted as is: without remote_auth_key anyone who can write it can make "
                "this instance load KV of their choosing; set remote_auth_key (the same secret on every "
                "trusted instance) to authenticate stored objects",
                _redacted(config.remote_url),
            )
        remote = remote_backend(config, codec("remote"), metrics)
        warn_if_unreachable(remote, config.remote_url)
        backends.append(remote)
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
        read_window=config.tier_read_window,
    )
