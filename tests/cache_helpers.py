"""Synthetic but realistic TeacherRows for cache tests (reusable by any test file).

Each row comes from random logits over a small vocabulary: a Zipf-like per-token bias plus noise at a per-position
"temperature", so some positions are peaked and some flat. Everything is computed the reference way, in float64 over
the full vocabulary: log_softmax, top-k (ties broken by id), exact tail mass by log-sum-exp of the rest, the next
token sampled from the distribution (so ``input_ids[t+1]`` is the target of position ``t``), its log-prob and its
full-vocabulary rank (1 + number of strictly larger log-probs).
"""

from __future__ import annotations

import numpy as np

from rlkd.cache.schema import TeacherRow, make_row_id


def full_logprobs(rng: np.random.Generator, P: int, vocab: int) -> np.ndarray:
    """(P, vocab) float64 log-probabilities with realistic spread (some peaked, some flat positions)."""
    bias = -1.2 * np.log1p(np.arange(vocab))[rng.permutation(vocab)]  # Zipf-like, shuffled over ids
    scale = rng.uniform(0.3, 2.5, size=(P, 1))
    logits = (bias + rng.standard_normal((P, vocab)) * 2.0) * scale
    return logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)


def row_from_logprobs(lp: np.ndarray, input_ids: np.ndarray, source_index: int, k: int, *,
                      loss_mask: np.ndarray | None = None, min_prob: float | None = None,
                      min_k: int = 1) -> TeacherRow:
    """Build a TeacherRow from full (P, V) log-probs of the positions of ``input_ids`` (P = T - 1)."""
    P, V = lp.shape
    order = np.lexsort((np.broadcast_to(np.arange(V), lp.shape), -lp), axis=1)  # by lp desc, then id
    top = order[:, :k]  # (P, k)
    top_lp = np.take_along_axis(lp, top, axis=1)
    if min_prob is None:
        counts = np.full(P, k, dtype=np.int32)
    else:
        counts = np.clip((np.exp(top_lp) >= min_prob).sum(axis=1), min(min_k, k), k).astype(np.int32)
    kept = np.arange(k)[None, :] < counts[:, None]  # (P, k)
    rest = lp.copy()
    np.put_along_axis(rest, top, np.where(kept, -np.inf, top_lp), axis=1)
    tail = np.logaddexp.reduce(rest, axis=1)  # exact log of the mass outside the kept entries
    nxt = input_ids[1:]
    target_lp = lp[np.arange(P), nxt]
    target_rank = 1 + (lp > target_lp[:, None]).sum(axis=1)
    if loss_mask is None:
        loss_mask = np.ones(P, dtype=bool)
    return TeacherRow(
        row_id=make_row_id(input_ids, source_index),
        source_index=int(source_index),
        input_ids=input_ids.astype(np.int32),
        loss_mask=np.asarray(loss_mask, dtype=bool),
        topk_count=counts,
        topk_ids=top[kept].astype(np.int32),
        topk_logprobs=top_lp[kept].astype(np.float32),
        tail_logmass=tail.astype(np.float32),
        target_logprob=target_lp.astype(np.float32),
        target_rank=target_rank.astype(np.int32),
    )


def make_rows(n: int, *, k: int = 8, vocab: int = 300, min_len: int = 2, max_len: int = 40, seed: int = 0,
              source_offset: int = 0, min_prob: float | None = None, min_k: int = 1) -> list[TeacherRow]:
    """``n`` rows with lengths in [min_len, max_len]; source indices ``source_offset + i``."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        T = int(rng.integers(min_len, max_len + 1))
        lp = full_logprobs(rng, T - 1, vocab)
        # Sample each next token from its position's distribution (Gumbel-max), so targets are realistic.
        nxt = np.argmax(lp + rng.gumbel(size=lp.shape), axis=1)
        input_ids = np.concatenate([[rng.integers(vocab)], nxt]).astype(np.int32)
        prompt = int(rng.integers(0, T - 1))
        loss_mask = np.arange(T - 1) >= prompt  # response positions only, like a chat row
        rows.append(row_from_logprobs(lp, input_ids, source_offset + i, k, loss_mask=loss_mask,
                                      min_prob=min_prob, min_k=min_k))
    return rows


def test_meta(vocab: int = 300, **extra) -> dict:
    """A minimal writer meta with a tokenizer identity that bounds ids by ``vocab``."""
    meta = {
        "teacher": {"name_or_path": "synthetic", "config_sha256": "0" * 64},
        "tokenizer": {"sha256": "1" * 64, "vocab_size": vocab, "name_or_path": "synthetic"},
        "dataset": {"source": "synthetic", "split": "train", "fingerprint": "abc"},
        "config": {"k": None},
        "logprobs_mode": "raw_logprobs",
        "temperature": 1.0,
        "engine": "synthetic",
    }
    meta.update(extra)
    return meta


test_meta.__test__ = False  # not a pytest test despite its name


def assert_rows_equal(a: TeacherRow, b: TeacherRow, *, logprobs: bool = True) -> None:
    """Field-by-field equality (log-probs exactly, so only for fp32 or for rows read twice)."""
    assert a.row_id == b.row_id and a.source_index == b.source_index
    for name in ("input_ids", "loss_mask", "topk_count", "topk_ids", "tail_logmass", "target_logprob",
                 "target_rank") + (("topk_logprobs",) if logprobs else ()):
        x, y = np.asarray(getattr(a, name)), np.asarray(getattr(b, name))
        assert x.shape == y.shape, name
        assert np.array_equal(x.astype(np.float64), y.astype(np.float64), equal_nan=True), name
