"""Turn a configuration into a shelf: tiers, codecs, calibrations, engine, metrics, codec processes, and
(for kvshelf's own generation loop) the model, guard, blender and generator. Every runtime assembles
here: `kvshelf serve`, `generate`, `demo`, `bench`, `advise`, `calibrate` and the vLLM connector.

What a shelf owns (its metrics, codec processes and calibrations) is made here and passed down; nothing
is process-wide, so two shelves in one process do not interfere.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from kvshelf.advice.cost import CostModel
from kvshelf.advice.guard import Guard
from kvshelf.assembly.runtimes import check_runtime
from kvshelf.assembly.tiers import build_tiers
from kvshelf.blend.blender import Blender
from kvshelf.cache.engine import CacheEngine
from kvshelf.cache.fingerprint import ModelFingerprint
from kvshelf.codecs import calibration as calib
from kvshelf.codecs.pool import CodecProcesses
from kvshelf.config import KVShelfConfig, TierCodec
from kvshelf.errors import ConfigError
from kvshelf.integrations.hf import CachedGenerator
from kvshelf.metrics import Metrics
from kvshelf.model.loader import LoadedModel, load_model
from kvshelf.model.runner import ModelRunner

log = logging.getLogger(__name__)


@dataclass
class Owned:
    """What one shelf owns and passes down to what it builds."""

    metrics: Metrics
    codec_processes: CodecProcesses
    calibrations: calib.Calibrations = field(default_factory=calib.Calibrations)

    @classmethod
    def for_config(cls, config: KVShelfConfig) -> Owned:
        return cls(Metrics(config.metrics_prefix), CodecProcesses(config.codec_workers))

    def close(self) -> None:
        self.codec_processes.close()


@dataclass
class Shelf:
    config: KVShelfConfig
    model: LoadedModel
    engine: CacheEngine | None
    generator: CachedGenerator
    owned: Owned | None = None  # made from the config when not given

    def __post_init__(self) -> None:
        if self.owned is None:
            self.owned = Owned.for_config(self.config)

    @property
    def runner(self) -> ModelRunner:
        return self.model.runner

    @property
    def metrics(self) -> Metrics:
        return self.owned.metrics

    def close(self) -> None:
        """Finish write-behind, close tier connections, stop the codec processes."""
        if self.engine is not None:
            self.engine.close()
        self.owned.close()


def tier_calibration(
    spec: TierCodec,
    fingerprint: ModelFingerprint | None,
    *,
    runner: ModelRunner | None = None,
    tokenizer=None,
    calibrations: calib.Calibrations | None = None,
) -> calib.Calibration | None:
    """The calibration a cachegen tier codes with: a .kvcal file (checked against the model's KV layout);
    or, with `auto`, the model's own, made once from a few dozen short forwards and kept in the cache
    folder: only where kvshelf runs the model (`runner`); inside vLLM `auto` runs uncalibrated."""
    if spec.name != "cachegen" or spec.calibration == "off":
        return None
    try:
        if spec.calibration != "auto":
            cal = calib.load(spec.calibration)
            if fingerprint is not None:
                cal.check_layout((fingerprint.num_layers, fingerprint.num_kv_heads, fingerprint.head_dim))
        elif runner is None:
            log.info("cachegen runs uncalibrated in vLLM; `kvshelf calibrate` makes a file for codec_calibration")
            return None
        elif tokenizer is None:
            raise ConfigError(f"{spec.calibration_key}: auto needs the model's tokenizer; give a .kvcal path or off")
        else:
            from kvshelf.model.calibrate import calibration_for

            cal = calibration_for(runner, tokenizer)
    except calib.CalibrationError as err:
        raise ConfigError(f"{spec.calibration_key}: {err}") from None
    return calibrations.add(cal) if calibrations is not None else cal


def codec_calibration(config: KVShelfConfig, runner: ModelRunner, tokenizer=None) -> str | None:
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
    runner: ModelRunner | None = None,
    tokenizer=None,
) -> CacheEngine | None:
    """The cache engine for a model: its tiers with their codecs and calibrations; None without tiers."""
    specs = config.tier_codecs()
    calibrations = {
        tier: tier_calibration(spec, fingerprint, runner=runner, tokenizer=tokenizer, calibrations=owned.calibrations)
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


def build_engine(
    config: KVShelfConfig, runner: ModelRunner, tokenizer=None, *, owned: Owned | None = None
) -> CacheEngine | None:
    return open_engine(
        config, runner.fingerprint(), owned=owned or Owned.for_config(config), runner=runner, tokenizer=tokenizer
    )


def check_supported(config: KVShelfConfig) -> None:
    """Refuse or explain settings that this version cannot honour as asked, rather than ignore them."""
    if config.use_layerwise and config.enable_blending:
        log.warning(
            "use_layerwise with enable_blending: blended prompts load their chunks whole (CacheBlend needs "
            "every chunk's KV before its check layer); prompts without separators load layer by layer"
        )


def min_cached_tokens(config: KVShelfConfig) -> int:
    """Prompts shorter than this skip the cache (the one place its default, one chunk, is written)."""
    return config.min_cached_tokens or config.chunk_size


def open_shelf(
    config: KVShelfConfig | None = None,
    *,
    show_progress: bool = True,
    loaded: LoadedModel | None = None,
    runtime: str | None = "library",
) -> Shelf:
    """A shelf for `config`; `loaded` reuses a model already loaded (it must be the config's model).
    `runtime` names who runs it (see assembly/runtimes.py): keys set that it ignores are refused."""
    config = config or KVShelfConfig()
    if runtime is not None:
        check_runtime(config, runtime)
    check_supported(config)
    if loaded is None:
        loaded = load_model(config.model, device=config.device, dtype=config.dtype, show_progress=show_progress)
    owned = Owned.for_config(config)
    engine = open_engine(
        config, loaded.runner.fingerprint(), owned=owned, runner=loaded.runner, tokenizer=loaded.tokenizer
    )
    blender = None
    if config.enable_blending:
        try:
            blender = Blender(
                loaded.runner, engine, check_layers=config.blend_check_layers, ratios=config.blend_recompute_ratios
            )
        except ValueError as err:
            raise ConfigError(str(err)) from None
    guard = None
    if config.guard and engine is not None:
        cost = CostModel.for_runner(loaded.runner)
        guard = Guard(cost, min_tokens=min_cached_tokens(config), metrics=owned.metrics)
    generator = CachedGenerator(
        loaded.runner,
        engine,
        loaded.tokenizer,
        store_generated=config.store_generated,
        blender=blender,
        blend_separator=config.blend_special_str,
        layerwise=config.use_layerwise and engine is not None,
        async_load=config.use_async_load,
        buffer_layers=config.buffer_size,
        layerwise_store=config.layerwise_store,
        guard=guard,
    )
    return Shelf(config, loaded, engine, generator, owned)
