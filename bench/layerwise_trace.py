"""Where the layerwise gap goes on a GPU: per-layer timestamps and a torch.profiler timeline of one run.

    python bench/layerwise_trace.py --out DIR --llama8b [--tokens 12288 --suffix 2048 --repeats 3]
        [--switch-ms 5 1] [--read-plans 8:16:4 8:512:8 8:16:4:1:48] [--buffer-size 8]
    python bench/layerwise_trace.py --out DIR --kv kv.safetensors --calibration FILE.kvcal [--tokens 12288]

--llama8b: bench/layerwise.py's setup (random Llama-3-8B shape, bf16, calibrated cachegen disk tier, 12K cached
tokens as 256-token chunks), then for each variant (the interpreter's switch interval x read plan: layers per range, head
probe KiB, reads in flight, groups read alone first; alternated within each of `--repeats` rounds) the layerwise TTFT, the loader alone
and the compute alone (medians), and one more layerwise run with timestamps (CPU clock per thread, CUDA events on
the compute and load streams) of every layer: when the loader began and ended a group's decode and its phases
(reads waited for, staging: pinned buffer, copy, checks; kernel launch, transform), when its GPU work ran, when
the forward asked for a layer and got it, when the compute stream reached it and could go on. One layerwise run
is then traced with torch.profiler (CPU and CUDA) into DIR/*.json.gz (chrome://tracing, Perfetto).

--kv/--calibration: Gemma 3 270M's real KV through the loader (bench/gpu_layerwise.py's opened chunks), same
timestamps, and a trace of one loader run.

The loader's phases carry record_function labels in the traces (kvshelf::stage, ::kernel, ::finish,
::release, ::read_wait). Summaries: DIR/summary.json and the printed lines.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kvshelf.cache import device_decode  # noqa: E402
from kvshelf.cache.range_reads import RangeReads  # noqa: E402
from kvshelf.codecs import rans, rans_gpu  # noqa: E402
from kvshelf.codecs.cachegen import CacheGenCodec  # noqa: E402
from kvshelf.layerwise import loader as loader_module  # noqa: E402
from kvshelf.layerwise.loader import LayerwiseLoader  # noqa: E402
from kvshelf.layerwise.stats import LayerwiseStats  # noqa: E402
from kvshelf.storage import digests  # noqa: E402
from kvshelf.storage.disk import DiskBackend  # noqa: E402


class Recorder:
    """Timestamps of one run's loader and forward (patched in while `on`)."""

    def __init__(self):
        self.on = False  # reset() before each recorded run (it needs CUDA)
        self.cpu, self.gpu, self.lock = [], [], threading.Lock()

    def reset(self):
        self.t0 = time.perf_counter()
        self.base = torch.cuda.Event(enable_timing=True)
        self.base.record()
        self.cpu: list[tuple] = []  # (what, thread, i, j, start ms, end ms)
        self.gpu: list[tuple] = []  # (what, i, j, start event, end event)
        self.lock = threading.Lock()

    def ms(self):
        return 1e3 * (time.perf_counter() - self.t0)

    def add(self, what, i, j, t0, t1):
        with self.lock:
            self.cpu.append((what, threading.current_thread().name, i, j, t0, t1))

    def timed(self, what, fn, i_of=None):
        rec = self

        def wrapper(*args, **kwargs):
            if not rec.on:
                return fn(*args, **kwargs)
            t0 = rec.ms()
            with torch.profiler.record_function(f"kvshelf::{what}"):
                out = fn(*args, **kwargs)
            i, j = i_of(args) if i_of else (-1, -1)
            rec.add(what, i, j, t0, rec.ms())
            return out

        return wrapper

    def summary(self) -> dict:
        torch.cuda.synchronize()
        gpu = [(w, i, j, self.base.elapsed_time(a), self.base.elapsed_time(b)) for w, i, j, a, b in self.gpu]
        return {"cpu": self.cpu, "gpu": gpu}


REC = Recorder()


def install():
    """Patch the loader, the device decoding and the GPU decoder with timestamps (only while REC.on)."""
    orig_wait = LayerwiseLoader.wait
    orig_decode = LayerwiseLoader._decode_on_device
    orig_release = LayerwiseLoader._release

    def wait(self, i, *args):
        if not REC.on or not self._cuda:
            return orig_wait(self, i, *args)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()  # the compute stream reached layer i (the layers before it computed)
        t0 = REC.ms()
        with torch.profiler.record_function(f"kvshelf::wait {i}"):
            orig_wait(self, i, *args)
        REC.add("wait", i, i + 1, t0, REC.ms())
        b.record()  # and could go on (layer i loaded)
        REC.gpu.append(("compute_gate", i, i + 1, a, b))

    def decode(self, i, j, t0, staged=None):
        if not REC.on or not self._cuda:
            return orig_decode(self, i, j, t0, staged)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(self._stream)
        c0 = REC.ms()
        with torch.profiler.record_function(f"kvshelf::decode {i}-{j}"):
            out = orig_decode(self, i, j, t0, staged)
        REC.add("decode", i, j, c0, REC.ms())
        b.record(self._stream)
        REC.gpu.append(("decode", i, j, a, b))
        return out

    def release(self, pending):
        if not REC.on:
            return orig_release(self, pending)
        c0 = REC.ms()
        with torch.profiler.record_function("kvshelf::release"):
            out = orig_release(self, pending)
        REC.add("release", pending[0], pending[1], c0, REC.ms())
        return out

    LayerwiseLoader.wait = wait
    LayerwiseLoader._decode_on_device = decode
    LayerwiseLoader._release = release
    LayerwiseLoader._open_on_device = REC.timed("open", LayerwiseLoader._open_on_device)
    LayerwiseLoader._stage_on_device = REC.timed("prepare", LayerwiseLoader._stage_on_device, lambda a: a[1:3])
    device_decode._ReadAhead.next = REC.timed("read_wait", device_decode._ReadAhead.next)
    RangeReads.read = REC.timed("range_read", RangeReads.read, lambda a: (a[0].a, a[0].b))  # a batch of chunks
    rans_gpu.stage = REC.timed("stage", rans_gpu.stage)
    rans_gpu._stage_in_place = REC.timed("stage.in_place", rans_gpu._stage_in_place)
    rans_gpu._pinned = REC.timed("stage.pinned", rans_gpu._pinned)
    rans.scan_segments = REC.timed("stage.scan", rans.scan_segments)
    rans_gpu.run_staged = REC.timed("kernel", rans_gpu.run_staged)
    CacheGenCodec._finish_layers = REC.timed("finish", CacheGenCodec._finish_layers, lambda a: (a[2][0], a[2][-1] + 1))
    rans_gpu.finish = REC.timed("finish", rans_gpu.finish, lambda a: (a[5][0], a[5][-1] + 1))


def set_switch(ms: float) -> None:
    """The interpreter's thread switch interval (sys.setswitchinterval; Python's default: 5 ms): how long a
    thread that wants the GIL waits before the holder is asked to drop it (the forward's launches vs the loader)."""
    sys.setswitchinterval(ms / 1e3)


def _plan(text: str) -> tuple[int, int, int, int, int, int, int, int]:
    """LAYERS:PROBE_KIB:WINDOW[:ALONE[:CALLS[:HASH_KIB[:HEADS[:PROCS]]]]] (ALONE: kvshelf.cache.device_decode.READ_ALONE,
    CALLS: the calls each range of every chunk (and the heads, HEADS 0) are read in, READ_CALLS; HASH_KIB: segments
    from this size on are hashed with the GIL released, kvshelf.storage.digests._RELEASED_DIGEST, 0: never; HEADS: the
    disk tier's head_calls; PROCS: worker processes reading the ranges, READ_PROCESSES, 0: the tier's threads; their
    defaults if left out)."""
    layers, kib, window, *rest = (int(x) for x in text.split(":"))
    alone = rest[0] if rest else device_decode.READ_ALONE
    calls = rest[1] if len(rest) > 1 else device_decode.READ_CALLS
    hash_kib = rest[2] if len(rest) > 2 else digests._RELEASED_DIGEST >> 10
    heads = rest[3] if len(rest) > 3 else DiskBackend.head_calls
    return (
        layers,
        kib,
        window,
        alone,
        calls,
        hash_kib,
        heads,
        rest[4] if len(rest) > 4 else device_decode.READ_PROCESSES,
    )


def per_layer(s: dict) -> dict:
    """Per layer: when the loader finished it on the CPU (release end = ready), when the forward asked for it and
    got it; GPU: when its decode ran, when the compute stream reached it and could go on."""
    ready = {}
    for what, _th, i, j, _a, b in s["cpu"]:
        if what == "release":
            for k in range(i, j):
                ready[k] = b
    ask = {i: (a, b) for w, _th, i, _j, a, b in s["cpu"] if w == "wait"}
    dec = {}
    for w, i, j, a, b in s["gpu"]:
        if w == "decode":
            for k in range(i, j):
                dec[k] = (a, b)
    gate = {i: (a, b) for w, i, _j, a, b in s["gpu"] if w == "compute_gate"}
    out = {}
    for k in sorted(set(ask) | set(ready)):
        out[k] = {
            "ready_cpu": ready.get(k),
            "asked": ask.get(k, (None, None))[0],
            "got": ask.get(k, (None, None))[1],
            "gpu_decode": dec.get(k),
            "gpu_gate": gate.get(k),
        }
    return out


def totals(s: dict) -> dict:
    """CPU time per phase and thread, ms."""
    tot: dict = {}
    for what, th, _i, _j, a, b in s["cpu"]:
        key = f"{what} [{th.split('-')[-1] if th.startswith('kvshelf') else th}]"
        tot[key] = tot.get(key, 0.0) + (b - a)
    return {k: round(v, 2) for k, v in sorted(tot.items())}


def gaps(s: dict) -> dict:
    """GPU: compute-stream stall per layer (gate end - gate start), decode GPU spans."""
    stall = [round(b - a, 2) for w, _i, _j, a, b in s["gpu"] if w == "compute_gate"]
    dec = [(i, j, round(a, 2), round(b, 2)) for w, i, j, a, b in s["gpu"] if w == "decode"]
    return {"compute_stall_ms": stall, "stall_sum_ms": round(sum(stall), 2), "decode_gpu_spans": dec}


def trace(out: Path, name: str, fn) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    raw = out / f"{name}.json"
    prof.export_chrome_trace(str(raw))
    with open(raw, "rb") as src, gzip.open(str(raw) + ".gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()


def llama(args, out: Path, results: dict) -> None:
    import layerwise as lwb  # bench/layerwise.py

    from kvshelf.cache.engine import CacheEngine
    from kvshelf.codecs import calibration as calib
    from kvshelf.codecs import get_codec
    from kvshelf.codecs.pool import CodecProcesses
    from kvshelf.generation import CachedGenerator
    from kvshelf.model.calibrate import calibrate
    from kvshelf.model.runner import ModelRunner
    from kvshelf.storage.tiers import TierManager

    device = torch.device("cuda")
    model, _ = lwb.llama8b(device)
    runner = ModelRunner(model)
    vocab = runner.config.vocab_size
    ids = torch.randint(0, vocab, (args.tokens + 1,), generator=torch.Generator().manual_seed(0)).tolist()
    t = time.perf_counter()
    # bench/layerwise.py's calibration of this model, kept in the temp folder by its fingerprint: reused if there
    kept = Path(tempfile.gettempdir()) / f"kvshelf-bench-{runner.fingerprint().hex()[:16]}.kvcal"
    if kept.is_file():
        cal = calib.Calibration.from_bytes(kept.read_bytes())
    else:
        cal_ids = torch.randint(0, vocab, (512,), generator=torch.Generator().manual_seed(7))
        cal = calibrate(runner, cal_ids.tolist(), continuation=128)
        kept.write_bytes(cal.to_bytes())
    calib.register(cal)
    print(f"calibrated in {time.perf_counter() - t:.1f} s", flush=True)
    processes = CodecProcesses(os.cpu_count() or 1)
    codec = get_codec("cachegen", {"calibration": cal.digest}, processes=processes)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "kvshelf-trace"
    shutil.rmtree(work, ignore_errors=True)
    backend = DiskBackend(work, 64 << 30, codec)
    tiers = TierManager(
        [backend], write_queue_bytes=1 << 40, write_block_s=600.0, deadline_s=30.0, workers=args.tier_workers
    )
    engine = CacheEngine(runner.fingerprint(), tiers, chunk_size=256)
    engine.save_unfull_chunk = False
    whole = CachedGenerator(runner, engine, store_generated=False)
    layered = CachedGenerator(
        runner, engine, use_layerwise=True, buffer_size=args.buffer_size, store_generated=False, layerwise_store=False
    )
    prefix = ids[: args.tokens]
    whole.generate(prefix + ids[args.tokens :], max_new_tokens=1)
    tiers.flush()
    rng = torch.Generator().manual_seed(1)

    def request():
        return prefix + torch.randint(0, vocab, (args.suffix,), generator=rng).tolist()

    def layerwise_run():
        torch.cuda.synchronize()
        r = layered.generate(request(), max_new_tokens=1)
        torch.cuda.synchronize()
        tiers.flush()
        assert r.hit_tokens == args.tokens, r.hit_tokens
        return r.ttft_s

    def loader_run():
        with torch.inference_mode():
            kv = runner.new_kv(args.tokens + args.suffix)
            torch.cuda.synchronize()
            t = time.perf_counter()
            retrieval = engine.retrieve_layerwise(prefix + [0], max_tokens=args.tokens, device=kv.device)
            ld = LayerwiseLoader(
                retrieval,
                kv,
                buffer_size=args.buffer_size,
                stats=LayerwiseStats(runner.num_layers),
                decoding=retrieval.device_decoding(kv.device),
            )
            for i in range(runner.num_layers):
                ld.wait(i)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t
            ld.close()
            return dt

    def compute_run():
        with torch.inference_mode():
            kv = runner.new_kv(args.tokens + args.suffix)
            torch.cuda.synchronize()
            t = time.perf_counter()
            runner.forward(request()[args.tokens :], args.tokens, kv)
            torch.cuda.synchronize()
            return time.perf_counter() - t

    probe0 = backend.head_probe

    def apply(ct: int, plan: tuple, fused: int = 1, priority: int = 1) -> None:
        set_switch(ct)
        loader_module.PRIORITY_COMPUTE = bool(priority)  # the layerwise forward on a high-priority stream
        rans_gpu.FUSED = bool(fused)  # 2: fused, 128 tokens per program on 8 warps (1: 64 on 4)
        rans_gpu._TOKEN_BLOCK, rans_gpu._FINISH_WARPS = (128, 8) if fused == 2 else (64, 4)
        layers, kib, window, device_decode.READ_ALONE, engine.read_calls, hash_kib, backend.head_calls, procs = plan
        engine.read_processes = procs
        digests._RELEASED_DIGEST = hash_kib << 10 if hash_kib else 1 << 62
        engine.read_layers, backend.head_probe, tiers.read_window = layers, (kib << 10) or probe0, window

    variants = [
        (ct, plan, f, pr)
        for plan in args.read_plans
        for ct in args.switch_ms
        for f in args.fused
        for pr in args.priority
    ]
    for ct, plan, fused, pr in variants:  # compile, pin, warm (each plan stages other sizes)
        apply(ct, plan, fused, pr)
        layerwise_run()
        loader_run()
    compute_run()
    rows = []
    for rep in range(args.repeats):  # variants alternate within each repeat (drift)
        for ct, plan, fused, pr in variants:
            apply(ct, plan, fused, pr)
            rows.append({"switch_ms": ct, "plan": plan, "fused": fused, "priority": pr, "rep": rep, "layerwise_ms": 1e3 * layerwise_run(),
                         "loader_ms": 1e3 * loader_run(), "compute_ms": 1e3 * compute_run()})  # fmt: skip
    summary = []
    for ct, plan, fused, pr in variants:
        mine = [r for r in rows if (r["switch_ms"], r["plan"], r["fused"], r["priority"]) == (ct, plan, fused, pr)]
        med = {k: statistics.median(r[k] for r in mine) for k in ("layerwise_ms", "loader_ms", "compute_ms")}
        med["ratio"] = med["layerwise_ms"] / max(med["loader_ms"], med["compute_ms"])
        # one run of each with timestamps (the instrumentation costs a little: phases only)
        REC.reset()
        REC.on = True
        try:
            apply(ct, plan, fused, pr)
            layerwise_run()
        finally:
            REC.on = False
        s = REC.summary()
        row = {
            "switch_ms": ct,
            "plan": plan,
            "fused": fused,
            "priority": pr,
            **med,
            "runs": mine,
            "phases": totals(s),
            "gaps": gaps(s),
        }
        row["layers"] = per_layer(s)
        row["cpu_spans"] = [(w, th, i, j, round(a, 2), round(b, 2)) for w, th, i, j, a, b in s["cpu"]]
        summary.append(row)
        print(
            f"switch {ct} ms plan {plan} fused {fused} priority {pr}: medians layerwise {med['layerwise_ms']:.1f} loader {med['loader_ms']:.1f}"
            f" compute {med['compute_ms']:.1f} ratio {med['ratio']:.2f} (layerwise runs "
            f"{[round(r['layerwise_ms'], 1) for r in mine]}); phases {row['phases']}",
            flush=True,
        )
    results["llama8b"] = summary
    apply(args.switch_ms[-1], args.read_plans[0], args.fused[0], args.priority[0])
    if args.profile:
        REC.on = True
        trace(out, f"llama8b_layerwise_sw{args.switch_ms[-1]}", layerwise_run)
        REC.on = False
    tiers.close()


def gemma(args, out: Path, results: dict) -> None:
    import gpu_layerwise as glb  # bench/gpu_layerwise.py
    from safetensors.torch import load_file

    from kvshelf.cache.engine import EngineStats, LayerwiseRetrieval
    from kvshelf.codecs import calibration as calib
    from kvshelf.codecs import pool as codec_pool
    from kvshelf.model.kv_buffer import KVBuffer

    kv = load_file(args.kv)["kv"]
    cal = calib.load(args.calibration)
    calib.register(cal)
    device = torch.device("cuda")
    codec = CacheGenCodec(calibration=cal.digest, processes=codec_pool.CodecProcesses(os.cpu_count() or 1))
    chunks, _ = glb.opened_chunks(kv, args.tokens, codec, cal.inv_freq)
    layers, _, heads, _, dim = kv.shape
    layer_bytes = 2 * heads * args.tokens * dim * 2
    retrieval = LayerwiseRetrieval(chunks, layers, threading.Lock(), EngineStats())
    plan = retrieval.device_decoding(device)
    buf = KVBuffer(layers, heads, dim, args.tokens, dtype=torch.float16, device=device)

    def run(size):
        torch.cuda.synchronize()
        t = time.perf_counter()
        ld = LayerwiseLoader(retrieval, buf, buffer_size=size, stats=LayerwiseStats(layers), decoding=plan)
        for i in range(layers):
            ld.wait(i)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        ld.close()
        assert ld.error is None, ld.error
        return dt

    for ct in args.switch_ms:  # uninstrumented: GB/s per layer, medians of 7
        set_switch(ct)
        for size in (8, 16):
            for _ in range(2):
                run(size)
            times = [run(size) for _ in range(7)]
            gbps = layers * layer_bytes / statistics.median(times) / 1e9
            results[f"gemma loader switch {ct} ms buffer {size} GB/s per layer"] = gbps
            print(f"gemma loader, switch {ct} ms, buffer {size}: {gbps:.1f} GB/s per layer "
                  f"({[round(1e3 * t, 2) for t in times]} ms)", flush=True)  # fmt: skip
    rows = []  # with timestamps, the last --switch-ms value
    for size in (8, 16):
        for rep in range(args.repeats):
            REC.reset()
            REC.on = True
            try:
                dt = run(size)
            finally:
                REC.on = False
            s = REC.summary()
            row = {"buffer": size, "rep": rep, "ms": 1e3 * dt, "GBps": layers * layer_bytes / dt / 1e9}
            row.update(phases=totals(s), gaps=gaps(s), layers=per_layer(s), cpu=s["cpu"])
            print(f"gemma buffer {size}: {row['ms']:.2f} ms {row['GBps']:.1f} GB/s; {row['phases']}", flush=True)
            print(f"   gpu decode spans {row['gaps']['decode_gpu_spans']}", flush=True)
            rows.append(row)
    results["gemma"] = rows
    REC.on = True
    trace(out, f"gemma_loader_b8_sw{args.switch_ms[-1]}", lambda: run(8))
    REC.on = False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--llama8b", action="store_true")
    ap.add_argument("--kv")
    ap.add_argument("--calibration")
    ap.add_argument("--tokens", type=int, default=12288)
    ap.add_argument("--suffix", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--buffer-size", type=int, default=8)
    ap.add_argument("--no-profile", dest="profile", action="store_false",
                    help="no torch.profiler trace of a layerwise run at the end (Llama)")  # fmt: skip
    ap.add_argument("--tier-workers", type=int, default=8)
    ap.add_argument("--switch-ms", type=float, nargs="+", default=[5.0],
                    help="sys.setswitchinterval values compared, ms (Python's default 5)")  # fmt: skip
    ap.add_argument("--priority", type=int, nargs="+", default=[1],
                    help="1: the layerwise forward on a high-priority stream (loader.PRIORITY_COMPUTE), 0: not")  # fmt: skip
    ap.add_argument("--fused", type=int, nargs="+", default=[1],
                    help="1: symbols -> KV in one kernel (rans_gpu.FUSED), 2: the same, 128 tokens a program, 0: "
                         "the torch path; compared")  # fmt: skip
    ap.add_argument("--read-plans", type=_plan, nargs="+", default=[_plan("8:16:4")],
                    help="LAYERS:PROBE_KIB:WINDOW[:ALONE[:CALLS[:HASH_KIB[:HEADS[:PROCS]]]]] (bench/layerwise.py "
                         "--read-plans; ALONE: decode groups read alone first, device_decode.READ_ALONE; CALLS: calls "
                         "each range of every chunk is read in, device_decode.READ_CALLS; HASH_KIB: segments hashed "
                         "with the GIL released from this size on, 0: never; HEADS: the disk tier's head_calls, 0: "
                         "CALLS; PROCS: range reader processes, 0: threads) compared, Llama only")  # fmt: skip
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    install()
    results: dict = {"gpu": torch.cuda.get_device_name(), "cores": os.cpu_count(), "args": vars(args)}
    if args.llama8b:
        llama(args, out, results)
    if args.kv:
        gemma(args, out, results)
    with open(out / ("summary_llama.json" if args.llama8b else "summary_gemma.json"), "w") as f:
        json.dump(results, f, default=str)


if __name__ == "__main__":
    main()
