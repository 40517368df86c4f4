"""The CPU unit decoder's last step (kvshelf.codecs.cachegen_casts): RoPE back on K halves and the cast into the
output dtype in one compiled call, against the reference steps (cachegen_cpu._rope, then torch's cast)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvshelf.codecs import cachegen_casts as cf
from kvshelf.codecs import cachegen_cpu as cc

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _finish(x: np.ndarray, h0: int, h1: int, heads: int, tokens: int, dim: int, cos, sin, which, dtype):
    """cf.finish on a copy of x (flat float32) into a fresh output of `dtype`; (output, x as finish left it)."""
    x = x.copy()
    out = torch.empty(x.shape[0], dtype=dtype)
    cf.finish(x, x.view(np.uint32), h0, h1, heads, tokens, dim, cos, sin, which, cf.bits_view(out), cf.KINDS[dtype])
    return out, x


def _edge_floats() -> np.ndarray:
    """float32 values where a cast to fp16 or bf16 decides something: each side of fp16's overflow, smallest
    normal and subnormals, ties to even at every such boundary, bf16 ties, zeros, infinities, fp32 subnormals."""
    base = [0.0, 65504.0, 65519.996, 65520.0, 65535.0, 65536.0, 3e38, 2.0**-14, 2.0**-24, 2.0**-25, 3 * 2.0**-25,
            5 * 2.0**-25, 2.0**-26, 2.0**-14 - 2.0**-25, 1e-40, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 1.0 + 2.0**-8,
            1.0 + 3 * 2.0**-8, np.inf]  # fmt: skip
    v = np.array(base, np.float32)
    near = np.concatenate([v.view(np.uint32).astype(np.int64) + d for d in (-1, 0, 1)])  # one ulp each side
    near = (
        near[(near >= 0) & (near <= 0x7F800000)].astype(np.uint32).view(np.float32)
    )  # above +inf: NaNs, never decoded
    return np.concatenate([near, -near])


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_cast_writes_torchs_bits_at_every_edge(dtype):
    x = _edge_floats()
    n = x.shape[0]
    ones, zeros = np.ones((1, n, 1), np.float32), np.zeros((1, n, 1), np.float32)
    got, _ = _finish(x, 1, 2, 1, n, 1, ones, zeros, np.zeros(1, np.int64), dtype)  # one V half: no rotation
    want = torch.from_numpy(x).to(dtype)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), x[(got != want).numpy()][:8]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=300), st.sampled_from(DTYPES))
def test_the_cast_writes_torchs_bits_for_any_finite_float(words, dtype):
    x = np.array(words, np.uint32).view(np.float32)
    x = x[np.isfinite(x)]
    if not x.shape[0]:
        return
    n = x.shape[0]
    ones, zeros = np.ones((1, n, 1), np.float32), np.zeros((1, n, 1), np.float32)
    got, _ = _finish(x, 1, 2, 1, n, 1, ones, zeros, np.zeros(1, np.int64), dtype)
    assert torch.equal(got.view(torch.uint8), torch.from_numpy(x).to(dtype).view(torch.uint8))


# A unit of any halves (starting on a K or a V half), heads, tokens and head size, in each 16/32-bit output dtype.
def unit_cases(test):
    return settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])(
        given(
            seed=st.integers(0, 2**32 - 1),
            h0=st.integers(0, 3),
            halves=st.integers(1, 6),
            heads=st.integers(1, 3),
            tokens=st.integers(1, 9),
            dim=st.sampled_from([2, 4, 8, 16]),
            dtype=st.sampled_from(DTYPES),
        )(test)
    )


def _rope_tables(rng, tokens: int, dim: int, h1: int):
    """Two RoPE tables (cos, sin) and which table each layer of halves 0..h1-1 takes."""
    angles = rng.uniform(-50, 50, size=(2, tokens, dim // 2))
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    return cos, sin, rng.integers(0, 2, size=(h1 + 1) // 2).astype(np.int64)


@unit_cases
def test_rope_and_cast_equal_the_reference_steps(seed, h0, halves, heads, tokens, dim, dtype):
    """A unit of any halves (starting on a K or a V half; layers with different RoPE tables) equals
    cachegen_cpu._rope in place, then torch's cast."""
    rng = np.random.default_rng(seed)
    h1 = h0 + halves
    x = (rng.standard_normal(halves * heads * tokens * dim) * 2.0 ** rng.integers(-20, 18)).astype(np.float32)
    cos, sin, which = _rope_tables(rng, tokens, dim, h1)
    got, rotated = _finish(x, h0, h1, heads, tokens, dim, cos, sin, which, dtype)
    want = x.copy()
    cc._rope(want, h0, h1, heads, tokens, dim, cos, sin, which, np.float32(1.0))
    assert np.array_equal(rotated.view(np.uint32), want.view(np.uint32))
    assert torch.equal(got.view(torch.uint8), torch.from_numpy(want).to(dtype).view(torch.uint8))


def test_bits_view_is_the_outputs_memory():
    for dtype in DTYPES:
        out = torch.zeros(2, 3, dtype=dtype)
        bits = cf.bits_view(out)
        bits[4] = 1
        ints = out.view(-1).view(torch.int16 if bits.dtype.itemsize == 2 else torch.int32)
        assert bits.shape == (6,) and ints[4] == 1 and int(ints.sum()) == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_widening_is_torchs_for_every_16_bit_pattern(dtype):
    """Every fp16 / bf16 value (NaNs, infinities, subnormals included) widens to the float32 bits torch gives."""
    kv = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    n = kv.shape[0]
    x = np.empty(n, np.float32)
    ones, zeros = np.ones((1, n, 1), np.float32), np.zeros((1, n, 1), np.float32)
    cf.start(cf.bits_view(kv), cf.KINDS[dtype], x, x.view(np.uint32), 1, 2, 1, n, 1, ones, zeros, np.zeros(1, np.int64))
    assert np.array_equal(x.view(np.uint32), kv.float().numpy().view(np.uint32))


@unit_cases
def test_cast_and_rope_off_equal_the_reference_steps(seed, h0, halves, heads, tokens, dim, dtype):
    """Encoding's first step on a unit of any halves: torch's cast to float32, then cachegen_cpu._rope with
    sign -1, in place."""
    rng = np.random.default_rng(seed)
    h1 = h0 + halves
    kv = torch.from_numpy(rng.standard_normal(halves * heads * tokens * dim).astype(np.float32) * 300).to(dtype)
    cos, sin, which = _rope_tables(rng, tokens, dim, h1)
    got = np.full(kv.shape[0] + 3, 7.0, np.float32)  # beyond the unit: left alone
    cf.start(cf.bits_view(kv), cf.KINDS[dtype], got, got.view(np.uint32), h0, h1, heads, tokens, dim, cos, sin, which)
    want = kv.float().numpy().copy()
    cc._rope(want, h0, h1, heads, tokens, dim, cos, sin, which, np.float32(-1.0))
    assert np.array_equal(got[: kv.shape[0]].view(np.uint32), want.view(np.uint32)) and (got[-3:] == 7).all()
