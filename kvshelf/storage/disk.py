"""Warm tier: one file per chunk in a local directory, with a byte capacity and LRU eviction.

Writes are atomic (temp file in the same directory, optional fsync, rename), so a crash leaves either the
old state or the new, never a half file under a real name. On start the index is rebuilt from the files:
leftover temp files are removed, and so is any file whose header, name or size does not check out (a
file of any content never stops the start; what is not a regular file is left alone).
One process owns a directory; processes that share KV share it through Redis or S3.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import uuid
from collections import OrderedDict
from pathlib import Path

from kvshelf.codecs import Codec
from kvshelf.metrics import Metrics
from kvshelf.storage.auth import ObjectAuth
from kvshelf.storage.expect import MAX_HEADER_BYTES
from kvshelf.storage.format import PREFIX_SIZE, FormatError, OtherVersion, read_header
from kvshelf.storage.serialized import ByteStore, ObjectTooLarge

log = logging.getLogger(__name__)

SUFFIX = ".kvs"
TMP_MARK = ".tmp-"
_HEADER_PROBE = PREFIX_SIZE + MAX_HEADER_BYTES  # the most a header can take; read no more when indexing


class DiskBackend(ByteStore):
    name = "disk"
    head_calls = 1  # heads come from the page cache: one worker parses them all (StorageBackend.head_calls)

    def __init__(
        self,
        path: str | os.PathLike,
        capacity_bytes: int,
        codec: Codec,
        *,
        fsync: bool = False,
        auth: ObjectAuth | None = None,
        metrics: Metrics | None = None,
    ):
        super().__init__(codec, auth=auth, metrics=metrics)
        if capacity_bytes <= 0:
            raise ValueError(f"disk tier capacity must be > 0 bytes, got {capacity_bytes}")
        self.root = Path(path).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self._capacity = int(capacity_bytes)
        self.fsync = fsync
        self._lock = threading.Lock()
        self._index: OrderedDict[str, int] = OrderedDict()  # name -> size, least recently used first
        self._used = 0
        self.evictions = 0
        self._rebuild_index()

    # -- paths and index ---------------------------------------------------------------------------
    def _path(self, name: str) -> Path:
        return self.root / name[:2] / (name + SUFFIX)

    def _rebuild_index(self) -> None:
        """Index the files found; remove leftovers and anything that does not check out. No file, of any
        content or kind, stops the start: the worst is a warning and a removal (or, for what is not a
        regular file, leaving it alone)."""
        found: list[tuple[float, str, int]] = []
        removed = 0
        self._outdated = 0
        try:
            subdirs = [d for d in self.root.iterdir() if d.is_dir() and not d.is_symlink()]
        except OSError as err:
            raise OSError(f"disk tier: cannot list {self.root}: {err}") from err
        for sub in subdirs:
            try:
                paths = list(sub.iterdir())
            except OSError as err:
                log.warning("disk tier: skipping unreadable folder %s: %s", sub, err)
                continue
            for path in paths:
                entry = self._index_entry(path)
                if entry is None:
                    removed += 1
                elif entry != ():
                    found.append(entry)
        for _, name, size in sorted(found):
            self._index[name] = size
            self._used += size
        if removed:
            self.corrupt_objects += removed
        log.info(
            "disk tier %s: %d chunks, %d bytes; %d damaged or partial files removed, %d of another format "
            "version (written by another kvshelf version) removed",
            self.root,
            len(self._index),
            self._used,
            removed,
            self._outdated,
        )
        with self._lock:
            self._evict_until(0)

    def _index_entry(self, path: Path):
        """(mtime, name, size) for a sound object file; None for a damaged one (removed); () for anything
        else (left alone, or a file of another format version, removed and counted apart)."""
        try:
            st = path.lstat()
            if not stat.S_ISREG(st.st_mode):
                log.warning("disk tier: leaving %s alone: not a regular file", path)
                return ()
            if TMP_MARK in path.name:  # a write that never reached its rename
                path.unlink(missing_ok=True)
                return None
            if path.suffix != SUFFIX:
                return ()
            with open(path, "rb") as f:
                header, _ = read_header(f.read(_HEADER_PROBE), expected_size=st.st_size)
            if self.name_of(bytes.fromhex(header["key"])) != path.stem or path.parent.name != path.stem[:2]:
                raise FormatError("file name is not this tier's name for the key in its header")
        except Exception as err:  # noqa: BLE001 - damage of any kind: remove, never fail the start
            outdated = isinstance(err, OtherVersion)
            if not outdated:  # an upgrade's old files are counted in one line, not one each
                log.warning("disk tier: removing damaged file %s: %s: %s", path, type(err).__name__, err)
            try:
                path.unlink(missing_ok=True)
            except OSError as unlink_err:
                log.warning("disk tier: cannot remove %s: %s", path, unlink_err)
            if outdated:
                self._outdated += 1
                return ()
            return None
        return (st.st_mtime, path.stem, st.st_size)

    def _evict_until(self, incoming: int) -> None:
        """Drop least recently used files until `incoming` more bytes fit. Caller holds the lock."""
        while self._index and self._used + incoming > self._capacity:
            name, size = self._index.popitem(last=False)
            self._used -= size
            self.evictions += 1
            self._path(name).unlink(missing_ok=True)

    # -- byte verbs ----------------------------------------------------------------------------------
    def _put_bytes(self, name: str, parts: list) -> bool:
        size = sum(len(p) for p in parts)
        if size > self._capacity:
            return False
        with self._lock:
            if name in self._index:
                self._index.move_to_end(name)
                return True
            self._evict_until(size)
            if self._used + size > self._capacity:
                return False  # the rest is reserved by writes in flight, which cannot be evicted: drop this one
            # Reserve the space now so concurrent writers cannot overshoot the capacity.
            self._used += size
        path = self._path(name)
        tmp = path.with_name(f"{path.name}{TMP_MARK}{uuid.uuid4().hex}")
        try:
            path.parent.mkdir(exist_ok=True)
            with open(tmp, "wb", buffering=0) as f:
                for part in parts:
                    f.write(part)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
            if self.fsync:
                dir_fd = os.open(path.parent, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        except BaseException:
            tmp.unlink(missing_ok=True)
            with self._lock:
                self._used -= size
            raise
        with self._lock:
            if name in self._index:  # a concurrent writer of the same chunk won: keep one count
                self._used -= size
            else:
                self._index[name] = size
        return True

    def _get_bytes(self, name: str, limit: int) -> bytes | None:
        return self._pread(name, 0, limit, limit)

    def _get_range(self, name: str, start: int, length: int, limit: int) -> bytes | None:
        return self._pread(name, start, length, limit)

    def _file_of(self, name: str) -> str | None:
        with self._lock:
            if name not in self._index:
                return None
            self._index.move_to_end(name)
        return str(self._path(name))

    def _forget_name(self, name: str) -> None:
        self._forget(name)

    def _get_range_into(self, name: str, start: int, out: memoryview, limit: int) -> int | None:
        return self._pread(name, start, out.nbytes, limit, out)

    def _pread(self, name: str, start: int, length: int, limit: int, out: memoryview | None = None):
        """Up to `length` bytes of the file from `start` (the whole file: start 0, length `limit`); with `out`,
        read into it (os.preadv: the page cache's bytes copied once, into the caller's buffer) and their count."""
        with self._lock:
            if name not in self._index:
                return None
            self._index.move_to_end(name)
        try:
            with open(self._path(name), "rb", buffering=0) as f:
                fd = f.fileno()
                size = os.fstat(fd).st_size
                if size > limit:
                    raise ObjectTooLarge(f"file of {size} bytes; no expected chunk is larger than {limit}")
                n = max(0, min(length, size - start))
                # one copy out of the page cache; decoding views it (shorter than asked where the file shrank:
                # the format's checks refuse that)
                if out is None:
                    return os.pread(fd, n, start)
                got = 0
                while got < n:  # preadv may return fewer bytes than asked (signals, very large reads)
                    step = os.preadv(fd, [out[got:n]], start + got)
                    if step == 0:
                        break
                    got += step
                return got
        except FileNotFoundError:  # removed behind our back
            self._forget(name)
            return None

    def _forget(self, name: str) -> None:
        with self._lock:
            size = self._index.pop(name, None)
            if size is not None:
                self._used -= size

    def _delete_name(self, name: str) -> None:
        self._forget(name)
        self._path(name).unlink(missing_ok=True)

    def contains(self, key: bytes) -> bool:
        name = self.name_of(key)
        with self._lock:
            return name in self._index

    def clear(self) -> None:
        with self._lock:
            names = list(self._index)
            self._index.clear()
            self._used = 0
        for name in names:
            self._path(name).unlink(missing_ok=True)

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def num_chunks(self) -> int:
        return len(self._index)
