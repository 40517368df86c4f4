"""Codec calibration: per-model transforms that let cachegen's scalar quantiser spend bits where they count.

A calibration is pure data computed once per model (kvshelf.model.calibrate does it from the model's own KV,
queries and output projection) and stored as a safetensors file named by the digest of its bytes:

- K is coded before RoPE: each key is rotated back by its position (its chunk's start + index), which
  turns the position-dependent spread of K into a fixed low-rank structure (on Gemma 3 270M the
  decorrelation gain of K rises from ~1-4 dB after RoPE to ~7-22 dB before it).
- Each (layer, K|V, head) gets a mean and an invertible linear transform: a weighting by what the error
  costs (K: the queries' energy per rotation pair; V: the output projection's Gram matrix), then the
  eigenvectors of the weighted covariance (a Karhunen-Loeve transform). One uniform step then quantises
  every coefficient: with entropy coding that is the rate-optimal scalar quantiser.
- A step per (layer, K|V) from measured sensitivity: each layer's step is set so that every layer adds the
  same next-token KL divergence (layers that shape everything downstream get finer steps).

Encoders name the calibration's digest in each chunk's codec parameters; a reader without that
calibration treats the chunk as a miss. Files are checked against their digest on load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from kvshelf.errors import KVShelfError
from kvshelf.kvmath.rope import rotate_keys as rotate  # noqa: F401  (cachegen codes K before RoPE: calib.rotate)
from kvshelf.paths import cache_root

log = logging.getLogger(__name__)

CALIBRATION_VERSION = 1
SUFFIX = ".kvcal"
_TENSORS = ("inv_freq", "mean", "forward", "inverse", "step")


class CalibrationError(ValueError):
    """A calibration is damaged or does not fit the KV it is asked to code."""


class MissingCalibration(KVShelfError):
    """A stored chunk names a calibration this process does not have: sound data, unreadable here."""


@dataclass(frozen=True, eq=False)
class Calibration:
    inv_freq: torch.Tensor  # [layers, head_dim / 2] RoPE inverse frequencies (0 where a layer has none)
    mean: torch.Tensor  # [layers, 2, kv_heads, head_dim]
    forward: torch.Tensor  # [layers, 2, kv_heads, head_dim, head_dim]: coefficients = forward @ (x - mean)
    inverse: torch.Tensor  # [layers, 2, kv_heads, head_dim, head_dim]: x = inverse @ coefficients + mean
    step: torch.Tensor  # [layers, 2]: quantisation step of the coefficients at precision level 5
    info: dict = field(default_factory=dict)  # provenance: model digest, tokens used, KL target
    _cache: dict = field(default_factory=dict, repr=False)  # digest, copies on devices

    def __post_init__(self):
        layers, two, heads, dim = self.mean.shape
        expected = {
            "inv_freq": (layers, dim // 2),
            "forward": (layers, 2, heads, dim, dim),
            "inverse": (layers, 2, heads, dim, dim),
            "step": (layers, 2),
        }
        if two != 2 or dim % 2:
            raise CalibrationError(f"calibration mean has shape {tuple(self.mean.shape)}")
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise CalibrationError(f"calibration {name} has shape {tuple(getattr(self, name).shape)}, not {shape}")
        if not bool((self.step > 0).all()) or not bool(torch.isfinite(self.step).all()):
            raise CalibrationError("calibration steps must be positive and finite")

    @property
    def layout(self) -> tuple[int, int, int]:
        """(layers, kv_heads, head_dim) of the KV it codes."""
        layers, _, heads, dim = self.mean.shape
        return layers, heads, dim

    def to_bytes(self) -> bytes:
        tensors = {name: getattr(self, name).float().contiguous() for name in _TENSORS}
        meta = {"kvshelf_calibration": str(CALIBRATION_VERSION), "info": json.dumps(self.info, sort_keys=True)}
        return st_save(tensors, metadata=meta)

    @property
    def digest(self) -> str:
        """Names the calibration: a hash of its version, tensors (fixed order, float32 bytes) and info.
        Not a hash of the file: safetensors does not promise the same bytes for the same content."""
        if "_digest" not in self._cache:
            h = hashlib.blake2b(digest_size=16, person=b"kvshelf-calib")
            h.update(f"{CALIBRATION_VERSION}\n{json.dumps(self.info, sort_keys=True)}".encode())
            for name in _TENSORS:
                t = getattr(self, name).float().contiguous()
                h.update(f"{name}{list(t.shape)}".encode())
                h.update(t.numpy().tobytes())
            self._cache["_digest"] = h.hexdigest()
        return self._cache["_digest"]

    @classmethod
    def from_bytes(cls, data: bytes, expected_digest: str | None = None) -> Calibration:
        cal = cls._parse(data)
        if expected_digest is not None and cal.digest != expected_digest:
            raise CalibrationError(f"calibration file does not match its digest {expected_digest}")
        return cal

    @classmethod
    def _parse(cls, data: bytes) -> Calibration:
        try:
            tensors = st_load(data)
            # safetensors keeps metadata in its JSON header; read it without torch
            header_len = int.from_bytes(data[:8], "little")
            meta = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
        except Exception as err:  # noqa: BLE001 - any parse failure means "not a calibration"
            raise CalibrationError(f"not a calibration file: {err}") from None
        if meta.get("kvshelf_calibration") != str(CALIBRATION_VERSION):
            raise CalibrationError(f"calibration version {meta.get('kvshelf_calibration')!r} is not supported")
        try:
            return cls(**{k: tensors[k] for k in _TENSORS}, info=json.loads(meta.get("info", "{}")))
        except KeyError as err:
            raise CalibrationError(f"calibration file lacks {err}") from None

    def tensors_on(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        """The transforms on `device` (cached: a GPU decoder uploads them once)."""
        key = str(torch.device(device))
        if key not in self._cache:
            self._cache[key] = {n: getattr(self, n).to(device) for n in _TENSORS}
        return self._cache[key]

    def decode_transform(self, level: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """(inverse transforms with the coefficient steps of precision `level` folded in, transposed for
        coefficients @ matrix: [layers, 2, heads, dim, dim]; means [layers, 2, heads, dim]) on `device`,
        cached: what a decoder multiplies integer symbols by."""
        key = f"decode-{level}-{torch.device(device)}"
        if key not in self._cache:
            steps = self.step * 2.0 ** (5 - level)  # as cachegen's encoder: each level halves the steps
            scaled = (self.inverse * steps[:, :, None, None, None]).transpose(-1, -2).contiguous()
            self._cache[key] = (scaled.to(device), self.mean.to(device))
        return self._cache[key]

    def encode_transform(self, level: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """(forward transforms divided by the coefficient steps of precision `level`, transposed for
        vectors @ matrix: [layers, 2, heads, dim, dim]; the mean's coefficients, negated and divided
        likewise: [layers, 2, heads, dim]) on `device`, cached: x @ scaled + bias = coefficients / step."""
        key = f"encode-{level}-{torch.device(device)}"
        if key not in self._cache:
            steps = (self.step * 2.0 ** (5 - level))[:, :, None, None]
            scaled = (self.forward.transpose(-1, -2) / steps[..., None]).contiguous()
            bias = -torch.einsum("lkhj,lkhij->lkhi", self.mean, self.forward) / steps
            self._cache[key] = (scaled.to(device), bias.contiguous().to(device))
        return self._cache[key]

    def check_layout(self, layout: tuple[int, int, int]) -> None:
        """Refuse a model of another (layers, kv_heads, head_dim)."""
        if self.layout != tuple(layout):
            raise CalibrationError(
                f"calibration for (layers, kv heads, head dim) {self.layout}, the model has {layout}"
            )

    def check_fits(self, shape: tuple[int, ...]) -> None:
        """Refuse a layer's KV [2, heads, tokens, dim] of another layout."""
        layers, heads, dim = self.layout
        if len(shape) != 4 or (shape[1], shape[3]) != (heads, dim):
            raise CalibrationError(f"calibration for {layers} layers x {heads} heads x {dim} dims, KV is {shape}")


def fit_transform(samples: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, forward and inverse transform for vectors `samples` [n, dim] whose errors cost e^T W e with
    W = `weight` [dim, dim] (symmetric, positive semi-definite): whiten the cost, then rotate onto the
    principal axes of the weighted data. Returns float32 tensors."""
    x = samples.double()
    mean = x.mean(0)
    evals, evecs = torch.linalg.eigh(weight.double())
    evals = evals.clamp_min(float(evals.max()) * 1e-6)  # directions that cost nothing still decode finitely
    root = (evecs * evals.sqrt()) @ evecs.T
    inv_root = (evecs / evals.sqrt()) @ evecs.T
    z = (x - mean) @ root
    cov = z.T @ z / max(1, len(z))
    _, basis = torch.linalg.eigh(cov)
    forward = basis.T @ root
    inverse = inv_root @ basis
    return mean.float(), forward.float(), inverse.float()


# -- where calibrations live -------------------------------------------------------------------------------
class Calibrations:
    """The calibrations one owner (a shelf) gave its codecs, by digest; other digests are looked up in
    the calibration folder. Owned and passed down, so shelves never see each other's."""

    def __init__(self, *cals: Calibration):
        self._lock = threading.Lock()
        self._by_digest = {cal.digest: cal for cal in cals}

    def add(self, cal: Calibration) -> Calibration:
        with self._lock:
            self._by_digest[cal.digest] = cal
        return cal

    def lookup(self, digest: str) -> Calibration:
        with self._lock:
            cal = self._by_digest.get(digest)
        return cal if cal is not None else lookup(digest)


# Content-addressed (a digest names exactly one calibration's bytes), so what it holds cannot differ
# between users; tools and tests register here, shelves keep their own `Calibrations`.
_lock = threading.Lock()
_registry: dict[str, Calibration] = {}


def default_dir() -> Path:
    return cache_root() / "calibrations"


def register(cal: Calibration) -> str:
    """Make `cal` known to this process's codecs; returns its digest."""
    with _lock:
        _registry[cal.digest] = cal
    return cal.digest


def save(cal: Calibration, directory: Path | None = None) -> Path:
    directory = Path(directory or default_dir())
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{cal.digest}{SUFFIX}"
    if not path.exists():
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(cal.to_bytes())
        tmp.replace(path)
    return path


def load(path: str | Path) -> Calibration:
    """A calibration file, verified against its digest when it is named by one, and registered."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration file {path} does not exist")
    digest = path.name.removesuffix(SUFFIX) if path.name.endswith(SUFFIX) else None
    cal = Calibration.from_bytes(path.read_bytes(), expected_digest=digest)
    register(cal)
    return cal


def lookup(digest: str) -> Calibration:
    """The calibration with this digest: registered in this process, or a file in the default directory."""
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{32}", digest):
        raise CalibrationError(f"{digest!r} is not a calibration digest")  # it names a file: no paths
    with _lock:
        cal = _registry.get(digest)
    if cal is not None:
        return cal
    path = default_dir() / f"{digest}{SUFFIX}"
    if not path.is_file():
        raise MissingCalibration(f"cachegen calibration {digest} is not known here (looked in {path.parent})")
    return load(path)
