"""Calibrated cachegen's reconstruction at bin centroids and rate-distortion optimised rounding (issue #17):
the offsets table, RDOQ's cost, the compiled encoder against the reference, and chunks of the former
reconstruction (coder 2) refused everywhere."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvshelf.codecs import cachegen_cpu as cc
from kvshelf.codecs import calibration as calib
from kvshelf.codecs import rans
from kvshelf.codecs.cachegen import CacheGenCodec, _code_calibrated, _values_calibrated

PROPS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_offsets_are_the_bin_centroids_of_a_laplace_density_of_the_class_spread():
    offsets = rans.CENTROID.astype(np.float64)
    assert offsets.shape == (rans.SPREAD_CLASSES,) and rans.CENTROID.dtype == np.float32
    assert (offsets >= 0).all() and (offsets < 0.5).all()
    assert (np.diff(offsets) <= 0).all() and offsets[0] > 0.4 and offsets[-1] < 1e-3  # wider classes: less
    assert (offsets * 65536 == np.round(offsets * 65536)).all()  # coarse grid: the same bits on any libm
    for c in (0, 8, 12, 16, 24):
        b = rans.spread_of(c) / math.sqrt(2)  # Laplace scale of that RMS
        for m in (1, 2, 5):  # the centroid of bin m by numerical integration
            x = np.linspace(m - 0.5, m + 0.5, 200001)
            w = np.exp(-x / b)
            centroid = float((x * w).sum() / w.sum())
            assert abs((m - centroid) - offsets[c]) < 2e-5, (c, m)


def test_reconstruction_moves_nonzero_symbols_toward_zero_by_their_class_offset():
    q = np.array([[-3, -1, 0, 1, 2, 40]], np.int32)
    cls = np.array([[12]])
    got = rans.reconstruct(q, cls)
    off = rans.CENTROID[12]
    assert got.dtype == np.float32
    assert np.array_equal(got[0], np.array([-3 + off, -1 + off, 0, 1 - off, 2 - off, 40 - off], np.float32))


def coefficients(seed: int, heads: int, tokens: int, dim: int) -> np.ndarray:
    """Float coefficients [heads, tokens, dim] (in steps) of rows of every spread, Laplace-like, a few outliers."""
    rng = np.random.default_rng(seed)
    spread = 2.0 ** rng.uniform(-4.0, 9.0, size=(heads, 1, dim))
    u = rng.laplace(size=(heads, tokens, dim)) * spread / math.sqrt(2)
    u[rng.integers(heads), rng.integers(tokens), rng.integers(dim)] = rng.uniform(-1e6, 1e6)
    return u.astype(np.float32)


def cost(u, q, cls, lam):
    return (u.astype(np.float64) - rans.reconstruct(q, cls)) ** 2 + lam * rans.symbol_bits(cls, q)


@PROPS
@given(seed=st.integers(0, 2**32 - 1), lam=st.sampled_from([0.0, 0.05, 0.15, 0.5, 3.0]))
def test_rdoq_never_raises_a_coefficients_cost_and_moves_it_one_step_toward_zero_at_most(seed, lam):
    u = coefficients(seed, 2, 40, 8)
    q = np.rint(u).astype(np.int64)
    cls = rans.classes_of(q.transpose(0, 2, 1).reshape(16, 40)).reshape(2, 1, 8)
    got = rans.rdoq(u, q, cls, lam)
    assert (cost(u, got, cls, lam) <= cost(u, q, cls, lam)).all()
    moved = got != q
    assert (got[moved] == q[moved] - np.sign(q[moved])).all()
    assert not moved[(q == 0) | (np.abs(q) >= rans.RADIUS[np.broadcast_to(cls, q.shape)])].any()  # zeros, escapes
    if lam == 0:  # nearest rounding already has the least error with centroids inside the bins
        assert not moved.any()
    if lam >= 0.15:
        assert moved.any()


@PROPS
@given(seed=st.integers(0, 2**32 - 1), heads=st.integers(1, 2), tokens=st.integers(1, 40), dim=st.sampled_from([2, 8]))
def test_the_compiled_encoder_rounds_as_the_reference_rdoq_and_writes_its_bytes(seed, heads, tokens, dim):
    u = np.stack([coefficients(seed + k, heads, tokens, dim) for k in range(2)])
    width, per_lane, _ = rans.layout(heads * dim, tokens)
    out, ends = cc._encode_halves(u, width, per_lane, *cc._TABLES)
    q = np.rint(u).astype(np.int32)
    q = np.stack([rans.rdoq_part(u[k], q[k], rans.RDOQ_LAMBDA) for k in range(2)])
    assert cc._head(5).tobytes() + out.tobytes() == _code_calibrated(q, 5)
    values = np.empty(q.shape, np.float32)
    cc.decode_segment_into(_code_calibrated(q, 5), heads, tokens, dim, 5, values)
    assert np.array_equal(values, _values_calibrated(_code_calibrated(q, 5), q.shape, 5))


def test_rdoq_makes_smaller_segments_than_plain_rounding():
    u = np.stack([coefficients(k, 2, 64, 8) / 4 for k in range(2)])  # mostly small symbols: where RDOQ acts
    width, per_lane, _ = rans.layout(16, 64)
    rdoq, _ = cc._encode_halves(u, width, per_lane, *cc._TABLES)
    plain, _ = cc._encode_halves(u, width, per_lane, *cc._TABLES[:4], 0.0, *cc._TABLES[5:])
    assert len(rdoq) < len(plain)


def _calibration(layers: int, dim: int) -> calib.Calibration:
    g = torch.Generator().manual_seed(5)
    basis = torch.linalg.qr(torch.randn(layers, 2, 1, dim, dim, generator=g))[0]
    return calib.Calibration(
        inv_freq=torch.rand(layers, dim // 2, generator=g),
        mean=torch.zeros(layers, 2, 1, dim),
        forward=basis,
        inverse=basis.transpose(-1, -2).contiguous(),
        step=torch.full((layers, 2), 0.05),
        info={"test": "centroid"},
    )


def test_chunks_of_the_bin_centre_coder_are_misses_everywhere():
    """Coder 2 wrote the same rANS parts but its symbols meant bin centres (segment flags 2 | 4): reading them
    with centroids would serve slightly wrong KV. A tier's codec refuses such objects (other parameters), the
    header's parameters name a coder this kvshelf refuses, and every decoder refuses the segment's flags."""
    from kvshelf.codecs import rans_gpu
    from kvshelf.storage.base import ChunkMeta, StoredChunk
    from kvshelf.storage.format import FormatError, encode_chunk, open_chunk

    layers, tokens, dim = 2, 16, 8
    cal = _calibration(layers, dim)
    calib.register(cal)
    codec = CacheGenCodec(calibration=cal.digest)

    class BinCentre(CacheGenCodec):  # what coder 2 wrote: its parameters and its segments' flags
        def params(self):
            return {**super().params(), "coder": 2}

        def encode_layers(self, kv, position=0):
            return [seg[:3] + bytes([2 | 4]) + seg[4:] for seg in super().encode_layers(kv, position)]

    kv = torch.randn(layers, 2, 1, tokens, dim, generator=torch.Generator().manual_seed(6))
    chunk = StoredChunk(ChunkMeta(b"\0" * 32, tokens, tuple(kv.shape), kv.dtype), kv)
    old_blob = encode_chunk(b"k" * 16, chunk, BinCentre(calibration=cal.digest, rdoq=0))
    assert open_chunk(encode_chunk(b"k" * 16, chunk, codec), b"k" * 16, codec).decode_all().kv.shape == kv.shape
    with pytest.raises(FormatError):  # a tier's codec: other parameters
        open_chunk(old_blob, b"k" * 16, codec)
    with pytest.raises((FormatError, ValueError)):  # the header's parameters: coder 2, refused
        open_chunk(old_blob, b"k" * 16).decode_all()
    # the segments themselves, should parameters ever match: refused by the reference, compiled and GPU paths
    seg = BinCentre(calibration=cal.digest).encode_layers(kv)[0]
    shape = (2, 1, tokens, dim)
    with pytest.raises(ValueError, match="header"):
        _values_calibrated(seg, shape, 5)
    with pytest.raises(ValueError, match="header"):
        cc.decode_segment_into(seg, 1, tokens, dim, 5, np.empty(shape, np.float32))
    with pytest.raises(ValueError, match="header"):
        codec.decode_layer(seg, shape, torch.float32, 0, layers)
    with pytest.raises(rans.RansError):
        rans_gpu.stage([seg], shape, 5, "cpu")
