"""Calibrated cachegen's whole-segment CPU coder (kvshelf.codecs.cachegen_cpu) against the reference: the
parts assembled and decoded one by one (kvshelf.codecs.rans), RoPE by kvshelf.kvmath.rope."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest
import torch
from helpers import damaged
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvshelf.codecs import cachegen_cpu as cc
from kvshelf.codecs import cachegen_encoder, pool, rans
from kvshelf.codecs import cachegen_threads as ct
from kvshelf.codecs import calibration as calib
from kvshelf.codecs.base import BackToBack
from kvshelf.codecs.cachegen import CacheGenCodec, _code_calibrated, _symbols_calibrated

PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def symbols(seed: int, heads: int, tokens: int, dim: int, escapes: int = 2) -> np.ndarray:
    """[2, heads, tokens, dim]: rounded Gaussians of every spread class (zeros to the widest), far outliers."""
    rng = np.random.default_rng(seed)
    spread = 2.0 ** rng.uniform(-4.0, 13.0, size=(2, heads, 1, dim))
    q = np.round(rng.standard_normal((2, heads, tokens, dim)) * spread)
    for _ in range(escapes):
        q[rng.integers(2), rng.integers(heads), rng.integers(tokens), rng.integers(dim)] = rng.integers(-(2**30), 2**30)
    return q.astype(np.int32)


@PROPS
@given(
    seed=st.integers(0, 2**32 - 1),
    heads=st.integers(1, 3),
    tokens=st.integers(1, 70),
    dim=st.sampled_from([2, 4, 6, 8, 32, 64]),
    escapes=st.integers(0, 5),
)
def test_whole_segments_code_the_reference_bytes_and_decode_its_symbols(seed, heads, tokens, dim, escapes):
    q = symbols(seed, heads, tokens, dim, escapes)
    data = cc.encode_segment(q, 5)
    assert data == _code_calibrated(q, 5)  # the stored format, byte for byte
    want = _symbols_calibrated(data, q.shape, 5)
    assert np.array_equal(want, q)
    as_int = np.full(q.shape, -7, np.int32)
    as_float = np.full(q.shape, -7, np.float32)
    cc.decode_segment_into(memoryview(data), heads, tokens, dim, 5, as_int)
    cc.decode_segment_into(data, heads, tokens, dim, 5, as_float)
    assert np.array_equal(as_int, want)
    assert np.array_equal(as_float, want.astype(np.float32))  # what `.float()` of the symbols gives


@PROPS
@given(data=st.data())
def test_hostile_segments_are_refused_exactly_when_the_reference_refuses_them(data):
    shape = (2, 1, 24, 8)
    q = symbols(data.draw(st.integers(0, 1000)), 1, 24, 8)
    good = cc.encode_segment(q, 5)
    bad = damaged(data, good)
    try:
        want = _symbols_calibrated(bad, shape, 5)
    except ValueError:
        want = None
    guard = np.full((3, *shape), 12345, np.float32)  # the decoder gets the middle; the rest must stay
    try:
        cc.decode_segment_into(bad, *shape[1:], 5, guard[1])
        got = guard[1]
    except rans.RansError as err:
        assert str(err).startswith("cachegen ")
        got = None
    assert (guard[0] == 12345).all() and (guard[2] == 12345).all()
    assert (got is None) == (want is None)
    if want is not None:
        assert np.array_equal(got, want.astype(np.float32))


def test_wrong_level_shape_or_output_is_refused():
    q = symbols(3, 1, 8, 4)
    data = cc.encode_segment(q, 5)
    with pytest.raises(ValueError, match="header"):
        cc.decode_segment_into(data, 1, 8, 4, 6, np.empty(q.shape, np.float32))
    with pytest.raises(ValueError):
        cc.decode_segment_into(data, 1, 4, 8, 5, np.empty((2, 1, 4, 8), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        cc.decode_segment_into(data, 1, 8, 4, 5, np.empty((2, 1, 4, 8), np.float32).transpose(0, 1, 3, 2))


def _calibration(layers: int, heads: int, dim: int, seed: int) -> calib.Calibration:
    g = torch.Generator().manual_seed(seed)
    forward = torch.linalg.qr(torch.randn(layers, 2, heads, dim, dim, generator=g))[0]
    inv_freq = torch.rand(layers, dim // 2, generator=g)
    inv_freq[1] = inv_freq[0]  # layers sharing a frequency row share RoPE tables
    inv_freq[-1] = 0  # a layer without RoPE
    cal = calib.Calibration(
        inv_freq=inv_freq,
        mean=torch.randn(layers, 2, heads, dim, generator=g),
        forward=forward,
        inverse=forward.transpose(-1, -2).contiguous(),
        step=torch.full((layers, 2), 0.05),
        info={"test": f"cachegen_cpu {seed}"},
    )
    calib.register(cal)
    return cal


def test_rope_in_place_equals_the_reference_rotation():
    cal = _calibration(4, 2, 8, 1)
    x = torch.randn(3, 2, 2, 5, 8)
    for sign in (1.0, -1.0):
        got = x.clone()
        cc.rope_(cal, got.numpy(), [1, 2, 3], 77, sign)
        want = calib.rotate(x[:, 0], cal.inv_freq[1:4], 77, sign)
        assert torch.equal(got[:, 0], want) and torch.equal(got[:, 1], x[:, 1])


@pytest.mark.parametrize("workers", [0, 3, 4, 16])
def test_codec_layers_equal_the_reference_path(workers):
    """Units of (layer, K|V) halves on threads (one matmul each; 16 workers: more threads than halves, 4: a
    layer's K and V in different units) decode what the reference does segment by segment: the symbols
    bit-exact, the KV identical (same float arithmetic)."""
    layers, heads, tokens, dim = 5, 2, 16, 8
    cal = _calibration(layers, heads, dim, 2)
    processes = pool.CodecProcesses(workers)
    codec = CacheGenCodec(calibration=cal.digest, processes=processes)
    kv = torch.randn(layers, 2, heads, tokens, dim, generator=torch.Generator().manual_seed(3)).half()
    position = 3 * tokens
    segs = codec.encode_layers(kv, position)
    shape = (2, heads, tokens, dim)
    for i in range(layers):  # encoding: the reference's per-layer arithmetic and byte assembly
        scaled, bias = cal.encode_transform(codec.bits, "cpu")
        keys = calib.rotate(kv[i, 0].float(), cal.inv_freq[i], position, -1.0)
        x = torch.stack((keys, kv[i, 1].float())).reshape(2 * heads, tokens, dim)
        b = bias[i].reshape(2 * heads, 1, dim).expand(2 * heads, tokens, dim)
        coeffs = torch.baddbmm(b, x, scaled[i].reshape(2 * heads, dim, dim)).round_().to(torch.int32)
        assert segs[i] == _code_calibrated(coeffs.reshape(shape).numpy(), codec.bits)
    got = codec.decode_layers(segs, shape, torch.float16, list(range(layers)), layers, position)
    for i in range(layers):
        q = torch.from_numpy(_symbols_calibrated(segs[i], shape, codec.bits))
        want = codec._finish_calibrated(q, i, position, "cpu").to(torch.float16)  # the GPU path's arithmetic
        assert torch.equal(got[i], want)
        assert torch.equal(codec.decode_layer(segs[i], shape, torch.float16, i, layers, position), want)
    assert codec.decode_layers([], shape, torch.float16, [], layers, position) == []
    assert codec.encode_layers(kv[:0], position) == []
    some = codec.decode_layers([segs[4], segs[1], segs[2]], shape, torch.float32, [4, 1, 2], layers, position)
    assert all(torch.equal(a.half(), got[k]) for a, k in zip(some, [4, 1, 2], strict=True))
    # segments back to back in one buffer (a stored chunk's payload, after other bytes): read there, no join
    offsets = [7, *(7 + e for e in itertools.accumulate(len(s) for s in segs))]
    back = BackToBack(memoryview(b"x" * 7 + b"".join(segs) + b"y"), offsets)
    assert list(map(bytes, back)) == segs and bytes(back.joined) == b"".join(segs)
    assert BackToBack.layers(back.joined.obj, offsets, []) == []
    assert type(BackToBack.layers(back.joined.obj, offsets, [4, 1])) is list  # not consecutive: a plain list
    for first, end in ((0, layers), (1, 4), (3, 4)):
        part = BackToBack.layers(back.joined.obj, offsets, list(range(first, end)))
        assert isinstance(part, BackToBack) and part == segs[first:end]
        stacked = codec.decode_stacked(part, shape, torch.float16, list(range(first, end)), layers, position)
        assert all(torch.equal(stacked[k - first], got[k]) for k in range(first, end))
    processes.close()


def _check_units(layers: list[int], workers: int, spread: bool = False) -> list[tuple[int, int]]:
    got = ct.units(layers, workers, spread=spread)
    assert [a for a, _ in got] == [0, *(b for _, b in got[:-1])] and got[-1][1] == 2 * len(layers)  # all, in order
    assert all(0 < b - a <= ct.MOST_HALVES for a, b in got)
    for a, b in got:  # never across a gap in the layer numbers
        assert all(layers[k] == layers[k - 1] + 1 for k in range(a // 2 + 1, (b + 1) // 2))
    return got


def test_units_cut_halves_evenly_for_the_threads():
    assert ct.MOST_HALVES == 6
    for n in (1, 2, 3, 5, 7, 17, 18, 19, 32, 80):  # uneven layer counts, one layer, more workers than halves
        for workers in (0, 1, 2, 3, 8, 12, 16, 64):
            got = _check_units(list(range(n)), workers)
            sizes = [b - a for a, b in got]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)  # balanced, larger first
            # units as small as giving each worker one allows, and as few as that size needs
            size = min(ct.MOST_HALVES, -(-2 * n // max(workers, 1)))
            assert max(sizes) <= size and len(got) == -(-2 * n // size)
            # spread (an idle pool): as large at most, one per worker where there are enough halves
            spread = [b - a for a, b in _check_units(list(range(n)), workers, spread=True)]
            assert max(spread) - min(spread) <= 1 and spread == sorted(spread, reverse=True) and max(spread) <= size
            assert len(spread) == max(-(-2 * n // size), min(workers, 2 * n))
    assert ct.units(list(range(18)), 16) == [(k, k + 3) for k in range(0, 36, 3)]  # 12 units of 3 halves
    # spread on 16 threads: 4 units of 3 halves, then 12 of 2 (the threads that start last get less)
    want = [(k, k + 3) for k in range(0, 12, 3)] + [(k, k + 2) for k in range(12, 36, 2)]
    assert ct.units(list(range(18)), 16, spread=True) == want
    assert ct.units(list(range(18)), 12) == [(k, k + 3) for k in range(0, 36, 3)]
    assert ct.units(list(range(18)), 0) == [(k, k + 6) for k in range(0, 36, 6)]  # inline: L2-sized units
    assert ct.units([5], 16) == [(0, 1), (1, 2)]  # one layer: K and V
    assert ct.units([], 4) == []


def test_units_never_span_a_gap_in_the_layers():
    assert ct.units([4, 1, 2], 1) == [(0, 2), (2, 6)]  # layer 4, then layers 1 and 2
    assert ct.units([0, 1, 2, 7, 8], 2) == [(0, 5), (5, 6), (6, 10)]
    for layers in ([3, 2, 1, 0], [0, 2, 4, 6, 8], [9, 10, 11, 0, 1]):
        for workers in (0, 2, 5, 16):
            _check_units(layers, workers)
            _check_units(layers, workers, spread=True)


@PROPS
@given(data=st.data())
def test_damaged_segments_split_over_units_are_refused_as_the_reference_refuses_them(data):
    """With each half in its own unit, a damaged segment's K and V are checked by different units: the chunk is
    refused exactly when the reference refuses the segment, with a RansError, and nothing else is needed."""
    layers, heads, tokens, dim = 3, 1, 8, 8
    cal = _calibration(layers, heads, dim, 5)
    processes = pool.CodecProcesses(6)
    codec = CacheGenCodec(calibration=cal.digest, processes=processes)
    kv = torch.randn(layers, 2, heads, tokens, dim, generator=torch.Generator().manual_seed(5)).half()
    segs = codec.encode_layers(kv, 0)
    which = data.draw(st.integers(0, layers - 1))
    segs[which] = damaged(data, segs[which])
    shape = (2, heads, tokens, dim)
    try:
        _symbols_calibrated(segs[which], shape, codec.bits)
        refused = False
    except ValueError:
        refused = True
    try:
        codec.decode_layers(segs, shape, torch.float16, list(range(layers)), layers, 0)
        assert not refused
    except rans.RansError as err:
        assert refused and str(err).startswith("cachegen ")
    finally:
        processes.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_other_dtypes_code_and_decode_as_torch_casts(dtype):
    """KV of another dtype codes the bytes its float32 values code, and decodes to the float32 KV cast as torch
    casts it."""
    layers, heads, tokens, dim = 3, 2, 8, 8
    cal = _calibration(layers, heads, dim, 6)
    processes = pool.CodecProcesses(4)
    codec = CacheGenCodec(calibration=cal.digest, processes=processes)
    kv = torch.randn(layers, 2, heads, tokens, dim, generator=torch.Generator().manual_seed(6)).to(dtype)
    segs = codec.encode_layers(kv, 16)
    assert segs == codec.encode_layers(kv.float(), 16)
    shape = (2, heads, tokens, dim)
    want = codec.decode_layers(segs, shape, torch.float32, list(range(layers)), layers, 16)
    got = codec.decode_layers(segs, shape, dtype, list(range(layers)), layers, 16)
    assert all(g.dtype == dtype and torch.equal(g, w.to(dtype)) for g, w in zip(got, want, strict=True))
    processes.close()


def test_a_thread_that_coded_under_inference_mode_codes_outside_it():
    """A thread's reused buffers made while torch's inference mode was on (a runner's forward) stay writable
    after it (calibration outside inference mode on the same thread): the same bytes and KV either way."""
    layers, heads, tokens, dim = 2, 2, 8, 8
    cal = _calibration(layers, heads, dim, 7)
    codec = CacheGenCodec(calibration=cal.digest)  # no workers: units run inline on the calling thread
    kv = torch.randn(layers, 2, heads, tokens, dim, generator=torch.Generator().manual_seed(7))
    shape = (2, heads, tokens, dim)
    seen = []

    def code_twice():  # a fresh thread: its buffers are made under inference mode, then reused outside
        with torch.inference_mode():
            first = codec.encode_layers(kv, 0)
            first_kv = codec.decode_layers(first, shape, torch.float32, [0, 1], layers, 0)
        again = codec.encode_layers(kv, 0)
        again_kv = codec.decode_layers(again, shape, torch.float32, [0, 1], layers, 0)
        seen.append(first == again and all(torch.equal(a, b) for a, b in zip(first_kv, again_kv, strict=True)))

    thread = threading.Thread(target=code_twice)
    thread.start()
    thread.join()
    assert seen == [True]


def test_codec_threads_code_for_a_caller_under_inference_mode():
    """A caller under torch's inference mode (a runner's forward, a loader) with codec threads: the threads (outside
    inference mode) write into the chunk's output tensor, so it is a normal tensor; same bytes and KV as outside."""
    layers, heads, tokens, dim = 4, 2, 16, 8
    cal = _calibration(layers, heads, dim, 9)
    processes = pool.CodecProcesses(4)
    codec = CacheGenCodec(calibration=cal.digest, processes=processes)
    kv = torch.randn(layers, 2, heads, tokens, dim, generator=torch.Generator().manual_seed(9))
    shape = (2, heads, tokens, dim)
    try:
        segs = codec.encode_layers(kv, 32)
        want = codec.decode_layers(segs, shape, torch.float16, list(range(layers)), layers, 32)
        with torch.inference_mode():
            for _ in range(3):  # several batches: units on the caller and on codec threads
                assert codec.encode_layers(kv, 32) == segs
                got = codec.decode_layers(segs, shape, torch.float16, list(range(layers)), layers, 32)
                assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    finally:
        processes.close()


def test_units_round_coefficients_as_torch_does_and_code_the_reference_bytes():
    """The unit coder rounds inside its compiled call: halves to even, clamped to +-2**30, NaN as torch's cast."""
    coeffs = torch.randn(3, 2, 2, 8, 4, generator=torch.Generator().manual_seed(4)) * 40
    coeffs[0, 0, 0, 0, :4] = torch.tensor([2.5, -3.5, 0.5, -0.5])
    coeffs[1, 1, 1, 2, :3] = torch.tensor([float("inf"), float("-inf"), 3e12])
    coeffs[2, 0, 1, 5, 0] = float("nan")
    want = coeffs.clone().round_().clamp_(-(2**30), 2**30).to(torch.int32).numpy()
    width, per_lane, _ = rans.layout(2 * 4, 8)
    out, ends = cachegen_encoder.encode_halves(coeffs.reshape(6, 2, 8, 4).numpy(), width, per_lane)
    parts = [out[a:b].tobytes() for a, b in zip([0, *ends[:-1]], ends, strict=True)]
    segs = [cc._head(5).tobytes() + parts[2 * k] + parts[2 * k + 1] for k in range(3)]
    assert segs[:2] == [_code_calibrated(want[k], 5) for k in range(2)]
    # NaN's -2**31 is kept as an escape here; the reference's np.abs overflows on it and clips it instead
    assert np.array_equal(_symbols_calibrated(segs[2], want.shape[1:], 5), want[2])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1), st.sampled_from([(1, 8, 4), (2, 16, 8), (3, 32, 8)]), st.integers(1, 6))
def test_the_unit_encoder_writes_the_whole_segment_coders_bytes_with_its_scratch_reused(seed, shape, halves):
    """cachegen_encoder codes parts of any spread (zeros to the widest class, escapes, huge values) into the bytes
    of cachegen_cpu's whole-segment coder (the reference's layout), also when its scratch was used before by
    parts with more escapes, other classes and more halves (nothing stale leaks into the bytes)."""
    heads, tokens, dim = shape
    rng = np.random.default_rng(seed)
    width, per_lane, _ = rans.layout(heads * dim, tokens)
    scratch = cachegen_encoder.Scratch.make(heads * dim, tokens, 6, width, per_lane)
    noisy = (rng.standard_normal((6, heads, tokens, dim)) * 2.0 ** rng.uniform(-4, 30, (6, heads, 1, dim))).astype(
        np.float32
    )
    cachegen_encoder.encode_halves(noisy, width, per_lane, scratch)  # leaves escapes and words behind
    spread = 2.0 ** rng.uniform(-4, 14, (halves + halves % 2, heads, 1, dim))
    coeffs = (rng.standard_normal((halves + halves % 2, heads, tokens, dim)) * spread).astype(np.float32)
    coeffs[0, 0, rng.integers(tokens)] *= 1e6  # escapes in one token of every channel
    if halves > 1:
        coeffs[1] = 0.0
    out, ends = cachegen_encoder.encode_halves(coeffs, width, per_lane, scratch)
    parts = [out[a:b].tobytes() for a, b in zip([0, *ends[:-1]], ends, strict=True)]
    q = np.clip(np.rint(coeffs), -(2**30), 2**30).astype(np.int32)
    for k in range(0, len(parts), 2):
        assert cc._head(5).tobytes() + parts[k] + parts[k + 1] == cc.encode_segment(q[k : k + 2], 5)
