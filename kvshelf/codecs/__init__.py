"""KV codecs by name. Every tier stores through one of these."""

from __future__ import annotations

from kvshelf.codecs.base import Codec
from kvshelf.codecs.cachegen import CacheGenCodec
from kvshelf.codecs.int8 import Int8Codec
from kvshelf.codecs.raw import RawCodec
from kvshelf.errors import ConfigError

_CODECS: dict[str, type[Codec]] = {"none": RawCodec, "int8": Int8Codec, "cachegen": CacheGenCodec}
ALIASES = {"naive": "none", "raw": "none"}  # LMCache calls the raw format "naive"
CODEC_NAMES = sorted(_CODECS) + sorted(ALIASES)


def get_codec(name: str, params: dict | None = None, *, key: str = "codec", processes=None, calibrations=None) -> Codec:
    """A codec by name. `processes` (a CodecProcesses) and `calibrations` (a Calibrations) are its
    owner's, passed to the codecs that use them (cachegen)."""
    canonical = ALIASES.get(name, name)
    if canonical not in _CODECS:
        raise ConfigError(f"{key}: unknown codec {name!r}; known: {', '.join(CODEC_NAMES)}")
    owned = {"processes": processes, "calibrations": calibrations} if canonical == "cachegen" else {}
    try:
        return _CODECS[canonical](**(params or {}), **owned)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{key}: bad parameters for codec {name!r}: {err}") from None


__all__ = ["CODEC_NAMES", "Codec", "get_codec"]
