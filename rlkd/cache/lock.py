"""One writer per cache folder: an advisory lock on ``DIR/writer.lock``.

``flock`` locks are released by the kernel when their process dies, so a crash (even SIGKILL) never leaves a stale
lock behind. The holder writes who it is into the file, so a refused second writer can say who holds it. Every
writer of a cache folder takes it: :class:`~rlkd.cache.writer.CacheWriter`, the Ray driver of stage 1, and
``rlkd verify --repair``.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from rlkd.cache.manifest import CacheLockedError
from rlkd.fsutil import utc_now

LOCK_NAME = "writer.lock"


class DirLock:
    """``with DirLock(folder, "who I am"):`` holds ``folder/writer.lock``, or raises :class:`CacheLockedError`."""

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

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
