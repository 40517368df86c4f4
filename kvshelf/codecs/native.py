"""What compiled (numba) codec code needs beyond numba: the BLAS sgemm that torch itself calls, and casts between
float32 and fp16 / bf16, so that a whole work unit (symbols, transform, RoPE, cast) is one call that never takes
the GIL (kvshelf.codecs.cachegen_threads).

- `blas()`: the address of the Fortran `sgemm_batch_` in torch's own library (torch's x86 wheels link Intel MKL
  into libtorch_cpu; torch's CPU `baddbmm` calls it on an AMD EPYC), and of MKL's per-thread thread count
  setter: on the codec's threads MKL must not start threads of its own (a unit is the parallelism; MKL's
  default in a thread torch did not set up is every core: 16 threads x 16 threads). Called from compiled code
  through `call_sgemm_batch` / `call_int` with the address as an argument (no address baked into the machine
  code, so numba's on-disk cache stays valid across processes). `None` where torch has no such symbol (other
  platforms) or where it does not give torch.baddbmm's float32 results bit for bit on this machine.
  `fast_blas()`: blas() where it is also as fast as torch's matmul here (else the codec keeps torch's).
- `half_bits` / `half_value`: float32 <-> IEEE fp16 by LLVM's own conversion (F16C's vcvtps2ph / vcvtph2ps:
  round to nearest even, as torch's cast); `bf16_bits`: float32 -> bfloat16 by bit arithmetic, as torch's
  scalar cast (round to nearest even; NaN -> 0x7FC0). Vectorisable loops: ~torch's cast speed.
"""

from __future__ import annotations

import ctypes
import functools
import os
import time

import numpy as np
import torch
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

# -- sgemm ---------------------------------------------------------------------------------------------------------


@intrinsic
def call_sgemm_batch(typingctx, fn, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, groups, sizes):
    """Call the Fortran sgemm_batch at address `fn` (MKL's group interface); every argument an integer address."""
    args = (fn, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, groups, sizes)
    if not all(isinstance(t, types.Integer) for t in args):
        return None
    sig = types.void(*args)

    def codegen(context, builder, signature, values):
        byte_ptr = ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [byte_ptr] * 15)
        target = builder.inttoptr(values[0], fnty.as_pointer())
        builder.call(target, [builder.inttoptr(v, byte_ptr) for v in values[1:]])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def call_int(typingctx, fn, value):
    """Call the C function `int f(int)` at address `fn`."""
    if not isinstance(fn, types.Integer) or not isinstance(value, types.Integer):
        return None

    def codegen(context, builder, signature, values):
        i32 = ir.IntType(32)
        target = builder.inttoptr(values[0], ir.FunctionType(i32, [i32]).as_pointer())
        return builder.call(target, [builder.trunc(values[1], i32) if values[1].type.width > 32 else values[1]])

    return types.int32(fn, value), codegen


@njit(nogil=True, cache=True)
def affine(blas, threads, params, q, q_at, mats, m_at, bias, b_at, x, x_at, count, tokens, dim):  # pragma: no cover
    """x[i] = bias[i] + q[i] @ mats[i] for `count` matrices (q, x: [tokens, dim] row-major from q_at / x_at;
    mats: [dim, dim] from m_at; bias: [dim] from b_at; all float32, offsets in values) by one call of the
    sgemm_batch at blas[0], made as torch's baddbmm makes it (bias first, then beta = 1; row-major q @ m is
    column-major m^T q^T: no transposes), on `threads` MKL threads (this thread's MKL setting, by
    MKL_Set_Num_Threads_Local at blas[1], put back after). `params`: int64 scratch of 8 + 3 * count (the
    Fortran arguments, then the matrices' addresses: the caller holds it, so that it outlives the call)."""
    fn, set_threads = blas[0], blas[1]
    before = call_int(set_threads, threads)
    params[0] = 0x4E  # 'N'
    params[1] = dim
    params[2] = tokens
    params[3] = 0x3F800000  # 1.0f
    params[4] = 1  # one group
    params[5] = count  # of `count` products
    for i in range(count):
        row = x[x_at + i * tokens * dim : x_at + (i + 1) * tokens * dim]
        b = bias[b_at + i * dim : b_at + (i + 1) * dim]
        for t in range(tokens):
            row[t * dim : (t + 1) * dim] = b
        params[8 + i] = mats.ctypes.data + 4 * (m_at + i * dim * dim)
        params[8 + count + i] = q.ctypes.data + 4 * (q_at + i * tokens * dim)
        params[8 + 2 * count + i] = x.ctypes.data + 4 * (x_at + i * tokens * dim)
    p = params.ctypes.data
    call_sgemm_batch(fn, p, p, p + 8, p + 16, p + 8, p + 24, p + 64, p + 8, p + 64 + 8 * count, p + 8, p + 24,
                     p + 64 + 16 * count, p + 8, p + 32, p + 40)  # fmt: skip
    call_int(set_threads, before)


def _mkl() -> np.ndarray | None:
    """The addresses of sgemm_ and MKL_Set_Num_Threads_Local in torch's library, or None."""
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        found = [ctypes.cast(getattr(lib, name), ctypes.c_void_p).value for name in _SYMBOLS]
    except (OSError, AttributeError):
        return None
    return np.array(found, np.int64)


_SYMBOLS = ("sgemm_batch_", "MKL_Set_Num_Threads_Local")  # the C setter takes an int (lowercase mkl_...: a pointer)


@functools.cache
def blas() -> np.ndarray | None:
    """[sgemm_batch_'s address, MKL_Set_Num_Threads_Local's] (what `affine` takes) when `affine` gives
    torch.baddbmm's results bit for bit (checked once, on a codec-shaped problem: 256 tokens x 256 dims), else
    None."""
    fn = _mkl()
    if fn is None:
        return None
    q, m, bias, want = _problem(2)
    return fn if np.array_equal(_affine(fn, q, m, bias), want.numpy().reshape(-1)) else None


@functools.cache
def fast_blas() -> np.ndarray | None:
    """blas() where its matmul costs at most 5% more CPU than torch.baddbmm's on this machine (timed once: best
    of 5 on a unit's shape, 6 matrices of 256 x 256 x 256, ~20 ms), else None: the codec's fused units need it.
    Measured: as fast as torch on an AMD EPYC (both MKL), 1.55x slower on the H200 host's Xeon, where torch's
    own path is faster (BENCHMARKS.md, issue #17, fifth session): there the units keep torch's matmul."""
    fn = blas()
    if fn is None:
        return None
    q, m, bias, _ = _problem(6)
    expanded, out = bias[:, None, :].expand(6, 256, 256), torch.empty(6, 256, 256)
    ours, theirs = [], []
    _affine(fn, q, m, bias), torch.baddbmm(expanded, q, m, out=out)  # first calls: MKL's set-up
    for _ in range(5):
        t = time.thread_time()
        _affine(fn, q, m, bias)
        ours.append(time.thread_time() - t)
        t = time.thread_time()
        torch.baddbmm(expanded, q, m, out=out)
        theirs.append(time.thread_time() - t)
    return fn if min(ours) <= 1.05 * min(theirs) else None


def _problem(n: int):
    g = torch.Generator().manual_seed(17)
    q = torch.randint(-40, 41, (n, 256, 256), generator=g).float()
    m = torch.randn(n, 256, 256, generator=g)
    bias = torch.randn(n, 256, generator=g)
    return q, m, bias, torch.baddbmm(bias[:, None, :].expand(n, 256, 256), q, m)


def _affine(fn, q: torch.Tensor, m: torch.Tensor, bias: torch.Tensor) -> np.ndarray:
    n = q.shape[0]
    x = np.empty(n * 256 * 256, np.float32)
    affine(fn, 1, np.zeros(8 + 3 * n, np.int64), q.numpy().reshape(-1), 0, m.numpy().reshape(-1), 0,
           bias.numpy().reshape(-1), 0, x, 0, n, 256, 256)  # fmt: skip
    return x


# -- casts ---------------------------------------------------------------------------------------------------------


@intrinsic
def half_bits(typingctx, x):
    """float32 -> the bits of the nearest fp16 (round to nearest even; overflow -> inf)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, values):
        return builder.bitcast(builder.fptrunc(values[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(x), codegen


@intrinsic
def half_value(typingctx, u):
    """fp16 bits -> float32 (exact)."""
    if u != types.uint16:
        return None

    def codegen(context, builder, signature, values):
        return builder.fpext(builder.bitcast(values[0], ir.HalfType()), ir.FloatType())

    return types.float32(u), codegen


@njit(nogil=True, cache=True, inline="always")
def bf16_bits(u):  # pragma: no cover - compiled
    """float32 (its bits, uint32) -> bfloat16 bits, as torch's scalar cast: round to nearest even, NaN 0x7FC0."""
    if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16(0x7FC0)
    return np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


def has_f16c() -> bool:
    """Whether this CPU converts fp16 in hardware (else LLVM would need a runtime routine numba lacks)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return "+f16c" in llvm_binding.get_host_cpu_features().flatten()


# Output / input kinds of the fused units: what the KV tensor holds.
F32, F16, BF16, OTHER = 0, 1, 2, 3


def kind_of(dtype: torch.dtype) -> int:
    """The compiled casts' code for a KV dtype (OTHER: torch casts)."""
    if dtype == torch.float32:
        return F32
    if dtype == torch.float16 and _F16C:
        return F16
    if dtype == torch.bfloat16:
        return BF16
    return OTHER


_F16C = has_f16c()


def flat_views(t: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """A contiguous tensor as the compiled code's (uint16, float32) flat arrays: its own memory in the one its
    kind uses, an empty array in the other."""
    k = kind_of(t.dtype)
    none16, none32 = np.empty(0, np.uint16), np.empty(0, np.float32)
    if k == F32:
        return none16, t.numpy().reshape(-1)
    if k in (F16, BF16):
        return t.view(torch.int16).numpy().view(np.uint16).reshape(-1), none32
    return none16, none32


@njit(nogil=True, cache=True)
def cast_out(x, x_at, n, kind, out16, out32, at):  # pragma: no cover - compiled
    """x[x_at : x_at + n] (float32) into out16 / out32 from `at`, as torch's cast to the kind's dtype."""
    src = x[x_at : x_at + n]  # slices first: loops over 0..n-1 of both vectorise (offset indexes did not)
    if kind == F32:
        out32[at : at + n] = src
    elif kind == F16:
        dst = out16[at : at + n]
        for i in range(n):
            dst[i] = half_bits(src[i])
    elif kind == BF16:
        dst, bits = out16[at : at + n], src.view(np.uint32)
        for i in range(n):
            dst[i] = bf16_bits(bits[i])


@njit(nogil=True, cache=True)
def cast_in(kind, in16, in32, at, n, q):  # pragma: no cover - compiled
    """in16 / in32 [at : at + n] (the kind's dtype) into q[:n] as float32 (exact for every kind here)."""
    if kind == F32:
        q[:n] = in32[at : at + n]
    elif kind == F16:
        src, dst = in16[at : at + n], q[:n]
        for i in range(n):
            dst[i] = half_value(src[i])
    elif kind == BF16:
        src, bits = in16[at : at + n], q[:n].view(np.uint32)
        for i in range(n):
            bits[i] = np.uint32(src[i]) << np.uint32(16)
