"""Wire a configuration into a ready-to-use shelf: model runner, tokenizer, cache engine, generator."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from kvshelf.advice.cost import CostModel
from kvshelf.advice.guard import Guard
from kvshelf.blend.blender import Blender
from kvshelf.cache.engine import CacheEngine
from kvshelf.config import KVShelfConfig
from kvshelf.errors import ConfigError
from kvshelf.generation import CachedGenerator
from kvshelf.metrics import metrics
from kvshelf.model.loader import LoadedModel, load_model
from kvshelf.model.runner import ModelRunner
from kvshelf.storage.factory import build_tiers, uses_cachegen

log = logging.getLogger(__name__)


@dataclass
class Shelf:
    config: KVShelfConfig
    model: LoadedModel
    engine: CacheEngine | None
    generator: CachedGenerator

    @property
    def runner(self) -> ModelRunner:
        return self.model.runner

    def close(self) -> None:
        """Finish write-behind and close tier connections."""
        if self.engine is not None:
            self.engine.close()


def codec_calibration(config: KVShelfConfig, runner: ModelRunner, tokenizer=None) -> str | None:
    """The digest of the calibration cachegen tiers should use, making it first if needed; None when no
    tier uses cachegen or calibration is off. Computing one takes a few dozen short forwards, once per
    model: it is kept in the cache folder and found again by the model's fingerprint."""
    if config.codec_calibration == "off" or not uses_cachegen(config):
        return None
    from kvshelf.codecs.calibration import CalibrationError
    from kvshelf.model.calibrate import calibration_for

    path = None if config.codec_calibration == "auto" else config.codec_calibration
    if path is None and tokenizer is None:
        raise ConfigError("codec_calibration: auto needs the model's tokenizer; give a .kvcal path or off")
    try:
        return calibration_for(runner, tokenizer, path=path).digest
    except CalibrationError as err:
        raise ConfigError(f"codec_calibration: {err}") from None


def build_engine(config: KVShelfConfig, runner: ModelRunner, tokenizer=None) -> CacheEngine | None:
    tiers = build_tiers(config, codec_calibration(config, runner, tokenizer))
    if tiers is None:
        return None
    return CacheEngine(
        runner.fingerprint(),
        tiers,
        chunk_size=config.chunk_size,
        save_partial_chunks=config.save_unfull_chunk,
        pin_memory=config.pin_memory,
    )


def check_supported(config: KVShelfConfig) -> None:
    """Refuse or explain settings that this version cannot honour as asked, rather than ignore them."""
    if config.use_layerwise and config.enable_blending:
        log.warning(
            "use_layerwise with enable_blending: blended prompts load their chunks whole (CacheBlend needs "
            "every chunk's KV before its check layer); prompts without separators load layer by layer"
        )


def open_shelf(
    config: KVShelfConfig | None = None, *, show_progress: bool = True, loaded: LoadedModel | None = None
) -> Shelf:
    """A shelf for `config`; `loaded` reuses a model already loaded (it must be the config's model)."""
    config = config or KVShelfConfig()
    check_supported(config)
    if loaded is None:
        loaded = load_model(config.model, device=config.device, dtype=config.dtype, show_progress=show_progress)
    engine = build_engine(config, loaded.runner, loaded.tokenizer)
    blender = None
    if config.enable_blending:
        try:
            blender = Blender(
                loaded.runner,
                engine,
                check_layers=config.blend_check_layers,
                ratios=config.blend_recompute_ratios,
                metrics=metrics(),
            )
        except ValueError as err:
            raise ConfigError(str(err)) from None
    guard = None
    if config.guard and engine is not None:
        cost = CostModel.for_runner(loaded.runner)
        guard = Guard(cost, min_tokens=config.min_cached_tokens or config.chunk_size)
    generator = CachedGenerator(
        loaded.runner,
        engine,
        loaded.tokenizer,
        store_generated=config.store_generated,
        blender=blender,
        blend_special_str=config.blend_special_str,
        use_layerwise=config.use_layerwise and engine is not None,
        use_async_load=config.use_async_load,
        buffer_size=config.buffer_size,
        layerwise_store=config.layerwise_store,
        guard=guard,
        metrics=metrics(),
    )
    return Shelf(config, loaded, engine, generator)
