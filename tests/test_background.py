"""rlkd.background: order, bounds, error propagation and early stops of the one background-thread helper."""

from __future__ import annotations

import threading
import time

import pytest

from rlkd.background import BackgroundSink, prefetch


def test_prefetch_yields_everything_in_order_and_stays_bounded():
    produced = []

    def items():
        for i in range(50):
            produced.append(i)
            yield i

    out = []
    for i, x in enumerate(prefetch(items(), depth=3)):
        time.sleep(0.002)
        # The producer is at most depth items in the queue plus one in hand ahead of the consumer.
        assert len(produced) <= i + 1 + 3 + 1
        out.append(x)
    assert out == list(range(50))


def test_prefetch_reraises_after_the_items_before_the_error():
    def items():
        yield 1
        yield 2
        raise OSError("shard-00003.parquet: connection reset")

    got = []
    with pytest.raises(OSError, match="connection reset"):
        for x in prefetch(items(), depth=2):
            got.append(x)
    assert got == [1, 2]


def test_prefetch_stops_its_thread_when_the_caller_breaks():
    before = threading.active_count()
    gen = prefetch(iter(range(10**9)), depth=2, name="rlkd-test-prefetch")
    assert next(gen) == 0
    gen.close()
    assert not [t for t in threading.enumerate() if t.name == "rlkd-test-prefetch"]
    assert threading.active_count() == before


def test_prefetch_depth_zero_runs_inline():
    assert list(prefetch(iter([3, 1, 2]), depth=0)) == [3, 1, 2]


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
