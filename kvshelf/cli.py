"""The `kvshelf` command line."""

from __future__ import annotations

import json
import logging
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from kvshelf.config import KVShelfConfig, load_config
from kvshelf.errors import KVShelfError

app = typer.Typer(help="kvshelf: reuse, tier and compress the KV cache of LLM prompts.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)

ConfigOpt = Annotated[str | None, typer.Option("--config", "-c", help="YAML config file")]
ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="local HF model folder or 'gemma3-270m'")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:N or auto")]
ChunkOpt = Annotated[int | None, typer.Option("--chunk-size", help="tokens per KV chunk")]


def _config(config: str | None, **overrides) -> KVShelfConfig:
    return load_config(config, overrides=overrides)


def _fail(err: Exception) -> None:
    err_console.print(f"[red]error:[/] {err}")
    raise typer.Exit(2)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


@app.command()
def demo(
    config: ConfigOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    chunk_size: ChunkOpt = None,
    quick: Annotated[bool, typer.Option(help="two short documents and two questions")] = False,
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate per answer")] = 16,
    json_out: Annotated[str | None, typer.Option("--json", help="also write the rows to this JSON file")] = None,
) -> None:
    """RAG-style demo on the default model: TTFT without and with kvshelf, per question."""
    from kvshelf.app import open_shelf
    from kvshelf.demo import run_demo

    try:
        cfg = _config(config, model=model, device=device, chunk_size=chunk_size)
        shelf = open_shelf(cfg)
        rows = run_demo(shelf, quick=quick, max_new_tokens=max_new_tokens, console=console)
    except KVShelfError as err:
        _fail(err)
    if json_out:
        with open(json_out, "w") as f:
            json.dump(rows, f, indent=2)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="prompt text")],
    config: ConfigOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    max_new_tokens: Annotated[int, typer.Option()] = 32,
) -> None:
    """Generate a greedy continuation of PROMPT (one-shot; the cache lives for this process only)."""
    from kvshelf.app import open_shelf

    try:
        shelf = open_shelf(_config(config, model=model, device=device))
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


config_app = typer.Typer(help="Inspect configuration.")
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show(config: ConfigOpt = None) -> None:
    """Print the effective configuration."""
    try:
        cfg = _config(config)
    except KVShelfError as err:
        _fail(err)
    table = Table(title="kvshelf config")
    table.add_column("key")
    table.add_column("value")
    table.add_column("meaning")
    for name, field in KVShelfConfig.model_fields.items():
        table.add_row(name, repr(getattr(cfg, name)), field.description or "")
    console.print(table)


if __name__ == "__main__":
    app()
