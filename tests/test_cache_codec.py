"""Codecs, schema and row ids of the teacher cache, checked against independent reference implementations."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlkd.cache import CacheReader, CacheWriter, MAX_K, adaptive_counts, make_row_id, roundtrip
from rlkd.cache.codec import arrow_schema
from tests.cache_helpers import make_rows, test_meta


def q8_reference(lp_pos: np.ndarray) -> np.ndarray:
    """The q8 rules of rlkd.cache.codec written as a plain loop over ranks, for one position."""
    t = float(np.float16(lp_pos[0]))
    out = [t]
    g_prev = 0
    for x in lp_pos[1:]:
        if not np.isfinite(x) or not np.isfinite(t):
            out.append(-np.inf)
            continue
        g = max(int(np.rint((t - float(x)) * 16)), 0, g_prev)  # gap on the 1/16 grid, never decreasing
        g = min(g, g_prev + 254)  # a delta is at most 254 (255 means -inf)
        g_prev = g
        out.append(t - g / 16)
    return np.array(out)


@st.composite
def positions(draw):
    """Per-position rank-ordered log-probs, with ties, -inf suffixes, huge gaps, k=1 and the largest k.

    Hypothesis picks the shape and the kind of each position; numpy fills in long arrays (drawing a thousand
    floats one by one through hypothesis would dominate the test time).
    """
    k = draw(st.sampled_from([1, 2, 3, 8, 64, MAX_K]))
    P = draw(st.integers(1, 2 if k == MAX_K else 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    counts = np.array([draw(st.integers(1, k)) for _ in range(P)])
    flat = []
    for n in counts.tolist():
        top = draw(st.one_of(st.just(0.0), st.floats(-30.0, 0.0)))
        kind = draw(st.sampled_from(["smooth", "ties", "jumps", "mixed", "grid"]))
        if kind == "smooth":
            steps = rng.exponential(0.7, n - 1)
        elif kind == "ties":
            steps = np.where(rng.random(n - 1) < 0.7, 0.0, rng.exponential(0.5, n - 1))
        elif kind == "jumps":
            steps = rng.uniform(10.0, 40.0, n - 1)
        elif kind == "grid":  # exactly on and half-way between q8 grid points
            steps = rng.integers(0, 40, n - 1) / 32.0
        else:
            steps = rng.choice([0.0, 0.03, 1.0, 16.0, 30.0], n - 1)
        lp = top - np.concatenate([[0.0], np.cumsum(steps)])
        n_inf = draw(st.integers(0, n - 1)) if draw(st.booleans()) else 0
        if n_inf:
            lp[n - n_inf:] = -np.inf
        flat.append(lp)
    return np.concatenate(flat).astype(np.float32), counts


def split(flat, counts):
    return np.split(flat, np.cumsum(counts)[:-1])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(positions())
def test_q8_matches_reference_and_bounds(data):
    with np.errstate(invalid="ignore"):  # -inf - -inf in diffs of -inf suffixes
        lp, counts = data
        dec = roundtrip("q8", lp, counts)
        assert dec.dtype == np.float32 and dec.shape == lp.shape
        # the fixed-k fast path (one position at a time, or a uniform grid) agrees with the general path
        one_by_one = np.concatenate([roundtrip("q8", x, np.array([x.shape[0]])) for x in split(lp, counts)])
        assert np.array_equal(dec, one_by_one)
        m = int(counts.min())
        grid = np.concatenate([x[:m] for x in split(lp, counts)])
        np.testing.assert_array_equal(roundtrip("q8", grid, np.full(len(counts), m)),
                                      np.concatenate([x[:m] for x in split(dec, counts)]))
        for x, d in zip(split(lp, counts), split(dec, counts)):
            ref = q8_reference(x.astype(np.float64))
            assert np.array_equal(np.isinf(d), np.isinf(ref))
            assert np.allclose(d[np.isfinite(ref)], ref[np.isfinite(ref)], rtol=0, atol=1e-5)
            # -inf stays exactly -inf, finite stays finite
            assert np.array_equal(np.isneginf(d), np.isneginf(x))
            # top-1 within fp16 rounding; in-range entries (reference not saturated) within 1/32 nat
            assert abs(float(d[0]) - float(x[0])) <= abs(float(x[0])) * 2.0**-11 + 1e-7 or not np.isfinite(x[0])
            fin = np.isfinite(x)
            t = float(np.float16(x[0]))
            with np.errstate(invalid="ignore"):
                g_true = np.rint((t - x[1:].astype(np.float64)) * 16)
                g_used = np.rint((t - ref[1:]) * 16)
            in_range = fin[1:] & (g_true == np.maximum(g_used, 0)) & (x[1:] <= t)
            # order preserved: decoded is non-increasing; in-range ties stay exact ties
            assert (np.diff(d[np.isfinite(d)]) <= 0).all()
            both = np.concatenate([[True], in_range])
            with np.errstate(invalid="ignore"):
                tie = (np.diff(x) == 0) & both[:-1] & both[1:]
            assert (np.diff(d)[tie] == 0).all()
            err = np.abs(d[1:][in_range].astype(np.float64) - x[1:][in_range])
            assert (err <= 1 / 32 + 1e-5).all()


@settings(max_examples=50, deadline=None)
@given(positions())
def test_fp16_and_fp32_bounds(data):
    lp, counts = data
    assert np.array_equal(roundtrip("fp32", lp, counts), lp)
    dec = roundtrip("fp16", lp, counts)
    fin = np.isfinite(lp)
    assert np.array_equal(np.isneginf(dec), np.isneginf(lp))
    assert (np.abs(dec[fin] - lp[fin]) <= np.abs(lp[fin]) * 2.0**-11 + 2.0**-24).all()


def test_q8_error_on_realistic_rows():
    """On softmax-derived rows, entries within 15.8 nat of the top-1 cannot saturate: max error <= 1/32 nat; and the
    KL on the renormalised top-k is tiny (the issue measured 4.7e-5 nat)."""
    rows = make_rows(40, k=20, vocab=500, seed=3)
    kls, errs = [], []
    for r in rows:
        x = r.topk_logprobs.reshape(-1, 20).astype(np.float64)
        d = roundtrip("q8", r.topk_logprobs, r.topk_count).reshape(-1, 20).astype(np.float64)
        errs.append(np.abs(d - x)[:, 1:].max())
        p = np.exp(x - np.logaddexp.reduce(x, axis=1, keepdims=True))
        q = d - np.logaddexp.reduce(d, axis=1, keepdims=True)
        kls.append((p * (np.log(p) - q)).sum(axis=1))
    assert max(errs) <= 1 / 32 + 1e-5
    assert np.concatenate(kls).mean() < 2e-4


def test_largest_k_and_k1_through_the_cache(tmp_path):
    """k = MAX_K and k = 1 survive a write/read with every codec."""
    for k in (1, MAX_K):
        rows = make_rows(3, k=k, vocab=MAX_K + 10, min_len=2, max_len=4, seed=k)
        for codec in ("q8", "fp16", "fp32"):
            out = tmp_path / f"{k}-{codec}"
            with CacheWriter(out, test_meta(vocab=MAX_K + 10), k=k, codec=codec) as w:
                for r in rows:
                    w.write(r)
            back = list(CacheReader(out, shuffle=False).iter_rows())
            for a, b in zip(rows, back):
                assert np.array_equal(a.topk_ids, b.topk_ids)
                np.testing.assert_allclose(b.topk_logprobs, roundtrip(codec, a.topk_logprobs, a.topk_count),
                                           atol=1e-6)


def test_adaptive_counts_brute_force():
    rng = np.random.default_rng(0)
    lp = -np.sort(rng.exponential(2.0, size=(50, 16)).cumsum(axis=1), axis=1)
    got = adaptive_counts(lp, min_prob=1e-2, min_k=3)
    for t in range(50):
        n = sum(1 for v in lp[t] if np.exp(v) >= 1e-2)
        assert got[t] == min(max(n, 3), 16)


def test_make_row_id_is_sha256_of_ids_and_index():
    ids = np.array([5, 7, 65535, 70000], dtype=np.int64)
    expected = hashlib.sha256(b"rlkd-row-v1\0" + struct.pack("<q", 12) + struct.pack("<4i", 5, 7, 65535, 70000))
    assert make_row_id(ids, 12) == expected.hexdigest()[:32]
    assert make_row_id(ids.astype(np.int32), 12) == make_row_id(list(ids), 12)
    assert make_row_id(ids, 13) != make_row_id(ids, 12)


def test_encodings_read_back_from_parquet_metadata(tmp_path):
    """BYTE_STREAM_SPLIT really lands on the ids/float leaves, ids are unsigned 32-bit, everything is zstd."""
    rows = make_rows(20, k=8, seed=0)
    for codec in ("q8", "fp16", "fp32"):
        out = tmp_path / codec
        with CacheWriter(out, test_meta(), k=8, codec=codec) as w:
            for r in rows:
                w.write(r)
        pf = pq.ParquetFile(next(out.glob("*.parquet")))
        assert pf.schema_arrow.equals(arrow_schema(codec, 8), check_metadata=False)
        md = pf.metadata.row_group(0)
        cols = {md.column(i).path_in_schema: md.column(i) for i in range(md.num_columns)}
        assert all(c.compression == "ZSTD" for c in cols.values())
        bss = {p for p, c in cols.items() if "BYTE_STREAM_SPLIT" in c.encodings}
        expected = {"topk_ids.list.element", "tail_logmass.list.element", "target_logprob.list.element",
                    "target_rank.list.element", "input_ids.list.element", "topk_count.list.element"}
        expected |= {"top1_logprob.list.element"} if codec == "q8" else {"topk_logprobs.list.element"}
        assert bss == expected
        # the manifest records what the file metadata shows
        manifest = json.loads((out / "manifest.json").read_text())
        assert set(manifest["storage"]["column_encoding"]) == expected
        assert manifest["storage"]["compression"] == "zstd"
        levels = manifest["storage"]["compression_level"]
        assert set(levels) == set(cols)
        assert all(levels[p] == 1 for p in cols if p.split(".")[0] in ("topk_logprobs", "logprob_gaps"))
        assert levels["topk_ids.list.element"] == 3 and levels["target_rank.list.element"] == 15
        dict_cols = {p for p, c in cols.items() if any("DICTIONARY" in e for e in c.encodings)}
        assert dict_cols == set(manifest["storage"]["dictionary"]) == set()
        ids = pf.schema.column(list(cols).index("topk_ids.list.element"))
        assert ids.physical_type == "INT32" and "Int(bitWidth=32, isSigned=false)" in str(ids.logical_type)
        if codec == "q8":
            assert cols["logprob_gaps"].physical_type == "BYTE_ARRAY"
            assert pf.schema_arrow.field("top1_logprob").type.value_type.bit_width == 16
        meta = pf.schema_arrow.metadata
        assert meta[b"rlkd.codec"] == codec.encode() and meta[b"rlkd.k"] == b"8"


@pytest.mark.parametrize("breakage", ["increasing", "count_gt_k", "id_out_of_vocab", "shape", "nan"])
def test_writer_rejects_broken_rows(tmp_path, breakage):
    from rlkd.cache.schema import TeacherRow

    r = make_rows(1, k=4, seed=1, min_len=5)[0]
    fields = dict(r.__dict__)
    if breakage == "increasing":
        lp = r.topk_logprobs.copy()
        lp[0], lp[1] = lp[1] - 0.5, lp[0]
        fields["topk_logprobs"] = lp
    elif breakage == "count_gt_k":
        fields["topk_count"] = r.topk_count + 1
    elif breakage == "id_out_of_vocab":
        ids = r.topk_ids.copy()
        ids[3] = 300
        fields["topk_ids"] = ids
    elif breakage == "shape":
        fields["tail_logmass"] = r.tail_logmass[:-1]
    else:
        lp = r.topk_logprobs.copy()
        lp[2] = np.nan
        fields["topk_logprobs"] = lp
    with CacheWriter(tmp_path, test_meta(vocab=300), k=4) as w:
        with pytest.raises(ValueError, match=r.row_id):
            w.write(TeacherRow(**fields))
        assert w.write(r)
