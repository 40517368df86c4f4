"""KVShelfConfig: the key table (kvshelf.config.keys) with the checks a type or bound cannot express (codec,
calibration and blend signal names, ratios, lists given as one value), the checks across keys (levels and
calibrations apply to cachegen tiers only), and what the keys derive (each byte tier's codec spec, capacities).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import field_validator, model_validator

from kvshelf.codecs import CODEC_NAMES
from kvshelf.config.keys import ConfigKeys

GB = 1 << 30


@dataclass(frozen=True)
class TierCodec:
    """One tier's codec spec: its name, cachegen level (None: the codec's default) and calibration
    (auto, off or a .kvcal path), with the config keys they came from (for error messages)."""

    name: str
    level: int | None
    calibration: str
    codec_key: str
    level_key: str
    calibration_key: str


class KVShelfConfig(ConfigKeys):
    """kvshelf's settings, checked. kvshelf.config.load_config layers them from a file, the environment and
    the command line; KVShelfConfig(key=value, ...) takes them directly (defaults for the rest)."""

    @field_validator("local_disk_codec", "remote_serde")
    @classmethod
    def _known_codec(cls, value: str) -> str:
        if value not in CODEC_NAMES:
            raise ValueError(f"unknown codec {value!r}; known: {', '.join(CODEC_NAMES)}")
        return value

    @field_validator("codec_calibration", "local_disk_codec_calibration", "remote_serde_calibration")
    @classmethod
    def _calibration_source(cls, value: str | None) -> str | None:
        if value is not None and value not in ("auto", "off") and not value.endswith(".kvcal"):
            raise ValueError("must be auto, off or a path to a .kvcal file")
        return value

    # issue 19: the seed's env vars hold one value (LMCACHE_BLEND_CHECK_LAYERS=1,
    # LMCACHE_BLEND_RECOMPUTE_RATIOS=0.15) or a comma-separated list; both mean a list here.
    @field_validator("blend_check_layers", "blend_recompute_ratios", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        if isinstance(value, str) and "," in value:
            return [v.strip() for v in value.strip("[] ").split(",") if v.strip()]
        return [value] if isinstance(value, int | float | str) and not isinstance(value, bool) else value

    @field_validator("blend_selection_signal")
    @classmethod
    def _blend_signal(cls, value: str) -> str:
        signals = ("kv", "k", "v", "question", "kv+question")  # kvshelf.blend.selection.SIGNALS (no torch here)
        if value not in signals:
            raise ValueError(f"must be one of {', '.join(signals)}, got {value!r}")
        return value

    @field_validator("blend_recompute_ratios")
    @classmethod
    def _ratios(cls, value: list[float]) -> list[float]:
        if not value or any(not 0.0 <= r <= 1.0 for r in value):
            raise ValueError(f"each ratio must be within [0, 1], got {value}")
        return value

    @model_validator(mode="after")
    def _levels_fit_codecs(self) -> KVShelfConfig:
        """Levels and calibrations apply to cachegen tiers only; the bug this replaces checked the disk
        codec (int8 by default) even with no disk tier (issue #14)."""
        for spec in self.tier_codecs().values():
            if spec.name == "cachegen":
                continue
            for key, value in ((spec.level_key, spec.level), (spec.calibration_key, spec.calibration)):
                if value is not None and key not in ("quantization_bits", "codec_calibration"):
                    what = "8 bits only" if spec.name == "int8" else "no level"
                    raise ValueError(f"{key}={value}: the {spec.codec_key} codec {spec.name!r} has {what}")
        if self.quantization_bits not in (None, 8) and not self.uses_cachegen():
            raise ValueError(
                f"quantization_bits={self.quantization_bits}: no enabled tier uses cachegen (the int8 codec has "
                "8 bits only); set local_disk_codec or remote_serde to cachegen"
            )
        return self

    def tier_codecs(self) -> dict[str, TierCodec]:
        """The codec spec of each enabled byte tier (disk, remote), per-tier keys over the shared ones.
        The CPU tier keeps tensors as they are: it has no codec."""
        out = {}
        for tier, enabled, codec_key in (
            ("disk", self.local_disk, "local_disk_codec"),
            ("remote", self.remote_url, "remote_serde"),
        ):
            if not enabled:
                continue
            name = getattr(self, codec_key)
            level = getattr(self, codec_key + "_level")
            calibration = getattr(self, codec_key + "_calibration")
            shared = name == "cachegen"  # the shared keys reach cachegen tiers only
            out[tier] = TierCodec(
                name=name,
                level=level if level is not None else (self.quantization_bits if shared else None),
                calibration=calibration or (self.codec_calibration if shared else "off"),
                codec_key=codec_key,
                level_key=(codec_key + "_level") if level is not None else "quantization_bits",
                calibration_key=(codec_key + "_calibration") if calibration is not None else "codec_calibration",
            )
        return out

    def uses_cachegen(self) -> bool:
        return any(spec.name == "cachegen" for spec in self.tier_codecs().values())

    @property
    def cpu_capacity_bytes(self) -> int:
        return int(self.max_local_cpu_size * GB)

    @property
    def disk_capacity_bytes(self) -> int:
        return int(self.max_local_disk_size * GB)
