"""Disk tier: atomic files, capacity, restart, damage, crash between write and rename, a full disk."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import key, make_chunk

from kvshelf.codecs import get_codec
from kvshelf.storage.disk import TMP_MARK, DiskBackend

RAW = get_codec("none")


def files(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("*/*") if p.is_file())


def test_round_trip_and_restart(tmp_path):
    disk = DiskBackend(tmp_path, 1 << 30, RAW)
    chunks = {key(i): make_chunk(seed=i) for i in range(5)}
    for k, c in chunks.items():
        assert disk.put(k, c)
    again = DiskBackend(tmp_path, 1 << 30, RAW)  # a new process would see the same
    assert again.num_chunks == 5 and again.used_bytes == disk.used_bytes
    for k, c in chunks.items():
        assert again.contains(k)
        assert torch.equal(again.get(k).kv, c.kv)


def test_capacity_evicts_least_recently_used(tmp_path):
    one = files_after_put(tmp_path).stat().st_size
    disk = DiskBackend(tmp_path / "d", 3 * one, RAW)
    for i in range(3):
        disk.put(key(i), make_chunk(seed=i))
    disk.get(key(0))  # 0 is now the most recent
    disk.put(key(3), make_chunk(seed=3))
    assert not disk.contains(key(1)) and all(disk.contains(key(i)) for i in (0, 2, 3))
    assert disk.used_bytes <= 3 * one and len(files(tmp_path / "d")) == 3 and disk.evictions == 1
    # An object larger than the whole tier is refused, nothing is evicted for it.
    assert not DiskBackend(tmp_path / "small", one - 1, RAW).put(key(9), make_chunk())


def files_after_put(tmp_path) -> Path:
    probe = DiskBackend(tmp_path / "probe", 1 << 30, RAW)
    probe.put(key(0), make_chunk())
    return files(tmp_path / "probe")[0]


def test_damaged_files_are_removed_on_restart(tmp_path):
    disk = DiskBackend(tmp_path, 1 << 30, RAW)
    for i in range(4):
        disk.put(key(i), make_chunk(seed=i))
    paths = {p.stem: p for p in files(tmp_path)}
    truncated, header_hit, renamed = (paths[disk.name_of(key(i))] for i in range(3))
    truncated.write_bytes(truncated.read_bytes()[:100])
    data = bytearray(header_hit.read_bytes())
    data[40] ^= 0xFF
    header_hit.write_bytes(bytes(data))
    os.rename(renamed, renamed.with_name(disk.name_of(key(7)) + ".kvs"))  # a file under another key's name
    (tmp_path / "ab").mkdir(exist_ok=True)
    (tmp_path / "ab" / ("ab" * 16 + ".kvs" + TMP_MARK + "x")).write_bytes(b"partial")
    again = DiskBackend(tmp_path, 1 << 30, RAW)
    assert again.num_chunks == 1 and again.contains(key(3))
    assert again.corrupt_objects == 4
    assert [p.stem for p in files(tmp_path)] == [disk.name_of(key(3))]


def test_payload_damage_is_a_miss_and_deletes_the_file(tmp_path):
    disk = DiskBackend(tmp_path, 1 << 30, RAW)
    disk.put(key(1), make_chunk())
    path = files(tmp_path)[0]
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # one bit in the payload: the header still checks out at start-up
    path.write_bytes(bytes(data))
    assert disk.get(key(1)) is None
    assert not path.exists() and not disk.contains(key(1)) and disk.corrupt_objects == 1


CHILD = textwrap.dedent(
    """
    import os, signal, sys, resource
    sys.path.insert(0, {tests!r})
    from helpers import key, make_chunk
    from kvshelf.codecs import get_codec
    from kvshelf.storage.disk import DiskBackend
    disk = DiskBackend({root!r}, 1 << 30, get_codec("none"))
    disk.put(key(1), make_chunk(seed=1))
    mode = sys.argv[1]
    if mode == "kill-before-rename":
        os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
        disk.put(key(2), make_chunk(seed=2))
    elif mode == "disk-full":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
        from kvshelf.storage.tiers import TierManager
        tiers = TierManager([disk])
        assert tiers.put(key(2), make_chunk(seed=2, tokens=64))  # queued: the write happens behind
        tiers.flush()
        print("stats", tiers.stats()["disk"]["errors"], tiers.stats()["disk"]["dropped_writes"])
        print("get", tiers.get(key(2)) is None)
        tiers.close()
    """
)


def run_child(tmp_path, mode):
    script = CHILD.format(tests=str(Path(__file__).parent), root=str(tmp_path))
    return subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=120)


def test_crash_between_write_and_rename(tmp_path):
    proc = run_child(tmp_path, "kill-before-rename")
    assert proc.returncode == -9
    assert any(TMP_MARK in p.name for p in files(tmp_path))  # the half-done write is on disk ...
    again = DiskBackend(tmp_path, 1 << 30, RAW)
    assert not any(TMP_MARK in p.name for p in files(tmp_path))  # ... and gone after restart
    assert again.contains(key(1)) and not again.contains(key(2))
    assert torch.equal(again.get(key(1)).kv, make_chunk(seed=1).kv)


def test_disk_full_drops_the_write_without_raising(tmp_path):
    proc = run_child(tmp_path, "disk-full")
    assert proc.returncode == 0, proc.stderr
    assert "stats 1 1" in proc.stdout and "get True" in proc.stdout
    assert not any(TMP_MARK in p.name for p in files(tmp_path))  # the failed write cleaned up
    again = DiskBackend(tmp_path, 1 << 30, RAW)
    assert again.contains(key(1)) and not again.contains(key(2))


def test_concurrent_writers_never_overshoot_the_capacity(tmp_path, monkeypatch):
    """Space reserved by writes in flight cannot be evicted: a write that would not fit is dropped."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    import kvshelf.storage.disk as disk_module

    one = files_after_put(tmp_path).stat().st_size
    real_replace = os.replace

    def slow_replace(src, dst):  # keeps several writes in flight at once, as a slow disk would
        time.sleep(0.02)
        real_replace(src, dst)

    monkeypatch.setattr(disk_module.os, "replace", slow_replace)
    disk = DiskBackend(tmp_path / "d", 3 * one, RAW)
    chunks = [make_chunk(seed=i) for i in range(24)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: disk.put(key(i), chunks[i]), range(24)))
    on_disk = sum(p.stat().st_size for p in files(tmp_path / "d"))
    assert disk.used_bytes <= 3 * one and on_disk <= 3 * one
    assert on_disk == disk.used_bytes


@pytest.mark.parametrize("tokens", [16, 256])  # the object comes whole with the head's probe, or it does not
def test_an_object_longer_than_its_head_says_gives_no_ranges_and_is_deleted(tmp_path, tokens):
    disk = DiskBackend(tmp_path, 1 << 30, RAW)
    disk.put(key(1), make_chunk(tokens=tokens))
    path = files(tmp_path)[0]
    assert (path.stat().st_size > disk.head_probe) == (tokens == 256)
    path.write_bytes(path.read_bytes() + b"trailing")
    ranges = disk.open_ranges(key(1))
    if tokens == 16:
        assert ranges is None  # it came whole with the head
    else:
        assert ranges.read(2, 3) is None  # a range read bounds the file by the head's size
    assert not path.exists() and not disk.contains(key(1)) and disk.corrupt_objects == 1
