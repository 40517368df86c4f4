"""KV codecs by name. Every tier stores through one of these."""

from __future__ import annotations

from kvshelf.codecs.base import Codec
from kvshelf.codecs.int8 import Int8Codec
from kvshelf.codecs.raw import RawCodec
from kvshelf.errors import ConfigError

_CODECS: dict[str, type[Codec]] = {"none": RawCodec, "int8": Int8Codec}
ALIASES = {"naive": "none", "raw": "none"}  # LMCache calls the raw format "naive"
CODEC_NAMES = sorted(_CODECS) + sorted(ALIASES)


def get_codec(name: str, params: dict | None = None, *, key: str = "codec") -> Codec:
    canonical = ALIASES.get(name, name)
    if canonical not in _CODECS:
        raise ConfigError(f"{key}: unknown codec {name!r}; known: {', '.join(CODEC_NAMES)}")
    return _CODECS[canonical](**(params or {}))


__all__ = ["CODEC_NAMES", "Codec", "get_codec"]
