"""The `kvshelf` command line."""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from kvshelf.config import KVShelfConfig, load_config, load_config_with_sources, parse_assignments
from kvshelf.errors import KVShelfError

app = typer.Typer(help="kvshelf: reuse, tier and compress the KV cache of LLM prompts.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)

ConfigOpt = Annotated[str | None, typer.Option("--config", "-c", help="YAML config file")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override any config key: --set chunk_size=128")]
ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="local HF model folder or 'gemma3-270m'")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:N or auto")]
ChunkOpt = Annotated[int | None, typer.Option("--chunk-size", help="tokens per KV chunk")]


def _config(config: str | None, sets: list[str] | None = None, **overrides) -> KVShelfConfig:
    return load_config(config, overrides={**parse_assignments(sets or []), **overrides})


@contextmanager
def _steps(out: Console, what: str, total: int):
    """A progress bar over `total` steps; yields step(description, fn, *args, **kwargs) -> fn's result."""
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(
        SpinnerColumn(),
        TextColumn(f"[bold]{what}[/] {{task.description}}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=out,
        transient=True,
    ) as progress:
        task = progress.add_task("", total=total)

        def step(description: str, fn, *args, **kwargs):
            progress.update(task, description=description)
            result = fn(*args, **kwargs)
            progress.advance(task)
            return result

        yield step


def _fail(err: Exception) -> None:
    err_console.print(f"[red]error:[/] {err}")
    raise typer.Exit(2)


@app.callback()
def main(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="log what kvshelf does (INFO level) to stderr")
    ] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


@app.command()
def demo(
    config: ConfigOpt = None,
    sets: SetOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    chunk_size: ChunkOpt = None,
    quick: Annotated[bool, typer.Option(help="two questions instead of three")] = False,
    max_new_tokens: Annotated[int, typer.Option(help="most tokens per answer (answers stop at a newline)")] = 8,
    json_out: Annotated[
        str | None, typer.Option("--json", help="also write the measurements to this JSON file")
    ] = None,
) -> None:
    """The product in four steps on the default model: prefix reuse (cold vs warm), documents reordered
    (CacheBlend vs prefix caching vs full prefill), a restart served from the disk tier, bytes per tier and
    codec. The demo turns CacheBlend on and uses a fresh temporary disk tier of its own."""
    from kvshelf.demo import run_demo

    try:
        cfg = _config(config, sets, model=model, device=device, chunk_size=chunk_size)
        out = run_demo(cfg, quick=quick, max_new_tokens=max_new_tokens, console=console)
    except KVShelfError as err:
        _fail(err)
    if json_out:
        with open(json_out, "w") as f:
            json.dump(out, f, indent=2)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="prompt text")],
    config: ConfigOpt = None,
    sets: SetOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    max_new_tokens: Annotated[int, typer.Option()] = 32,
) -> None:
    """Generate a greedy continuation of PROMPT (one-shot; the cache lives for this process only)."""
    from kvshelf.assembly import open_shelf

    try:
        shelf = open_shelf(_config(config, sets, model=model, device=device), runtime="generate")
        result = shelf.generator.generate(prompt, max_new_tokens=max_new_tokens)
    except KVShelfError as err:
        _fail(err)
    console.print(result.text)
    console.print(f"[dim]{result.prompt_tokens} prompt tokens, TTFT {result.ttft_s:.2f} s[/]")


@app.command("fetch-model")
def fetch_model(model: ModelOpt = None) -> None:
    """Convert the default model once (or check a local folder) and print its path."""
    from kvshelf.model.provision import resolve_model

    try:
        console.print(str(resolve_model(model)))
    except KVShelfError as err:
        _fail(err)


@app.command()
def calibrate(
    config: ConfigOpt = None,
    sets: SetOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    out: Annotated[str | None, typer.Option(help="also copy the .kvcal file into this folder")] = None,
) -> None:
    """Make (or find) the model's cachegen calibration and print its file: share it with other machines,
    or give it to vLLM's connector as codec_calibration."""
    import shutil

    from kvshelf.assembly import check_runtime
    from kvshelf.codecs.calibration import SUFFIX, default_dir
    from kvshelf.model.calibrate import calibration_for
    from kvshelf.model.loader import load_model

    try:
        cfg = _config(config, sets, model=model, device=device)
        check_runtime(cfg, "calibrate")
        loaded = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
        cal = calibration_for(loaded.runner, loaded.tokenizer)
    except KVShelfError as err:
        _fail(err)
    path = default_dir() / f"{cal.digest}{SUFFIX}"
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        path = Path(shutil.copy2(path, Path(out) / path.name))
    console.print(str(path))


config_app = typer.Typer(help="Inspect configuration.")
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show(config: ConfigOpt = None, sets: SetOpt = None) -> None:
    """Print the effective configuration and where each value came from."""
    try:
        cfg, sources = load_config_with_sources(config, overrides=parse_assignments(sets or []))
    except KVShelfError as err:
        _fail(err)
    table = Table(title="kvshelf config (defaults < file < env < command line)")
    for col in ("key", "value", "from", "meaning"):
        table.add_column(col, overflow="fold")
    for name, field in KVShelfConfig.model_fields.items():
        value = getattr(cfg, name)
        shown = "***" if name in ("api_key", "tenant_secret", "remote_auth_key") and value else repr(value)
        effective = _effective(name, cfg)
        if effective is not None:
            shown += f" -> {effective}"
        table.add_row(name, shown, sources[name], field.description or "")
    console.print(table)


def _effective(name: str, cfg: KVShelfConfig) -> str | None:
    """What an unset or automatic setting amounts to, for `config show`."""
    value = getattr(cfg, name)
    if name in ("device", "dtype") and value == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        if name == "device":
            return device
        return "float32" if device == "cpu" else "bfloat16"
    if value is not None:
        return None
    return {
        "quantization_bits": "5 (cachegen's default level)",
        "local_disk_codec_level": "quantization_bits (cachegen only)",
        "remote_serde_level": "quantization_bits (cachegen only)",
        "local_disk_codec_calibration": "codec_calibration (cachegen only)",
        "remote_serde_calibration": "codec_calibration (cachegen only)",
        "min_cached_tokens": f"{cfg.chunk_size} (one chunk)",
        "served_model_name": "the model folder's name",
        "local_disk": "off",
        "remote_url": "off",
        "cache_salt": "none (one tenant)",
        "remote_ttl_s": "never expire",
        "metrics_port": "off",
        "redis_ssl_ca_certs": "the system's CA bundle",
        "api_key": "none (no authentication)",
    }.get(name)


@app.command()
def serve(
    config: ConfigOpt = None,
    sets: SetOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    host: Annotated[str | None, typer.Option(help="bind address (default 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="port (default 8000)")] = None,
) -> None:
    """Run the OpenAI-compatible server with the KV cache (/v1/completions, /v1/chat/completions, /metrics)."""
    from kvshelf.server import serve as run_server

    try:
        run_server(_config(config, sets, model=model, device=device, host=host, port=port))
    except KVShelfError as err:
        _fail(err)


@app.command()
def proxy(
    prefill: Annotated[list[str], typer.Option(help="a prefill instance (vLLM, kv_role=kv_producer); repeat")],
    decode: Annotated[list[str], typer.Option(help="a decode instance (vLLM, kv_role=kv_consumer); repeat")],
    host: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8100,
    prefill_timeout: Annotated[float, typer.Option(help="seconds a prefill may take before decode computes")] = 120.0,
    read_timeout: Annotated[float, typer.Option(help="seconds to wait for a decode instance's next bytes")] = 600.0,
) -> None:
    """Route OpenAI completions through a prefill instance (max_tokens=1), then a decode instance."""
    from kvshelf.server.proxy import ProxySettings, run_proxy

    try:
        settings = ProxySettings.of(
            prefill, decode, host=host, port=port, prefill_timeout_s=prefill_timeout, read_timeout_s=read_timeout
        )
    except KVShelfError as err:
        _fail(err)
    run_proxy(settings)


@app.command()
def stats(
    url: Annotated[str, typer.Option(help="server base URL")] = "http://127.0.0.1:8000",
    api_key: Annotated[
        str | None, typer.Option(envvar="KVSHELF_API_KEY", help="API key, if the server wants one")
    ] = None,
) -> None:
    """Pretty-print a running server's cache statistics."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = httpx.get(f"{url.rstrip('/')}/api/v1/cache/stats", headers=headers, timeout=10)
        resp.raise_for_status()
    except httpx.HTTPError as err:
        _fail(KVShelfError(f"could not read stats from {url}: {err}"))
    body = resp.json()
    if not body.get("enabled"):
        console.print("the server runs without a KV cache")
        return
    e = body["engine"]
    console.print(
        f"[bold]{body['model']['id']}[/] ({body['model']['dtype']}, {body['model']['layers']} layers), "
        f"chunk size {body['chunk_size']}: {e['hit_tokens']}/{e['requested_tokens']} prompt tokens hit "
        f"({e['hit_rate']:.1%}), {e['stored_tokens']} stored, {e['rejected_chunks']} rejected"
    )
    reasons = {r: v for r, v in e.get("by_reason", {}).items() if v["requests"]}
    if reasons:
        console.print(
            "requests by cache path: "
            + ", ".join(f"{r} {v['requests']} ({v['tokens']} tokens)" for r, v in sorted(reasons.items()))
        )
    table = Table(title="tiers")
    cols = ["tier", "used", "capacity", "hits", "misses", "errors", "writes", "dropped writes", "corrupt", "breaker"]
    for col in cols:
        table.add_column(col, justify="right")

    def mb(v):
        return "-" if v is None else f"{v / 1e6:.1f} MB"

    for name, t in body["tiers"].items():
        table.add_row(
            name,
            mb(t["used_bytes"]),
            mb(t["capacity_bytes"]),
            str(t["hits"]),
            str(t["misses"]),
            str(t["errors"]),
            str(t["puts"]),
            str(t["dropped_writes"]),
            str(t["corrupt_objects"]),
            "open" if t["breaker_open"] else "closed",
        )
    console.print(table)


def _measure_codecs(cost, runner) -> None:
    """Each codec's decode speed here (measured once, then kept): none, int8, and calibrated cachegen when
    this model's calibration exists (without one, cachegen is not measured: advise says so)."""
    from kvshelf.advice.decode_speed import decode_speed
    from kvshelf.codecs import calibration as calib
    from kvshelf.codecs import get_codec

    layout = (runner.num_layers, runner.num_kv_heads, runner.head_dim)
    codecs = {"none": get_codec("none"), "int8": get_codec("int8")}
    index = calib.default_dir() / f"model-{runner.fingerprint().digest().hex()}.txt"
    if index.is_file():
        try:
            cal = calib.load(calib.default_dir() / f"{index.read_text().strip()}{calib.SUFFIX}")
            codecs["cachegen"] = get_codec("cachegen", {"calibration": calib.register(cal)})
        except (calib.CalibrationError, OSError, KVShelfError) as err:
            console.print(f"cachegen's decode speed not measured: its calibration does not load ({err})")
    for name, codec in codecs.items():
        cost.codec_bytes_per_s[name] = decode_speed(codec, layout, runner.dtype, runner.device)


@app.command()
def advise(
    trace: Annotated[str | None, typer.Option(help="JSONL workload trace")] = None,
    scenario: Annotated[str | None, typer.Option(help="short-chat, long-rag, multi-turn or cross-node")] = None,
    gpu: Annotated[bool, typer.Option(help="the serving machine has a GPU")] = False,
    shared: Annotated[bool, typer.Option(help="several instances/nodes should share the cache")] = False,
    link_gbit: Annotated[float, typer.Option(help="the network to a shared tier, Gbit/s (picks its codec)")] = 10.0,
    out: Annotated[str | None, typer.Option(help="write the recommended config to this YAML file")] = None,
    ab_requests: Annotated[
        int, typer.Option(help="check the advice on this many of the trace's first requests (0: predict only)")
    ] = 6,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Recommend prefix reuse / CacheBlend / codecs / tiers / layerwise for a workload, from measured costs,
    and check the recommendation by a short measured A/B on the trace before writing it."""
    import yaml

    from kvshelf.advice.advise import analyse, check_scenario, synthetic_trace
    from kvshelf.advice.cost import CostModel
    from kvshelf.advice.trace import read_items, tokenize
    from kvshelf.advice.verify import baseline, candidates, verify
    from kvshelf.assembly import check_runtime, open_shelf
    from kvshelf.generation import CachedGenerator
    from kvshelf.model.loader import load_model

    try:
        # Every argument is checked before the model loads.
        cfg = _config(config, sets, model=model, device=device)
        check_runtime(cfg, "advise")
        if (trace is None) == (scenario is None):
            raise KVShelfError("give exactly one of --trace FILE or --scenario NAME")
        if scenario is not None:
            check_scenario(scenario)
        if ab_requests < 0:
            raise KVShelfError(f"--ab-requests must be >= 0, got {ab_requests}")
        items = read_items(trace) if trace else None
        if link_gbit <= 0:
            raise KVShelfError(f"--link-gbit must be > 0, got {link_gbit}")
        lm = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
        cost = CostModel.for_runner(lm.runner)
        _measure_codecs(cost, lm.runner)
        verdict = None
        if items is not None:
            requests, texts = tokenize(items, lm.tokenizer, cfg.blend_special_str)
            sample = texts[:ab_requests]
            if sample:
                plain = CachedGenerator(lm.runner, None, lm.tokenizer)
                plain.generate("warm-up", max_new_tokens=1, use_cache=False)
                probe = sample[:3]
                with _steps(console, "advise: prefill speed on the trace", len(probe)) as step:
                    baseline(plain, probe, cost, step=step)
                _check_prefill(cost, lm.runner, len(probe))
        else:
            requests = synthetic_trace(scenario)
        result = analyse(
            requests,
            cost,
            chunk_size=cfg.chunk_size,
            gpu=gpu,
            shared=shared,
            cpu_capacity_gb=cfg.max_local_cpu_size,
            link_gbit=link_gbit,
        )
        if items is not None and sample:
            total = 2 * len(sample) * len(candidates(result.config))
            with _steps(console, "advise: checking", total) as step:
                verdict = verify(lm, cfg, result.config, sample, plain, step=step, open_shelf=open_shelf)
    except (KVShelfError, ValueError) as err:
        _fail(err)
    console.print(
        f"{result.requests} requests, {result.mean_prompt_tokens:.0f} tokens on average; prefix reuse would serve "
        f"{result.prefix_hit_rate:.0%} of prompt tokens, chunk reuse {result.blend_hit_rate:.0%} of chunk tokens; "
        f"prefill {cost.prefill_tokens_per_s:.0f} tokens/s (measured here)"
    )
    table = Table(title="predicted mean TTFT and storage")
    table.add_column("mode")
    table.add_column("predicted", justify="right")
    for mode, t in result.predicted_ttft_s.items():
        table.add_row(mode, f"{t:.3f} s")
    for codec, gb in result.predicted_storage_gb.items():
        table.add_row(f"storage, {codec}", f"{gb:.2f} GB")
    console.print(table)
    for reason in result.reasons:
        console.print(f"- {reason}")
    chosen = result.config
    if verdict is not None:
        table = Table(title=f"measured mean TTFT, first {verdict.requests} requests of the trace, fresh cache")
        for col in ("config", "with it", "no cache (paired)", "speed-up"):
            table.add_column(col, justify="left" if col == "config" else "right")
        for trial in verdict.trials:
            table.add_row(
                trial.label,
                f"{trial.mean_ttft_s:.3f} s",
                f"{trial.no_cache_ttft_s:.3f} s",
                f"{trial.no_cache_ttft_s / trial.mean_ttft_s:.2f}x",
            )
        console.print(table)
        for note in verdict.notes:
            console.print(f"[yellow]- {note}[/]")
        chosen = verdict.chosen
    else:
        why = "a synthetic scenario" if scenario else "--ab-requests 0"
        console.print(f"[yellow]- predicted only ({why}): check it with `kvshelf bench --trace FILE --config FILE`[/]")
    text = yaml.safe_dump(chosen, sort_keys=False)
    console.print(text)
    if out:
        with open(out, "w") as f:
            f.write(text)


def _check_prefill(cost, runner, observations: int) -> None:
    """Measure the prefill speed again when the trace's own prefills disagree with it by more than 30%;
    when they still disagree, the trace's figure (its real prompt lengths) is the one to predict with."""
    observed = cost.prefill_disagrees(min_observations=observations)
    if observed is None:
        return
    console.print(
        f"the saved prefill speed ({cost.prefill_tokens_per_s:.0f} tokens/s) differs from this trace's prefills "
        f"({observed:.0f} tokens/s) by more than 30%: measuring it again"
    )
    cost.remeasure_prefill(runner)
    if abs(observed - cost.prefill_tokens_per_s) > 0.3 * cost.prefill_tokens_per_s:
        console.print(
            f"measured again: {cost.prefill_tokens_per_s:.0f} tokens/s, still far from the trace's; predicting with "
            f"the trace's own {observed:.0f} tokens/s (a busy machine, or prompt lengths unlike the measurement's)"
        )
        cost.prefill_tokens_per_s = observed


@app.command("bench")
def bench_trace(
    trace: Annotated[str, typer.Option(help="JSONL workload trace (as for advise)")],
    config: ConfigOpt = None,
    sets: SetOpt = None,
    max_new_tokens: Annotated[int, typer.Option()] = 1,
) -> None:
    """Replay a trace with a config and measure mean TTFT against no cache (checks advise's prediction)."""
    import statistics

    from kvshelf.advice.trace import read_items, tokenize
    from kvshelf.assembly import open_shelf

    try:
        items = read_items(trace)
        shelf = open_shelf(_config(config, sets), runtime="bench")
        _, texts = tokenize(items, shelf.model.tokenizer, shelf.config.blend_special_str)
        gen = shelf.generator
        gen.generate("warm-up", max_new_tokens=1, use_cache=False)
        with _steps(console, "bench", 2 * len(texts)) as step:
            plain = [
                step(
                    f"request {i}/{len(texts)} without the cache",
                    gen.generate,
                    t,
                    max_new_tokens=max_new_tokens,
                    use_cache=False,
                ).ttft_s
                for i, t in enumerate(texts, 1)
            ]
            cached = [
                step(f"request {i}/{len(texts)} with the cache", gen.generate, t, max_new_tokens=max_new_tokens).ttft_s
                for i, t in enumerate(texts, 1)
            ]
    except KVShelfError as err:
        _fail(err)
    a, b = statistics.fmean(plain), statistics.fmean(cached)
    console.print(f"{len(texts)} requests: mean TTFT {a:.3f} s without the cache, {b:.3f} s with it ({a / b:.2f}x)")


if __name__ == "__main__":
    app()
