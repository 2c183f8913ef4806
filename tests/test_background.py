"""rlkd.background: order, bounds, error propagation and early stops of the background-thread helpers."""

from __future__ import annotations

import threading
import time

import pytest

from rlkd.background import BackgroundSink, map_ahead


def test_map_ahead_keeps_order_and_stays_bounded():
    started = []
    lock = threading.Lock()

    def fn(i):
        with lock:
            started.append(i)
        time.sleep(0.001 * (i % 3))  # out-of-order completion
        return i * i

    out = []
    for i, x in enumerate(map_ahead(fn, range(60), workers=3)):
        with lock:
            assert len(started) <= i + 1 + 3  # at most `workers` calls ahead of the consumer
        out.append(x)
    assert out == [i * i for i in range(60)]


def test_map_ahead_reraises_after_the_results_before_the_error():
    def fn(i):
        if i == 2:
            raise OSError("shard-00003.parquet: connection reset")
        return i

    got = []
    with pytest.raises(OSError, match="connection reset"):
        for x in map_ahead(fn, range(5), workers=2):
            got.append(x)
    assert got == [0, 1]


def test_map_ahead_stops_submitting_when_the_consumer_breaks():
    calls = []
    gen = map_ahead(lambda i: calls.append(i) or i, range(10**6), workers=2, name="rlkd-test-ahead")
    assert next(gen) == 0
    gen.close()
    time.sleep(0.05)
    assert len(calls) <= 3  # the one consumed, and at most `workers` more already submitted


def test_map_ahead_with_no_workers_runs_inline():
    assert list(map_ahead(lambda x: -x, [3, 1, 2], workers=0)) == [-3, -1, -2]


def test_sink_processes_in_order_and_reports_errors_at_the_next_submit():
    seen = []
    with BackgroundSink(seen.append, depth=2) as sink:
        for i in range(20):
            sink.submit(i)
    assert seen == list(range(20))

    def fail_on_3(x):
        if x == 3:
            raise OSError("No space left on device")
        seen.append(x)

    seen.clear()
    sink = BackgroundSink(fail_on_3, depth=1)
    with pytest.raises(OSError, match="No space left"):
        for i in range(100):
            sink.submit(i)
        sink.close()
    assert seen == [0, 1, 2]


def test_sink_still_processes_submitted_items_when_the_caller_fails():
    seen = []
    with pytest.raises(KeyboardInterrupt):
        with BackgroundSink(lambda x: (time.sleep(0.01), seen.append(x)), depth=4) as sink:
            for i in range(4):
                sink.submit(i)
            raise KeyboardInterrupt
    assert seen == [0, 1, 2, 3]
