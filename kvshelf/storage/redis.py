"""Cold/shared tier: Redis or Valkey through redis-py, single node or cluster.

URLs: redis://[user:pass@]host:port/db, rediss:// (TLS), unix:///path.sock, valkey:// and valkeys://
(same protocols), redis-cluster://[user:pass@]host:port,host:port (TLS: rediss-cluster://; also
valkey-cluster:// and valkeys-cluster://): the table in storage/urls.py.
Values above `part_bytes` are split into parts written first, then a small manifest under the main
key: a reader that sees the manifest finds every part, and a crash mid-write leaves no manifest, so a
miss. A hash tag keeps a chunk's parts in one cluster slot. Parts carry the manifest's TTL; without a
TTL they are written with a grace expiry (PART_GRACE_S) that is removed once the manifest is in place,
so a write that dies half way leaves nothing behind for long. Space is the server's business: give it
a `maxmemory` and an `allkeys-lru` policy, or pass a TTL.

Reads trust no value: a server-side script returns a value's size instead of the value when it is
larger than the largest chunk the read expects, and a manifest must add up (parts x part size = total,
total within that limit) before a part is fetched; all parts come in one round trip, and a delete
removes the value and its parts with one UNLINK. The server must allow scripting (EVALSHA, SCRIPT LOAD)
for kvshelf's user; a server that refuses it makes every read a tier fault.
"""

from __future__ import annotations

import struct
from urllib.parse import unquote, urlsplit

import redis
from redis.cluster import ClusterNode, RedisCluster

from kvshelf.codecs import Codec
from kvshelf.errors import ConfigError
from kvshelf.metrics import Metrics
from kvshelf.storage.auth import ObjectAuth
from kvshelf.storage.expect import GENERIC
from kvshelf.storage.format import FormatError
from kvshelf.storage.serialized import ByteStore, ObjectTooLarge
from kvshelf.storage.urls import REMOTE_SCHEMES, url_scheme

_MANIFEST = struct.Struct("<4sIIQ")  # magic, part count, part bytes, total bytes
_MANIFEST_MAGIC = b"KVS2"


def _client(url: str, *, timeout_s: float, ssl_ca_certs: str | None):
    scheme = url_scheme(url)
    entry = REMOTE_SCHEMES.get(scheme)
    if entry is None or entry.store != "redis":
        redis_schemes = ", ".join(f"{s}://" for s, e in REMOTE_SCHEMES.items() if e.store == "redis")
        raise ConfigError(f"remote_url: unsupported scheme {scheme!r} for Redis; use {redis_schemes}")
    common = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if entry.cluster:
        parts = urlsplit(url.replace(scheme + "://", "x://", 1))
        hosts = parts.netloc.rsplit("@", 1)[-1]
        nodes = []
        for hp in hosts.split(","):
            host, _, port = hp.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError(f"remote_url: cluster node {hp!r} must be host:port")
            nodes.append(ClusterNode(host, int(port)))
        return RedisCluster(
            startup_nodes=nodes,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            ssl=entry.tls,
            ssl_ca_certs=ssl_ca_certs if entry.tls else None,
            **common,
        )
    url = entry.native + url[len(scheme) :]
    scheme = entry.native
    extra = {"ssl_ca_certs": ssl_ca_certs} if (scheme == "rediss" and ssl_ca_certs) else {}
    return redis.Redis.from_url(url, **common, **extra)


# One round trip per read, and the size is known before the value travels: a value larger than the
# caller's limit comes back as its length (a number), another type as -1, a missing key as nil.
_READ = """
local t = redis.call('TYPE', KEYS[1])['ok']
if t == 'none' then return false end
if t ~= 'string' then return -1 end
local n = redis.call('STRLEN', KEYS[1])
if n > tonumber(ARGV[1]) then return n end
return redis.call('GET', KEYS[1])
"""
# All parts of one value in one round trip (they share a slot), each checked against the part size.
_READ_PARTS = """
local out = {}
for i, k in ipairs(KEYS) do
  local t = redis.call('TYPE', k)['ok']
  if t == 'none' then return 0 end
  if t ~= 'string' or redis.call('STRLEN', k) > tonumber(ARGV[1]) then return -1 end
  out[i] = redis.call('GET', k)
end
return out
"""
PART_GRACE_S = 600  # parts carry an expiry until their manifest is written: a crashed write leaves nothing
MAX_PARTS = 1 << 16


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
        auth: ObjectAuth | None = None,
        metrics: Metrics | None = None,
    ):
        super().__init__(codec, auth=auth, metrics=metrics)
        if part_bytes < 1024:
            raise ConfigError(f"redis part size must be >= 1024 bytes, got {part_bytes}")
        self.url = url
        self.client = _client(url, timeout_s=timeout_s, ssl_ca_certs=ssl_ca_certs)
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.part_bytes = part_bytes
        self._read = self.client.register_script(_READ)
        self._read_parts = self.client.register_script(_READ_PARTS)

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
        pieces = [blob[i : i + self.part_bytes] for i in range(0, len(blob), self.part_bytes)]
        part_keys = self._part_keys(name, len(pieces))
        pipe = self.client.pipeline(transaction=False)
        for part_key, part in zip(part_keys, pieces, strict=True):
            pipe.set(part_key, part, ex=self.ttl_s or PART_GRACE_S)
        pipe.execute()
        # The manifest goes last: until it exists, readers see a miss.
        self.client.set(key, _MANIFEST.pack(_MANIFEST_MAGIC, len(pieces), self.part_bytes, len(blob)), ex=self.ttl_s)
        if self.ttl_s is None:  # kept as long as their manifest: allkeys-lru or a delete reclaims them
            pipe = self.client.pipeline(transaction=False)
            for part_key in part_keys:
                pipe.persist(part_key)
            pipe.execute()
        return True

    @staticmethod
    def _manifest(head: bytes, limit: int) -> tuple[int, int, int] | None:
        """(parts, part bytes, total) of a manifest, None if `head` is not one; FormatError if one that
        announces more than `limit` bytes or a part count its sizes do not give."""
        if len(head) != _MANIFEST.size or not head.startswith(_MANIFEST_MAGIC):
            return None
        _, count, part_bytes, total = _MANIFEST.unpack(head)
        if total > limit:
            raise ObjectTooLarge(f"manifest announces {total} bytes; no expected chunk is larger than {limit}")
        if part_bytes < 1024 or count != -(-total // part_bytes) or not 2 <= count <= MAX_PARTS:
            raise FormatError(f"manifest of {count} parts x {part_bytes} bytes does not add up to {total} bytes")
        return count, part_bytes, total

    def _get_bytes(self, name: str, limit: int) -> bytes | None:
        key = self._key(name)
        head = self._read(keys=[key], args=[limit])
        if head is None:
            return None
        if isinstance(head, int):
            if head < 0:
                raise FormatError("value is not a Redis string")
            raise ObjectTooLarge(f"value of {head} bytes; no expected chunk is larger than {limit}")
        manifest = self._manifest(head, limit)
        if manifest is None:
            return head
        count, part_bytes, total = manifest
        parts = self._read_parts(keys=self._part_keys(name, count), args=[part_bytes])
        if isinstance(parts, int):
            raise FormatError("a part is missing (expired, evicted)" if parts == 0 else "a part is not a sound part")
        blob = b"".join(parts)
        if len(blob) != total:
            raise FormatError(f"parts hold {len(blob)} bytes, the manifest says {total}")
        return blob

    def _get_range(self, name: str, start: int, length: int, limit: int) -> bytes | None:
        """GETRANGE: one round trip for a plain value (its length, its first bytes to tell a manifest, the
        range), a second one for the parts a manifest's range spans."""
        key = self._key(name)
        pipe = self.client.pipeline(transaction=False)
        pipe.strlen(key)
        pipe.getrange(key, 0, _MANIFEST.size - 1)
        if length > 0:
            pipe.getrange(key, start, start + length - 1)  # an end below start would mean "to the end"
        try:
            size, head, *data = pipe.execute()
        except redis.ResponseError:
            raise FormatError("value is not a Redis string") from None
        if size == 0:
            return None
        if size > limit:
            raise ObjectTooLarge(f"value of {size} bytes; no expected chunk is larger than {limit}")
        manifest = self._manifest(head, limit) if size == _MANIFEST.size else None
        if manifest is None:
            return data[0] if data else b""
        count, part_bytes, total = manifest
        end = min(start + length, total)
        if end <= start:
            return b""
        first, last = start // part_bytes, (end - 1) // part_bytes
        pipe = self.client.pipeline(transaction=False)
        for p, part_key in enumerate(self._part_keys(name, count)[first : last + 1], first):
            lo, hi = max(start, p * part_bytes) - p * part_bytes, min(end, (p + 1) * part_bytes) - p * part_bytes
            pipe.getrange(part_key, lo, hi - 1)
        try:
            pieces = pipe.execute()
        except redis.ResponseError:
            raise FormatError("a part is not a Redis string") from None
        return b"".join(pieces)  # a missing part reads as empty: the range comes short, and is refused

    def _delete_name(self, name: str) -> None:
        key = self._key(name)
        keys = [key]
        try:
            head = self.client.getrange(key, 0, _MANIFEST.size)  # bounded: never a whole planted value
            manifest = self._manifest(head, GENERIC.max_object_bytes)
        except (redis.ResponseError, FormatError):  # another type, or a manifest that does not add up
            manifest = None
        if manifest is not None:
            keys += self._part_keys(name, manifest[0])
        self.client.unlink(*keys)  # one call: the parts share the key's hash tag, so its slot

    def contains(self, key: bytes) -> bool:
        return bool(self.client.exists(self._key(self.name_of(key))))

    def contains_many(self, keys: list[bytes]) -> list[bool]:
        pipe = self.client.pipeline(transaction=False)
        for k in keys:
            pipe.exists(self._key(self.name_of(k)))
        return [bool(r) for r in pipe.execute()]

    def clear(self) -> None:
        for k in self.client.scan_iter(match=f"{self.prefix}*", count=1000):
            self.client.unlink(k)

    def close(self) -> None:
        self.client.close()
