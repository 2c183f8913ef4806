"""One writer per cache: ``writer_lock(where, holder)``, a local folder lock or an object-store lease.

Every writer of a cache takes it: :class:`~rlkd.cache.writer.CacheWriter`, the Ray driver of stage 1, and
``rlkd verify --repair``. Both kinds have one interface: ``acquire()`` (or ``with``) refuses with
:class:`~rlkd.cache.manifest.CacheLockedError` naming the holder; ``check()`` raises once the writer may no longer
write; ``read(rel)`` / ``put(rel, data)`` / ``remove(rel)`` read and replace the objects the lock guards (the manifest);
``release()``; ``took_over`` (an expired lease this writer replaced, else None).

- A local folder (:class:`DirLock`): an advisory ``flock`` on ``DIR/writer.lock``. The kernel releases it when its
  process dies, so a crash (even SIGKILL) never leaves a stale lock behind. The holder writes who it is into the file,
  so a refused second writer can say who holds it. ``put`` is an atomic replace (temporary, fsync, rename).
- An object store (:class:`~rlkd.cache.lease.Lease`): a lease object ``PREFIX/writer.lease`` renewed while the writer
  lives; see :mod:`rlkd.cache.lease` for the protocol and exactly what it guarantees.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from rlkd.cache.lease import DEFAULT_LEASE_SECONDS, Lease
from rlkd.cache.manifest import CacheLockedError, atomic_write
from rlkd.fsutil import utc_now

LOCK_NAME = "writer.lock"


def writer_lock(where, holder: str, *, lease_seconds: float = DEFAULT_LEASE_SECONDS):
    """The writer lock of the cache at ``where`` (a path, a URL or a CacheLocation), not yet acquired: a
    :class:`DirLock` for a local folder, a :class:`~rlkd.cache.lease.Lease` of ``lease_seconds`` on a store."""
    from rlkd.cache.storage import CacheLocation

    loc = CacheLocation.parse(where)
    if loc.is_local:
        return DirLock(loc.local_path(), holder)
    return Lease(loc, holder, seconds=lease_seconds)


class DirLock:
    """``with DirLock(folder, "who I am"):`` holds ``folder/writer.lock``, or raises :class:`CacheLockedError`."""

    took_over = None
    """A kernel lock is never taken over (the interface of :class:`~rlkd.cache.lease.Lease`)."""

    def __init__(self, folder: str | Path, holder: str):
        self.folder = Path(folder)
        self.holder = holder
        self._fd: int | None = None

    def acquire(self) -> DirLock:
        fd = os.open(self.folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                other = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "an unknown process"
            finally:
                os.close(fd)
            raise CacheLockedError(
                f"{self.folder} is being written by another rlkd process ({other}). Only one writer may change a "
                "cache at a time: wait for it to finish, stop it, or write to another folder (several workers write "
                "sibling folders, merged afterwards). The lock is released automatically when that process exits."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{self.holder}, pid {os.getpid()} on {socket.gethostname()} since {utc_now()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def check(self) -> None:
        """Nothing to do: the kernel holds the lock for as long as this process lives."""

    def read(self, rel: str) -> bytes | None:
        try:
            return (self.folder / rel).read_bytes()
        except FileNotFoundError:
            return None

    def put(self, rel: str, data: bytes) -> None:
        atomic_write(self.folder / rel, data)

    def remove(self, rel: str) -> None:
        (self.folder / rel).unlink(missing_ok=True)

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
