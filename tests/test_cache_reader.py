"""CacheReader: batches of rows vs the written rows, rank split, per-epoch order, exact resume, errors."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlkd.cache import CacheReader, CacheWriter
from rlkd.cache.reader import buffer_shuffle_order
from tests.cache_helpers import assert_rows_equal, make_rows, test_meta

K = 6


@pytest.fixture(scope="module")
def rows():
    # fixed-k rows and adaptive-k rows mixed, lengths 2..30
    return make_rows(70, k=K, seed=11, max_len=30) + make_rows(33, k=K, seed=12, source_offset=500, max_len=30,
                                                              min_prob=3e-2)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, rows):
    out = tmp_path_factory.mktemp("reader-cache")
    with CacheWriter(out, test_meta(), k=K, codec="fp32", row_group_rows=9, shard_max_bytes=12_000) as w:
        for r in rows:
            w.write(r)
    return out


def ids_of(reader) -> list[str]:
    return [r.row_id for b in reader for r in b]


def test_batches_hold_the_written_rows(cache, rows):
    """Each batch is a list of decoded, unpadded rows equal to what was written (padding is core.targets.collate's,
    tested in tests/test_core_targets.py)."""
    by_id = {r.row_id: r for r in rows}
    batches = list(CacheReader(cache, batch_size=5, shuffle=False))
    assert [len(b) for b in batches] == [5] * (len(rows) // 5) + ([len(rows) % 5] if len(rows) % 5 else [])
    for batch in batches:
        for r in batch:
            assert_rows_equal(r, by_id[r.row_id])


def test_no_shuffle_is_file_order(cache, rows):
    assert ids_of(CacheReader(cache, batch_size=7, shuffle=False)) == [r.row_id for r in rows]
    assert [r.row_id for r in CacheReader(cache).iter_rows()] == [r.row_id for r in rows]


@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 8])
def test_union_over_ranks_is_the_cache_exactly_once(cache, rows, world_size):
    per_rank = []
    for rank in range(world_size):
        rd = CacheReader(cache, batch_size=4, seed=3, rank=rank, world_size=world_size, shuffle_buffer=10)
        ids = ids_of(rd)
        assert len(ids) == rd.num_rows and rd.num_batches == -(-len(ids) // 4)
        assert rd.min_num_batches <= rd.num_batches
        per_rank.append(ids)
    flat = [i for ids in per_rank for i in ids]
    assert sorted(flat) == sorted(r.row_id for r in rows) and len(flat) == len(set(flat))
    sizes = [len(ids) for ids in per_rank]
    assert max(sizes) - min(sizes) <= 1


def test_epochs_differ_and_seed_repeats(cache):
    def order(seed, epoch):
        return ids_of(CacheReader(cache, batch_size=8, seed=seed, epoch=epoch, shuffle_buffer=16))

    e0, e1 = order(0, 0), order(0, 1)
    assert sorted(e0) == sorted(e1) and e0 != e1
    assert order(0, 0) == e0 and order(0, 1) == e1
    assert order(1, 0) != e0
    rd = CacheReader(cache, batch_size=8, seed=0, shuffle_buffer=16)
    assert ids_of(rd) == e0
    assert ids_of(rd) == []  # the epoch is finished until set_epoch
    rd.set_epoch(1)
    assert ids_of(rd) == e1
    rd.reset()
    assert ids_of(rd) == e1


def _batches(reader, limit=None):
    """The first ``limit`` batches (all if None), pulling exactly that many from the reader."""
    return list(itertools.islice(iter(reader), limit))


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert_rows_equal(x, y)


@settings(max_examples=20, deadline=None)
@given(stop=st.integers(0, 40), world_size=st.sampled_from([1, 2, 3]), buffer=st.sampled_from([0, 1, 5, 64]),
       batch_size=st.sampled_from([1, 3, 8]), epoch=st.integers(0, 2), prefetch=st.sampled_from([0, 2]))
def test_resume_anywhere_equals_uninterrupted(cache, stop, world_size, buffer, batch_size, epoch, prefetch):
    kw = dict(batch_size=batch_size, seed=7, world_size=world_size, rank=world_size - 1, shuffle_buffer=buffer,
              epoch=epoch, prefetch=prefetch)
    full = _batches(CacheReader(cache, **kw))
    stop = min(stop, len(full))
    first = CacheReader(cache, **kw)
    head = _batches(first, limit=stop)
    state = json.loads(json.dumps(first.state_dict()))  # must be JSON-safe
    resumed = CacheReader(cache, **{**kw, "epoch": 0})
    resumed.load_state_dict(state)
    resumed.set_epoch(epoch)  # a trainer's loop calls this after loading: must not restart the epoch
    tail = _batches(resumed)
    assert len(head) + len(tail) == len(full)
    for a, b in zip(head + tail, full):
        _same(a, b)


def test_resume_rejects_other_settings(cache):
    rd = CacheReader(cache, seed=1, world_size=2)
    state = rd.state_dict()
    with pytest.raises(ValueError, match="seed") as err:
        CacheReader(cache, seed=2, world_size=3, rank=1).load_state_dict(state)
    assert "world_size" in str(err.value)


def test_buffer_shuffle_order_is_a_bounded_permutation():
    rng = np.random.default_rng(0)
    order = buffer_shuffle_order(1000, 32, rng)
    assert sorted(order.tolist()) == list(range(1000))
    # an item can only be emitted once it has entered the buffer: s-th output < s + buffer
    assert (order < np.arange(1000) + 32).all()
    assert not np.array_equal(order, np.arange(1000))


def test_drop_last_and_bad_arguments(cache, rows):
    rd = CacheReader(cache, batch_size=10, shuffle=False, drop_last=True)
    batches = list(rd)
    assert len(batches) == len(rows) // 10 == rd.num_batches and all(len(b) == 10 for b in batches)
    with pytest.raises(ValueError, match="rank"):
        CacheReader(cache, rank=2, world_size=2)


def test_empty_cache_and_more_ranks_than_rows(tmp_path):
    with CacheWriter(tmp_path, test_meta(), k=K):
        pass
    rd = CacheReader(tmp_path)
    assert rd.num_rows == 0 and list(rd) == [] and rd.num_batches == 0
    rows = make_rows(3, k=K, seed=13)
    with CacheWriter(tmp_path, test_meta(), k=K) as w:
        for r in rows:
            w.write(r)
    got = [r.row_id for rank in range(5) for b in CacheReader(tmp_path, rank=rank, world_size=5) for r in b]
    assert sorted(got) == sorted(r.row_id for r in rows)
