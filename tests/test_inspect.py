"""`rlkd inspect`: summary statistics against a brute-force per-position computation, the entropy bounds against
the true entropy, the row view (piped: plain text with the decoded tokens and probabilities), and the student
agreement wiring (crafted logits with hand-computed CR@k / OR@k / MOR@k, a real tiny student against an
independent reference, k too large). The HTML report is checked in headless Chromium in test_inspect_html.py.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from rlkd.cache import CacheReader, CacheWriter, TeacherRow, make_row_id, tokenizer_identity
from rlkd.cli import main
from tests.cache_helpers import full_logprobs, row_from_logprobs

THR = 0.1


def build_cache(out_dir, tokenizer_dir, *, n_rows=12, k=16, codec="q8", seed=0, min_prob=None,
                return_full=False):
    """A cache of rows from random full distributions over the tiny tokenizer's vocabulary.

    Returns (cache_dir, rows as the reader decodes them[, full (P, V) log-probs per row]).
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    V = len(tok)
    rng = np.random.default_rng(seed)
    rows, fulls = [], []
    for i in range(n_rows):
        T = int(rng.integers(3, 50))
        lp = full_logprobs(rng, T - 1, V)  # (P, V) float64
        nxt = np.argmax(lp + rng.gumbel(size=lp.shape), axis=1)  # sampled next tokens
        ids = np.concatenate([[rng.integers(V)], nxt]).astype(np.int32)
        # A prompt/response split; row 0 is all prompt and row 1 all response, the edge cases of the split.
        cut = 0 if i == 1 else (T - 1 if i == 0 else int(rng.integers(0, T - 1)))
        rows.append(row_from_logprobs(lp, ids, i, k, loss_mask=np.arange(T - 1) >= cut, min_prob=min_prob))
        fulls.append(lp)
    meta = {"teacher": {"name_or_path": "random-logits", "vocab_size": V}, "tokenizer": tokenizer_identity(tok),
            "dataset": {"name": "random", "seed": seed}, "config": {}, "logprobs_mode": "raw_logprobs",
            "temperature": 1.0, "engine": "numpy"}
    with CacheWriter(out_dir, meta, k=k, codec=codec, row_group_rows=5) as w:
        for r in rows:
            w.write(r)
    decoded = list(CacheReader(out_dir, shuffle=False).iter_rows())
    assert [r.row_id for r in decoded] == [r.row_id for r in rows]
    return (out_dir, decoded, fulls) if return_full else (out_dir, decoded)


# --------------------------------------------------------------------------------------------------------------
# Brute force: one position at a time, in float64, building the extreme tails explicitly.


def brute_position(lp, tail_logmass, V, thr=THR):
    """(top1, H_lower, H_upper, peaks, tail) of one position from its cached entries."""
    p = np.exp(np.asarray(lp, dtype=np.float64))
    n = len(p)
    h_top = -sum(x * math.log(x) for x in p if x > 0)
    m = math.exp(float(tail_logmass))
    cap, R = p[-1], V - n
    # Lower bound: fill dropped tokens greedily at the cap (the most concentrated feasible tail).
    h_lo, rest, used = 0.0, m, 0
    while rest > 1e-15 and used < R:
        q = min(cap, rest) if cap > 0 else rest
        h_lo -= q * math.log(q)
        rest -= q
        used += 1
    # Upper bound: R equal dropped tokens.
    h_hi = -R * (m / R) * math.log(m / R) if m > 0 else 0.0
    return p[0], h_top + h_lo, h_top + h_hi, int((p >= thr).sum()), m


def brute_arrays(rows, V):
    cols = {k: [] for k in ("top1", "lo", "hi", "peaks", "tail", "rank", "resp", "in_topk", "tprob")}
    for row in rows:
        off = 0
        for t in range(row.num_positions):
            n = int(row.topk_count[t])
            top1, lo, hi, pk, tail = brute_position(row.topk_logprobs[off:off + n], row.tail_logmass[t], V)
            off += n
            for key, v in zip(("top1", "lo", "hi", "peaks", "tail"), (top1, lo, hi, pk, tail)):
                cols[key].append(v)
            cols["rank"].append(int(row.target_rank[t]))
            cols["resp"].append(bool(row.loss_mask[t]))
            cols["in_topk"].append(int(row.target_rank[t]) <= n)
            cols["tprob"].append(math.exp(float(row.target_logprob[t])))
    return {k: np.array(v) for k, v in cols.items()}


@pytest.fixture(scope="module")
def q8_cache(tmp_path_factory, tiny_tokenizer_dir):
    return build_cache(tmp_path_factory.mktemp("q8") / "cache", tiny_tokenizer_dir, n_rows=12, k=16, codec="q8")


@pytest.mark.parametrize("codec,min_prob,small_chunks", [("q8", None, False), ("fp32", None, False),
                                                        ("fp16", 0.02, False), ("q8", None, True),
                                                        ("fp16", 0.02, True)])
def test_summary_matches_brute_force(tmp_path, tiny_tokenizer_dir, monkeypatch, codec, min_prob, small_chunks):
    """small_chunks: statistics chunks of 7 positions and q8 decode slabs of 5, so that row groups are cut into
    many pieces (the paths 1M-position caches take, which these tiny caches otherwise never reach)."""
    from rlkd.cache import codec as codec_module
    from rlkd.inspect import stats
    from rlkd.inspect.stats import summary

    if small_chunks:
        monkeypatch.setattr(stats, "CHUNK_POSITIONS", 7)
        monkeypatch.setattr(codec_module, "DECODE_SLAB", 5)
    cache, rows = build_cache(tmp_path / "c", tiny_tokenizer_dir, codec=codec, min_prob=min_prob, seed=3)
    from transformers import AutoTokenizer

    V = len(AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir)))
    if min_prob is not None:  # adaptive k: the segmented (not the fixed-k grid) code path
        assert len({int(c) for r in rows for c in r.topk_count}) > 3
    s, a = summary(cache, threshold=THR)
    b = brute_arrays(rows, V)
    assert s["vocab_size"] == V and len(a) == len(b["top1"]) == s["manifest"]["positions"]
    np.testing.assert_allclose(a.top1, b["top1"], rtol=1e-6)
    np.testing.assert_allclose(a.entropy_lower, b["lo"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a.entropy_upper, b["hi"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(a.peaks, b["peaks"])
    np.testing.assert_allclose(a.tail, b["tail"], rtol=1e-6, atol=1e-12)
    np.testing.assert_array_equal(a.target_rank, b["rank"])
    np.testing.assert_array_equal(a.response, b["resp"])

    for group, sel in (("all", np.ones_like(b["resp"])), ("prompt", ~b["resp"]), ("response", b["resp"])):
        g = s["stats"][group]
        assert g["positions"] == sel.sum() > 0
        assert g["top1_prob"]["mean"] == pytest.approx(b["top1"][sel].mean(), rel=1e-5)
        assert g["top1_prob"]["p50"] == pytest.approx(np.median(b["top1"][sel]), rel=1e-5)
        for stat, ref in (("top1_prob", b["top1"][sel]), ("entropy_lower", b["lo"][sel]), ("tail_mass", b["tail"][sel]),
                          ("target_prob", b["tprob"][sel])):
            d = g[stat]
            assert d["std"] == pytest.approx(ref.std(), rel=1e-4, abs=1e-7), stat
            assert [d["min"], d["p05"], d["p25"], d["p75"], d["max"]] == pytest.approx(
                [ref.min(), *np.quantile(ref, [0.05, 0.25, 0.75]), ref.max()], rel=1e-5, abs=1e-9), stat
        # Histogram bins as np.histogram with the same edges puts the same values.
        ours = a.top1[a.response == (group == "response")] if group != "all" else a.top1
        ref_hist = np.histogram(ours.astype(np.float64), np.linspace(0, 1, 21))[0]
        assert g["top1_prob"]["hist"]["counts"] == ref_hist.tolist()
        assert g["entropy_lower"]["mean"] == pytest.approx(b["lo"][sel].mean(), rel=1e-5)
        assert g["entropy_upper"]["p95"] == pytest.approx(np.quantile(b["hi"][sel], 0.95), rel=1e-4)
        assert g["tail_mass"]["mean"] == pytest.approx(b["tail"][sel].mean(), rel=1e-5, abs=1e-9)
        assert sum(g["top1_prob"]["hist"]["counts"]) == sel.sum()
        pk = b["peaks"][sel]
        assert g["peaks"]["counts"] == {str(i): int((pk == i).sum()) for i in range(pk.max() + 1)}
        assert g["peaks"]["multi_peak_share"] == pytest.approx((pk >= 2).mean())
        assert g["peaks"]["mean"] == pytest.approx(pk.mean())
        rk = b["rank"][sel]
        assert g["target_rank"]["top1_share"] == pytest.approx((rk == 1).mean())
        assert g["target_rank"]["in_topk_share"] == pytest.approx(b["in_topk"][sel].mean())
        assert g["target_rank"]["p50"] == pytest.approx(np.median(rk))
        hist = dict(zip(g["target_rank"]["hist"]["labels"], g["target_rank"]["hist"]["counts"]))
        assert hist["1"] == (rk == 1).sum() and hist["6-10"] == ((rk >= 6) & (rk <= 10)).sum()
        assert sum(hist.values()) == sel.sum()
    if min_prob is None:  # fixed k=16 >= 1 / 0.1: no dropped token can be a peak
        assert s["stats"]["all"]["peaks"]["undercount_share"] == 0.0


def test_summary_quantiles_are_numpys(q8_cache):
    """Every quantile the summary reports is np.quantile (linear interpolation) of the same positions' values, per
    group, including groups of one and two positions (where interpolation has nothing or one gap to work with)."""
    from rlkd.inspect.stats import FLOAT_STATS, QUANTILES, position_arrays, summarize, summary

    cache, rows = q8_cache
    _, a = summary(cache)
    r = rows[5]
    few = np.zeros(r.num_positions, bool)
    few[[0, -1, -2]] = True  # a response of 3 positions beside a long prompt
    one = np.zeros(r.num_positions, bool)
    one[1] = True
    cases = [a] + [position_arrays(r.topk_count, r.topk_logprobs, r.tail_logmass, r.target_logprob, r.target_rank,
                                   mask, vocab_size=512) for mask in (few, one)]
    cases.append(cases[-1].select(np.array([0, 1])))  # two positions: one prompt, one response
    for arrays in cases:
        s = summarize(arrays)
        for group, sel in (("all", slice(None)), ("prompt", ~arrays.response), ("response", arrays.response)):
            for name, field in FLOAT_STATS.items():
                v = getattr(arrays, field)[sel]
                ref = np.quantile(v[np.isfinite(v)].astype(np.float64), QUANTILES)
                got = [s[group][name][f"p{round(100 * q):02d}"] for q in QUANTILES]
                np.testing.assert_allclose(got, ref, rtol=1e-12, err_msg=f"{group} {name}")
            assert s[group]["target_rank"]["p50"] == np.median(arrays.target_rank[sel])


def test_one_group_empty_and_reading_only_some_columns(q8_cache):
    """A cache whose positions are all in one group: that group equals "all" and the other is None. And the
    summary's column subset reads the same per-position values as a full read."""
    from rlkd.inspect.stats import SUMMARY_COLUMNS, position_arrays, summarize

    cache, rows = q8_cache
    r = rows[3]
    for mask, empty in ((np.ones(r.num_positions, bool), "prompt"), (np.zeros(r.num_positions, bool), "response")):
        a = position_arrays(r.topk_count, r.topk_logprobs, r.tail_logmass, r.target_logprob, r.target_rank, mask,
                            vocab_size=512)
        s = summarize(a)
        full = "response" if empty == "prompt" else "prompt"
        assert s[empty] is None and s[full] == s["all"] and s["all"]["positions"] == r.num_positions
    full_blocks = list(CacheReader(cache, shuffle=False).iter_blocks())
    some = list(CacheReader(cache, shuffle=False).iter_blocks(columns=SUMMARY_COLUMNS))
    assert len(full_blocks) == len(some) > 1
    for fb, sb in zip(full_blocks, some):
        assert sb.input_ids is None and sb.topk_ids is None and sb.row_id is None
        for key, v in fb.position_columns().items():
            np.testing.assert_array_equal(sb.position_columns()[key], v, err_msg=key)
    with pytest.raises(ValueError, match="unknown column"):
        next(CacheReader(cache, shuffle=False).iter_blocks(columns=["no_such_column"]))


def test_summary_reraises_a_damaged_page(q8_cache, tmp_path):
    """A damaged page in the last row group (read after others succeeded) reaches the caller as
    CacheCorruptError."""
    import shutil

    import pyarrow.parquet as pq

    from rlkd.cache import CacheCorruptError
    from rlkd.inspect.stats import summary

    cache, rows = q8_cache
    bad = tmp_path / "bad"
    shutil.copytree(cache, bad)
    shard = sorted(bad.glob("*.parquet"))[0]
    md = pq.ParquetFile(shard).metadata
    assert md.num_row_groups >= 2
    rg = md.row_group(md.num_row_groups - 1)
    col = next(rg.column(j) for j in range(rg.num_columns) if rg.column(j).path_in_schema.startswith("tail_logmass"))
    data = bytearray(shard.read_bytes())
    data[col.data_page_offset + col.total_compressed_size - 3] ^= 0xFF  # inside a page the summary reads
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptError, match="row group"):
        summary(bad)


def test_entropy_bounds_contain_the_true_entropy(tmp_path, tiny_tokenizer_dir):
    from rlkd.inspect.stats import summary

    cache, rows, fulls = build_cache(tmp_path / "c", tiny_tokenizer_dir, codec="fp32", k=8, seed=7,
                                     return_full=True)
    _, a = summary(cache)
    true_h = np.concatenate([-(np.exp(lp) * lp).sum(axis=1) for lp in fulls])  # (N,) exact entropies
    assert (a.entropy_lower <= true_h + 1e-4).all() and (true_h <= a.entropy_upper + 1e-4).all()
    # The bounds are informative: the lower bound beats treating the tail as one bucket on most positions.
    gap = a.entropy_upper - a.entropy_lower
    assert np.median(gap) < 1.0 and (a.entropy_upper > a.entropy_lower).any()


def test_sample_is_a_seeded_subset(q8_cache):
    from rlkd.inspect.stats import summary

    cache, rows = q8_cache
    _, full = summary(cache)
    s, a = summary(cache, sample=50, seed=4)
    assert len(a) == 50 == s["sample"]["positions"] and s["stats"]["all"]["positions"] == 50
    chosen = np.sort(np.random.default_rng(4).choice(len(full), size=50, replace=False))
    np.testing.assert_array_equal(a.entropy_lower, full.entropy_lower[chosen])
    np.testing.assert_array_equal(summary(cache, sample=50, seed=4)[1].top1, a.top1)
    assert len(summary(cache, sample=10 ** 9)[1]) == len(full)  # larger than the cache: everything


def test_cli_summary_text_and_json(q8_cache):
    cache, rows = q8_cache
    runner = CliRunner()
    res = runner.invoke(main, ["inspect", str(cache)])
    assert res.exit_code == 0, res.output
    for needle in ("k / codec   16 / q8", "top-1 probability", "entropy lower bound", "entropy upper bound",
                   "number of peaks", "tail mass", "rank of the actual next token", "prompt", "response",
                   "bytes/token"):
        assert needle in res.output
    assert "█" in res.output  # histograms
    res = runner.invoke(main, ["inspect", str(cache), "--json", "--peak-threshold", "0.2"])
    assert res.exit_code == 0, res.output
    obj = json.loads(res.stdout)
    assert obj["schema"] == "rlkd.inspect/1" and set(obj) == {"schema", "summary"}
    m = obj["summary"]["manifest"]
    assert m["rows"] == len(rows) and m["positions"] == sum(r.num_positions for r in rows)
    assert m["bytes_per_token"] == pytest.approx(m["bytes"] / m["tokens"]) and m["shards"] >= 1
    assert obj["summary"]["peak_threshold"] == 0.2
    assert obj["summary"]["stats"]["all"]["positions"] == m["positions"]


def test_cli_help_documents_the_json_schema():
    res = CliRunner().invoke(main, ["inspect", "--help"])
    assert res.exit_code == 0
    for needle in ('"schema": "rlkd.inspect/1"', '"summary"', '"row"', '"student"', '"html"', "multi_peak_share"):
        assert needle in res.output
    from rlkd.core.metrics import metric_keys
    from rlkd.inspect import JSON_SCHEMA

    for key in metric_keys() + ["left_out", "tail", "cache_k"]:  # the schema names every reported metric
        assert f'"{key}"' in JSON_SCHEMA, key


def test_row_view_piped(q8_cache, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    cache, rows = q8_cache
    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    row = rows[3]
    res = CliRunner().invoke(main, ["inspect", str(cache), "--row", "3", "--positions", "2:6", "--top", "3"])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "\x1b[" not in out  # piped: plain text
    assert tok.decode(row.input_ids.tolist()) in out  # the row's text
    lines = [ln for ln in out.splitlines() if ln[:5].strip().isdigit()]
    assert [int(ln.split()[0]) for ln in lines] == [2, 3, 4, 5]
    counts = np.asarray(row.topk_count)
    for ln, t in zip(lines, range(2, 6)):
        start = int(counts[:t].sum())
        for j in range(3):
            tid = int(row.topk_ids[start + j])
            p = math.exp(float(row.topk_logprobs[start + j]))
            mark = "*" if tid == int(row.input_ids[t + 1]) else ""
            assert f"{mark}{tok.decode([tid])!r} {p:.4f}" in ln, (ln, tid, p)
        assert repr(tok.decode([int(row.input_ids[t + 1])]))[:14] in ln  # the actual next token
        assert f"{math.exp(float(row.target_logprob[t])):.4f}" in ln

    res = CliRunner().invoke(main, ["inspect", str(cache), "--row", row.row_id[:10], "--json", "--top", "2"])
    obj = json.loads(res.stdout)["row"]
    assert obj["index"] == 3 and len(obj["positions"]) == row.num_positions
    p0 = obj["positions"][0]
    assert p0["next_id"] == int(row.input_ids[1]) and len(p0["top"]) == 2
    assert p0["top"][0]["prob"] == pytest.approx(math.exp(float(row.topk_logprobs[0])), rel=1e-6)


def test_row_view_colour_and_errors(q8_cache, tmp_path, tiny_tokenizer_dir):
    import shutil

    cache, rows = q8_cache
    runner = CliRunner()
    res = runner.invoke(main, ["inspect", str(cache), "--row", "0", "--positions", "0:2", "--color", "always"])
    assert res.exit_code == 0 and "\x1b[" in res.output
    res = runner.invoke(main, ["inspect", str(cache), "--row", str(len(rows))])
    assert res.exit_code != 0 and f"the cache has {len(rows)} rows" in res.output
    res = runner.invoke(main, ["inspect", str(cache), "--positions", "0:3"])
    assert res.exit_code != 0 and "give --row too" in res.output
    # A cache whose recorded tokenizer path is gone: a clear error, and --tokenizer fixes it.
    moved = tmp_path / "moved"
    shutil.copytree(cache, moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["tokenizer"]["name_or_path"] = str(tmp_path / "no-such-tokenizer")
    (moved / "manifest.json").write_text(json.dumps(manifest))
    res = runner.invoke(main, ["inspect", str(moved), "--row", "0"])
    assert res.exit_code != 0 and "--tokenizer" in res.output and "no-such-tokenizer" in res.output
    res = runner.invoke(main, ["inspect", str(moved), "--row", "0", "--tokenizer", str(tiny_tokenizer_dir)])
    assert res.exit_code == 0, res.output


HOSTILE = "Set the title\x1b]0;pwned\x07 then clear\x1b[2J and a C1 CSI \x9b31m and DEL\x7f."
"""Dataset text with an OSC title sequence (ESC ] 0 ; ... BEL), an ANSI clear screen, a C1 CSI and DEL."""


def test_text_from_data_never_reaches_the_terminal_raw(tmp_path, tiny_tokenizer_dir):
    """#13 item 9: control characters in a row's text, its tokens and the manifest are escaped in every view."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    ids = np.array(tok(HOSTILE, add_special_tokens=False)["input_ids"], dtype=np.int32)
    assert tok.decode(ids.tolist()) == HOSTILE
    rng = np.random.default_rng(0)
    row = row_from_logprobs(full_logprobs(rng, len(ids) - 1, len(tok)), ids, 0, 8,
                            loss_mask=np.arange(len(ids) - 1) >= 3)
    meta = {"teacher": {"name_or_path": "evil\x1b]0;teacher\x07", "vocab_size": len(tok)},
            "tokenizer": tokenizer_identity(tok), "dataset": {"name": "evil\x1b[2Jdata\x9b"}, "config": {},
            "logprobs_mode": "raw_logprobs", "temperature": 1.0, "engine": "numpy"}
    with CacheWriter(tmp_path / "c", meta, k=8, codec="fp32") as w:
        w.write(row)
    raw = ("\x1b", "\x07", "\x9b", "\x7f")
    runner = CliRunner()
    for args in (["--row", "0"], ["--row", "0", "--color", "always"], ["--row", "0", "--json"], [], ["--json"]):
        res = runner.invoke(main, ["inspect", str(tmp_path / "c"), *args])
        assert res.exit_code == 0, res.output
        out = res.output
        if "--color" in args:
            out = __import__("re").sub(r"\x1b\[[0-9;]*m", "", out)  # rich's own colour codes (SGR) are fine
        assert not [c for c in raw if c in out], (args, out[:400])
        if "--json" in args:  # lossless: the parsed JSON holds the original characters
            obj = json.loads(res.stdout)
            if "row" in obj:
                assert obj["row"]["text"] == HOSTILE
            else:
                assert obj["summary"]["manifest"]["dataset"]["name"] == "evil\x1b[2Jdata\x9b"
        elif args:
            assert "\\x1b]0;pwned\\x07" in out  # shown, visibly escaped
    plain = runner.invoke(main, ["inspect", str(tmp_path / "c")]).output
    assert "evil\\x1b]0;teacher\\x07" in plain


# --------------------------------------------------------------------------------------------------------------
# Student agreement


def _ranked_logits(order, V):
    """Logits whose descending order starts with ``order`` (ties: equal entries in a tuple)."""
    z = np.full(V, -20.0)
    level = 10.0
    for item in order:
        for i in (item if isinstance(item, tuple) else (item,)):
            z[i] = level
        level -= 0.5
    return z


def test_agreement_on_crafted_rows(tmp_path, tiny_tokenizer_dir):
    """CR@k / set@k / MOR@k through the cache and inspect's wiring, against values computed by hand."""
    import torch

    from rlkd.inspect.student import agreement_from_logits

    V, k = 40, 12
    teacher = list(range(20, 32))  # the teacher's top-12 ids, rank order, at every position
    lp = np.log(np.array([0.3, 0.2, 0.1, 0.08, 0.07, 0.06, 0.05, 0.04, 0.03, 0.02, 0.015, 0.01]))
    ids = np.array([1, 2, 3, 4, 5], dtype=np.int32)  # 4 positions
    row = TeacherRow(row_id=make_row_id(ids, 0), source_index=0, input_ids=ids,
                     loss_mask=np.array([False, False, True, True]), topk_count=np.full(4, k, np.int32),
                     topk_ids=np.tile(teacher, 4).astype(np.int32), topk_logprobs=np.tile(lp, 4).astype(np.float32),
                     tail_logmass=np.full(4, np.log1p(-np.exp(lp).sum()), np.float32),
                     target_logprob=np.full(4, lp[0], np.float32), target_rank=np.ones(4, np.int32))
    meta = {"teacher": {"name_or_path": "x", "vocab_size": V}, "tokenizer": {"sha256": "0", "vocab_size": V,
            "name_or_path": "x"}, "dataset": {}, "config": {}}
    with CacheWriter(tmp_path / "c", meta, k=k, codec="fp32") as w:
        w.write(row)
    (row,) = CacheReader(tmp_path / "c", shuffle=False).iter_rows()
    T = teacher
    student = np.stack([
        _ranked_logits(T, V),  # same order: everything 1
        _ranked_logits([T[0], T[2], T[1]] + T[3:], V),  # ranks 2/3 swapped: cr@1 1, cr@2 0, cr@5 0, or 1
        _ranked_logits([T[5], T[0], T[1], T[2], T[3], T[4]] + T[6:], V),  # T6 first: top-5 overlap 4, top-10 same
        _ranked_logits(T[:6] + [(T[6], T[7])] + T[8:], V),  # a tie at ranks 7/8: no metric can tell
    ])
    m = agreement_from_logits([(row, torch.tensor(student, dtype=torch.float32))], k)
    a, r = m["all"], m["response"]
    assert a["positions"] == 4 and r["positions"] == 2
    assert a["cr@1"] == pytest.approx(3 / 4) and a["cr@2"] == pytest.approx(2 / 4)
    assert a["cr@5"] == pytest.approx(2 / 4) and a["set@5"] == pytest.approx(3 / 4) and a["set@10"] == 1.0
    assert a["mor@5"] == pytest.approx((1 + 1 + 0.8 + 1) / 4) and a["mor@10"] == 1.0
    assert a["top1_agreement"] == pytest.approx(3 / 4)
    assert r["cr@1"] == pytest.approx(1 / 2) and r["set@5"] == pytest.approx(1 / 2)
    assert r["mor@5"] == pytest.approx(0.9) and r["cr@2"] == pytest.approx(1 / 2)
    # kd: forward KL(teacher || student) over the 12 cached ids plus one tail bucket, by hand.
    q = student - np.logaddexp.reduce(student, axis=1, keepdims=True)  # (4, V)
    p = np.exp(lp)
    q_top = q[:, teacher]  # (4, 12)
    q_tail = np.log1p(-np.exp(q_top).sum(axis=1))
    p_tail = 1 - p.sum()
    kd = (p * (lp - q_top)).sum(axis=1) + p_tail * (np.log(p_tail) - q_tail)
    assert a["kd"] == pytest.approx(kd.mean(), rel=1e-4) and r["kd"] == pytest.approx(kd[2:].mean(), rel=1e-4)


def test_k8_cache_reports_what_it_can_and_says_why_not_the_rest(tmp_path, tiny_tokenizer_dir, tiny_student_dir):
    """#13 item 8: a k=8 cache gives CR@1/2/5, MOR@5 and set@5, and the output says why the @10 metrics are left out."""
    cache, rows = build_cache(tmp_path / "c", tiny_tokenizer_dir, n_rows=3, k=8, codec="fp32")
    res = CliRunner().invoke(main, ["inspect", str(cache), "--student", str(tiny_student_dir), "--json"])
    assert res.exit_code == 0, res.output
    st = json.loads(res.stdout)["student"]
    got = st["metrics"]["all"]
    for key in ("cr@1", "cr@2", "cr@5", "mor@5", "set@5", "top1_agreement", "kd", "ce"):
        assert isinstance(got[key], float), key
    assert not [key for key in got if "@10" in key]
    assert set(st["left_out"]) == {"mor@10", "set@10"} and "top-8" in st["left_out"]["mor@10"]
    res = CliRunner().invoke(main, ["inspect", str(cache), "--student", str(tiny_student_dir)])
    assert res.exit_code == 0, res.output
    assert "mor@5" in res.output and "mor@10" in res.output.split("left out")[1]
    assert "left out mor@10, set@10" in res.output and "--top-k 10" in res.output


def reference_agreement(rows, logits_per_row):
    """Independent numpy CR/set/MOR/top-1 over all positions (full k everywhere), stable-sorted student ranks."""
    hits = {key: [] for key in ("cr@1", "cr@2", "cr@5", "set@5", "set@10", "mor@5", "mor@10")}
    for row, z in zip(rows, logits_per_row):
        k = int(row.topk_count[0])
        tids = np.asarray(row.topk_ids).reshape(-1, k)
        for t in range(row.num_positions):
            s = np.argsort(-z[t], kind="stable")
            for kk in (1, 2, 5):
                hits[f"cr@{kk}"].append(list(s[:kk]) == list(tids[t, :kk]))
            for kk in (5, 10):
                common = len(set(s[:kk]) & set(tids[t, :kk]))
                hits[f"set@{kk}"].append(common == kk)
                hits[f"mor@{kk}"].append(common / kk)
    return {key: float(np.mean(v)) for key, v in hits.items()}


def test_student_against_a_plain_forward(q8_cache, tiny_student_dir, tiny_tokenizer_dir):
    import torch
    from transformers import AutoModelForCausalLM

    cache, rows = q8_cache
    res = CliRunner().invoke(main, ["inspect", str(cache), "--student", str(tiny_student_dir), "--json"])
    assert res.exit_code == 0, res.output
    st = json.loads(res.stdout)["student"]
    assert st["rows"] == len(rows) and st["positions"] == sum(r.num_positions for r in rows)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_student_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = [model(torch.tensor(r.input_ids[None], dtype=torch.long)).logits[0, :-1].double().numpy()
                  for r in rows]
    ref = reference_agreement(rows, logits)
    got = st["metrics"]["all"]
    assert got["positions"] == st["positions"]
    for key, v in ref.items():
        assert got[key] == pytest.approx(v, abs=1e-9), key
    assert got["top1_agreement"] == pytest.approx(ref["cr@1"])
    assert got["kd"] > 0
    resp = st["metrics"]["response"]
    assert resp["positions"] == sum(int(r.loss_mask.sum()) for r in rows)
    # Text form: a table with every metric.
    res = CliRunner().invoke(main, ["inspect", str(cache), "--student", str(tiny_student_dir), "--sample", "60"])
    assert res.exit_code == 0, res.output
    for key in ("cr@1", "cr@2", "cr@5", "set@5", "set@10", "mor@5", "mor@10", "top1_agreement", "kd", "ce"):
        assert key in res.output


def test_student_sample_scores_whole_random_rows(q8_cache, tiny_student_dir):
    from rlkd.inspect.student import student_agreement

    cache, rows = q8_cache
    st = student_agreement(cache, tiny_student_dir, sample=60, seed=1)
    lengths = np.array([r.num_positions for r in rows])
    order = np.random.default_rng(1).permutation(len(rows))
    n_rows = int(np.searchsorted(np.cumsum(lengths[order]), 60)) + 1
    assert st["rows"] == n_rows < len(rows)
    assert st["positions"] == lengths[order[:n_rows]].sum() >= 60


def test_student_with_another_tokenizer_is_refused(tmp_path, tiny_student_dir):
    from transformers import AutoTokenizer

    from tests import tiny

    other = tmp_path / "tok"
    tiny.make_tokenizer(other, vocab_size=400)
    cache, _ = build_cache(tmp_path / "c", other, n_rows=2, k=10, codec="fp32")
    assert len(AutoTokenizer.from_pretrained(str(other))) != 512
    res = CliRunner().invoke(main, ["inspect", str(cache), "--student", str(tiny_student_dir)])
    assert res.exit_code != 0 and "tokenizer mismatch" in res.output
