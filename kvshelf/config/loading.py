"""Loading the config: defaults < YAML file < environment < CLI, checked after each layer, so that an error
names the key, where its value came from and what is allowed.

The YAML file may use the flat keys (LMCache's names where LMCache has one) or the nested form in
NESTED_KEYS (`storage: {cpu, disk, remote}`, ...). Env vars are `KVSHELF_<KEY>` or `LMCACHE_<KEY>`
(KVSHELF_ wins); LMCache keys are mapped to kvshelf's or refused with a reason (kvshelf.lmcache_compat).
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kvshelf.config.keys import NESTED_KEYS
from kvshelf.config.validation import KVShelfConfig
from kvshelf.errors import ConfigError
from kvshelf.lmcache_compat import lmcache_env, translate
from kvshelf.storage.urls import remote_scheme

_TIER_SWITCHES = {"storage.disk.enabled": "local_disk", "storage.remote.enabled": "remote_url"}
_SECTIONS = {k.split(".")[0] for k in NESTED_KEYS} | {"storage"}


def _flatten(data: dict, source: str) -> dict[str, Any]:
    """Turn a YAML mapping with nested sections into flat keys; flat keys pass through."""
    flat: dict[str, Any] = {}
    switches: dict[str, bool] = {}

    def walk(node: Any, path: str) -> None:
        if path in NESTED_KEYS:
            flat[NESTED_KEYS[path]] = node
        elif path in _TIER_SWITCHES:
            switches[path] = bool(node)
        elif isinstance(node, dict) and any(k.startswith(path + ".") for k in [*NESTED_KEYS, *_TIER_SWITCHES]):
            for key, value in node.items():
                walk(value, f"{path}.{key}")
        else:
            known = sorted(k for k in [*NESTED_KEYS, *_TIER_SWITCHES] if k.startswith(path.split(".")[0] + "."))
            raise ConfigError(f"unknown config key {path!r} (from {source}); known under it: {', '.join(known)}")

    for key, value in data.items():
        if key in _SECTIONS and isinstance(value, dict) and key != "extra_config":
            walk(value, key)
        else:
            flat[key] = value
    for path, enabled in switches.items():
        field = _TIER_SWITCHES[path]
        if not enabled:
            flat[field] = None
        elif flat.get(field) is None:
            need = "path" if field == "local_disk" else "url"
            raise ConfigError(f"{path} is true but {path.rsplit('.', 1)[0]}.{need} is not set (from {source})")
    return flat


def _parse_env(name: str, raw: str) -> Any:
    annotation = str(KVShelfConfig.model_fields[name].annotation)
    if annotation.startswith(("list", "dict")):
        try:
            return json.loads(raw)
        except ValueError:
            return [v.strip() for v in raw.split(",") if v.strip()]
    if raw.lower() in ("none", "null", "") and "None" in annotation:
        return None
    return raw


def _env_values(environ: dict[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    values, sources = {}, {}
    for name in KVShelfConfig.model_fields:
        for prefix in ("LMCACHE_", "KVSHELF_"):  # later wins: KVSHELF_ over LMCACHE_
            var = prefix + name.upper()
            if var in environ:
                values[name] = _parse_env(name, environ[var])
                sources[name] = f"env {var}"
    return values, sources


def _format_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(config)"
        if e["type"] == "extra_forbidden":
            near = difflib.get_close_matches(key, list(KVShelfConfig.model_fields), n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            lines.append(f"unknown config key {key!r} (from {source}); {hint}`kvshelf config show` lists every key")
        else:
            lines.append(f"config key {key!r} (from {source}): {e['msg']}, got {e.get('input')!r}")
    return "; ".join(lines)


def load_config_with_sources(
    path: str | os.PathLike | None = None,
    *,
    environ: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[KVShelfConfig, dict[str, str]]:
    """The effective config and, for each key, where its value came from."""
    environ = dict(os.environ if environ is None else environ)
    path = path or environ.get("KVSHELF_CONFIG_FILE") or environ.get("LMCACHE_CONFIG_FILE")
    layers: list[tuple[str, dict, dict]] = []
    if path:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file {str(file)!r} does not exist")
        try:
            data = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(file)!r} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(file)!r} must hold a mapping of keys to values")
        flat = translate(_flatten(data, str(file)), f"file {file}")
        layers.append((str(file), flat, dict.fromkeys(flat, f"file {file}")))
    env_values, env_sources = _env_values(environ)
    # issue 21: LMCache keys (LMCACHE_<KEY>, file, --set) are mapped to kvshelf's or refused with a reason.
    mapped_env = translate({**lmcache_env(environ), **env_values}, "environment")  # kvshelf's own names win
    env_sources.update(dict.fromkeys(set(mapped_env) - set(env_values), "env LMCACHE_*"))
    env_values = mapped_env
    layers.append(("environment", env_values, env_sources))
    cli = translate({k: v for k, v in (overrides or {}).items() if v is not None}, "command line")
    layers.append(("command line", cli, dict.fromkeys(cli, "command line")))
    merged: dict[str, Any] = {}
    sources = dict.fromkeys(KVShelfConfig.model_fields, "default")
    for source, values, where in layers:
        merged.update(values)
        sources.update(where)
        try:
            KVShelfConfig.model_validate(merged)
        except ValidationError as err:
            raise ConfigError(_format_error(err, source)) from None
    config = KVShelfConfig.model_validate(merged)
    if config.remote_url:
        try:
            remote_scheme(config.remote_url)
        except ValueError as err:
            raise ConfigError(f"config key 'remote_url' (from {sources['remote_url']}): {err}") from None
    return config, sources


def load_config(path=None, *, environ=None, overrides=None) -> KVShelfConfig:
    return load_config_with_sources(path, environ=environ, overrides=overrides)[0]


def parse_assignments(pairs: list[str]) -> dict[str, Any]:
    """CLI `--set key=value` pairs; values are YAML scalars/lists (`--set blend_check_layers=[1,2]`)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out
