"""Work on a background thread, bounded and without losing errors: the one helper behind every overlap in rlkd.

Two faces of one mechanism (a daemon thread, a bounded queue, a stop marker, and the thread's error re-raised in the
caller):

* :func:`prefetch` iterates an iterable on a thread and yields its items at most ``depth`` ahead: the cache reader
  reads and decodes the next row groups while the trainer works, ``inspect`` decodes while it summarises.
* :class:`BackgroundSink` runs ``fn(item)`` on a thread for every submitted item, in order: stage 1 builds and writes
  rows while the engine scores the next batch.

numpy, pyarrow, zstd and torch release the GIL in their heavy loops, so one extra thread overlaps real work.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

_STOP = object()


class _Failure:
    """An exception raised on the thread, carried through the queue to the caller."""

    def __init__(self, error: BaseException):
        self.error = error


def prefetch(items: Iterable[T], depth: int = 2, *, name: str = "rlkd-prefetch") -> Iterator[T]:
    """Yield the items of ``items``, produced on a background thread at most ``depth`` items ahead.

    An exception raised while producing is re-raised here, after the items produced before it. Closing the
    generator early (``break``, an error in the caller) stops the thread at its next item; ``depth=0`` iterates in
    the caller, without a thread.
    """
    if depth <= 0:
        yield from items
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            put(_Failure(e))
            return
        put(_STOP)

    thread = threading.Thread(target=work, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _STOP:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


class BackgroundSink(Generic[T]):
    """``submit(item)`` queues ``fn(item)`` for a background thread; use as a context manager.

    * Bounded: at most ``depth`` items wait; ``submit`` blocks beyond that, which bounds memory.
    * In order: items are processed one at a time, in submission order.
    * Nothing hidden: an error on the thread is raised in the caller at the next ``submit`` or at ``close``; after
      it, queued items are dropped. When the caller fails inside the ``with`` block, items already submitted are
      still processed before its error propagates.
    """

    def __init__(self, fn: Callable[[T], None], depth: int = 2, *, name: str = "rlkd-sink"):
        self._fn = fn
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            item = self._q.get()
            if item is _STOP:
                return
            if self._error is not None:
                continue  # drain without processing after a failure
            try:
                self._fn(item)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                self._error = e

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, item: T) -> None:
        self._raise_if_failed()
        self._q.put(item)

    def close(self) -> None:
        """Process everything queued, stop the thread, and raise its error if it had one."""
        if self._thread.is_alive():
            self._q.put(_STOP)
            self._thread.join()
        self._raise_if_failed()

    def __enter__(self) -> BackgroundSink[T]:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # the caller failed: still process what was submitted, but let the caller's error propagate
            try:
                self.close()
            except BaseException:  # noqa: BLE001 - the caller's error is the one to report
                pass
