"""How a reader gets at a shard's bytes, wherever the cache lives (see :mod:`rlkd.cache.storage`).

- A local cache: the file, opened by path.
- An object store: a shard's footer is read once (one ranged read of its tail), then each row group as one ranged
  read of its byte range (Arrow's pre-buffering coalesces its column chunks). An epoch downloads about the cache's
  size once, whatever the shuffle order, and nothing is written to local disk.
- An object store with a local disk cache (:class:`LocalShardCache`): the first use of a shard downloads it whole,
  checked against the manifest's sha256, into the cache folder; later row groups and later epochs read the local
  copy. Beyond the size budget the least recently used shards are deleted.

Every transfer goes through :class:`~rlkd.cache.storage.CacheLocation`, which retries transient failures and
then raises :class:`~rlkd.cache.storage.StorageError` naming the object.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rlkd.cache.manifest import CacheCorruptError
from rlkd.cache.storage import DOWNLOAD_SUFFIX, CacheLocation

GB = 10**9


class _RangedObject:
    """A read-only, seekable Python file over one object: reads are ranged reads through the location (with its
    retries), except the tail, which is kept from the footer read. Wrapped in ``pa.PythonFile`` for Parquet."""

    closed = False

    def __init__(self, loc: CacheLocation, rel: str, size: int, tail: bytes = b""):
        self.loc, self.rel, self.size = loc, rel, int(size)
        self.tail, self.tail_start = tail, int(size) - len(tail)
        self.pos = 0

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else self.size + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        start = self.pos
        end = self.size if n is None or n < 0 else min(self.size, start + n)
        if end <= start:
            return b""
        if start >= self.tail_start:
            data = self.tail[start - self.tail_start:end - self.tail_start]
        else:
            data = self.loc.read_range(self.rel, start, end - start)
        self.pos = end
        return data

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        pass


FOOTER_READ = 64 << 10
"""Bytes read from a shard's end to get its footer in one request (Arrow's own default); longer footers cost a
second read."""


class LocalShardCache:
    """Whole-shard copies of remote caches in a local folder, at most ``max_bytes`` in all, least recently used out.

    Files are named by their manifest sha256 (``<sha256>.parquet``), so a shard is never served stale, the same
    shard reached through two URLs is stored once, and several processes (ranks on one node) can share the folder:
    each download goes to a temporary name and is renamed into place, and a file another process evicts is fetched
    again. Recency is the file's modification time, touched on every use, so it survives restarts.
    """

    def __init__(self, directory: str | Path, max_bytes: int):
        self.dir = Path(directory).expanduser()
        self.max_bytes = int(max_bytes)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(f"--local-cache {self.dir} cannot be created ({e.strerror}): choose a writable folder") \
                from None
        if not os.access(self.dir, os.W_OK):
            raise OSError(f"--local-cache {self.dir} is not writable: choose a writable folder")
        for tmp in self.dir.glob(f".*{DOWNLOAD_SUFFIX}"):  # left by a killed process (no download takes an hour)
            try:
                if time.time() - tmp.stat().st_mtime > 3600:
                    tmp.unlink()
            except OSError:
                pass
        self._lock = threading.Lock()
        self._busy: dict[str, threading.Lock] = {}
        self._reserved = 0  # bytes of downloads in flight
        self.downloaded_bytes = 0
        """Bytes this process downloaded into the cache."""
        self.hits = 0
        self.misses = 0

    def path_of(self, sha256: str) -> Path:
        return self.dir / f"{sha256}.parquet"

    def fetch(self, loc: CacheLocation, rel: str, *, sha256: str, size: int) -> Path:
        """The local copy of shard ``rel`` (downloaded and checked now if missing); marks it most recently used."""
        path = self.path_of(sha256)
        with self._lock:
            busy = self._busy.setdefault(sha256, threading.Lock())
        with busy:  # one download per shard, while other threads fetch other shards
            try:
                if path.stat().st_size == size:
                    os.utime(path)
                    with self._lock:
                        self.hits += 1
                    return path
            except FileNotFoundError:
                pass
            with self._lock:  # evict and reserve together, so parallel downloads stay within the budget
                self._make_room(size)
                self._reserved += size
            try:
                digest = loc.download(rel, path, expected_sha256=sha256)
            finally:
                with self._lock:
                    self._reserved -= size
            with self._lock:
                self.downloaded_bytes += size
                self.misses += 1
            if digest != sha256:  # nothing was kept
                raise CacheCorruptError(f"shard {loc.name(rel)}: the downloaded copy has sha256 {digest[:12]}..., "
                                        f"the manifest says {sha256[:12]}... (the object was modified or is "
                                        f"corrupt): run `rlkd verify {loc.url}`")
            return path

    def _make_room(self, incoming: int) -> None:
        """Delete least recently used copies until ``incoming`` more bytes fit (called under the lock). A shard is
        downloaded even when it cannot fit: the budget is then exceeded by what the reader needs right now."""
        entries = []
        for p in self.dir.glob("*.parquet"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            entries.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in entries) + self._reserved
        for _, size, p in sorted(entries):
            if total + incoming <= self.max_bytes:
                break
            p.unlink(missing_ok=True)  # a reader that has it open keeps reading (POSIX); new opens fetch again
            total -= size

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.dir.glob("*.parquet"))


class ShardOpener:
    """Opens a cache's shards as ``pq.ParquetFile`` (page CRCs checked), wherever they live.

    ``open(rel, entry)`` parses the footer (cached for remote shards); ``open(rel, entry, metadata=md)`` is cheap
    (no footer read) and gives each reading thread its own file handle, so threads read row groups in parallel.
    """

    def __init__(self, loc: CacheLocation, local_cache: LocalShardCache | None = None):
        self.loc = loc
        self.local_cache = local_cache if not loc.is_local else None  # a local cache needs no copy

    def local_file(self, rel: str, entry: dict) -> Path | None:
        """The local file holding ``rel`` (the cache's own, or its local-cache copy), or None (ranged reads)."""
        path = self.loc.local_path(rel)
        if path is not None:
            return path
        if self.local_cache is not None:
            return self.local_cache.fetch(self.loc, rel, sha256=entry["sha256"], size=int(entry["bytes"]))
        return None

    def open(self, rel: str, entry: dict, metadata: pq.FileMetaData | None = None) -> pq.ParquetFile:
        for attempt in (0, 1):
            path = self.local_file(rel, entry)
            if path is None:
                return self._open_ranged(rel, entry, metadata)
            try:
                return pq.ParquetFile(path, metadata=metadata, page_checksum_verification=True, memory_map=False)
            except FileNotFoundError:
                if self.local_cache is None or attempt:
                    raise
                # evicted by another process between fetch and open: fetch it again
        raise AssertionError("unreachable")

    def _open_ranged(self, rel: str, entry: dict, metadata) -> pq.ParquetFile:
        size = int(entry["bytes"])
        tail = b""
        if metadata is None:  # the footer, in one request
            n = min(size, FOOTER_READ)
            tail = self.loc.read_range(rel, size - n, n)
        obj = _RangedObject(self.loc, rel, size, tail)
        return pq.ParquetFile(pa.PythonFile(obj, mode="r"), metadata=metadata, pre_buffer=True,
                              page_checksum_verification=True)
