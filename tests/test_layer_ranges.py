"""Layer ranges read apart from every byte tier (StorageBackend.open_ranges, format version 3): the head is
verified once, each range on its own as it is read; what passes equals the whole object's segments, and a
damaged, truncated or vanished range is a miss that deletes the object."""

from __future__ import annotations

import boto3
import pytest
import redis as redis_py
from helpers import key, make_chunk

from kvshelf.codecs import get_codec
from kvshelf.storage.auth import ObjectAuth
from kvshelf.storage.disk import DiskBackend
from kvshelf.storage.format import read_header
from kvshelf.storage.redis import RedisBackend
from kvshelf.storage.s3 import S3Backend
from kvshelf.storage.serialized import ByteStore
from kvshelf.storage.tiers import TierManager

AUTH = ObjectAuth.from_secret("a secret every instance of the fleet shares")
INT8 = get_codec("int8")
LAYERS = 5


class BytesInMemory(ByteStore):
    """A byte tier without range reads of its own: ranges come from the default (a whole read, cut)."""

    name = "bytes"

    def __init__(self, codec, **kw):
        super().__init__(codec, **kw)
        self.objects: dict[str, bytes] = {}
        self.whole_reads = 0

    def _put_bytes(self, name, parts):
        self.objects[name] = b"".join(parts)
        return True

    def _get_bytes(self, name, limit):
        self.whole_reads += 1
        return self.objects.get(name)

    def _delete_name(self, name):
        self.objects.pop(name, None)

    def contains(self, k):
        return self.name_of(k) in self.objects

    def clear(self):
        self.objects.clear()


class Raw:
    """Get and set a tier's stored bytes behind its back (to damage them)."""

    def __init__(self, store, get, put):
        self.store, self.get, self.put = store, get, put


def _disk(tmp_path, **_):
    d = DiskBackend(tmp_path, 1 << 26, INT8, auth=AUTH)
    return Raw(d, lambda n: d._path(n).read_bytes(), lambda n, b: d._path(n).write_bytes(b))


def _memory(tmp_path, **_):
    m = BytesInMemory(INT8, auth=AUTH)
    return Raw(m, lambda n: m.objects[n], lambda n, b: m.objects.__setitem__(n, b))


def _redis(tmp_path, redis_server, parts=False, **_):
    r = RedisBackend(
        redis_server.url, INT8, prefix=f"ranges{tmp_path.name}:", auth=AUTH, part_bytes=1024 if parts else 32 << 20
    )
    c = redis_py.Redis.from_url(redis_server.url)

    def get(name):
        k = r._key(name)
        head = c.get(k)
        manifest = r._manifest(head, 1 << 30)
        return head if manifest is None else b"".join(c.get(p) for p in r._part_keys(name, manifest[0]))

    def put(name, blob):
        k = r._key(name)
        manifest = r._manifest(c.get(k), 1 << 30)
        if manifest is None:
            c.set(k, blob)
        else:
            for i, p in enumerate(r._part_keys(name, manifest[0])):
                c.set(p, blob[i * 1024 : (i + 1) * 1024])

    return Raw(r, get, put)


def _s3(tmp_path, s3_server, **_):
    bucket = "ranges-" + tmp_path.name.replace("_", "-").lower()[-30:].strip("-")
    client = boto3.client("s3", endpoint_url=s3_server.endpoint)
    client.create_bucket(Bucket=bucket)
    s = S3Backend.from_url(f"s3://{bucket}/kv?endpoint={s3_server.endpoint}", INT8, auth=AUTH)
    obj = s._object
    return Raw(
        s,
        lambda n: client.get_object(Bucket=bucket, Key=obj(n))["Body"].read(),
        lambda n, b: client.put_object(Bucket=bucket, Key=obj(n), Body=b),
    )


TIERS = ["disk", "memory", "redis", "redis-parts", "s3"]


@pytest.fixture
def tier(request, tmp_path):
    kind = request.param
    if kind == "disk":
        raw = _disk(tmp_path)
    elif kind == "memory":
        raw = _memory(tmp_path)
    elif kind.startswith("redis"):
        raw = _redis(tmp_path, request.getfixturevalue("redis_server"), parts=kind == "redis-parts")
    else:
        raw = _s3(tmp_path, request.getfixturevalue("s3_server"))
    raw.store.head_probe = 256  # fewer bytes than a head takes: a second read for the rest of it
    yield raw
    raw.store.close()


def chunk(seed=0):
    return make_chunk(tokens=64, seed=seed, layers=LAYERS, heads=2, dim=16)  # int8: ~2.3 KB per layer


@pytest.mark.parametrize("tier", TIERS, indirect=True)
def test_layer_ranges_equal_the_whole_objects_segments(tier):
    store = tier.store
    store.put(key(1), chunk())
    whole = store.open(key(1))
    ranges = store.open_ranges(key(1))
    assert ranges.meta == whole.meta and ranges.offsets == whole.encoded_payload()[2]
    for i, j in [(0, 1), (1, 3), (3, 5), (0, LAYERS)]:
        got = ranges.read(i, j)
        want = b"".join(bytes(whole.encoded_layer(k)[1]) for k in range(i, j))
        assert bytes(got) == want
    assert store.open_ranges(key(2)) is None and store.corrupt_objects == 0  # absent: a plain miss


@pytest.mark.parametrize("tier", TIERS, indirect=True)
def test_a_damaged_layer_is_refused_when_its_range_is_read_and_the_object_deleted(tier):
    store = tier.store
    store.put(key(3), chunk(seed=3))
    name = store.name_of(key(3))
    blob = bytearray(tier.get(name))
    header, start = read_header(bytes(blob))
    ranges = store.open_ranges(key(3))  # the head is sound
    at = start + header["layer_offsets"][2] + 7
    blob[at] ^= 0x01  # one bit of layer 2
    tier.put(name, bytes(blob))
    assert bytes(ranges.read(0, 2)) == bytes(blob[start : start + header["layer_offsets"][2]])  # layers 0-1 pass
    assert ranges.read(2, 3) is None and store.corrupt_objects == 1
    assert not store.contains(key(3))


@pytest.mark.parametrize("tier", TIERS, indirect=True)
def test_ranges_read_into_a_buffer_are_the_same_bytes_verified_there(tier):
    store = tier.store
    store.put(key(8), chunk(seed=8))
    ranges = store.open_ranges(key(8))
    for i, j in [(0, 1), (1, 3), (0, LAYERS)]:
        n = ranges.offsets[j] - ranges.offsets[i]
        buf = bytearray(b"\xee" * (n + 6))
        got = ranges.read_into(i, j, memoryview(buf)[3 : 3 + n])  # a loader's staging buffer, at its place
        assert bytes(got) == bytes(buf[3 : 3 + n]) == bytes(ranges.read(i, j))
        assert buf[:3] == buf[-3:] == b"\xee" * 3  # nothing written outside the part
    with pytest.raises(ValueError):
        ranges.read_into(0, 1, memoryview(bytearray(ranges.offsets[1] + 1)))  # not the range's size
    name = store.name_of(key(8))
    blob = bytearray(tier.get(name))
    header, start = read_header(bytes(blob))
    blob[start + header["layer_offsets"][3] + 5] ^= 0x01  # one bit of layer 3
    tier.put(name, bytes(blob))
    out = memoryview(bytearray(ranges.offsets[4] - ranges.offsets[2]))
    assert ranges.read_into(2, 4, out) is None and store.corrupt_objects == 1  # refused, the object deleted


@pytest.mark.parametrize("tier", ["disk", "redis", "s3"], indirect=True)
def test_a_truncated_or_swapped_object_gives_no_range(tier):
    store = tier.store
    store.put(key(4), chunk(seed=4))
    store.put(key(5), chunk(seed=5))
    name4, name5 = store.name_of(key(4)), store.name_of(key(5))
    ranges = store.open_ranges(key(4))
    blob = tier.get(name4)
    tier.put(name4, blob[:-100])  # cut in the last layer
    assert bytes(ranges.read(0, 1))  # the first layer still reads
    assert ranges.read(LAYERS - 1, LAYERS) is None and store.corrupt_objects == 1
    ranges5 = store.open_ranges(key(5))
    tier.put(name5, blob)  # another chunk's object (same shape) under this name, after its head was read
    assert ranges5.read(1, 2) is None and store.corrupt_objects == 2
    store.put(key(5), chunk(seed=5))
    ranges5 = store.open_ranges(key(5))
    tier.put(name5, tier.get(name5)[:-100])  # cut again: read into a buffer, the read comes short
    last = memoryview(bytearray(ranges5.offsets[LAYERS] - ranges5.offsets[LAYERS - 1]))
    assert ranges5.read_into(LAYERS - 1, LAYERS, last) is None and store.corrupt_objects == 3


@pytest.mark.parametrize("tier", ["disk", "memory"], indirect=True)
def test_a_damaged_head_is_a_miss_and_the_default_reads_whole(tier):
    store = tier.store
    store.put(key(6), chunk(seed=6))
    name = store.name_of(key(6))
    blob = bytearray(tier.get(name))
    blob[70] ^= 0x01  # in the header: its MAC fails
    tier.put(name, bytes(blob))
    assert store.open_ranges(key(6)) is None and store.corrupt_objects == 1
    if isinstance(store, BytesInMemory):
        store.put(key(7), chunk(seed=7))
        before = store.whole_reads
        r = store.open_ranges(key(7))
        r.read(0, 1)
        assert store.whole_reads - before == 3  # head probe, the rest of the head, the range: each a whole read


def test_a_tier_stack_reads_ranges_side_by_side_on_its_workers(tmp_path):
    disk = DiskBackend(tmp_path, 1 << 26, INT8)
    tiers = TierManager([disk], deadline_s=5.0, read_window=3)
    keys = [key(10 + i) for i in range(4)]
    for i, k in enumerate(keys):
        disk.put(k, chunk(seed=10 + i))
    heads = list(tiers.open_many(keys, tier="disk", ranges=True))
    assert all(h is not None for h in heads)
    calls = [(h.read, (i, i + 1)) for i in range(LAYERS) for h in heads]
    got = list(tiers.run_many(calls, tier="disk"))
    want = [bytes(disk.open(k).encoded_layer(i)[1]) for i in range(LAYERS) for k in keys]
    assert [bytes(g) for g in got] == want
    assert tiers.stats()["disk"]["hits"] == 4
    tiers.close()


@pytest.mark.parametrize("calls", [1, 3, 4, 9])
def test_heads_opened_in_fewer_calls_are_the_same_readers_in_order(tmp_path, calls):
    disk = DiskBackend(tmp_path, 1 << 26, INT8)
    disk.head_calls = 0  # the caller's calls (a disk tier's own: one)
    tiers = TierManager([disk], deadline_s=5.0, read_window=2)
    keys = [key(30 + i) for i in range(4)]
    for i, k in enumerate(keys[:3]):
        disk.put(k, chunk(seed=30 + i))
    keys.insert(1, key(99))  # not stored: a miss in the middle of a call's share
    one_each = list(tiers.open_many(keys, tier="disk", ranges=True))
    batched = list(tiers.open_many(keys, tier="disk", ranges=True, calls=calls))
    assert [r is None for r in batched] == [r is None for r in one_each] == [False, True, False, False, True]
    for a, b in zip(one_each, batched, strict=True):
        if a is not None:
            assert b.offsets == a.offsets and bytes(b.read(0, LAYERS)) == bytes(a.read(0, LAYERS))
    assert tiers.stats()["disk"]["hits"] == 6 and tiers.stats()["disk"]["misses"] == 4
    tiers.close()


def test_a_call_of_heads_that_fails_is_a_miss_for_each_of_its_keys(tmp_path):
    class Failing(DiskBackend):
        def open_ranges(self, k, expected=None):
            if k == key(41):
                raise OSError("disk error")
            return super().open_ranges(k, expected)

    disk = Failing(tmp_path, 1 << 26, INT8)
    tiers = TierManager([disk], deadline_s=5.0, read_window=2)
    keys = [key(40 + i) for i in range(4)]
    for i, k in enumerate(keys):
        disk.put(k, chunk(seed=40 + i))
    disk.head_calls = 0  # the caller's calls
    got = list(tiers.open_many(keys, tier="disk", ranges=True, calls=2))  # (40, 41) and (42, 43)
    assert [r is None for r in got] == [True, True, False, False]
    assert tiers.stats()["disk"]["errors"] == 1 and tiers.stats()["disk"]["misses"] == 2
    disk.head_calls = 1  # a disk tier's own: every head in one call, so the error makes each a miss
    assert DiskBackend.head_calls == 1
    got = list(tiers.open_many(keys, tier="disk", ranges=True, calls=2))
    assert got == [None] * 4 and tiers.stats()["disk"]["errors"] == 2 and tiers.stats()["disk"]["misses"] == 6
    tiers.close()


class CountingDisk(DiskBackend):
    """A disk tier that notes every range it reads (first byte, length)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.ranges: list[tuple[int, int]] = []

    def _get_range(self, name, start, length, limit):
        self.ranges.append((start, length))
        return super()._get_range(name, start, length, limit)


def test_layers_read_with_the_head_are_not_read_again_and_are_still_checked(tmp_path):
    disk = CountingDisk(tmp_path, 1 << 26, INT8)
    disk.put(key(20), chunk(seed=20))
    name = disk.name_of(key(20))
    blob = bytearray(disk._path(name).read_bytes())
    header, start = read_header(bytes(blob))
    offs = header["layer_offsets"]
    disk.head_probe = start + offs[2] + 10  # the head, layers 0-1 and a few bytes of layer 2
    whole = disk.open(key(20))
    ranges = disk.open_ranges(key(20))
    assert disk.ranges == [(0, disk.head_probe)]
    assert bytes(ranges.read(0, 2)) == b"".join(bytes(whole.encoded_layer(k)[1]) for k in range(2))
    assert bytes(ranges.read(1, 2)) == bytes(whole.encoded_layer(1)[1]) and len(disk.ranges) == 1
    assert bytes(ranges.read(1, 3)) == b"".join(bytes(whole.encoded_layer(k)[1]) for k in range(1, 3))
    assert disk.ranges[1:] == [(start + offs[1], offs[3] - offs[1])]  # not within the head's bytes: read
    blob[start + offs[1] + 3] ^= 0x10  # one bit of layer 1, damaged before its head is read
    disk._path(name).write_bytes(bytes(blob))
    damaged = disk.open_ranges(key(20))
    assert bytes(damaged.read(0, 1)) == bytes(whole.encoded_layer(0)[1])
    assert damaged.read(0, 2) is None and disk.corrupt_objects == 1 and not disk.contains(key(20))
