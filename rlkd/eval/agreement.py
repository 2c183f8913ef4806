"""Peak agreement of a student with a teacher cache, row by row, for ``rlkd eval --cache``.

The metrics are *not* computed here: :func:`score_cache_rows` is the one adapter onto the code that ``rlkd inspect
--student`` and the trainer's evaluation share (today :class:`rlkd.inspect.student.StudentScorer` and
:func:`rlkd.inspect.student.agreement_from_logits`, over :class:`rlkd.trainer.metrics.PeakMetrics`), and
:func:`cache_k_problems` asks the same code up front whether the cache's k suffices. When that code moves to
``rlkd/core/metrics.py``, only these two functions change.

Each metric is kept per cache row as (numerator, denominator) over the row's *response* positions (the trained ones),
so that sums over rows give exactly the all-rows value ``inspect --student`` reports under ``metrics.response``, and
the bootstrap can resample rows (:mod:`rlkd.eval.stats`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

AGREEMENT_METRICS = ("cr@1", "cr@2", "cr@5", "mor@5", "mor@10", "top1_agreement", "kd")
"""Reported in display order. ``kd`` is the sparse forward KL with the tail bucket (nats, lower is better)."""

_DENOMINATOR = {"cr@1": "eligible@1", "cr@2": "eligible@2", "cr@5": "eligible@5", "mor@5": "eligible@5",
                "mor@10": "eligible@10", "top1_agreement": "eligible@1", "kd": "positions"}
"""A rate is over the positions where the teacher kept >= k entries; ``kd`` over every response position."""


@dataclass
class CacheScores:
    """One student's agreement on the chosen cache rows."""

    row_ids: list[str]
    """The cache rows scored, in file order (the same for every student)."""
    num: dict[str, np.ndarray]
    """metric -> (R,) per-row numerator (hits, or summed KL)."""
    den: dict[str, np.ndarray]
    """metric -> (R,) per-row denominator (eligible positions)."""
    positions: int
    """Response positions scored."""


def cache_k_problems(cache_dir: str, k: int) -> list[str]:
    """Why the shared metric code would refuse a cache of top-``k`` (checked before anything is generated)."""
    from rlkd.inspect.student import AgreementError, check_cache_k

    try:
        check_cache_k(int(k), cache_dir)
    except AgreementError as e:
        return [str(e)]
    return []


def select_cache_rows(cache_dir: str, source_indices: set[int] | None, max_rows: int | None) -> list[str]:
    """row_ids of the cache rows to score, in file order: those whose source index is in ``source_indices`` (all
    when None), at most ``max_rows`` of them."""
    from rlkd.cache import CacheReader

    chosen: list[str] = []
    for row in CacheReader(cache_dir, shuffle=False).iter_rows():
        if source_indices is None or int(row.source_index) in source_indices:
            chosen.append(row.row_id)
            if max_rows is not None and len(chosen) >= max_rows:
                break
    return chosen


def score_cache_rows(student: str, cache_dir: str, row_ids: list[str], *, progress: bool = False,
                     desc: str = "agreement") -> CacheScores:
    """The adapter: load ``student`` once and score each chosen cache row with the shared metric code."""
    from rlkd.cache import CacheReader
    from rlkd.inspect.student import StudentScorer, agreement_from_logits

    scorer = StudentScorer(student, cache_dir)  # checks the cache's k and the student's tokenizer, loads fp32
    wanted = set(row_ids)
    num = {m: np.zeros(len(row_ids)) for m in AGREEMENT_METRICS}
    den = {m: np.zeros(len(row_ids)) for m in AGREEMENT_METRICS}
    where = {rid: i for i, rid in enumerate(row_ids)}
    positions = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(row_ids), unit="row", desc=desc, dynamic_ncols=True, leave=False)
    for row in CacheReader(cache_dir, shuffle=False).iter_rows():
        if row.row_id not in wanted:
            continue
        got = agreement_from_logits([(row, scorer.logits(row))], scorer.k)["response"]
        i = where[row.row_id]
        if got is not None:
            positions += int(got["positions"])
            for m in AGREEMENT_METRICS:
                d = float(got[_DENOMINATOR[m]])
                num[m][i] = (got[m] or 0.0) * d
                den[m][i] = d
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return CacheScores(list(row_ids), num, den, positions)
