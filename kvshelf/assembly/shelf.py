"""Turn a configuration into a shelf for kvshelf's own request path: the engine half (engine.py: tiers,
codecs, calibrations, cache engine, metrics, codec processes), then the model, guard, blender and
generator. `kvshelf serve`, `generate`, `demo`, `bench` and `advise` assemble here; the vLLM connector
uses engine.py alone.

What a shelf owns (its metrics, codec processes and calibrations) is made here and passed down; nothing
is process-wide, so two shelves in one process do not interfere.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from kvshelf.advice.cost import CostModel
from kvshelf.advice.decode_speed import learn_tier_codecs
from kvshelf.advice.guard import Guard
from kvshelf.assembly.engine import Owned, min_cached_tokens, open_engine
from kvshelf.assembly.runtimes import check_runtime
from kvshelf.blend.blender import Blender
from kvshelf.cache.engine import CacheEngine
from kvshelf.config import KVShelfConfig
from kvshelf.errors import ConfigError
from kvshelf.generation import CachedGenerator
from kvshelf.metrics import Metrics
from kvshelf.model.loader import LoadedModel, load_model
from kvshelf.model.runner import ModelRunner

log = logging.getLogger(__name__)


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


def check_supported(config: KVShelfConfig) -> None:
    """Refuse or explain settings that this version cannot honour as asked, rather than ignore them."""
    if config.use_layerwise and config.enable_blending:
        log.warning(
            "use_layerwise with enable_blending: blended prompts load their chunks whole (CacheBlend needs "
            "every chunk's KV before its check layer); prompts without separators load layer by layer"
        )


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
            blender = Blender.from_config(loaded.runner, engine, config, owned.metrics)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    guard = None
    if config.guard and engine is not None:
        cost = CostModel.for_runner(loaded.runner)
        runner = loaded.runner
        learn_tier_codecs(  # issue #17: the guard predicts loads with its codecs' decode speeds measured here
            cost,
            [(t.name, t.backend.codec) for t in engine.backend.tiers],
            (runner.num_layers, runner.num_kv_heads, runner.head_dim),
            runner.dtype,
            runner.device,
        )
        guard = Guard(cost, min_tokens=min_cached_tokens(config), metrics=owned.metrics)
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
        metrics=owned.metrics,
    )
    return Shelf(config, loaded, engine, generator, owned)
