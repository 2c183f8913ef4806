"""Engine output -> cache row: adaptive-k trimming and the exact tail, for one example.

The same function serves the single-process runner and any distributed one, so every path writes identical rows.
"""

from __future__ import annotations

import numpy as np

from rlkd.cache.codec import adaptive_counts
from rlkd.cache.schema import TeacherRow, make_row_id
from rlkd.pipeline.engines import Scored, tail_logmass


def keep_counts(topk_logprobs: np.ndarray, k: int, min_prob: float | None, min_k: int) -> np.ndarray:
    """(P, k) full-precision log-probs -> (P,) int32 entries to keep per position.

    Without ``min_prob`` every position keeps ``k``. With it, a position keeps the entries whose probability is
    ``>= min_prob`` (the top-k is sorted, so that is a prefix), but never fewer than ``min_k`` nor more than ``k``
    (the cache's own :func:`rlkd.cache.adaptive_counts`, so every tool counts the same way).
    """
    if min_prob is None:
        return np.full(topk_logprobs.shape[0], k, dtype=np.int32)
    return adaptive_counts(topk_logprobs[:, :k], min_prob, min_k)


def build_row(example, scored: Scored, k: int, min_prob: float | None = None, min_k: int = 1) -> TeacherRow:
    """The cache row for ``example`` (an :class:`rlkd.pipeline.data.Example`) from its engine output.

    ``scored`` may hold more than ``k`` entries per position (an engine run with a larger k); only the first ``k``
    are used. When entries are dropped (``k`` below the engine's, or adaptive k), the tail is recomputed exactly from
    the full-precision kept entries, so ``exp(tail) + sum(exp(kept)) == 1`` up to float rounding.
    """
    ids = np.asarray(example.input_ids, dtype=np.int32)  # (T,)
    P = ids.shape[0] - 1
    if scored.num_positions != P:
        raise ValueError(
            f"example {example.source_index}: engine scored {scored.num_positions} positions for {ids.shape[0]} "
            f"tokens (expected {P})"
        )
    if scored.topk_ids.shape[1] < k:
        raise ValueError(f"engine returned top-{scored.topk_ids.shape[1]} but the cache needs k={k}")
    lp = scored.topk_logprobs[:, :k]  # (P, k) float32, full precision
    counts = keep_counts(lp, k, min_prob, min_k)  # (P,)
    if scored.topk_ids.shape[1] == k and (counts == k).all():
        tail = scored.tail_logmass  # the engine's own, from the same k entries
    else:
        lp_kept = np.where(np.arange(k)[None, :] < counts[:, None], lp, -np.inf)  # (P, k)
        tail = tail_logmass(lp_kept)
    keep = np.arange(k)[None, :] < counts[:, None]  # (P, k); row-major flattening = position after position
    return TeacherRow(
        row_id=make_row_id(ids, int(example.source_index)),
        source_index=int(example.source_index),
        input_ids=ids,
        loss_mask=np.asarray(example.loss_mask, dtype=bool),
        topk_count=counts,
        topk_ids=np.ascontiguousarray(scored.topk_ids[:, :k][keep], dtype=np.int32),
        topk_logprobs=np.ascontiguousarray(lp[keep], dtype=np.float32),
        tail_logmass=np.asarray(tail, dtype=np.float32),
        target_logprob=np.asarray(scored.target_logprob, dtype=np.float32),
        target_rank=np.asarray(scored.target_rank, dtype=np.int32),
    )


def write_rows(batch: list, scored: list, w, cfg, stats) -> None:
    """Build each example's row and write it to ``w`` (a CacheWriter), counting rows, tokens and positions written
    into ``stats`` (a :class:`~rlkd.pipeline.stats.RunStats`); the one row-writing path of every stage-1 runner."""
    for ex, sc in zip(batch, scored):
        row = build_row(ex, sc, cfg.top_k, cfg.min_prob, cfg.min_k)
        if w.write(row):
            stats.add(rows=1, tokens=int(row.input_ids.shape[0]), positions=row.num_positions)
