"""The README's code runs as written, so docs and behaviour cannot drift apart.

Fast: every `kvshelf` command line in the README names a real subcommand and real options; the commands
that build a shelf take `--set`; the YAML examples load as kvshelf configs; the config table names real
keys; `kvshelf config show` runs. Slow (the real model): every ```python block runs as it stands.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from kvshelf.cli import app
from kvshelf.config import KVShelfConfig, load_config

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
SHELF_COMMANDS = ("demo", "generate", "serve", "bench", "advise", "calibrate")


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def command_lines() -> list[list[str]]:
    """Each `kvshelf ...` invocation in the README's bash blocks, continuation lines joined, comments cut."""
    lines = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0]
            m = re.search(r"(?:^|\s|/)kvshelf\s+(\S.*)", line)
            if m:
                lines.append(m.group(1).split())
    return lines


def cli_command(name: str) -> click.Command:
    group = typer.main.get_command(app)
    return group.commands[name] if name != "config show" else group.commands["config"].commands["show"]


def option_names(cmd: click.Command) -> set[str]:
    return {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}


def test_readme_commands_use_real_subcommands_and_options():
    seen = command_lines()
    assert len(seen) >= 5
    for words in seen:
        name = "config show" if words[:2] == ["config", "show"] else words[0]
        cmd = cli_command(name)
        for word in words:
            flag = word.split("=", 1)[0]
            if flag.startswith("--"):
                assert flag in option_names(cmd), f"README: `kvshelf {' '.join(words)}`: {flag} is not an option"


@pytest.mark.parametrize("name", [*SHELF_COMMANDS, "config show"])
def test_every_command_that_builds_a_shelf_takes_set(name):
    assert "--set" in option_names(cli_command(name)), name
    assert f"`{name}`" in README or name == "config show"  # the README lists it


def test_readme_yaml_examples_load(tmp_path):
    configs = [b for b in blocks("yaml") if "chunk_size" in b or "storage:" in b]
    assert len(configs) >= 2
    for i, text in enumerate(configs):
        path = tmp_path / f"{i}.yaml"
        path.write_text(text)
        load_config(path, environ={})  # placeholders (hosts, paths) are fine: nothing connects at load time


def test_config_table_names_real_keys():
    rows = re.findall(r"^\| (`[^|]+`) \|", README, flags=re.M)
    keys = {k for row in rows for k in re.findall(r"`([a-z_]+)`", row)}
    assert len(keys) > 30
    assert keys <= set(KVShelfConfig.model_fields), keys - set(KVShelfConfig.model_fields)


def test_config_show_prints_every_key_with_effective_defaults():
    result = CliRunner().invoke(app, ["config", "show", "--set", "chunk_size=64"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    for name in KVShelfConfig.model_fields:
        assert name in result.output
    assert "None -> 5" in result.output and "64 (one chunk)" in result.output


def test_set_reaches_the_demo_config():
    from kvshelf.cli import _config
    from kvshelf.demo import demo_config

    cfg = demo_config(_config(None, ["chunk_size=64", "local_disk_codec=none"]), "/tmp/x")
    assert (cfg.chunk_size, cfg.local_disk_codec, cfg.local_disk, cfg.enable_blending) == (64, "none", "/tmp/x", True)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_readme_python_blocks_run(index, tmp_path):
    code = blocks("python")[index]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, f"README python block {index}:\n{code}\n{proc.stderr[-3000:]}"
