"""Stage 1 writes rows on a background thread (rlkd.background.BackgroundSink around rows.write_rows): in order,
errors raised in the caller, nothing dropped; RunStats counts exactly across threads."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest

import rlkd.pipeline.engines as rows_mod
from rlkd.background import BackgroundSink
from rlkd.pipeline.stats import RunStats


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
    return RunStats()


def row_writer(w, st, depth=2):
    """What cache_teacher runs: write_rows on a background thread."""
    return BackgroundSink(lambda item: rows_mod.write_rows(*item, w, CFG, st), depth=depth, name="rlkd-row-writer")


def test_writes_every_row_in_order_off_the_caller_thread():
    w, st = FakeWriter(), stats()
    with row_writer(w, st, depth=1) as sink:
        for b in range(5):
            batch = list(range(3 * b, 3 * b + 3))
            sink.submit((batch, [None] * 3))
    assert w.written == list(range(15))
    snap = st.snapshot()
    assert (snap["rows"], snap["tokens"], snap["positions"]) == (15, sum(i + 2 for i in range(15)),
                                                                 sum(i + 1 for i in range(15)))
    assert w.threads == {"rlkd-row-writer"}


def test_a_write_error_reaches_the_caller_and_earlier_rows_stay_written():
    w = FakeWriter(fail_at=4)
    with pytest.raises(OSError, match="No space left"):
        with row_writer(w, stats(), depth=1) as sink:
            for b in range(10):
                sink.submit(([2 * b, 2 * b + 1], [None, None]))
    assert w.written == [0, 1, 2, 3]


def test_a_caller_error_still_writes_what_was_scored():
    w = FakeWriter()
    with pytest.raises(RuntimeError, match="engine died"):
        with row_writer(w, stats()) as sink:
            sink.submit(([0, 1], [None, None]))
            sink.submit(([2], [None]))
            raise RuntimeError("engine died")
    assert w.written == [0, 1, 2]


def test_run_stats_count_exactly_when_two_threads_add_and_a_third_reads():
    st = RunStats()
    snaps = []

    def add():
        for _ in range(20000):
            st.add(rows=1, tokens=3, engine_s=0.5)

    threads = [threading.Thread(target=add) for _ in range(2)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        snaps.append(st.snapshot())
    for t in threads:
        t.join()
    assert st.snapshot()["rows"] == 40000 and st.snapshot()["tokens"] == 120000
    # every snapshot is consistent: taken between two whole add() calls
    assert all(s["tokens"] == 3 * s["rows"] and s["engine_s"] == 0.5 * s["rows"] for s in snaps)
    assert RunStats.total([st.snapshot(), st.snapshot()])["rows"] == 80000
