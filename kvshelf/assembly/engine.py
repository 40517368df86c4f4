"""The engine half of the assembly: a config and a model fingerprint -> tiers, codecs, calibrations and a
cache engine, with what they own (metrics, codec processes, calibrations). The vLLM connector assembles
here (vLLM runs the model); shelf.py adds kvshelf's own model and request path on top. No model code is
imported here (calibrating from a runner imports it when asked).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from kvshelf.assembly.tiers import build_tiers
from kvshelf.cache.engine import CacheEngine
from kvshelf.cache.fingerprint import ModelFingerprint
from kvshelf.codecs import calibration as calib
from kvshelf.codecs.pool import CodecProcesses
from kvshelf.config import KVShelfConfig, TierCodec
from kvshelf.errors import ConfigError
from kvshelf.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass
class Owned:
    """What one shelf owns and passes down to what it builds."""

    metrics: Metrics
    codec_processes: CodecProcesses
    calibrations: calib.Calibrations = field(default_factory=calib.Calibrations)
    jobs: list = field(default_factory=list)  # background work to stop first on close (auto-calibration)

    @classmethod
    def for_config(cls, config: KVShelfConfig) -> Owned:
        return cls(
            Metrics(config.metrics_prefix), CodecProcesses(config.codec_workers, config.codec_output_pool_mb << 20)
        )

    def close(self) -> None:
        for job in self.jobs:
            job.stop()
        self.codec_processes.close()


def tier_calibration(
    spec: TierCodec,
    fingerprint: ModelFingerprint | None,
    *,
    runner=None,
    tokenizer=None,
    calibrations: calib.Calibrations | None = None,
    auto: calib.Calibration | None = None,
) -> calib.Calibration | None:
    """The calibration a cachegen tier codes with: a .kvcal file (checked against the model's KV layout);
    or, with `auto`, the model's own, made once from a few dozen short forwards and kept in the cache
    folder: only where kvshelf runs the model (`runner`); inside vLLM the tiers start uncalibrated (or raw)
    and kvshelf.assembly.autocalibration switches them once the model's calibration exists."""
    if spec.name != "cachegen" or spec.calibration == "off":
        return None
    try:
        if spec.calibration != "auto":
            cal = calib.load(spec.calibration)
            if fingerprint is not None:
                cal.check_layout((fingerprint.num_layers, fingerprint.num_kv_heads, fingerprint.head_dim))
        elif runner is None and auto is not None:  # inside vLLM, the model's auto calibration exists already
            cal = auto
        elif runner is None:
            log.info("cachegen starts uncalibrated in vLLM; its auto calibration follows (codec_calibration_pending)")
            return None
        elif tokenizer is None:
            raise ConfigError(f"{spec.calibration_key}: auto needs the model's tokenizer; give a .kvcal path or off")
        else:
            from kvshelf.model.calibrate import calibration_for

            cal = calibration_for(runner, tokenizer)
    except calib.CalibrationError as err:
        raise ConfigError(f"{spec.calibration_key}: {err}") from None
    return calibrations.add(cal) if calibrations is not None else cal


def codec_calibration(config: KVShelfConfig, runner, tokenizer=None) -> str | None:
    """The digest of the calibration the first cachegen tier uses (None: none or off)."""
    for spec in config.tier_codecs().values():
        fingerprint = runner.fingerprint() if runner is not None else None
        cal = tier_calibration(spec, fingerprint, runner=runner, tokenizer=tokenizer)
        if cal is not None:
            return cal.digest
    return None


def open_engine(
    config: KVShelfConfig,
    fingerprint: ModelFingerprint,
    *,
    owned: Owned,
    runner=None,
    tokenizer=None,
    auto_calibration: calib.Calibration | None = None,
) -> CacheEngine | None:
    """The cache engine for a model: its tiers with their codecs and calibrations; None without tiers.
    `auto_calibration`: what `auto` means where kvshelf does not run the model (kvshelf.assembly.autocalibration)."""
    specs = config.tier_codecs()
    calibrations = {
        tier: tier_calibration(
            spec,
            fingerprint,
            runner=runner,
            tokenizer=tokenizer,
            calibrations=owned.calibrations,
            auto=auto_calibration,
        )
        for tier, spec in specs.items()
    }
    tiers = build_tiers(
        config,
        calibrations,
        metrics=owned.metrics,
        processes=owned.codec_processes,
        calibrations=owned.calibrations,
    )
    if tiers is None:
        return None
    return CacheEngine(
        fingerprint,
        tiers,
        chunk_size=config.chunk_size,
        save_unfull_chunk=config.save_unfull_chunk,
        pin_memory=config.pin_memory,
    )


def build_engine(config: KVShelfConfig, runner, tokenizer=None, *, owned: Owned | None = None) -> CacheEngine | None:
    """The engine for a model kvshelf runs (`runner`: a ModelRunner)."""
    return open_engine(
        config, runner.fingerprint(), owned=owned or Owned.for_config(config), runner=runner, tokenizer=tokenizer
    )


def min_cached_tokens(config: KVShelfConfig) -> int:
    """Prompts shorter than this skip the cache (the one place its default, one chunk, is written)."""
    return config.min_cached_tokens or config.chunk_size
