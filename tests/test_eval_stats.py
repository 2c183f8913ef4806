"""`rlkd eval`'s scores and statistics against independent references: a hand-written LCS for ROUGE-L, the
rouge-score package itself, known bootstrap answers (constant differences, the normal approximation for large n)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from rlkd.eval.report import pairs, summarize
from rlkd.eval.scores import RougeL, contains, exact_match, normalize, score_rows
from rlkd.eval.stats import intervals, paired_difference, ratio, resample_ratios

# ---- ROUGE-L -------------------------------------------------------------------------------------------------------


def _lcs(a: list[str], b: list[str]) -> int:
    """Textbook dynamic programme for the longest common subsequence."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            table[i][j] = table[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(table[i - 1][j], table[i][j - 1])
    return table[-1][-1]


def _f_lcs(gen: list[str], ref: list[str]) -> float:
    lcs = _lcs(gen, ref)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(gen), lcs / len(ref)
    return 2 * p * r / (p + r)


def test_rouge_l_hand_computed_cases():
    rouge = RougeL()
    # LCS "the cat on the mat" = 5 of 6 tokens on both sides: P = R = F = 5/6.
    assert rouge("the cat on the mat sat", "the cat sat on the mat") == pytest.approx(5 / 6, abs=1e-12)
    # Case and punctuation are dropped by rouge-score's tokenizer, and stemming maps running/dogs to run/dog.
    assert rouge("Running, DOGS!", "run dog") == pytest.approx(1.0, abs=1e-12)
    # Without stemming these would share nothing; with it, "jumps" and "jumped" both become "jump": LCS 2 of 3 / 2.
    assert rouge("fox jumps high", "fox jumped") == pytest.approx(_f_lcs(["fox", "jump", "high"], ["fox", "jump"]))
    assert _f_lcs(["fox", "jump", "high"], ["fox", "jump"]) == pytest.approx(0.8)
    assert rouge("", "anything at all") == 0.0
    assert rouge("nothing shared", "completely different words") == 0.0


def test_rouge_l_equals_rouge_score_and_an_independent_lcs_on_random_strings():
    from rouge_score import rouge_scorer

    reference_scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = RougeL()
    rng = random.Random(7)
    words = "cat sat mat the a on in dog big red sun sky".split()  # <= 3 letters or unchanged by the stemmer
    for _ in range(200):
        gen = [rng.choice(words) for _ in range(rng.randint(1, 12))]
        ref = [rng.choice(words) for _ in range(rng.randint(1, 12))]
        got = rouge(" ".join(gen), " ".join(ref))
        assert got == reference_scorer.score(" ".join(ref), " ".join(gen))["rougeL"].fmeasure
        assert got == pytest.approx(_f_lcs(gen, ref), abs=1e-12)


def test_rouge_l_argument_order_is_reference_then_generation():
    # Precision is over the generation: a long generation that contains the reference has R = 1, P = 2/8.
    from rouge_score import rouge_scorer

    s = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score("red sun", "red sun in the big sky at dawn")
    assert s["rougeL"].recall == 1.0 and s["rougeL"].precision == pytest.approx(2 / 8)
    assert RougeL()("red sun in the big sky at dawn", "red sun") == pytest.approx(s["rougeL"].fmeasure)


# ---- exact match and contains --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, want", [
    ("  Paris.  ", "paris"),
    ("U.S.", "us"),
    ("don't\tstop\n\nNOW!", "dont stop now"),
    ("“Quoted” — dash…", "quoted dash"),
    ("a+b = $5", "a+b = $5"),  # symbols (S*) stay; only punctuation (P*) goes
    ("ﬁne", "fine"),  # NFKC folds the ligature
    ("Straße", "strasse"),  # casefold, not lower
    ("The answer", "the answer"),  # articles stay (unlike SQuAD)
])
def test_normalize_is_as_documented(text, want):
    assert normalize(text) == want


def test_exact_and_contains():
    assert exact_match(" paris! ", "Paris") == 1.0
    assert exact_match("Paris, France", "Paris") == 0.0
    assert contains("The capital is Paris, of course.", "paris") == 1.0
    assert contains("It costs 150 dollars", "5") == 0.0  # whole words only
    assert contains("It costs 5 dollars", "5") == 1.0
    assert contains("anything", "?!") == 0.0  # an empty normalised reference is never contained
    assert exact_match("", "?!") == 1.0  # but two empty texts are equal


def test_score_rows_averages_samples_per_row():
    rows = [
        [{"completion": "paris", "reference": "Paris", "tokens": 2, "hit_limit": False},
         {"completion": "lyon", "reference": "Paris", "tokens": 4, "hit_limit": True}],
        [{"completion": "x", "reference": "y", "tokens": 1, "hit_limit": False},
         {"completion": "y", "reference": "y", "tokens": 1, "hit_limit": False}],
    ]
    s = score_rows(rows)
    np.testing.assert_allclose(s["exact"], [0.5, 0.5])
    np.testing.assert_allclose(s["rougeL"], [0.5, 0.5])
    np.testing.assert_allclose(s["tokens"], [3.0, 1.0])
    np.testing.assert_allclose(s["hit_limit"], [0.5, 0.0])


# ---- bootstrap -----------------------------------------------------------------------------------------------------


def test_constant_paired_difference_has_a_zero_width_interval_at_the_difference():
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 1, size=300)
    b = a + 0.125  # the same rows, shifted: every resample sees exactly +0.125
    num = np.stack([a, b], axis=1)
    ivs, draws = intervals(num, np.ones_like(num), resamples=500, seed=3)
    d = paired_difference(ivs[0].value, ivs[1].value, draws[:, 0], draws[:, 1])
    assert d.value == pytest.approx(0.125, abs=1e-12)
    assert d.low == pytest.approx(0.125, abs=1e-12) and d.high == pytest.approx(0.125, abs=1e-12)
    # Each student alone still has a real interval (the rows vary): pairing is what removes it.
    assert ivs[0].high - ivs[0].low > 0.05


def test_large_n_normal_matches_the_analytic_interval():
    rng = np.random.default_rng(1)
    n = 20000
    x = rng.normal(3.0, 2.0, size=n)
    y = x + rng.normal(0.5, 1.0, size=n)  # paired: the difference has sd 1, whatever x's spread
    num = np.stack([x, y], axis=1)
    ivs, draws = intervals(num, np.ones_like(num), resamples=2000, seed=0)
    half = 1.959964 * x.std(ddof=1) / math.sqrt(n)
    assert ivs[0].value == pytest.approx(x.mean())
    assert ivs[0].low == pytest.approx(x.mean() - half, abs=0.08 * half)
    assert ivs[0].high == pytest.approx(x.mean() + half, abs=0.08 * half)
    d = paired_difference(ivs[0].value, ivs[1].value, draws[:, 0], draws[:, 1])
    dh = 1.959964 * (y - x).std(ddof=1) / math.sqrt(n)
    assert d.value == pytest.approx((y - x).mean())
    assert d.low == pytest.approx(d.value - dh, abs=0.08 * dh) and d.high == pytest.approx(d.value + dh, abs=0.08 * dh)
    assert d.high - d.low < 0.6 * (ivs[0].high - ivs[0].low)  # pairing: narrower than either student's own interval


def test_ratio_of_sums_resamples_rows_not_positions():
    # Two rows: 1 hit of 1 position, 0 hits of 3 positions. All-rows rate 1/4; a resample is one of
    # {row0 twice: 1, row1 twice: 0, one each: 1/4}, with probabilities 1/4, 1/4, 1/2.
    num, den = np.array([[1.0], [0.0]]), np.array([[1.0], [3.0]])
    assert ratio(num, den)[0] == pytest.approx(0.25)
    draws = resample_ratios(num, den, 4000, seed=0)[:, 0]
    values, counts = np.unique(np.round(draws, 12), return_counts=True)
    np.testing.assert_allclose(values, [0.0, 0.25, 1.0])
    np.testing.assert_allclose(counts / counts.sum(), [0.25, 0.5, 0.25], atol=0.03)


def test_bootstrap_is_seeded_and_handles_empty_rows():
    rng = np.random.default_rng(2)
    num = rng.uniform(size=(50, 3))
    den = np.ones_like(num)
    den[:, 2] = 0.0  # a metric no row gives: value None, no interval
    a, _ = intervals(num, den, resamples=200, seed=5)
    b, _ = intervals(num, den, resamples=200, seed=5)
    c, _ = intervals(num, den, resamples=200, seed=6)
    assert a == b and a[:2] != c[:2]
    assert a[2].value is None and a[2].low is None
    off, draws = intervals(num, den, resamples=0, seed=0)
    assert draws is None and off[0].low is None and off[0].value == pytest.approx(num[:, 0].mean())


def test_summarize_pairs_every_student_on_the_same_resamples():
    rng = np.random.default_rng(4)
    base = rng.uniform(size=100)
    series = [{"m": (base + k, np.ones(100))} for k in (0.0, 1.0, 3.0)]
    per_student, diffs = summarize(series, ["m"], ["a", "b", "c"], compare="all", resamples=300, seed=0)
    assert [(d["a"], d["b"]) for d in diffs] == [("a", "b"), ("a", "c"), ("b", "c")]
    for d, want in zip(diffs, (1.0, 3.0, 2.0)):
        iv = d["metrics"]["m"]
        assert iv.value == pytest.approx(want) and iv.low == pytest.approx(want) and iv.high == pytest.approx(want)
    assert pairs(["a", "b", "c"], "first") == [(0, 1), (0, 2)]
    assert per_student[1]["m"].value == pytest.approx(base.mean() + 1)
