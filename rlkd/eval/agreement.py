"""Peak agreement of a student with a teacher cache, row by row, for ``rlkd eval --cache``.

The metrics are *not* computed here: each row goes through :class:`rlkd.core.metrics.PeakMetrics`, the code behind
``rlkd inspect --student`` and the trainer's evaluation, and each metric is kept per cache row as (numerator,
denominator) over the row's *response* positions (the trained ones, :meth:`~rlkd.core.metrics.PeakMetrics.parts`), so
that sums over rows give exactly the all-rows value ``inspect --student`` reports under ``metrics.response``, and the
bootstrap can resample rows (:mod:`rlkd.eval.stats`). Metrics the cache's k cannot define are left out, as there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def agreement_metrics(cache_k: int) -> list[str]:
    """The agreement metrics reported for a cache of top-``cache_k``, in display order (``kd``: sparse forward KL with
    the tail bucket, nats, lower is better)."""
    from rlkd.core.metrics import metric_keys

    return metric_keys(cache_k)


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
    """Load ``student`` once and score each chosen cache row with the shared metric code."""
    from rlkd.cache import CacheReader
    from rlkd.core.metrics import PeakMetrics
    from rlkd.core.targets import collate
    from rlkd.inspect.student import StudentScorer

    scorer = StudentScorer(student, cache_dir)  # checks the student's tokenizer and vocabulary, loads it in fp32
    metrics = agreement_metrics(scorer.k)
    wanted = set(row_ids)
    num = {m: np.zeros(len(row_ids)) for m in metrics}
    den = {m: np.zeros(len(row_ids)) for m in metrics}
    where = {rid: i for i, rid in enumerate(row_ids)}
    positions = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(row_ids), unit="row", desc=desc, dynamic_ncols=True, leave=False)
    for row in CacheReader(cache_dir, shuffle=False).iter_rows():
        if row.row_id not in wanted:
            continue
        acc = PeakMetrics(scorer.k)
        mb = collate([row], scorer.k, all_positions=True)  # targets at every scored position
        acc.add(acc.score(scorer.logits(row), mb.targets), mask=mb.trained)  # response positions only
        i = where[row.row_id]
        positions += acc.positions
        for m, (n, d) in acc.parts().items():
            num[m][i], den[m][i] = n, d
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return CacheScores(list(row_ids), num, den, positions)
