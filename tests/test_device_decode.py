"""Layerwise loading that decodes stored chunks on the KV's own device (kvshelf.cache.device_decode), checked on
the CPU: the plan, the loader's path (a codec that says it decodes on the CPU stands in for cachegen on a GPU),
a decode error flag turning into a recompute, and cachegen's batched decoding through Triton's interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from kvshelf.cache.device_decode import read_groups
from kvshelf.cache.engine import CacheEngine
from kvshelf.codecs.int8 import Int8Codec
from kvshelf.generation import CachedGenerator
from kvshelf.model.runner import ModelRunner
from kvshelf.storage.disk import DiskBackend
from kvshelf.storage.format import read_header
from kvshelf.storage.tiers import TierManager

ROOT = Path(__file__).resolve().parents[1]


class HereBatched(Int8Codec):
    """int8 that claims to decode batched on the CPU: the loader takes its device-decoding path."""

    def __init__(self, damaged: bool = False):
        super().__init__()
        self.damaged, self.calls = damaged, []

    def decodes_on(self, device) -> bool:
        return True

    def decode_run_on(self, segments, shape, dtype, layers, num_layers, device, position):
        self.calls.append((list(layers), len(segments[0]), position))
        kv, _ = super().decode_run_on(segments, shape, dtype, layers, num_layers, device, position)
        return kv, torch.tensor(self.damaged)


def prompt(n, seed):
    return torch.randint(4, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def setup(tmp_path, model, codec):
    runner = ModelRunner(model)
    tiers = TierManager([DiskBackend(tmp_path, 1 << 28, codec)])
    engine = CacheEngine(runner.fingerprint(), tiers, chunk_size=16)
    whole = CachedGenerator(runner, engine)
    layered = CachedGenerator(runner, engine, use_layerwise=True, buffer_size=2, layerwise_store=False)
    return tiers, whole, layered


def test_layerwise_decoding_on_the_device_equals_whole_prompt_loading(tmp_path, tiny_models):
    codec = HereBatched()
    tiers, whole, layered = setup(tmp_path, tiny_models("llama"), codec)
    ids = prompt(70, 1)
    whole.generate(ids, max_new_tokens=1)  # stores 4 full chunks and one of 6 tokens
    tiers.flush()
    plan = layered.engine.retrieve_layerwise(ids, max_tokens=69).device_decoding("cpu")
    assert [(r.start, r.end, r.count) for r in plan.runs] == [(0, 64, 4), (64, 69, 1)]
    a = whole.generate(ids, max_new_tokens=6, stop_at_eos=False)
    codec.calls.clear()
    b = layered.generate(ids, max_new_tokens=6, stop_at_eos=False)
    assert a.hit_tokens == b.hit_tokens == 69 and a.token_ids == b.token_ids
    assert torch.allclose(a.first_logits, b.first_logits, atol=1e-5)
    layers = layered.runner.num_layers
    groups = [[i] for i in range(layers)]  # buffer_size 2: groups of one layer (one staged, one decoding)
    # each group of layers: one call per run (4 chunks from position 0, then the short chunk at 64)
    assert codec.calls == [c for g in groups for c in ((g, 4, 0), (g, 1, 64))]
    tiers.close()


class StagedHere(HereBatched):
    """HereBatched that records when each run of a group is staged (the CPU's share) and when queued."""

    def stage_run_on(self, segments, shape, dtype, layers, num_layers, device, position):
        self.calls.append(("stage", list(layers), len(segments[0])))
        launch = super().stage_run_on(segments, shape, dtype, layers, num_layers, device, position)

        def queued():
            self.calls.append(("queue", list(layers), len(segments[0])))
            return launch()

        return queued


def test_each_group_is_staged_after_the_one_before_is_queued_and_decodes_as_whole_loading(tmp_path, tiny_models):
    codec = StagedHere()
    tiers, whole, layered = setup(tmp_path, tiny_models("llama"), codec)
    ids = prompt(70, 3)
    whole.generate(ids, max_new_tokens=1)
    tiers.flush()
    a = whole.generate(ids, max_new_tokens=4, stop_at_eos=False)
    codec.calls.clear()
    b = layered.generate(ids, max_new_tokens=4, stop_at_eos=False)
    assert a.hit_tokens == b.hit_tokens == 69 and a.token_ids == b.token_ids
    assert torch.allclose(a.first_logits, b.first_logits, atol=1e-5)
    layers = layered.runner.num_layers
    staged = [c for c in codec.calls if c[0] == "stage"]
    queued = [c for c in codec.calls if c[0] == "queue"]
    # every run of every group staged once and queued once, in order (4 chunks from 0, then the short chunk)
    want = [[m] for m in range(layers) for _ in (4, 1)]
    assert [c[1] for c in staged] == [c[1] for c in queued] == want
    order = [(c[0], c[1][0]) for c in codec.calls if c[2] == 4]
    for m in range(layers):  # group m is staged before it is queued, and after group m - 1 is queued
        assert order.index(("stage", m)) < order.index(("queue", m))
        if m:
            assert order.index(("queue", m - 1)) < order.index(("stage", m))
    plan = layered.engine.retrieve_layerwise(ids, max_tokens=69).device_decoding("cpu")
    assert plan.ready(0, 1)  # opened chunks: nothing to wait for
    with pytest.raises(ValueError, match="staged"):
        plan.decode(1, 2, plan.stage(0, 1))
    whole_payloads, _ = plan.decode(1, 3)
    plan._readers[1].encoded_payload = lambda: None  # a reader that does not hold its payload whole
    by_segment, _ = plan.decode(1, 3)
    assert [(a, b) for a, b, _ in by_segment] == [(a, b) for a, b, _ in whole_payloads]
    assert all(torch.equal(x, y) for (_, _, x), (_, _, y) in zip(by_segment, whole_payloads, strict=True))
    tiers.close()


def test_a_decode_error_flag_makes_the_request_recompute(tmp_path, tiny_models):
    codec = HereBatched(damaged=True)
    tiers, whole, layered = setup(tmp_path, tiny_models("qwen3"), codec)
    ids = prompt(50, 2)
    whole.generate(ids, max_new_tokens=1)
    tiers.flush()
    out = layered.generate(ids, max_new_tokens=5, stop_at_eos=False)
    plain = whole.generate(ids, max_new_tokens=5, stop_at_eos=False, use_cache=False)
    assert out.hit_tokens == 0 and out.token_ids == plain.token_ids
    assert codec.calls and layered.layerwise_stats.as_dict()["fallbacks"] == 1
    tiers.close()


class LateDisk(DiskBackend):
    """A disk tier whose reads answer late, the later the earlier the read (so side-by-side reads finish out
    of order), recording which threads read, how many reads were in flight at once, and each read's range.
    Its heads are probed with fewer bytes than they take (two reads each), so that no object comes whole."""

    head_probe = 128

    def __init__(self, *args, delays=(0.03, 0.0), **kw):
        super().__init__(*args, **kw)
        self.delays, self.readers, self.in_flight, self.most = delays, [], 0, 0
        self.ranges: list[tuple[int, int]] = []
        self._count = threading.Lock()

    def _late(self, start, length, read):
        with self._count:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
            delay = self.delays[len(self.readers) % len(self.delays)]
            self.readers.append(threading.current_thread().name)
            self.ranges.append((start, length))
        try:
            time.sleep(delay)
            return read()
        finally:
            with self._count:
                self.in_flight -= 1

    def _file_of(self, name):  # its reads are timed here: none is left to a reader process (range_procs)
        return None

    def _get_range(self, name, start, length, limit):  # heads
        return self._late(start, length, lambda: super(LateDisk, self)._get_range(name, start, length, limit))

    def _get_range_into(self, name, start, out, limit):  # layer ranges, read into the loader's staging buffer
        return self._late(start, out.nbytes, lambda: super(LateDisk, self)._get_range_into(name, start, out, limit))


@pytest.mark.parametrize("read_calls", [1, 3, 7])
def test_streamed_reads_arrive_late_and_out_of_order_and_decode_as_whole_loading(tmp_path, tiny_models, read_calls):
    codec = HereBatched()
    runner = ModelRunner(tiny_models("llama"))
    disk = LateDisk(tmp_path, 1 << 28, codec)
    tiers = TierManager([disk], deadline_s=5.0)
    engine = CacheEngine(runner.fingerprint(), tiers, chunk_size=16)
    engine.read_layers = 1  # a range per decode group (the finest plan)
    engine.read_calls = read_calls  # the 7 chunks' heads and each range in 1 call, 3 calls, a call per chunk
    whole = CachedGenerator(runner, engine)
    layered = CachedGenerator(runner, engine, use_layerwise=True, buffer_size=2, layerwise_store=False)
    ids = prompt(100, 4)
    whole.generate(ids, max_new_tokens=1)
    tiers.flush()
    disk.readers.clear()
    retrieval = engine.retrieve_layerwise(ids, max_tokens=99, device="cpu")
    assert disk.readers == [] and retrieval.num_tokens == 99  # located, not read: the compute can start
    assert retrieval.in_memory() is None and retrieval.device_decoding("cpu").streaming
    a = whole.generate(ids, max_new_tokens=4, stop_at_eos=False)
    disk.readers.clear()
    b = layered.generate(ids, max_new_tokens=4, stop_at_eos=False)
    assert a.hit_tokens == b.hit_tokens == 99 and a.token_ids == b.token_ids
    assert torch.allclose(a.first_logits, b.first_logits, atol=1e-5)
    layers = runner.num_layers
    # 7 heads (2 reads each), then every chunk's range of each group (buffer_size 2: groups of one layer), all on
    # the tier's workers
    assert len(disk.readers) == 14 + 7 * layers and all(n.startswith("kvshelf-disk-") for n in disk.readers)
    assert disk.most <= tiers.read_window == 2  # within half the tier's 4 workers
    if read_calls > 1:
        assert disk.most == 2  # side by side
    assert tiers.stats()["disk"]["stuck"] == 0 and layered.layerwise_stats.as_dict()["fallbacks"] == 0
    tiers.close()


class Recording:
    """A KV target that notes, as each layer group is written, how many tier reads had begun by then."""

    def __init__(self, buf, disk):
        self.buf, self.disk, self.device, self.reads_at = buf, disk, buf.device, {}

    def write_layers(self, i, j, start, part, *, non_blocking=False):
        self.reads_at.setdefault(i, len(self.disk.ranges))
        self.buf.write_layers(i, j, start, part, non_blocking=non_blocking)

    def row_copier(self, chunks):
        return None


def test_layer_zero_is_ready_before_later_layers_are_read_and_the_kv_equals_whole_reads(tmp_path, tiny_models):
    from kvshelf.layerwise.loader import LayerwiseLoader
    from kvshelf.layerwise.stats import LayerwiseStats
    from kvshelf.model.kv_buffer import KVBuffer

    codec = HereBatched()
    runner = ModelRunner(tiny_models("qwen3"))
    disk = LateDisk(tmp_path, 1 << 28, codec, delays=(0.02,))
    tiers = TierManager([disk], deadline_s=5.0)
    engine = CacheEngine(runner.fingerprint(), tiers, chunk_size=16)
    engine.read_layers = 1  # a range per decode group (the finest plan)
    ids = prompt(100, 8)
    CachedGenerator(runner, engine).generate(ids, max_new_tokens=1)
    tiers.flush()
    fp = runner.fingerprint()
    layers, heads, dim = fp.num_layers, fp.num_kv_heads, fp.head_dim
    whole = torch.cat([kv for _, kv in engine.retrieve_chunks(ids, max_tokens=96)], dim=3)  # whole objects
    disk.ranges.clear()
    retrieval = engine.retrieve_layerwise(ids, max_tokens=96, device="cpu")
    target = Recording(KVBuffer(layers, heads, dim, 96, dtype=whole.dtype, device="cpu"), disk)
    loader = LayerwiseLoader(
        retrieval, target, buffer_size=2, stats=LayerwiseStats(layers), decoding=retrieval.device_decoding("cpu")
    )
    for i in range(layers):
        loader.wait(i)
    loader.close()
    assert loader.error is None
    assert torch.equal(target.buf.data[:, :, :, :96], whole)  # ranges verified apart decode as whole objects do
    assert len(disk.ranges) == 12 + 6 * layers and layers >= 3
    # layer 0 was decoded once the 6 heads (2 reads each) and layer 0's 6 ranges were in (reads of 20 ms, two at
    # a time, go on meanwhile): the last layer's ranges were read after layer 0 was in use
    assert 12 + 6 <= target.reads_at[0] <= len(disk.ranges) - 6
    tiers.close()


@pytest.mark.parametrize(("read_layers", "processes"), [(1, 0), (32, 0), (0, 0), (1, 2), (32, 2)])
@pytest.mark.parametrize("layer", ["first", "last"])
def test_a_damaged_layer_range_in_the_middle_of_a_streamed_read_makes_the_request_recompute(
    tmp_path, tiny_models, layer, read_layers, processes
):
    codec = HereBatched()
    tiers, whole, layered = setup(tmp_path, tiny_models("llama"), codec)
    layered.engine.read_layers = read_layers  # per group, the rest in one range, whole objects
    layered.engine.read_processes = processes  # ranges read and checked here, or by reader processes
    tiers.tiers[0].backend.head_probe = 128  # no object comes whole with its head
    ids = prompt(100, 5)
    whole.generate(ids, max_new_tokens=1)
    tiers.flush()
    disk = tiers.tiers[0].backend
    victim = disk._path(disk.name_of(whole.engine.keys(ids)[3].digest))  # the 4th of 7 chunks
    raw = bytearray(victim.read_bytes())
    header, start = read_header(bytes(raw))
    at = start + (header["layer_offsets"][0] if layer == "first" else header["layer_offsets"][-1] - 5)
    raw[at] ^= 0x40  # inside that layer's segment: its digest fails when the loader reads its range
    victim.write_bytes(bytes(raw))
    out = layered.generate(ids, max_new_tokens=4, stop_at_eos=False)
    plain = whole.generate(ids, max_new_tokens=4, stop_at_eos=False, use_cache=False)
    assert out.hit_tokens == 0 and out.token_ids == plain.token_ids  # recomputed: never the KV of a bad object
    assert layered.layerwise_stats.as_dict()["fallbacks"] == 1 and disk.corrupt_objects == 1
    tiers.flush()  # the recomputed prompt's chunks stored again, the damaged one replaced by a sound one
    again = layered.generate(ids, max_new_tokens=4, stop_at_eos=False)
    assert again.hit_tokens == 99 and again.token_ids == plain.token_ids
    assert layered.layerwise_stats.as_dict()["fallbacks"] == 1
    tiers.close()


def test_reads_are_cut_into_near_equal_consecutive_calls():
    from kvshelf.cache.device_decode import batches

    assert batches(48, 4) == [(0, 12), (12, 24), (24, 36), (36, 48)]
    assert batches(7, 3) == [(0, 2), (2, 4), (4, 7)]
    assert batches(3, 8) == [(0, 1), (1, 2), (2, 3)]  # never an empty call
    assert batches(5, 0) == batches(5, 1) == [(0, 5)] and batches(0, 4) == []


def test_the_read_plan_merges_decode_groups_after_the_first():
    groups = [(0, 1), *((i, min(i + 4, 32)) for i in range(1, 32, 4))]  # buffer 8: groups of 4 after layer 0
    assert read_groups(groups, 4) == groups  # a range per decode group
    assert read_groups(groups, 1) == groups  # groups larger than read_layers are read alone
    assert read_groups(groups, 8, alone=1) == [(0, 1), (1, 9), (9, 17), (17, 25), (25, 32)]
    assert read_groups(groups, 8) == read_groups(groups, 8, alone=1)  # READ_ALONE: layer 0 alone, then merged
    assert read_groups(groups, 8, alone=2) == [(0, 1), (1, 5), (5, 13), (13, 21), (21, 29), (29, 32)]
    assert read_groups(groups, 32, alone=1) == read_groups(groups, 31, alone=1) == [(0, 1), (1, 32)]  # one range
    assert read_groups(groups, 30, alone=1) == [(0, 1), (1, 29), (29, 32)]
    assert read_groups(groups, 32, alone=2) == [(0, 1), (1, 5), (5, 32)]
    assert read_groups(groups, 32, alone=0) == read_groups(groups, 32, alone=1)  # the first is always alone
    assert read_groups(groups, 0) == [(0, 32)]  # whole objects
    assert read_groups([(0, 1)], 32) == [(0, 1)] and read_groups([], 8) == []
    assert read_groups([(0, 2), (2, 3), (3, 4)], 8, alone=1) == [(0, 2), (2, 4)]  # the first group stays alone
    with pytest.raises(ValueError, match="consecutive"):
        read_groups([(0, 1), (2, 3)], 8)
    with pytest.raises(ValueError, match=">= 0"):
        read_groups(groups, -1)


def _loaded(engine, runner, ids, tokens):
    """Every layer of the prefix through the loader (buffer 4: layer 0, then groups of 2) and what it wrote."""
    from kvshelf.layerwise.loader import LayerwiseLoader
    from kvshelf.layerwise.stats import LayerwiseStats
    from kvshelf.model.kv_buffer import KVBuffer

    fp = runner.fingerprint()
    retrieval = engine.retrieve_layerwise(ids, max_tokens=tokens, device="cpu")
    buf = KVBuffer(fp.num_layers, fp.num_kv_heads, fp.head_dim, tokens, dtype=torch.float32, device="cpu")
    target = Recording(buf, engine.backend.tiers[0].backend)
    decoding = retrieval.device_decoding("cpu")
    loader = LayerwiseLoader(retrieval, target, buffer_size=4, stats=LayerwiseStats(fp.num_layers), decoding=decoding)
    for i in range(fp.num_layers):
        loader.wait(i)
    loader.close()
    assert loader.error is None
    return buf.data[:, :, :, :tokens], target


@pytest.mark.parametrize(
    ("read_layers", "alone", "plan"),
    [(2, 2, [(0, 1), (1, 3), (3, 4)]), (32, 1, [(0, 1), (1, 4)]), (32, 2, [(0, 1), (1, 3), (3, 4)])],
)
def test_coarse_ranges_read_the_plan_and_decode_as_whole_objects(
    tmp_path, tiny_models, read_layers, alone, plan, monkeypatch
):
    from kvshelf.cache import device_decode

    monkeypatch.setattr(device_decode, "READ_ALONE", alone)
    codec = HereBatched()
    runner = ModelRunner(tiny_models("qwen3"))
    disk = LateDisk(tmp_path, 1 << 28, codec, delays=(0.05,))
    tiers = TierManager([disk], deadline_s=5.0)
    engine = CacheEngine(runner.fingerprint(), tiers, chunk_size=16)
    ids = prompt(100, 9)
    CachedGenerator(runner, engine).generate(ids, max_new_tokens=1)
    tiers.flush()
    layers = runner.num_layers
    assert layers == 4  # groups (0, 1), (1, 3), (3, 4)
    whole = torch.cat([kv for _, kv in engine.retrieve_chunks(ids, max_tokens=96)], dim=3)
    heads = {}
    for k in engine.keys(ids)[:6]:
        blob = disk._path(disk.name_of(k.digest)).read_bytes()
        header, start = read_header(blob)
        heads[k.digest] = (start, header["layer_offsets"])
    engine.read_layers = read_layers
    disk.ranges.clear()
    kv, target = _loaded(engine, runner, ids, 96)
    assert torch.equal(kv.to(whole.dtype), whole)  # ranges verified apart decode as whole objects do
    # every chunk's head (two reads each: the probe is short), then each planned range of every chunk, in order
    assert len(disk.ranges) == 12 + 6 * len(plan)
    want = sorted((s + o[a], o[b] - o[a]) for a, b in plan for s, o in heads.values())
    assert sorted(disk.ranges[12:]) == want
    # layer 0 was decoded once the heads and its ranges were in, before the last ranges were read (50 ms each)
    assert 12 + 6 <= target.reads_at[0] <= len(disk.ranges) - 2
    tiers.close()


def test_whole_object_reads_decode_as_ranges_do(tmp_path, tiny_models):
    codec = HereBatched()
    runner = ModelRunner(tiny_models("qwen3"))
    disk = LateDisk(tmp_path, 1 << 28, codec, delays=(0.0,))
    tiers = TierManager([disk], deadline_s=5.0)
    engine = CacheEngine(runner.fingerprint(), tiers, chunk_size=16)
    ids = prompt(100, 10)
    CachedGenerator(runner, engine).generate(ids, max_new_tokens=1)
    tiers.flush()
    kv_ranges, _ = _loaded(engine, runner, ids, 96)
    engine.read_layers = 0
    disk.ranges.clear()
    kv_whole, _ = _loaded(engine, runner, ids, 96)
    assert disk.ranges == []  # whole objects: no range reads
    assert torch.equal(kv_whole, kv_ranges) and tiers.stats()["disk"]["hits"] >= 12
    tiers.close()


def test_read_ahead_is_bounded_and_in_order():
    from kvshelf.cache.device_decode import _ReadAhead

    made = []

    def results():
        for k in range(10):
            made.append(k)
            yield bytes([k]) * 100

    ahead = _ReadAhead(results(), limit=250)
    deadline = time.monotonic() + 5
    while len(made) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert len(made) == 3  # two queued (200 bytes), the third waits for room
    got = [ahead.next() for _ in range(10)]
    assert [g[0] for g in got] == list(range(10)) and ahead.next() is None and ahead.next() is None
    ahead.close()
    stopped = _ReadAhead(results(), limit=50)  # closed while the reads wait for room: ends, joined
    stopped.close()


def test_read_ahead_ends_when_closing_the_reads_raises(monkeypatch):
    from kvshelf.cache.device_decode import _ReadAhead

    class Reads:
        """Two results, then a close() that raises (a tier's generator failing as it ends its calls)."""

        def __init__(self):
            self._items = iter([b"a", b"b"])

        def __iter__(self):
            return self

        def __next__(self):
            return next(self._items)

        def close(self):
            raise OSError("tier gone while ending its reads")

    failures = []
    monkeypatch.setattr(threading, "excepthook", failures.append)
    ahead = _ReadAhead(Reads())
    ahead._thread.join()  # the reads' thread has ended (and failed loudly: below)
    got = []
    reader = threading.Thread(target=lambda: got.extend(ahead.next() for _ in range(3)), daemon=True)
    reader.start()
    reader.join(timeout=10)  # a missing end marker would make the third next() wait forever
    assert not reader.is_alive(), "next() waits for an end that was never queued"
    assert got == [b"a", b"b", None]
    assert [type(f.exc_value) for f in failures] == [OSError]
    ahead.close()


def test_chunks_held_decoded_are_not_planned_for_the_device(tiny_models):
    from kvshelf.storage.memory import MemoryBackend

    runner = ModelRunner(tiny_models("llama"))
    engine = CacheEngine(runner.fingerprint(), MemoryBackend(1 << 26), chunk_size=16)
    ids = prompt(40, 3)
    CachedGenerator(runner, engine).generate(ids, max_new_tokens=1)
    assert engine.retrieve_layerwise(ids, max_tokens=39).device_decoding("cpu") is None


# A child script's start: a random orthogonal calibration of `layers, heads, tokens, dim` registered, and its codec.
_CALIBRATED_CODEC = r"""
import torch
from kvshelf.codecs import calibration as calib
from kvshelf.codecs.cachegen import CacheGenCodec

layers, heads, tokens, dim = {shape}
g = torch.Generator().manual_seed({seed})
eye = torch.linalg.qr(torch.randn(layers, 2, heads, dim, dim, generator=g))[0]
cal = calib.Calibration(
    inv_freq=torch.rand(layers, dim // 2, generator=g),
    mean=torch.randn(layers, 2, heads, dim, generator=g),
    forward=eye,
    inverse=eye.transpose(-1, -2).contiguous(),
    step=torch.full((layers, 2), 0.05),
    info={{"test": "{label}"}},
)
calib.register(cal)
codec = CacheGenCodec(calibration=cal.digest)
"""

_BATCHED_CHECK = (
    _CALIBRATED_CODEC.format(shape="3, 2, 16, 8", seed=1, label="batched run")
    + r"""
from kvshelf.codecs.cachegen import _symbols_calibrated
from kvshelf.codecs import rans_gpu

kv = torch.randn(3, layers, 2, heads, tokens, dim, generator=g)
pos = 32  # the run starts at token 32: chunks at 32, 48, 64
segs = [[codec.encode_layer(kv[c, i], i, layers, pos + c * tokens) for c in range(3)] for i in (1, 2)]
shape = (2, heads, tokens, dim)
got, err = codec._decode_run_batched(segs, shape, torch.float32, [1, 2], "cpu", pos)
assert got.shape == (2, 2, heads, 3 * tokens, dim) and not bool(err)
for li, i in enumerate((1, 2)):
    for c in range(3):
        want = codec.decode_layer(segs[li][c], shape, torch.float32, i, layers, pos + c * tokens)
        assert torch.allclose(got[li, :, :, c * tokens : (c + 1) * tokens], want, atol=1e-4), (i, c)
bad = bytearray(segs[1][2])
bad[-40] ^= 0x01  # inside the words or escapes of V: the stream does not decode exactly
try:
    _, err = codec._decode_run_batched([segs[0], segs[1][:2] + [bytes(bad)]], shape, torch.float32, [1, 2], "cpu", pos)
    assert bool(err), "a damaged stream decoded without its flag"
except ValueError:
    pass  # refused while staging: as good
print("batched run ok")
import numpy as np
from kvshelf.codecs.base import SegmentRows

every = [[codec.encode_layer(kv[c, i], i, layers, pos + c * tokens) for i in range(layers)] for c in range(3)]
payloads = [(b"".join(segs_c), np.cumsum([0, *map(len, segs_c)]).tolist()) for segs_c in every]
rows = SegmentRows.of([(memoryview(p), offs) for p, offs in payloads], 1, 3)  # each chunk's layers 1-2: one span
assert [[bytes(s) for s in row] for row in rows] == [[every[c][i] for c in range(3)] for i in (1, 2)]
spans, err = codec._decode_run_batched(rows, shape, torch.float32, [1, 2], "cpu", pos)
plain, _ = codec._decode_run_batched([list(r) for r in rows], shape, torch.float32, [1, 2], "cpu", pos)
assert not bool(err) and torch.equal(spans, plain)
q_spans = rans_gpu.run_staged(rans_gpu.stage_spans(rows.spans, rows.offsets, shape, codec.bits, "cpu"))
q_plain = rans_gpu.run_staged(rans_gpu.stage([s for row in rows for s in row], shape, codec.bits, "cpu"))
assert torch.equal(q_spans, q_plain)
for bad_offsets in (rows.offsets + 1, rows.offsets[:, ::-1].copy(), rows.offsets[:2]):
    try:
        rans_gpu.stage_spans(rows.spans, bad_offsets, shape, codec.bits, "cpu")
        raise AssertionError("spans staged at offsets that do not describe them")
    except ValueError:
        pass
print("spans ok")
spiky = kv[0].clone()
spiky[:, :, :, ::5, ::3] = 3000.0  # far outside the calibrated steps: escapes
flat = [codec.encode_layer(spiky[i], i, layers, 0) for i in range(layers)]
staged = rans_gpu.stage(flat, shape, codec.bits, "cpu")
assert staged[2][0].numel() > 0  # escapes staged beside the descriptors
q = rans_gpu.run_staged(staged)
want = torch.stack([torch.from_numpy(_symbols_calibrated(seg, shape, codec.bits)) for seg in flat])
assert torch.equal(q, want)  # escapes included: the symbols exact
print("escapes ok")
host = rans_gpu.HostRange(sum(len(s) for s in flat) + 8, "cpu")  # a loader's staging buffer, read into
parts, at = [], 8  # not from its first byte: segments are found where they lie
for seg in flat:
    part = host.view(at, len(seg))
    part[:] = seg
    host.done()
    parts.append(part)
    at += len(seg)
assert rans_gpu._owner(parts) is host and rans_gpu._owner([*parts[:2], flat[2]]) is None
assert torch.equal(rans_gpu.run_staged(rans_gpu.stage(parts, shape, codec.bits, "cpu")), want)  # staged in place
parts[1][1] ^= 0x01  # its 4-byte header: refused where it lies, as a copied one is
try:
    rans_gpu.stage(parts, shape, codec.bits, "cpu")
    raise AssertionError("a damaged segment staged in place")
except rans_gpu.rans.RansError:
    pass
print("in place ok")
"""
)


def test_cachegen_decodes_a_run_of_layers_and_chunks_in_one_batch():
    # Triton's interpreter runs the GPU kernel on the CPU (CI has no GPU); chosen before triton is imported.
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    run = subprocess.run([sys.executable, "-c", _BATCHED_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "batched run ok" in run.stdout, run.stderr[-3000:]
    assert "escapes ok" in run.stdout and "in place ok" in run.stdout, run.stderr[-3000:]
    assert "spans ok" in run.stdout, run.stderr[-3000:]


# dim 32: the fused kernel's smallest head (tl.dot: halves of 16)
_FUSED_CHECK = (
    _CALIBRATED_CODEC.format(shape="2, 1, 16, 32", seed=2, label="fused finish")
    + r"""
from kvshelf.codecs import rans_gpu
kv = torch.randn(2, layers, 2, heads, tokens, dim, generator=g)
pos = 5000  # long positions: RoPE's angles reduced as the reference rounds them
segs = [[codec.encode_layer(kv[c, 1], 1, layers, pos + c * tokens) for c in range(2)]]
shape = (2, heads, tokens, dim)
assert rans_gpu.fuses(dim, torch.bfloat16) and not rans_gpu.fuses(16, torch.bfloat16)
q, err = rans_gpu.decode_run_raw(segs, shape, codec.bits, "cpu")
assert not bool(err)
scaled, mean = cal.decode_transform(codec.bits, "cpu")
got = rans_gpu.finish(q, 1, scaled, mean, cal.inv_freq, [1], pos, torch.float32)
ref = codec._finish_layers(q.permute(1, 2, 0, 3, 4).reshape(1, 2, heads, 2 * tokens, dim), [1], pos, "cpu")
assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-4), float((got - ref).abs().max())
half = rans_gpu.finish(q, 1, scaled, mean, cal.inv_freq, [1], pos, torch.bfloat16)
assert half.dtype == torch.bfloat16 and torch.allclose(half.float(), ref, atol=0.02, rtol=0.01)
print("fused ok")
"""
)


def test_the_fused_finish_kernel_equals_the_torch_reference():
    # symbols -> KV in one kernel (the GPU's path) against CacheGenCodec._finish_layers, through Triton's interpreter
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    run = subprocess.run([sys.executable, "-c", _FUSED_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "fused ok" in run.stdout, run.stderr[-3000:]


def test_a_staging_buffer_locates_the_parts_cut_from_it():
    from kvshelf.codecs.rans_gpu import HostRange

    host = HostRange(64, "cpu")
    parts = [host.view(at, n) for at, n in ((0, 8), (20, 30), (8, 4))]
    for _ in parts:
        host.done()
    cut = [parts[1][3:9], parts[0][2:]]  # segments cut from the parts, as a loader's are
    assert host.offsets(parts + cut).tolist() == [0, 20, 8, 23, 2] == [host.offset(p) for p in parts + cut]
    # a read-only or empty view: located the slow way, the same
    assert host.offsets([parts[1].toreadonly(), parts[2][4:], parts[0]]).tolist() == [20, 12, 0]


def test_a_staging_buffer_goes_back_only_once_no_read_writes_into_it():
    from kvshelf.codecs.rans_gpu import HostRange

    host = HostRange(64, "cpu")
    part = host.view(16, 8)
    part[:] = b"12345678"
    assert bytes(host.array[16:24]) == b"12345678" and host.offset(part) == 16
    with pytest.raises(ValueError):
        host.view(60, 8)  # outside the buffer
    host.close()  # a read still writes into `part`: kept
    assert host.view(0, 8) is None and not host._returned  # closed: no new part is handed out
    host.done()
    assert host._returned
