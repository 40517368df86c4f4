"""`cachegen`: layer-dependent quantisation + entropy coding with an ANS coder (constriction).

Two modes, chosen by whether the codec has a calibration (kvshelf.codecs.calibration):

CALIBRATED (the default where kvshelf runs the model): K is rotated back to before RoPE, every
(layer, K|V, head) vector goes through the calibration's transform (cost weighting + principal axes),
and one uniform step per (layer, K|V), set from measured sensitivity and the precision level `bits`
(each level halves it), quantises all coefficients. Each coefficient's symbols over the chunk's tokens
get a class (a quarter-octave of their spread, one byte) and are entropy-coded against a discretised
Gaussian of that spread, so no probability table is stored at all. The coder is an interleaved rANS with
static 14-bit tables (kvshelf.codecs.rans; params "coder": 2), decoded on the CPU without the GIL and on a
GPU from the same bytes (kvshelf.codecs.rans_gpu). Segment: magic b"CG", level (u8), flags (u8, bits 2
and 4), then a rANS part for K and one for V (classes, escapes, block word counts and states, words).

UNCALIBRATED (no calibration: e.g. inside vLLM, which runs the model itself):
Per layer segment (self-contained, so one layer decodes alone):
- Uniform quantisation with a step tied to the RMS, not the absmax, so that a few large values do not
  coarsen all the others: one step per (head, channel) over the chunk's tokens for K (K has outlier
  channels), one per (head, token) for V. step = rms / 2**(bits - 3); `bits` in late layers and
  `early_bits` in the first `early_fraction` of layers, which shape every later layer's input.
- Values more than 16 RMS out (attention-sink tokens, outlier channels) are kept exactly as escapes.
- Optionally (`delta=True`) tokens are coded as differences from their group's first.
- The symbols of K and of V are entropy-coded (ANS) against a histogram of this segment's own symbols,
  stored in the segment (a few hundred bytes per layer): decoding needs only the segment and the params.

Segment layout (little-endian): magic b"CG", K and V bits (u8), flags (u8), reserved (u8), K and V
alphabet sizes (u16), ANS words (u32) and escapes (u32) of K and of V; then K steps fp16 [H, D], V steps
fp16 [H, T], then each of these for K, then for V: counts u32, ANS words u32, escape positions i32,
escape values fp16.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from kvshelf.codecs import cachegen_uncalibrated as uncalibrated
from kvshelf.codecs import calibration as calib
from kvshelf.codecs import pool
from kvshelf.codecs.base import Codec, SegmentRows
from kvshelf.codecs.entropy import constriction

if TYPE_CHECKING:
    from kvshelf.codecs import rans

_CALIBRATED = 2
_RANS = 4  # calibrated segments written by the interleaved rANS coder (params "coder": 2)
CODER = 2  # 1 was constriction's ANS over class groups: such chunks are misses now
_CAL_HEAD = struct.Struct("<2sBB")


class CacheGenCodec(Codec):
    name = "cachegen"

    def __init__(
        self,
        bits: int = 5,
        early_bits: int = 6,
        early_fraction: float = 0.34,
        v_bits: int | None = None,
        delta: bool = False,
        group: int = 16,
        calibration: str | calib.Calibration | None = None,
        coder: int = CODER,
        *,
        processes: pool.CodecProcesses | None = None,
        calibrations: calib.Calibrations | None = None,
    ):
        if constriction is None:
            raise ImportError("the cachegen codec needs the 'constriction' package")
        # Parameters also come from stored headers: check types, not only ranges.
        for name, value in (("bits", bits), ("early_bits", early_bits), ("v_bits", v_bits)):
            if value is None and name == "v_bits":
                continue
            if type(value) is not int or not 2 <= value <= 8:
                raise ValueError(f"cachegen {name} must be an integer within 2..8, got {value!r}")
        if type(early_fraction) not in (int, float) or not 0 <= early_fraction <= 1:
            raise ValueError(f"cachegen early_fraction must be within 0..1, got {early_fraction!r}")
        if type(delta) is not bool:
            raise ValueError(f"cachegen delta must be true or false, got {delta!r}")
        if type(group) is not int or not 1 <= group <= 1 << 16:
            raise ValueError(f"cachegen group must be an integer within 1..65536, got {group!r}")
        if type(coder) is not int or coder != CODER:
            raise ValueError(f"cachegen coder {coder!r} is not supported (this kvshelf codes with coder {CODER})")
        if calibration is not None and not isinstance(calibration, str | calib.Calibration):
            raise ValueError(f"cachegen calibration must be a digest, got {calibration!r}")
        self.bits, self.early_bits, self.early_fraction = bits, early_bits, early_fraction
        self.v_bits, self.delta, self.group = v_bits, delta, group
        # A calibration, or its digest: then the transforms come from `calibrations` (the owner's
        # registry) or the calibration folder.
        if isinstance(calibration, str):
            calibration = (calibrations.lookup if calibrations else calib.lookup)(calibration)
        self.calibration = calibration or None
        self.processes = processes or pool.IN_PROCESS
        if self.calibration is not None:
            _rans().check_tables()

    def params(self) -> dict:
        return {
            "bits": self.bits,
            "early_bits": self.early_bits,
            "early_fraction": self.early_fraction,
            "v_bits": self.v_bits,
            "delta": self.delta,
            "group": self.group,
            **({"calibration": self.calibration.digest, "coder": CODER} if self.calibration is not None else {}),
        }

    def max_segment_bytes(self, shape, dtype) -> int:
        """No segment this codec writes is larger: per value at most a 24-bit ANS symbol (constriction's
        smallest probability is 2**-24) and an escape (8 bytes), plus per-row steps/classes and tables."""
        _, heads, tokens, dim = shape
        values = 2 * heads * tokens * dim
        return 12 * values + 4 * heads * (dim + tokens) + 64 * 1024

    def layer_bits(self, layer: int, num_layers: int) -> tuple[int, int]:
        """(K bits, V bits) for a layer: early layers get `early_bits` for both."""
        if layer < round(self.early_fraction * num_layers):
            return self.early_bits, self.early_bits
        return self.bits, self.v_bits or self.bits

    # -- codec verbs -------------------------------------------------------------------------------------
    def encode_layer(self, kv: torch.Tensor, layer: int, num_layers: int, position: int = 0) -> bytes:
        if self.calibration is not None:
            return _threads().encode_layers(self.calibration, self.bits, kv[None], [layer], position, self.processes)[0]
        return uncalibrated.encode(kv, *self.layer_bits(layer, num_layers), self.delta, self.group)

    def _decode_parts(self, data, shape, layer, num_layers):
        return uncalibrated.decode_parts(data, shape, self.layer_bits(layer, num_layers), self.delta, self.group)

    def decode_layer(self, data, shape, dtype, layer, num_layers, position=0) -> torch.Tensor:
        if self.calibration is not None:
            return self._decode_calibrated([data], shape, dtype, [layer], position)[0]
        return torch.from_numpy(uncalibrated.dequantize(self._decode_parts(data, shape, layer, num_layers), shape)).to(
            dtype
        )

    def decode_layers(self, segments, shape, dtype, layers, num_layers, position=0) -> list[torch.Tensor]:
        if self.calibration is not None:
            # (layer, K|V) halves in balanced units on `codec_workers` threads, each unit three calls that
            # release the GIL (kvshelf.codecs.cachegen_threads), no processes
            return list(self._decode_calibrated(segments, shape, dtype, list(layers), position).unbind(0))
        if not self.processes.workers:
            return super().decode_layers(segments, shape, dtype, layers, num_layers, position)
        # Each layer's entropy decoding runs in a worker; only the segment's bytes go out. Uncalibrated
        # segments come back as values. Encoding stays in-process: measured, it did not pay.
        jobs = [
            (self.params(), bytes(seg), tuple(shape), i, num_layers) for seg, i in zip(segments, layers, strict=True)
        ]
        return [torch.from_numpy(values).to(dtype) for values in self.processes.map_calls(_decode_segment, jobs)]

    def decode_stacked(self, segments, shape, dtype, layers, num_layers, position=0) -> torch.Tensor:
        if self.calibration is not None:  # the units write into one tensor of the chunk's layers
            return self._decode_calibrated(segments, shape, dtype, list(layers), position)
        return super().decode_stacked(segments, shape, dtype, layers, num_layers, position)

    # -- calibrated mode ---------------------------------------------------------------------------------
    def _calibrated_symbols(self, kv: torch.Tensor, layer: int, position: int) -> np.ndarray:
        """A layer's KV [2, heads, tokens, dim] -> integer symbols of the same shape."""
        return _cpu().symbols_of(self.calibration, self.bits, kv[None], [layer], position)[0]

    def _decode_calibrated(self, segments, shape, dtype, layers: list[int], position: int) -> torch.Tensor:
        """Layers' segments -> their KV [n, 2, heads, tokens, dim], on the codec's threads."""
        return _threads().decode_layers(self.calibration, self.bits, segments, shape, dtype, layers, position,
                                        self.processes)  # fmt: skip

    def encode_layers(self, kv: torch.Tensor, position: int = 0) -> list[bytes]:
        if self.calibration is None:
            return super().encode_layers(kv, position)
        layers = list(range(kv.shape[0]))
        return _threads().encode_layers(self.calibration, self.bits, kv, layers, position, self.processes)

    def _finish_calibrated(self, q, layer: int, position: int, device) -> torch.Tensor:
        """Integer symbols [2, heads, tokens, dim] (numpy, or a tensor already on `device`) -> float32 KV on
        `device`: one batched matmul by the inverse transform with the steps folded in, the mean as its
        bias, then RoPE on K again."""
        coeffs = q if isinstance(q, torch.Tensor) else torch.from_numpy(q).to(device, non_blocking=True)
        return self._finish_layers(coeffs[None], [layer], position, device)[0]

    def _finish_layers(self, coeffs: torch.Tensor, layers: list[int], position: int, device) -> torch.Tensor:
        """Integer symbols of several layers [len(layers), 2, heads, tokens, dim] on `device` -> their float32
        KV: the inverse transforms of all of them in one batched matmul, RoPE on their keys at once."""
        scaled, mean = self.calibration.decode_transform(self.bits, device)
        n, two, heads, tokens, dim = coeffs.shape
        at = layers[0] if layers == list(range(layers[0], layers[0] + n)) else None  # a slice, not a gather
        pick = (lambda t: t[at : at + n]) if at is not None else (lambda t: t[layers])  # noqa: E731
        b = n * two * heads
        bias = pick(mean).reshape(b, 1, dim).expand(b, tokens, dim)
        x = torch.baddbmm(bias, coeffs.reshape(b, tokens, dim).float(), pick(scaled).reshape(b, dim, dim))
        x = x.view(n, two, heads, tokens, dim)
        x[:, 0] = calib.rotate(x[:, 0], pick(self.calibration.tensors_on(device)["inv_freq"]), position, 1.0)
        return x

    def decode_layer_on(self, data, shape, dtype, layer, num_layers, device, position=0) -> torch.Tensor:
        """Calibrated: on a CUDA device the entropy decoding runs there too (kvshelf.codecs.rans_gpu, Triton),
        from the segment's bytes; elsewhere on the CPU. Uncalibrated: entropy decoding on the CPU, the small
        integer symbols, fp16 steps and escapes go to the device, where the dequantisation runs."""
        if torch.device(device).type == "cpu":
            return self.decode_layer(data, shape, dtype, layer, num_layers, position)
        if self.calibration is not None:
            from kvshelf.codecs import rans_gpu

            if rans_gpu.available(device):
                q = rans_gpu.decode_segment(data, shape, self.bits, device)
            else:
                q = _symbols_calibrated(data, shape, self.bits)
            return self._finish_calibrated(q, layer, position, device).to(dtype)
        qk, qv, sk, sv, (ik, iv, ek, ev) = self._decode_parts(data, shape, layer, num_layers)
        small = np.int8 if max(np.abs(qk).max(initial=0), np.abs(qv).max(initial=0)) < 128 else np.int16
        q = torch.from_numpy(np.stack((qk, qv)).astype(small)).to(device, non_blocking=True)
        out = q.float()
        out[0].mul_(torch.from_numpy(sk.copy()).to(device).float())
        out[1].mul_(torch.from_numpy(sv.copy()).to(device).float())
        flat_k, flat_v = out[0].view(-1), out[1].view(-1)
        flat_k[torch.from_numpy(ik.astype(np.int64)).to(device)] = torch.from_numpy(ek.copy()).to(device).float()
        flat_v[torch.from_numpy(iv.astype(np.int64)).to(device)] = torch.from_numpy(ev.copy()).to(device).float()
        return out.to(dtype)

    def decodes_on(self, device) -> bool:
        if self.calibration is None or torch.device(device).type != "cuda":
            return False
        from kvshelf.codecs import rans_gpu

        return rans_gpu.available(device)

    def decode_run_on(self, segments, shape, dtype, layers, num_layers, device, position):
        """Calibrated, on a CUDA device: every segment of the run (layers x chunks) checked and staged in one
        pinned buffer, one copy, one rANS kernel, then one kernel for the inverse transform, RoPE and the cast
        (rans_gpu.finish; torch's batched matmul where it does not apply). Does not wait for the GPU: the
        error flag it returns must be seen False before the KV is used."""
        if not self.decodes_on(device):
            return super().decode_run_on(segments, shape, dtype, layers, num_layers, device, position)
        return self._decode_run_batched(segments, shape, dtype, list(layers), device, position)

    def stage_run_on(self, segments, shape, dtype, layers, num_layers, device, position):
        """Calibrated, on a CUDA device: the segments checked and staged (their copy to the device queued on the
        current stream) now; the kernels when the returned callable is called."""
        if not self.decodes_on(device):
            return super().stage_run_on(segments, shape, dtype, layers, num_layers, device, position)
        return self._stage_run_batched(segments, shape, dtype, list(layers), device, position)

    def _decode_run_batched(self, segments, shape, dtype, layers, device, position):
        """decode_run_on's batched work, on any device the Triton kernel runs on (its interpreter: the CPU)."""
        return self._stage_run_batched(segments, shape, dtype, layers, device, position)()

    def _stage_run_batched(self, segments, shape, dtype, layers, device, position) -> Callable:
        from kvshelf.codecs import rans_gpu

        if isinstance(segments, SegmentRows):  # each chunk's layers back to back: one copy per chunk
            staged = rans_gpu.stage_spans(segments.spans, segments.offsets, shape, self.bits, device)
        else:
            staged = rans_gpu.stage([seg for row in segments for seg in row], shape, self.bits, device)
        return functools.partial(self._run_staged, staged, len(segments), shape, dtype, layers, device, position)

    def _run_staged(self, staged, num_layers, shape, dtype, layers, device, position):
        from kvshelf.codecs import rans_gpu

        if rans_gpu.fuses(shape[-1], dtype):  # symbols -> KV in the KV's dtype in one kernel, no float32 copies
            q, err = rans_gpu.decode_staged_raw(staged)
            scaled, mean = self.calibration.decode_transform(self.bits, device)
            inv_freq = self.calibration.tensors_on(device)["inv_freq"]
            return rans_gpu.finish(q, len(layers), scaled, mean, inv_freq, layers, position, dtype), err
        q, err = rans_gpu.decode_staged(staged, num_layers)
        return self._finish_layers(q, layers, position, device).to(dtype), err

    def decode_chunks_on(self, segments, shape, dtype, layer, num_layers, device, positions) -> list[torch.Tensor]:
        """Calibrated, on a CUDA device: one staging copy and one rANS kernel for the layer of every chunk;
        consecutive chunks (positions a chunk apart) share one inverse transform and RoPE."""
        from kvshelf.codecs import rans_gpu

        positions = list(positions)
        if self.calibration is None or len(segments) < 2 or not rans_gpu.available(device):
            return super().decode_chunks_on(segments, shape, dtype, layer, num_layers, device, positions)
        q = rans_gpu.decode_segments(segments, shape, self.bits, device)  # [chunks, 2, heads, tokens, dim]
        n, two, heads, tokens, dim = q.shape
        if positions == list(range(positions[0], positions[0] + n * tokens, tokens)):
            q = q.permute(1, 2, 0, 3, 4).reshape(two, heads, n * tokens, dim)
            kv = self._finish_calibrated(q, layer, positions[0], device).to(dtype)
            return list(kv.split(tokens, dim=2))
        return [self._finish_calibrated(q[i], layer, p, device).to(dtype) for i, p in enumerate(positions)]


def _threads():
    """kvshelf.codecs.cachegen_threads, imported on first use (numba)."""
    from kvshelf.codecs import cachegen_threads

    return cachegen_threads


def _cpu():
    """Compiled whole-segment coding (numba): imported on first use, as _rans."""
    from kvshelf.codecs import cachegen_cpu

    return cachegen_cpu


def _code_calibrated(q: np.ndarray, level: int) -> bytes:
    """A calibrated segment from integer symbols [2, heads, tokens, dim] (the reference: parts assembled in
    Python; the codec writes the same bytes with kvshelf.codecs.cachegen_cpu)."""
    return b"".join([calibrated_head(level), _rans().encode_part(q[0]), _rans().encode_part(q[1])])


def calibrated_head(level: int) -> bytes:
    """The 4 bytes every calibrated segment of precision `level` begins with."""
    return _CAL_HEAD.pack(b"CG", level, _CALIBRATED | _RANS)


def _rans():
    """The rANS coder, imported on first use: it loads numba and llvmlite, and vLLM's CPU worker start-up
    (its scan of loaded modules for Triton kernels) fails on llvmlite's objects, so importing kvshelf (the
    vLLM connector does) must not load them."""
    from kvshelf.codecs import rans

    return rans


def calibrated_parts(data, shape: tuple, level: int) -> tuple[np.ndarray, list[rans.Part]]:
    """A calibrated segment's bytes (uint8) and its two validated rANS parts (K, V)."""
    _, heads, tokens, dim = shape
    buf = np.frombuffer(data, np.uint8)[:]
    buf.flags.writeable = False  # one array type for the compiled decoder, whatever held the bytes
    if len(buf) < _CAL_HEAD.size:
        raise ValueError("cachegen segment is truncated")
    magic, level_read, flags = _CAL_HEAD.unpack_from(buf)
    if magic != b"CG" or flags != _CALIBRATED | _RANS or level != level_read:
        raise ValueError("cachegen segment header does not match the codec parameters")
    part = _rans().Part
    k = part(buf, _CAL_HEAD.size, heads, tokens, dim)
    v = part(buf, k.end, heads, tokens, dim)
    if v.end != len(buf):
        raise ValueError(f"cachegen segment has {len(buf)} bytes, expected {v.end}")
    return buf, [k, v]


def _symbols_calibrated(data, shape: tuple, level: int) -> np.ndarray:
    """A calibrated segment's integer symbols, [2, heads, tokens, dim] int32 (the reference decoder)."""
    _, heads, tokens, dim = shape
    buf, parts = calibrated_parts(data, shape, level)
    q = np.empty((2, heads, tokens, dim), np.int32)
    for kind, part in enumerate(parts):
        _rans().decode_part(buf, part, q[kind])
    return q


def _decode_segment(params: dict, data: bytes, shape: tuple, layer: int, num_layers: int) -> np.ndarray:
    """One layer's segment to fp32 values (runs in a codec worker process, or inline without workers)."""
    codec = CacheGenCodec(**params)
    return uncalibrated.dequantize(codec._decode_parts(data, shape, layer, num_layers), shape)
