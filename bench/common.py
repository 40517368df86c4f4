"""Shared by the benchmark scripts (run as `python bench/NAME.py`, so this folder is on sys.path)."""

from __future__ import annotations

import json
from pathlib import Path


def save_results(path: str, data) -> None:
    """Write a run's results as JSON (bench/results/ is git-ignored; BENCHMARKS.md holds the figures)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2))
