"""Work on a background thread, bounded and without losing errors: the one helper behind every overlap in rlkd.

Two faces of one mechanism (a daemon thread, a bounded queue, a stop marker, and the thread's error re-raised in the
caller):

* :func:`map_ahead` computes ``fn(item)`` on background threads, in order, a bounded number ahead of the consumer:
  the cache reader reads and decodes the next row groups while the trainer works (or ``inspect`` summarises).
* :class:`BackgroundSink` runs ``fn(item)`` on a thread for every submitted item, in order: stage 1 builds and writes
  rows while the engine scores the next batch.

numpy, pyarrow, zstd and torch release the GIL in their heavy loops, so one extra thread overlaps real work.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_STOP = object()


def map_ahead(fn: Callable[[T], R], items: Iterable[T], workers: int = 2, *,
              name: str = "rlkd-ahead") -> Iterator[R]:
    """``fn(item)`` for every item, in order, computed by ``workers`` background threads at most ``workers`` items
    ahead of the consumer (so memory holds at most ``workers`` results).

    An exception raised by ``fn`` is re-raised here, in the consumer's thread, after the results before it.
    Abandoning the iteration (``break``, an error in the consumer) cancels what has not started; calls already
    running finish on their own. ``workers=0`` computes in the caller, without a thread.
    """
    if workers <= 0:
        for item in items:
            yield fn(item)
        return
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
    todo = iter(items)
    inflight: deque = deque()
    try:
        for item in todo:
            inflight.append(pool.submit(fn, item))
            if len(inflight) >= workers:
                break
        while inflight:
            result = inflight.popleft().result()  # re-raises a failed call here
            nxt = next(todo, _STOP)
            if nxt is not _STOP:
                inflight.append(pool.submit(fn, nxt))
            yield result
            del result
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


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
