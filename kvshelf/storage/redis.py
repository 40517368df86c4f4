"""Cold/shared tier: Redis or Valkey through redis-py, single node or cluster.

URLs: redis://[user:pass@]host:port/db, rediss:// (TLS), unix:///path.sock, valkey:// and valkeys://
(same protocols), redis-cluster://[user:pass@]host:port,host:port (TLS: rediss-cluster://).
Values above `part_bytes` are split into parts written first, then a small manifest under the main
key: a reader that sees the manifest finds every part, and a crash mid-write leaves no manifest, so a
miss. A hash tag keeps a chunk's parts in one cluster slot. Space is the server's business: give it a
`maxmemory` and an `allkeys-lru` policy, or pass a TTL.
"""

from __future__ import annotations

import struct
from urllib.parse import unquote, urlsplit

import redis
from redis.cluster import ClusterNode, RedisCluster

from kvshelf.codecs import Codec
from kvshelf.errors import ConfigError
from kvshelf.storage.serialized import ByteStore

_MANIFEST = struct.Struct("<4sIQ")  # magic, part count, total bytes
_MANIFEST_MAGIC = b"KVSP"


def _client(url: str, *, timeout_s: float, ssl_ca_certs: str | None):
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    common = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if scheme in ("redis-cluster", "rediss-cluster", "valkey-cluster", "valkeys-cluster"):
        parts = urlsplit(url.replace(scheme + "://", "x://", 1))
        hosts = parts.netloc.rsplit("@", 1)[-1]
        nodes = []
        for hp in hosts.split(","):
            host, _, port = hp.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError(f"remote_url: cluster node {hp!r} must be host:port")
            nodes.append(ClusterNode(host, int(port)))
        tls = scheme.startswith(("rediss", "valkeys"))
        return RedisCluster(
            startup_nodes=nodes,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            ssl=tls,
            ssl_ca_certs=ssl_ca_certs if tls else None,
            **common,
        )
    if scheme in ("valkey", "valkeys"):
        url = "redis" + url[len("valkey") :]
        scheme = "redis" + scheme[len("valkey") :]
    if scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            f"remote_url: unsupported scheme {scheme!r} for Redis; use redis://, rediss://, unix://, valkey://, "
            "valkeys:// or redis-cluster://"
        )
    extra = {"ssl_ca_certs": ssl_ca_certs} if (scheme == "rediss" and ssl_ca_certs) else {}
    return redis.Redis.from_url(url, **common, **extra)


class RedisBackend(ByteStore):
    name = "redis"

    def __init__(
        self,
        url: str,
        codec: Codec,
        *,
        prefix: str = "kvshelf:",
        ttl_s: int | None = None,
        part_bytes: int = 32 << 20,
        timeout_s: float = 2.0,
        ssl_ca_certs: str | None = None,
    ):
        super().__init__(codec)
        if part_bytes < 1024:
            raise ConfigError(f"redis part size must be >= 1024 bytes, got {part_bytes}")
        self.url = url
        self.client = _client(url, timeout_s=timeout_s, ssl_ca_certs=ssl_ca_certs)
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.part_bytes = part_bytes

    def _key(self, name: str) -> str:
        return f"{self.prefix}{{{name}}}"  # {...}: the cluster hash tag

    def _part_keys(self, name: str, n: int) -> list[str]:
        return [f"{self._key(name)}:{i}" for i in range(n)]

    def _put_bytes(self, name: str, parts: list) -> bool:
        key = self._key(name)
        blob = b"".join(parts)
        if len(blob) <= self.part_bytes:
            self.client.set(key, blob, ex=self.ttl_s)
            return True
        parts = [blob[i : i + self.part_bytes] for i in range(0, len(blob), self.part_bytes)]
        pipe = self.client.pipeline(transaction=False)
        for part_key, part in zip(self._part_keys(name, len(parts)), parts, strict=True):
            pipe.set(part_key, part, ex=self.ttl_s)
        pipe.execute()
        # The manifest goes last: until it exists, readers see a miss.
        self.client.set(key, _MANIFEST.pack(_MANIFEST_MAGIC, len(parts), len(blob)), ex=self.ttl_s)
        return True

    def _get_bytes(self, name: str) -> bytes | None:
        head = self.client.get(self._key(name))
        if head is None or not head.startswith(_MANIFEST_MAGIC):
            return head
        if len(head) != _MANIFEST.size:
            return head  # not a manifest after all; the format check will reject it
        _, count, total = _MANIFEST.unpack(head)
        parts = self.client.mget(self._part_keys(name, count))
        if any(p is None for p in parts):
            return b""  # a part expired or was evicted: fails verification, so it is deleted as damaged
        blob = b"".join(parts)
        return blob if len(blob) == total else b""

    def _delete_name(self, name: str) -> None:
        key = self._key(name)
        head = self.client.get(key)
        keys = [key]
        if head is not None and head.startswith(_MANIFEST_MAGIC) and len(head) == _MANIFEST.size:
            keys += self._part_keys(name, _MANIFEST.unpack(head)[1])
        for k in keys:  # one by one: keys in a multi-key DEL must share a slot, and these do, but stay simple
            self.client.delete(k)

    def contains(self, key: bytes) -> bool:
        return bool(self.client.exists(self._key(key.hex())))

    def contains_many(self, keys: list[bytes]) -> list[bool]:
        pipe = self.client.pipeline(transaction=False)
        for k in keys:
            pipe.exists(self._key(k.hex()))
        return [bool(r) for r in pipe.execute()]

    def clear(self) -> None:
        for k in self.client.scan_iter(match=f"{self.prefix}*", count=1000):
            self.client.delete(k)

    def close(self) -> None:
        self.client.close()
