"""The one place where a configuration becomes a running shelf, for every runtime.

engine.py: config + model fingerprint -> tiers, codecs, calibrations, cache engine (the vLLM connector);
shelf.py: that plus kvshelf's own model and request path (serve, generate, demo, bench, advise);
runtimes.py: the keys each runtime honours; tiers.py: config -> tier stack. Names load on first use, so
the vLLM connector does not import the model code.
"""

from importlib import import_module

_EXPORTS = {
    "RUNTIMES": "kvshelf.assembly.runtimes",
    "check_runtime": "kvshelf.assembly.runtimes",
    "Owned": "kvshelf.assembly.engine",
    "build_engine": "kvshelf.assembly.engine",
    "codec_calibration": "kvshelf.assembly.engine",
    "min_cached_tokens": "kvshelf.assembly.engine",
    "open_engine": "kvshelf.assembly.engine",
    "tier_calibration": "kvshelf.assembly.engine",
    "Shelf": "kvshelf.assembly.shelf",
    "open_shelf": "kvshelf.assembly.shelf",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kvshelf.assembly' has no attribute {name!r}")
