"""Write rows on a background thread while the engine scores the next batch.

On a GPU the teacher's forward leaves the CPU idle, and building rows (numpy) and encoding and writing them (pyarrow,
zstd) would otherwise add their time to every batch. :class:`RowWriterThread` takes scored batches from the engine
loop and builds and writes their rows on one background thread, in submission order, through the same
:func:`rlkd.pipeline.rows.write_rows` and :class:`~rlkd.cache.CacheWriter` as before. The numpy, pyarrow and zstd work
releases the GIL, so it overlaps with the engine.

* **Bounded:** at most ``depth`` scored batches wait; ``submit`` blocks beyond that, which bounds memory.
* **Nothing lost, nothing hidden:** an error on the thread (a full disk, say) is raised in the caller at the next
  ``submit`` or at ``close``; on an error in the caller, batches already scored are still written before it
  propagates. A hard kill loses only rows not yet in a finished shard, which the next run redoes (resume is by
  ``row_id``).
"""

from __future__ import annotations

import queue
import threading

_STOP = object()


class RowWriterThread:
    """``submit(batch, scored)`` queues rows for writing; use as a context manager (``close`` on exit)."""

    def __init__(self, w, cfg, stats: dict, depth: int = 2):
        self.w, self.cfg, self.stats = w, cfg, stats
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="rlkd-row-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        from rlkd.pipeline import rows

        while True:
            item = self._q.get()
            if item is _STOP:
                return
            if self._error is not None:
                continue  # drain without writing after a failure
            batch, scored = item
            try:
                rows.write_rows(batch, scored, self.w, self.cfg, self.stats)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                self._error = e

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, batch: list, scored: list) -> None:
        self._raise_if_failed()
        self._q.put((batch, scored))

    def close(self) -> None:
        """Write everything queued, stop the thread, and raise its error if it had one."""
        if self._thread.is_alive():
            self._q.put(_STOP)
            self._thread.join()
        self._raise_if_failed()

    def __enter__(self) -> "RowWriterThread":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # the caller failed: still write what was scored, but let the caller's error propagate
            try:
                self.close()
            except BaseException:  # noqa: BLE001 - the caller's error is the one to report
                pass
