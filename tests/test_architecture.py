"""docs/architecture.md must describe the layering that CI enforces (pyproject's import-linter contracts)
and name every package of kvshelf; every module of kvshelf.config has its place in that package's contract."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def contract_layers() -> list[list[str]]:
    (layers,) = [c["layers"] for c in contracts() if c["type"] == "layers" and "containers" not in c]
    return [[p.strip().removeprefix("kvshelf.") for p in row.split("|")] for row in layers]


def doc_layers() -> list[list[str]]:
    rows = []
    for line in (ROOT / "docs" / "architecture.md").read_text().splitlines():
        m = re.match(r"\| (\d+) \| (.+?) \| ", line)
        if m:
            rows.append([p.strip(" `\\") for p in m.group(2).split("|")])
    return rows


def test_the_documented_layers_are_the_enforced_ones():
    assert doc_layers() == contract_layers()


def test_every_package_has_a_layer():
    layered = {p for row in contract_layers() for p in row}
    packages = {p.name for p in (ROOT / "kvshelf").iterdir() if (p / "__init__.py").is_file()}
    modules = {p.stem for p in (ROOT / "kvshelf").glob("*.py") if p.stem != "__init__"}
    assert packages | modules == layered


def test_every_config_module_has_a_layer():
    (layers,) = [c["layers"] for c in contracts() if c.get("containers") == ["kvshelf.config"]]
    modules = {p.stem for p in (ROOT / "kvshelf" / "config").glob("*.py") if p.stem != "__init__"}
    assert modules == set(layers)


def test_the_vllm_connector_imports_neither_numba_nor_llvmlite():
    """vLLM's CPU worker scans the loaded modules for Triton kernels at start-up and fails on llvmlite's objects
    (AttributeError: '_lib_fn_wrapper' object has no attribute 'get'): importing the connector, the engine and
    the loaders must leave numba to first use (a merge of the fifth session broke every vLLM test that way)."""
    import subprocess
    import sys

    code = (
        "import sys, kvshelf.integrations.vllm.connector, kvshelf.cache.engine, kvshelf.assembly; "
        "print(sorted(m for m in ('numba', 'llvmlite') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr
