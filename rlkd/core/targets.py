"""From cache rows to what a student's forward and a loss or metric take: padded model inputs plus the cached
teacher at the scored positions, flattened to ``(N, k)``. The one place where rows are padded.

A :class:`~rlkd.cache.TeacherRow` keeps its teacher top-k flat (``topk_ids`` of length ``sum(topk_count)``, see
:mod:`rlkd.cache.schema`). :func:`collate` pads the token ids to ``(B, T)`` and writes the teacher entries of the
selected positions straight into ``(N, k)`` arrays, in row-major ``(b, t)`` order, so ``hidden[target_mask]`` of
hidden states ``(B, T, H)`` lines up with the targets row by row (position ``t`` predicts token ``t + 1``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rlkd.cache.manifest import max_cached_id
from rlkd.cache.schema import TeacherRow

__all__ = ["ModelBatch", "TeacherTargets", "collate", "vocab_problem"]


@dataclass
class TeacherTargets:
    """The cached teacher at the ``N`` positions being scored (already flattened)."""

    topk_ids: Tensor
    """(N, k) int64: teacher top ids in teacher rank order; valid entries first, padding 0."""
    topk_logprobs: Tensor
    """(N, k) float32: their log-probabilities at temperature 1, non-increasing; -inf where invalid."""
    topk_valid: Tensor
    """(N, k) bool: entry is real (adaptive k keeps fewer than k at some positions)."""
    tail_logmass: Tensor
    """(N,) float32: ``log(1 - sum_topk p)``; -inf when the top-k holds all the mass."""
    target_ids: Tensor
    """(N,) int64: the actual next token (for the CE term)."""

    def slice(self, start: int, end: int) -> TeacherTargets:
        """Positions ``start:end`` (views, no copy)."""
        return TeacherTargets(*(getattr(self, f.name)[start:end] for f in fields(self)))

    def select(self, mask: Tensor) -> TeacherTargets:
        """The positions where ``mask`` (N,) bool is True (a copy)."""
        return TeacherTargets(*(getattr(self, f.name)[mask] for f in fields(self)))

    def to(self, device) -> TeacherTargets:
        return TeacherTargets(*(getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)))

    def __len__(self) -> int:
        return int(self.topk_ids.shape[0])

    @property
    def k(self) -> int:
        return int(self.topk_ids.shape[1])


@dataclass
class ModelBatch:
    """Rows padded for the student's forward, with the teacher targets of their selected positions."""

    input_ids: Tensor
    """(B, T) int64, right-padded with 0."""
    attention_mask: Tensor
    """(B, T) int64 (transformers wants integers): 1 on real tokens."""
    target_mask: Tensor
    """(B, T) bool: the positions with a target; ``hidden[target_mask]`` lines up with ``targets``. The last real
    position and padding are always False. For training these are the trained positions (``loss_mask``)."""
    trained: Tensor
    """(N,) bool: which targets are trained positions (``loss_mask``); all True unless ``all_positions``."""
    targets: TeacherTargets
    """The teacher at the N selected positions, row-major ``(b, t)`` order."""
    row_ids: list[str]
    """The rows' ``row_id``, in batch order."""
    tokens: int
    """Real (non-padding) input tokens."""

    @property
    def positions(self) -> int:
        """N, the number of selected positions (trained positions, for training)."""
        return len(self.targets)

    def to(self, device: torch.device | str) -> ModelBatch:
        return ModelBatch(input_ids=self.input_ids.to(device), attention_mask=self.attention_mask.to(device),
                          target_mask=self.target_mask.to(device), trained=self.trained.to(device),
                          targets=self.targets.to(device), row_ids=self.row_ids, tokens=self.tokens)


def collate(rows: Sequence[TeacherRow], k: int, *, all_positions: bool = False) -> ModelBatch:
    """Pad ``rows`` into a :class:`ModelBatch`; the targets hold each row's trained positions (``loss_mask``), or
    every scored position with ``all_positions``. ``k`` is the cache's k. Loops over rows, never over positions."""
    if not rows:
        raise ValueError("collate() needs at least one row")
    B = len(rows)
    T = max(int(r.input_ids.shape[0]) for r in rows)
    selected = [np.ones(r.num_positions, dtype=bool) if all_positions else np.asarray(r.loss_mask, dtype=bool)
                for r in rows]
    N = sum(int(s.sum()) for s in selected)
    input_ids = np.zeros((B, T), dtype=np.int64)
    attention_mask = np.zeros((B, T), dtype=np.int64)
    target_mask = np.zeros((B, T), dtype=bool)
    topk_ids = np.zeros((N, k), dtype=np.int64)
    topk_lp = np.full((N, k), -np.inf, dtype=np.float32)
    topk_valid = np.zeros((N, k), dtype=bool)
    tail = np.empty(N, dtype=np.float32)
    target_ids = np.empty(N, dtype=np.int64)
    trained = np.empty(N, dtype=bool)
    o = 0  # first target row of the current cache row
    for b, (r, sel) in enumerate(zip(rows, selected)):
        Tb, P, m = int(r.input_ids.shape[0]), r.num_positions, int(sel.sum())
        input_ids[b, :Tb] = r.input_ids
        attention_mask[b, :Tb] = 1
        target_mask[b, :P] = sel
        if m == 0:
            continue
        n = int(r.topk_ids.shape[0])
        if n == P * k:  # every position kept k entries: a reshape and a row selection
            topk_ids[o:o + m] = r.topk_ids.reshape(P, k)[sel]  # (m, k)
            topk_lp[o:o + m] = r.topk_logprobs.reshape(P, k)[sel]
            topk_valid[o:o + m] = True
        else:  # adaptive k: entry e of position t goes to slot (row of t, e - start_t) of the (N, k) arrays
            counts = r.topk_count.astype(np.int64)  # (P,)
            starts = np.cumsum(counts) - counts
            out_row = np.full(P, -1, dtype=np.int64)
            out_row[sel] = np.arange(o, o + m)
            keep = np.repeat(sel, counts)  # (n,) entries of selected positions
            dst = (np.repeat(out_row, counts) * k + np.arange(n) - np.repeat(starts, counts))[keep]
            topk_ids.reshape(-1)[dst] = r.topk_ids[keep]
            topk_lp.reshape(-1)[dst] = r.topk_logprobs[keep]
            topk_valid.reshape(-1)[dst] = True
        tail[o:o + m] = r.tail_logmass[sel]
        target_ids[o:o + m] = r.input_ids[1:][sel]
        trained[o:o + m] = np.asarray(r.loss_mask, dtype=bool)[sel]
        o += m
    return ModelBatch(
        input_ids=torch.from_numpy(input_ids),  # (B, T)
        attention_mask=torch.from_numpy(attention_mask),  # (B, T)
        target_mask=torch.from_numpy(target_mask),  # (B, T)
        trained=torch.from_numpy(trained),  # (N,)
        targets=TeacherTargets(
            topk_ids=torch.from_numpy(topk_ids),  # (N, k)
            topk_logprobs=torch.from_numpy(topk_lp),  # (N, k)
            topk_valid=torch.from_numpy(topk_valid),  # (N, k)
            tail_logmass=torch.from_numpy(tail),  # (N,)
            target_ids=torch.from_numpy(target_ids),  # (N,)
        ),
        row_ids=[r.row_id for r in rows],
        tokens=int(attention_mask.sum()),
    )


def vocab_problem(vocab_size: int, cache_dir: str | Path, manifest: dict, *, who: str, where: str) -> str | None:
    """Why a student with ``vocab_size`` ids cannot be scored against the cache (None when it can): every cached
    id indexes the student's embedding and LM head. ``who`` names the student, ``where`` the cache, in the message.
    """
    largest = max_cached_id(cache_dir, manifest)
    if largest < vocab_size:
        return None
    return (f"{who} has a vocabulary of {vocab_size} ids, but {where} holds token id {largest}: the student's "
            f"embedding and LM head must cover every cached id. Use a student made from the teacher "
            f"(`rlkd make-student`) or resize its embeddings to at least {largest + 1}.")
