"""kvshelf.codecs.native (MKL's sgemm and fp16 / bf16 casts inside compiled code) and the fused work units of
kvshelf.codecs.cachegen_threads built on it: torch's results bit for bit, the same bytes and KV as the units
made of torch calls."""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cachegen_cpu import _calibration

from kvshelf.codecs import native, pool
from kvshelf.codecs.cachegen import CacheGenCodec


def test_mkl_is_found_where_torch_links_it():
    """CI's x86 torch links MKL: the fused units' matmul must be there (else the tests below test only one path)."""
    if platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkl.is_available():
        assert native.blas() is not None
    assert native.fast_blas() is None or native.fast_blas() is native.blas()


@pytest.mark.parametrize(("count", "tokens", "dim"), [(1, 256, 256), (3, 16, 8), (2, 37, 64), (1, 1, 128)])
def test_affine_is_torch_baddbmm_bit_for_bit(count, tokens, dim):
    fn = native.blas()
    if fn is None:
        pytest.fail("no sgemm_batch in torch's library on this machine (see test_mkl_is_found_where_torch_links_it)")
    g = torch.Generator().manual_seed(count * tokens + dim)
    q = torch.randint(-300, 301, (count, tokens, dim), generator=g).float()
    m = torch.randn(count, dim, dim, generator=g)
    bias = torch.randn(count, dim, generator=g)
    want = torch.baddbmm(bias[:, None, :].expand(count, tokens, dim), q, m)
    # offsets inside larger arrays, as the units address the chunk's matrices and their buffers
    pad = 5
    qs = np.concatenate([np.zeros(pad * tokens * dim, np.float32), q.numpy().reshape(-1)])
    ms = np.concatenate([np.zeros(pad * dim * dim, np.float32), m.numpy().reshape(-1)])
    bs = np.concatenate([np.zeros(pad * dim, np.float32), bias.numpy().reshape(-1)])
    x = np.full((count + 1) * tokens * dim, 7.0, np.float32)
    native.affine(fn, 1, np.zeros(8 + 3 * count, np.int64), qs, pad * tokens * dim, ms, pad * dim * dim, bs,
                  pad * dim, x, tokens * dim, count, tokens, dim)  # fmt: skip
    assert np.array_equal(x[tokens * dim :], want.numpy().reshape(-1))
    assert (x[: tokens * dim] == 7.0).all()  # nothing written before its place


def _specials() -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    x = torch.cat([
        torch.randn(20000, generator=g) * 10.0 ** torch.randint(-9, 7, (20000,), generator=g),
        torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 65504.0, 65520.0, 65519.99, -70000.0, 1e-8, -6e-8,
                      2.0**-24, 2.0**-25, 3 * 2.0**-26, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 1.0 + 2.0**-8,
                      1.0 + 3 * 2.0**-8, 3.4e38, -1.2e-38, 1e-45]),
    ])  # fmt: skip
    return x.float()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_casts_are_torch_casts(dtype):
    """float32 -> the KV dtype as torch casts (round to nearest even, overflow, subnormals), and back exactly."""
    x = _specials()
    kind = native.kind_of(dtype)
    if dtype == torch.float16 and kind == native.OTHER:
        pytest.fail("this x86 CPU lacks F16C")  # every x86-64-v3 CPU has it; CI's do
    out = torch.empty(len(x) + 3, dtype=dtype)
    out16, out32 = native.flat_views(out)
    native.cast_out(np.concatenate([np.ones(2, np.float32), x.numpy()]), 2, len(x), kind, out16, out32, 3)
    want = x.to(dtype)
    assert torch.equal(out[3:].view(torch.uint8), want.view(torch.uint8))
    back = np.empty(len(x), np.float32)
    native.cast_in(kind, out16, out32, 3, len(x), back)
    assert np.array_equal(back, want.float().numpy(), equal_nan=True)


def test_bf16_nan_is_torch_scalar_nan():
    x = np.array([np.nan, -np.nan], np.float32)
    out = np.empty(2, np.uint16)
    native.cast_out(x, 0, 2, native.BF16, out, np.empty(0, np.float32), 0)
    assert out.tolist() == [0x7FC0, 0x7FC0]  # torch's scalar cast; decoded KV of finite transforms is never NaN


@pytest.mark.parametrize("workers", [0, 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_fused_units_code_and_decode_as_the_torch_units(monkeypatch, workers, dtype):
    layers, heads, tokens, dim = 4, 2, 16, 8
    cal = _calibration(layers, heads, dim, 9)
    processes = pool.CodecProcesses(workers)
    codec = CacheGenCodec(calibration=cal.digest, processes=processes)
    kv = torch.randn(layers, 2, heads, tokens, dim, generator=torch.Generator().manual_seed(8)).to(dtype)
    shape = (2, heads, tokens, dim)

    def run():
        segs = codec.encode_layers(kv, 2 * tokens)
        return segs, codec.decode_layers(segs, shape, dtype, list(range(layers)), layers, 2 * tokens)

    if native.blas() is None:
        pytest.fail("no sgemm_batch in torch's library on this machine")
    monkeypatch.setattr(native, "fast_blas", native.blas)  # the fused units, whichever this machine would pick
    segs, got = run()
    assert segs == codec.encode_layers(kv.transpose(0, 1).contiguous().transpose(0, 1), 2 * tokens)  # strided KV
    monkeypatch.setattr(native, "fast_blas", lambda: None)  # the units of four torch / compiled calls
    want_segs, want = run()
    processes.close()
    assert segs == want_segs
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_warm_up_compiles_what_the_codec_calls():
    """After warm_up the codec's calls compile nothing new: the fused units' argument types are the codec's
    (in a fresh process: this one's other tests compiled other signatures)."""
    code = """
import torch
from test_cachegen_cpu import _calibration
from kvshelf.codecs import cachegen_threads as ct, native, rans
from kvshelf.codecs.cachegen import CacheGenCodec
native.fast_blas = native.blas  # the fused units, whichever this machine would pick
rans.warm_up()
fns = (ct._decode_fused, ct._encode_fused, native.affine)  # what Python calls
seen = [len(f.signatures) for f in fns]
cal = _calibration(2, 1, 4, 10)
codec = CacheGenCodec(calibration=cal.digest)
for dtype in (torch.float16, torch.bfloat16, torch.float32):
    kv = torch.randn(2, 2, 1, 8, 4).to(dtype)
    codec.decode_layers(codec.encode_layers(kv, 0), (2, 1, 8, 4), dtype, [0, 1], 2, 0)
print(seen, [len(f.signatures) for f in fns])
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), *sys.path]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[-2] == "[1, 1, 1] [1, 1, 1]"


def test_affine_runs_on_the_threads_asked_and_puts_mkl_setting_back():
    """A unit's matmul runs on one MKL thread on the codec's threads, and this thread's MKL setting is what it
    was before (an inline unit must not change a caller's later matmuls)."""
    blas = native.blas()
    if blas is None:
        pytest.fail("no sgemm_batch in torch's library on this machine")
    setter = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(int(blas[1]))
    seen = []

    def on_a_thread():
        setter(3)
        x = np.empty(64 * 8, np.float32)
        native.affine(blas, 1, np.zeros(11, np.int64), np.ones(64 * 8, np.float32), 0, np.ones(64, np.float32), 0,
                      np.zeros(8, np.float32), 0, x, 0, 1, 64, 8)  # fmt: skip
        seen.append((setter(0), float(x[0])))

    thread = threading.Thread(target=on_a_thread)
    thread.start()
    thread.join()
    assert seen == [(3, 8.0)]
