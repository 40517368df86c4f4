"""Who is asking: API keys map to tenants, and each tenant's cache salt is derived on the server.

A tenant's salt is a keyed hash of its name (keyed with the server's secret), so no client can choose a
salt that reaches another tenant's KV: a client `cache_salt` is mixed into its own tenant's salt, never
used in its place.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import yaml

from kvshelf.config import KVShelfConfig
from kvshelf.errors import ConfigError

log = logging.getLogger(__name__)

MAX_SALT_CHARS = 1024  # as vLLM
ANONYMOUS = "anonymous"  # the tenant of a server without API keys


@dataclass(frozen=True)
class Tenant:
    name: str
    admin: bool = False


def load_keys_file(path: str) -> dict[str, Tenant]:
    """{key: Tenant} from a YAML or JSON file of `key: tenant` or `key: {tenant: name, admin: bool}`."""
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as err:
        raise ConfigError(f"api_keys_file {path!r}: cannot read it ({err.strerror or err})") from None
    try:
        data = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:
        raise ConfigError(f"api_keys_file {path!r}: not valid YAML/JSON: {err}") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"api_keys_file {path!r}: must map API keys to tenants")
    keys = {}
    for key, value in data.items():
        if not isinstance(key, str) or len(key) < 8:
            raise ConfigError(f"api_keys_file {path!r}: API keys must be strings of 8 characters or more")
        if isinstance(value, str):
            value = {"tenant": value}
        if not isinstance(value, dict) or not isinstance(value.get("tenant"), str) or not value["tenant"]:
            raise ConfigError(f"api_keys_file {path!r}: each key needs a tenant name (key ending ...{key[-4:]})")
        unknown = set(value) - {"tenant", "admin"}
        if unknown:
            raise ConfigError(f"api_keys_file {path!r}: unknown fields {sorted(unknown)}; allowed: tenant, admin")
        keys[key] = Tenant(value["tenant"], bool(value.get("admin", False)))
    return keys


def _local_secret() -> str:
    """This host's tenant secret, made once and kept (0600) in the cache folder, so that salts, and with
    them the disk and remote KV, survive a restart when no tenant_secret is configured."""
    from kvshelf.paths import cache_root

    path = cache_root() / "server" / "tenant_secret"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".tenant_secret.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32))
    try:
        os.link(tmp, path)  # the first writer wins; a concurrent start reads the winner's secret
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_text().strip()


class Tenants:
    """API key -> tenant, and tenant (+ client salt) -> cache salt."""

    def __init__(self, config: KVShelfConfig):
        self.keys: dict[str, Tenant] = {}
        if config.api_keys_file:
            self.keys.update(load_keys_file(config.api_keys_file))
        if config.api_key:
            self.keys[config.api_key] = Tenant("default", admin=True)
        secret = config.tenant_secret or _local_secret()
        if config.tenant_secret is None and config.remote_url:
            log.warning(
                "tenant_secret is not set: this host's own secret derives the tenants' salts, so other "
                "instances sharing the remote tier cannot reuse this one's KV; set the same tenant_secret "
                "on every instance"
            )
        self._secret = secret.encode()
        self._base = config.cache_salt or ""

    @property
    def open(self) -> bool:
        """True when the server asks for no key (every caller is the anonymous tenant)."""
        return not self.keys

    def authenticate(self, header: str | None) -> Tenant | None:
        """The tenant of an `Authorization: Bearer <key>` header; None when it names none."""
        if self.open:
            return Tenant(ANONYMOUS, admin=True)
        if not header or not header.startswith("Bearer "):
            return None
        given = header[len("Bearer ") :].encode()
        found = None
        for key, tenant in self.keys.items():  # compare with every key: no early exit to time
            if secrets.compare_digest(given, key.encode()):
                found = tenant
        return found

    def salt(self, tenant: Tenant, client_salt: str | None) -> str:
        """The cache salt of `tenant`'s request: its own, combined with the client's when one is given."""
        h = hmac.new(self._secret, digestmod=hashlib.sha256)
        for part in (self._base, tenant.name, client_salt):
            data = b"\x00" if part is None else b"\x01" + part.encode()
            h.update(len(data).to_bytes(4, "little") + data)
        return h.hexdigest()
