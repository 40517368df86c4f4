"""Shared by the benchmark scripts (run as `python bench/NAME.py`, so this folder is on sys.path)."""

from __future__ import annotations

import json
from pathlib import Path


def save_results(path: str, data) -> None:
    """Write a run's results as JSON (bench/results/ is git-ignored; BENCHMARKS.md holds the figures)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2))


def parse_spec(spec: str):
    name, _, rest = spec.partition(":")
    params = {}
    for kv in filter(None, rest.split(",")):
        k, _, v = kv.partition("=")
        params[k] = (
            v if v == "none" or v.endswith(".kvcal") else json.loads(v) if v not in ("true", "false") else v == "true"
        )
    return name, params


def codec_from_spec(spec: str, calibration=None, processes=None):
    """A codec from "name:k=v,...". Plain `cachegen` uses `calibration` (a Calibration) when given;
    `cachegen:calibration=none` is its uncalibrated mode, `cachegen:calibration=FILE.kvcal` uses that file; `processes` (a CodecProcesses) its coder's."""
    from kvshelf.codecs import get_codec

    name, params = parse_spec(spec)
    if name == "cachegen":
        if params.get("calibration") == "none":
            params.pop("calibration")
        elif str(params.get("calibration", "")).endswith(".kvcal"):  # a file: a candidate calibration
            from kvshelf.codecs import calibration as calib

            params["calibration"] = calib.load(params["calibration"])
        elif calibration is not None:
            params["calibration"] = calibration
    return get_codec(name, params, processes=processes)
