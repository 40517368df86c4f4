"""Load a model folder into a ModelRunner plus its tokenizer, on the requested device and dtype."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from kvshelf.errors import ConfigError
from kvshelf.model.provision import resolve_model
from kvshelf.model.runner import ModelRunner

log = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class LoadedModel:
    runner: ModelRunner
    tokenizer: object
    path: Path


def parse_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        # fp32 on CPU: bf16 matmuls are 4-5x slower on CPUs without AMX.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(_DTYPES)} or 'auto', got {name!r}")
    return _DTYPES[name]


def parse_device(name: str | torch.device | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(name)!r} asked for, but no CUDA GPU is available")
    return device


def load_model(spec: str | os.PathLike | None = None, *, device=None, dtype=None, show_progress=True) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(spec, show_progress=show_progress)
    dev = parse_device(device)
    dt = parse_dtype(dtype, dev)
    log.info("loading %s on %s as %s", path, dev, dt)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dt).to(dev)
    tokenizer = AutoTokenizer.from_pretrained(path)
    runner = ModelRunner(model, model_id=path.name)
    return LoadedModel(runner, tokenizer, path)
