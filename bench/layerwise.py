"""TTFT with whole-prompt KV loading vs layerwise loading, per tier and codec, as ratios in one run.

    python bench/layerwise.py [--tokens 2048] [--suffix 32] [--tiers cpu disk redis] [--codecs none cachegen]
    python bench/layerwise.py --device cuda --llama8b --tokens 4096 --suffix 256 --tiers cpu

A prompt of `tokens` tokens is cached; the measured request is that prompt plus `suffix` new tokens.
For each tier (alone in the stack, so every load comes from it) and codec:
- whole: load every cached chunk, then compute the suffix (kvshelf's ordinary path);
- layerwise: the loader thread brings layer i+1.. while the model computes layer i;
- load only / compute only: the two halves measured apart;
- overlap efficiency = (serial - layerwise) / min(load, compute): 1.0 when the shorter half hides fully,
  with serial either the measured whole path (which already overlaps its copies with the forward's
  kernel launches on a GPU) or load only + compute only (the two halves strictly one after the other).
With --llama8b a randomly initialised model of Llama-3-8B's shape (bf16) is built on the device.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from common import save_results  # noqa: E402

from kvshelf.cache.engine import CacheEngine  # noqa: E402
from kvshelf.codecs import get_codec  # noqa: E402
from kvshelf.codecs.pool import CodecProcesses  # noqa: E402
from kvshelf.generation import CachedGenerator  # noqa: E402
from kvshelf.layerwise.loader import LayerwiseLoader  # noqa: E402
from kvshelf.layerwise.stats import LayerwiseStats  # noqa: E402
from kvshelf.model.runner import ModelRunner  # noqa: E402
from kvshelf.storage.disk import DiskBackend  # noqa: E402
from kvshelf.storage.memory import MemoryBackend  # noqa: E402
from kvshelf.storage.tiers import TierManager  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def llama8b(device):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=16384,
        rope_theta=500000.0,
    )
    torch.manual_seed(0)  # the same random model every run (its calibration can be kept)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return model.eval(), "random Llama-3-8B shape"


@dataclasses.dataclass
class Setup:
    """One tier and codec under test: what every variant (buffer size, reads in flight, read plan) shares. The
    whole path's and the halves' times are measured with the first variant only and kept here for the rest."""

    args: argparse.Namespace
    runner: ModelRunner
    engine: CacheEngine
    tiers: TierManager
    whole: CachedGenerator
    layered: CachedGenerator
    prefix: list[int]
    rng: torch.Generator
    device: torch.device
    on_device: bool
    tier_name: str
    codec_name: str
    t_whole: list[float] = dataclasses.field(default_factory=list)
    t_load: list[float] = dataclasses.field(default_factory=list)
    t_compute: list[float] = dataclasses.field(default_factory=list)


def measure_variant(setup: Setup, buffer_size: int) -> dict:
    """One row: the whole path and the halves (measured with the first variant only), the layerwise path and
    the loader alone with this variant's buffer size and reads in flight."""
    args, runner, engine, tiers = setup.args, setup.runner, setup.engine, setup.tiers
    whole, layered, prefix, rng = setup.whole, setup.layered, setup.prefix, setup.rng
    device, on_device = setup.device, setup.on_device
    t_whole, t_load, t_compute = setup.t_whole, setup.t_load, setup.t_compute
    layered.layerwise.buffer_size = buffer_size
    vocab = runner.config.vocab_size
    first = not t_whole
    t_layer = []
    # The first `warmup` rounds start what a serving process starts once (kernels, worker threads and processes,
    # pinned pools) and are not counted: a median of few repeats must not hold a cold run.
    warm = args.warmup
    for rep in range(warm + args.repeats):
        counted = rep >= warm
        for gen, times in ((whole, t_whole), (layered, t_layer)):
            if gen is whole and (not first or (on_device and rep > warm)):
                continue
            # A new suffix each time: only the shared prefix is cached, as for a new question.
            request = prefix + torch.randint(0, vocab, (args.suffix,), generator=rng).tolist()
            sync(device)
            r = gen.generate(request, max_new_tokens=1)
            sync(device)
            if counted:
                times.append(r.ttft_s)
            tiers.flush()  # the new chunks' write-behind (encoding on every core) ends before the next run
            assert r.hit_tokens == args.tokens, (r.hit_tokens, args.tokens)
        # The halves apart: loading alone, and computing the suffix over KV already in place.
        with torch.inference_mode():
            kv = runner.new_kv(len(request))
            sync(device)
            t = time.perf_counter()
            if first and not (on_device and rep > warm):
                for key, chunk in engine.retrieve_chunks(request, max_tokens=len(request) - 1):
                    kv.load_chunk(key.start, chunk)
                sync(device)
                if counted:
                    t_load.append(time.perf_counter() - t)
            t = time.perf_counter()
            runner.forward(request[args.tokens :], args.tokens, kv)
            sync(device)
            if first and counted:
                t_compute.append(time.perf_counter() - t)
    # The layerwise loader alone (no compute): open the prefix, load every layer, synchronise.
    t_loader = []
    for rep in range(warm + args.repeats):
        with torch.inference_mode():
            kv = runner.new_kv(len(request))
            sync(device)
            t = time.perf_counter()
            retrieval = engine.retrieve_layerwise(request, max_tokens=args.tokens, device=kv.device)
            t_open = time.perf_counter() - t
            loader = LayerwiseLoader(
                retrieval,
                kv,
                buffer_size=buffer_size,
                stats=LayerwiseStats(runner.num_layers),
                decoding=retrieval.device_decoding(kv.device),
            )
            for i in range(runner.num_layers):
                loader.wait(i)
            sync(device)
            if rep >= warm:
                t_loader.append((t_open + loader.open_s, time.perf_counter() - t))
            loader.close()
    open_s = statistics.median(o for o, _ in t_loader)
    loader_s = statistics.median(a for _, a in t_loader)
    w, lw = statistics.median(t_whole), statistics.median(t_layer)
    load, comp = statistics.median(t_load), statistics.median(t_compute)
    whole_load = load
    if on_device:
        load = loader_s
    return {
        "tier": setup.tier_name,
        "buffer_size": buffer_size,
        "read_window": tiers.read_window,
        "codec": setup.codec_name,
        "decoded_on_device": on_device,
        "load_whole_path_s": whole_load,
        "whole_s": w,
        "layerwise_s": lw,
        "load_s": load,
        "compute_s": comp,
        "speedup": w / lw,
        "overlap_efficiency": (w - lw) / min(load, comp),
        "overlap_vs_serial": (load + comp - lw) / min(load, comp),
        "layerwise_vs_max": lw / max(load, comp),
        "loader_only_s": loader_s,
        "open_s": open_s,
        "loader_GBps_fp16_per_layer": args.tokens
        * runner.fingerprint().num_layers
        * 2
        * runner.num_kv_heads
        * runner.head_dim
        * 2
        / (loader_s - open_s)
        / 1e9,
        "runs_compute_s": t_compute,
        "runs_layerwise_s": t_layer,
        "runs_loader_s": t_loader,
        "loader_ms_per_request": 1e3 * sum(layered.layerwise_stats.as_dict()["layer_times"]),
        "waited_ms_per_request": 1e3 * sum(layered.layerwise_stats.as_dict()["wait_times"]),
    }


def _read_plan(text: str) -> tuple[int, int | None, int | None]:
    """--read-plans' "N", "N:K" or "N:K:W": (layers per range read, head probe in bytes or None, reads in flight
    or None: --read-window's)."""
    layers, _, rest = text.partition(":")
    kib, _, window = rest.partition(":")
    return int(layers), int(kib) << 10 if kib and int(kib) else None, int(window) if window else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--suffix", type=int, default=32)
    ap.add_argument("--tiers", nargs="+", default=["cpu", "disk", "redis"])
    ap.add_argument("--codecs", nargs="+", default=["none", "cachegen"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="rounds run first and not counted (cold start)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--llama8b", action="store_true")
    ap.add_argument("--tier-workers", type=int, default=4, help="the tier's worker threads (read windows up to it)")
    ap.add_argument(
        "--buffer-size", type=int, nargs="+", default=[4], help="layers the loader may run ahead; one row per value"
    )
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument(
        "--read-window", type=int, nargs="+", default=[2], help="tier reads in flight per request; one row per value"
    )
    ap.add_argument(
        "--read-plans",
        nargs="+",
        default=None,
        help="streamed device decoding's reads, one row each: N (layers per range after the first group, 0: whole"
        " objects; kvshelf.cache.device_decode.read_groups), N:K (and heads probed with K KiB, which may bring"
        " layer 0 along; 0 or empty: the tier's) or N:K:W (and W reads in flight); default: the engine's",
    )
    ap.add_argument("--json", default="bench/results/layerwise.json")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--no-layer-store", action="store_true", help="store after the first token, not per layer")
    ap.add_argument(
        "--calibrate",
        action="store_true",
        help="cachegen calibrated for this model (kvshelf.model.calibrate on random tokens when there is no tokenizer)",
    )
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.verbose:
        import logging

        logging.basicConfig(level=logging.DEBUG, format="%(name)s: %(message)s")
        logging.getLogger("kvshelf.generation").setLevel(logging.DEBUG)
    if args.llama8b:
        model, name = llama8b(device)
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (args.tokens + args.suffix,), generator=torch.Generator().manual_seed(0)).tolist()
    else:
        import pydoc_data.topics

        from kvshelf.model.loader import load_model

        lm = load_model(device=args.device)
        model, name = lm.runner.model, lm.path.name
        text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
        ids = lm.tokenizer(text)["input_ids"][: args.tokens + args.suffix]
    runner = ModelRunner(model)
    t = time.perf_counter()
    fingerprint = runner.fingerprint()  # a model without weight files (the random one) is hashed whole: minutes
    print(f"model fingerprint (weights digest) in {time.perf_counter() - t:.1f} s", flush=True)
    codec_params = {}
    if args.calibrate and "cachegen" in args.codecs:
        from kvshelf.codecs import calibration as calib
        from kvshelf.model.calibrate import calibrate

        t = time.perf_counter()
        kept = Path(tempfile.gettempdir()) / f"kvshelf-bench-{fingerprint.hex()[:16]}.kvcal"
        if kept.is_file():
            cal = calib.Calibration.from_bytes(kept.read_bytes())
        else:
            cal_ids = torch.randint(0, runner.config.vocab_size, (512,), generator=torch.Generator().manual_seed(7))
            cal = calibrate(runner, cal_ids.tolist(), continuation=128)
            kept.write_bytes(cal.to_bytes())
        calib.register(cal)
        codec_params["cachegen"] = {"calibration": cal.digest}
        console_note = f"calibrated cachegen ({cal.digest[:8]}) in {time.perf_counter() - t:.1f} s"
        print(console_note, flush=True)
    processes = CodecProcesses(os.cpu_count() or 1)  # the CPU encoder's layers on threads
    work = Path(tempfile.mkdtemp(prefix="kvshelf-layerwise-"))
    redis_server = None
    rows = []
    console = Console()
    for tier_name in args.tiers:
        for codec_name in args.codecs if tier_name != "cpu" else ["none"]:
            if tier_name == "cpu":
                backend = MemoryBackend(64 << 30)
            elif tier_name == "disk":
                codec = get_codec(codec_name, codec_params.get(codec_name), processes=processes)
                backend = DiskBackend(work / f"disk-{codec_name}", 64 << 30, codec)
            else:
                from services import RedisServer

                from kvshelf.storage.redis import RedisBackend

                redis_server = redis_server or RedisServer(work / "redis").start()
                codec = get_codec(codec_name, codec_params.get(codec_name), processes=processes)
                backend = RedisBackend(redis_server.url, codec, prefix=f"lw{codec_name}:")
            # every chunk of a long prompt written behind at once (the default queue drops what exceeds 256 MB)
            # deadline_s 30: reads on the tier's workers (as in a server), side by side, none cut here
            tiers = TierManager(
                [backend], write_queue_bytes=1 << 40, write_block_s=600.0, deadline_s=30.0, workers=args.tier_workers
            )
            engine = CacheEngine(runner.fingerprint(), tiers, chunk_size=args.chunk_size)
            whole = CachedGenerator(runner, engine, store_generated=False)
            layered = CachedGenerator(
                runner,
                engine,
                use_layerwise=True,
                buffer_size=args.buffer_size[0],
                store_generated=False,
                layerwise_store=not args.no_layer_store,
            )
            prefix = ids[: args.tokens]
            engine.save_unfull_chunk = False  # cache exactly the prefix's full chunks
            whole.generate(prefix + ids[args.tokens : args.tokens + 1], max_new_tokens=1)
            tiers.flush()
            vocab = runner.config.vocab_size
            rng = torch.Generator().manual_seed(1)
            # Decoded on the GPU by the layerwise loader (cachegen there): the CPU-decoding whole path and
            # load are measured once only (seconds each), "load" is the loader alone (open + decode).
            on_device = engine.retrieve_layerwise(prefix + [0]).device_decoding(device) is not None
            setup = Setup(args, runner, engine, tiers, whole, layered, prefix, rng, device, on_device, tier_name,
                          codec_name)  # fmt: skip
            sizes = args.buffer_size
            plans = [_read_plan(p) for p in args.read_plans] if args.read_plans and on_device else [None]
            variants = (
                [(b, w, p) for p in plans for w in args.read_window for b in sizes]
                if on_device
                else [(sizes[0], 2, None)]
            )
            probe0 = getattr(backend, "head_probe", None)
            for size, window, plan in variants:
                tiers.read_window = window
                if plan is not None:
                    engine.read_layers = plan[0]
                    if probe0 is not None:
                        backend.head_probe = plan[1] or probe0
                    tiers.read_window = plan[2] or window
                rows.append(measure_variant(setup, size))
                rows[-1]["read_layers"] = engine.read_layers if on_device else None
                rows[-1]["head_probe"] = getattr(backend, "head_probe", None)
                console.print(rows[-1])
            tiers.close()
    if redis_server is not None:
        redis_server.kill()
    table = Table(title=f"layerwise loading, {name} on {device}, {args.tokens} cached + {args.suffix} new tokens")
    for col in [
        "tier",
        "codec",
        "reads (layers:probe)",
        "load only",
        "compute only",
        "whole",
        "layerwise",
        "speed-up",
        "overlap eff. vs whole",
        "overlap eff. vs load+compute",
        "layerwise / max(load, compute)",
        "loader alone (open)",
    ]:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["tier"],
            r["codec"],
            "-" if r["read_layers"] is None else f"{r['read_layers']}:{(r['head_probe'] or 0) >> 10}K",
            f"{r['load_s'] * 1e3:.1f} ms",
            f"{r['compute_s'] * 1e3:.1f} ms",
            f"{r['whole_s'] * 1e3:.1f} ms",
            f"{r['layerwise_s'] * 1e3:.1f} ms",
            f"{r['speedup']:.2f}x",
            f"{r['overlap_efficiency']:.0%}",
            f"{r['overlap_vs_serial']:.0%}",
            f"{r['layerwise_vs_max']:.2f}",
            f"{r['loader_only_s'] * 1e3:.1f} ms ({r['open_s'] * 1e3:.1f})",
        )
    console.print(table)
    save_results(args.json, rows)


if __name__ == "__main__":
    main()
