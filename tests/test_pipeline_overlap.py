"""RowWriterThread: rows written in order on a background thread, errors raised in the caller, nothing dropped."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest

import rlkd.pipeline.rows as rows_mod
from rlkd.pipeline.overlap import RowWriterThread


class FakeWriter:
    def __init__(self, fail_at: int | None = None):
        self.written, self.fail_at, self.threads = [], fail_at, set()

    def write(self, row) -> bool:
        self.threads.add(threading.current_thread().name)
        if self.fail_at is not None and len(self.written) == self.fail_at:
            raise OSError(28, "No space left on device")
        self.written.append(row.ex)
        return True


@pytest.fixture(autouse=True)
def fake_rows(monkeypatch):
    def build_row(ex, scored, k, min_prob, min_k):
        return SimpleNamespace(ex=ex, input_ids=np.zeros(ex + 2), num_positions=ex + 1)
    monkeypatch.setattr(rows_mod, "build_row", build_row)


CFG = SimpleNamespace(top_k=4, min_prob=None, min_k=1)


def stats():
    return {"rows": 0, "tokens": 0, "positions": 0}


def test_writes_every_row_in_order_off_the_caller_thread():
    w, st = FakeWriter(), stats()
    with RowWriterThread(w, CFG, st, depth=1) as sink:
        for b in range(5):
            batch = list(range(3 * b, 3 * b + 3))
            sink.submit(batch, [None] * 3)
    assert w.written == list(range(15))
    assert st == {"rows": 15, "tokens": sum(i + 2 for i in range(15)), "positions": sum(i + 1 for i in range(15))}
    assert w.threads == {"rlkd-row-writer"}


def test_a_write_error_reaches_the_caller_and_earlier_rows_stay_written():
    w = FakeWriter(fail_at=4)
    with pytest.raises(OSError, match="No space left"):
        with RowWriterThread(w, CFG, stats(), depth=1) as sink:
            for b in range(10):
                sink.submit([2 * b, 2 * b + 1], [None, None])
    assert w.written == [0, 1, 2, 3]


def test_a_caller_error_still_writes_what_was_scored():
    w = FakeWriter()
    with pytest.raises(RuntimeError, match="engine died"):
        with RowWriterThread(w, CFG, stats()) as sink:
            sink.submit([0, 1], [None, None])
            sink.submit([2], [None])
            raise RuntimeError("engine died")
    assert w.written == [0, 1, 2]
