"""kvshelf's configuration: one definitions table, read from YAML, env vars and CLI overrides.

Precedence: defaults < YAML file < environment < CLI. The YAML file may use the flat keys (LMCache's
names where LMCache has one) or the nested form in NESTED_KEYS (`storage: {cpu, disk, remote}`, ...).
Env vars are `KVSHELF_<KEY>` or `LMCACHE_<KEY>` (KVSHELF_ wins). Unknown keys and bad values fail with
the key's name and what is allowed.

One concept per module, each importing only the ones after it (an import-linter contract):
`loading` (file, environment and command line, merged; error messages), `validation` (KVShelfConfig: the
table with its checks and what it derives) and `keys` (the table: every key's type, default and meaning,
and the nested YAML names). Import from kvshelf.config itself.
"""

from kvshelf.config.keys import NESTED_KEYS
from kvshelf.config.loading import load_config, load_config_with_sources, parse_assignments
from kvshelf.config.validation import GB, KVShelfConfig, TierCodec

__all__ = [
    "GB",
    "NESTED_KEYS",
    "KVShelfConfig",
    "TierCodec",
    "load_config",
    "load_config_with_sources",
    "parse_assignments",
]
