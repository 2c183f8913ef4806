"""The cache's data model: what one cached training sequence holds, and how positions line up.

Alignment (the contract every stage relies on)
----------------------------------------------
A row holds ``T`` token ids ``input_ids[0..T-1]``. Position ``t`` is the model's prediction made after reading
``input_ids[0..t]``, i.e. the distribution over ``input_ids[t+1]``. Positions ``0..T-2`` are *scored*; the last token
has no next token in the row and is not scored. (vLLM's ``prompt_logprobs`` entry ``i`` scores token ``i`` from its
prefix, so vLLM entry ``t+1`` is our position ``t``; entry 0 is empty.) A chat-formatted row ends with the template's
end-of-turn token, so the prediction *of* that token is scored and nothing after it is needed.

Per scored position ``t`` (all arrays have length ``P = T - 1``):

- ``loss_mask[t]``: train on position ``t`` (its target ``input_ids[t+1]`` is a response token);
- ``topk_count[t]``: how many entries this position keeps (``min_k <= n <= k``; ``k`` without adaptive k);
- ``topk_ids``: the teacher's top ids, in teacher rank order, concatenated over positions (``sum(topk_count)``);
- ``topk_logprobs``: their log-probabilities, same layout, non-increasing within a position;
- ``tail_logmass[t]``: ``log(1 - sum(exp(topk_logprobs)))`` computed from full-precision values (``-inf`` when the
  top-k holds all the mass);
- ``target_logprob[t]``: the teacher's log-probability of ``input_ids[t+1]``;
- ``target_rank[t]``: its rank over the full vocabulary, 1-based (1 = the teacher's argmax).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

FORMAT_VERSION = 1
"""Bumped on any incompatible change to the columns or the codecs."""

CODECS = ("q8", "fp16", "fp32")
"""Log-probability codecs. ``q8`` is the default; ``fp32`` is lossless."""


@dataclass
class TeacherRow:
    """One training sequence with the teacher's top-k at every scored position (see the module docstring)."""

    row_id: str
    """Stable content key: a hash of the token ids plus ``source_index``. Resume and deduplication use it."""
    source_index: int
    """Index of the example in the source dataset, so tools can show the original text."""
    input_ids: np.ndarray
    """(T,) int32 token ids."""
    loss_mask: np.ndarray
    """(T-1,) bool: position t is trained."""
    topk_count: np.ndarray
    """(T-1,) int32: entries kept at each position."""
    topk_ids: np.ndarray
    """(sum(topk_count),) int32: teacher top ids in rank order, position after position."""
    topk_logprobs: np.ndarray
    """(sum(topk_count),) float32: their log-probabilities."""
    tail_logmass: np.ndarray
    """(T-1,) float32: log of the probability mass outside the kept entries."""
    target_logprob: np.ndarray
    """(T-1,) float32: log-probability of the actual next token."""
    target_rank: np.ndarray
    """(T-1,) int32: 1-based full-vocabulary rank of the actual next token."""

    @property
    def num_positions(self) -> int:
        return int(self.input_ids.shape[0]) - 1


MAX_K = 1024
"""Largest top-k the format accepts. Counts are stored as uint16; the limit keeps a padded (B, T, k) batch bounded."""


def make_row_id(input_ids: np.ndarray, source_index: int) -> str:
    """A stable content key for a row: sha256 of the token ids (as little-endian int32) and the source index.

    The same tokens from the same source example give the same id in every run and on every machine, so a resumed
    stage 1 can skip what it already wrote. 32 hex digits (128 bits) are plenty to never collide.
    """
    ids = np.ascontiguousarray(np.asarray(input_ids), dtype="<i4")
    h = hashlib.sha256(b"rlkd-row-v1\0")
    h.update(int(source_index).to_bytes(8, "little", signed=True))
    h.update(ids.tobytes())
    return h.hexdigest()[:32]


def row_problems(row: TeacherRow, k: int, *, vocab_size: int | None = None) -> list[str]:
    """Every way ``row`` breaks the contract above (empty when it is well formed). Cheap: vectorised checks only."""
    problems: list[str] = []
    T = int(np.asarray(row.input_ids).shape[0]) if np.ndim(row.input_ids) == 1 else -1
    if T < 2:
        return [f"input_ids must be a 1-D array of at least 2 tokens (got shape {np.shape(row.input_ids)})"]
    P = T - 1
    for name in ("loss_mask", "topk_count", "tail_logmass", "target_logprob", "target_rank"):
        shape = np.shape(getattr(row, name))
        if shape != (P,):
            problems.append(f"{name} has shape {shape}, expected ({P},) = (len(input_ids) - 1,)")
    if problems:
        return problems
    counts = np.asarray(row.topk_count)
    if counts.min() < 1 or counts.max() > k:
        problems.append(f"topk_count must lie in [1, k={k}], got values in [{counts.min()}, {counts.max()}]")
    n = int(counts.sum())
    for name in ("topk_ids", "topk_logprobs"):
        shape = np.shape(getattr(row, name))
        if shape != (n,):
            problems.append(f"{name} has shape {shape}, expected ({n},) = (sum(topk_count),)")
    if problems:
        return problems
    ids = np.asarray(row.topk_ids)
    if ids.min() < 0 or (vocab_size is not None and ids.max() >= vocab_size):
        problems.append(f"topk_ids must lie in [0, {vocab_size}), got values in [{ids.min()}, {ids.max()}]")
    lp = np.asarray(row.topk_logprobs, dtype=np.float32)
    if np.isnan(lp).any() or (lp > 1e-4).any():
        problems.append("topk_logprobs must be log-probabilities (<= 0, no NaN)")
    elif n > 1:
        # Non-increasing within each position; a step across a position boundary is allowed to go up.
        step = np.diff(lp.astype(np.float64))
        boundary = np.zeros(n - 1, dtype=bool)
        boundary[np.cumsum(counts)[:-1] - 1] = True
        with np.errstate(invalid="ignore"):  # -inf - -inf is NaN: equal, allowed
            bad = (step > 1e-6) & ~boundary
        if bad.any():
            at = int(np.searchsorted(np.cumsum(counts), int(np.argmax(bad)) + 1, side="left"))
            problems.append(f"topk_logprobs must be non-increasing along rank (first violation at position {at})")
    for name in ("tail_logmass", "target_logprob"):
        v = np.asarray(getattr(row, name), dtype=np.float32)
        if np.isnan(v).any() or (v > 1e-4).any():
            problems.append(f"{name} must be a log-probability (<= 0, no NaN)")
    if np.asarray(row.target_rank).min() < 1:
        problems.append("target_rank is 1-based and must be >= 1")
    if not isinstance(row.row_id, str) or not row.row_id:
        problems.append("row_id must be a non-empty string (see make_row_id)")
    return problems
