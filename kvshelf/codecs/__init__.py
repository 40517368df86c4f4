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


def get_codec(name: str, params: dict | None = None, *, key: str = "codec") -> Codec:
    canonical = ALIASES.get(name, name)
    if canonical not in _CODECS:
        raise ConfigError(f"{key}: unknown codec {name!r}; known: {', '.join(CODEC_NAMES)}")
    try:
        return _CODECS[canonical](**(params or {}))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{key}: bad parameters for codec {name!r}: {err}") from None


__all__ = ["CODEC_NAMES", "Codec", "get_codec"]
