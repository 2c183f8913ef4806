"""Distillation losses from the cached teacher top-k: sparse KL / reverse KL / TVD with a tail bucket, the RLKD
ranking loss, and cross-entropy on the real next token.

Every module returns one value per position, shape ``(N,)``; reduction is the caller's (see
:func:`rlkd.trainer.chunked.chunked_distill_loss`). The inputs are the student's logits (N, V) and the cached teacher
as :class:`~rlkd.core.targets.TeacherTargets`; both are put on the same ``|I| + 1`` outcomes (the cached ids plus a
tail bucket, or the teacher renormalised over the cached ids with ``tail="renormalize"``) by
:mod:`rlkd.core.sparse`, which also explains the temperature's approximation of the tail. The kd term is
multiplied by ``tau^2`` (Hinton et al. 2015) so its gradient scale does not change with ``tau``. The rank and CE
terms always use ``tau = 1``.

Ranking loss: :class:`RankLoss`; the union and the teacher score of uncached tokens are defined in
:func:`rank_union`.

Cost: :class:`DistillLoss` reads the (N, V) logits in one fused pass (:func:`rlkd.core.kernels.vocab_stats`:
logsumexp, the exact tail logsumexp, every gather) plus one blocked top-k (:func:`rlkd.core.kernels.top_ids`) for the
ranking union, and writes one (N, V) gradient; on CPU the whole loss costs less than ``F.cross_entropy`` on the same
logits.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rlkd.core.kernels import compute_dtype, top_ids, vocab_stats
from rlkd.core.sparse import SparseView, bucket_view, forward_kl, sparse_view, xlogx_ratio
from rlkd.core.targets import TeacherTargets
from rlkd.trainer.config import LossConfig
from rlkd.trainer.softrank import soft_rank

__all__ = [
    "LOSS_TERMS",
    "DistillLoss",
    "RankLoss",
    "SparseForwardKL",
    "SparseReverseKL",
    "SparseTVD",
    "rank_union",
]

LOSS_TERMS = ("kd", "rank", "ce", "total", "overlap")
"""Keys of :meth:`DistillLoss.forward`'s result, in a fixed order (the chunked loss stacks them in this order)."""

LOG_FLOOR = -100.0
"""Floor for teacher log-probabilities inside the reverse KL: a teacher tail of exactly 0 (top-k holding all the
mass) would make it infinite for any student; -100 nats keeps it finite and still dominant."""


# ----------------------------------------------------------------------------------------------------------------
# Divergences on the sparse view (see rlkd.core.sparse: the cached ids plus the tail bucket).


class SparseForwardKL(nn.Module):
    """Forward KL(teacher || student) over the cached ids plus the tail bucket.

    ``sum_{i in I} p_i (a_i - q_i) + P_tail (log P_tail - log Q_tail)``, with ``Q_tail = 1 - sum_I e^{q_i}``.
    Shapes: a :class:`SparseView` of (N, k) / (N,) tensors -> (N,).
    Source: the tail bucket as in DistillKit's ``sparse_kl_div`` (``symmetric_uniform``, arcee-ai/DistillKit,
    ``distillkit/lossfuncs/kl.py``); the bias of dropping it: Sparse Logit Sampling (ACL 2025).
    """

    def forward(self, v: SparseView) -> Tensor:
        return forward_kl(v)  # (N,); the metrics report the same function


class SparseReverseKL(nn.Module):
    """Reverse KL(student || teacher) over the cached ids plus the tail bucket.

    ``sum_{i in I} e^{q_i} (q_i - a_i) + Q_tail (log Q_tail - log P_tail)``; teacher log-values are floored at
    ``LOG_FLOOR`` so an empty teacher tail gives a large finite loss, not inf. With ``tail="renormalize"`` both
    sides are renormalised over ``I`` (see :func:`sparse_view`). Shapes: :class:`SparseView` -> (N,).
    Source: reverse KL for LLM distillation, MiniLLM (Gu et al. 2024, arXiv 2306.08543); bucket as above.
    """

    def forward(self, v: SparseView) -> Tensor:
        student_lp = v.student_topk.masked_fill(~v.valid, float("-inf"))  # (N, k)
        teacher_lp = v.teacher_topk.clamp_min(LOG_FLOOR)  # (N, k)
        head = xlogx_ratio(student_lp, teacher_lp).sum(dim=1)  # (N,)
        return head + xlogx_ratio(v.student_tail, v.teacher_tail.clamp_min(LOG_FLOOR))  # (N,)


class SparseTVD(nn.Module):
    """Total variation distance over the cached ids plus the tail bucket.

    ``0.5 * (sum_{i in I} |p_i - e^{q_i}| + |P_tail - Q_tail|)``. Shapes: :class:`SparseView` -> (N,).
    Source: TVD for sequence-level KD, Wen et al. 2023 ("f-Divergence Minimization for Sequence-Level KD",
    arXiv 2307.15190); DistillKit's ``tvd.py`` uses the same sparse form.
    """

    def forward(self, v: SparseView) -> Tensor:
        diff = (v.teacher_topk.exp() - v.student_topk.exp()).abs()  # (N, k)
        head = torch.where(v.valid, diff, torch.zeros_like(diff)).sum(dim=1)  # (N,)
        return 0.5 * (head + (v.teacher_tail.exp() - v.student_tail.exp()).abs())  # (N,)


# ----------------------------------------------------------------------------------------------------------------
# RLKD ranking loss.


def rank_union(student_logits: Tensor, targets: TeacherTargets, k_r: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row union ``S`` of the teacher's top-``k_r`` (cached order) and the student's top-``k_r``.

    Returns ``(ids, mask, teacher_scores, overlap)``:
      ids (N, 2 k_r) int64: teacher's top-k_r ids, then the student's top-k_r ids (``torch.topk`` order);
      mask (N, 2 k_r) bool: True for the members of ``S``. A student id already among the teacher's valid top-k_r
        is a duplicate and masked out, so each token of ``S`` appears once and ``k_r <= |S| <= 2 k_r`` (fewer if
        the teacher kept fewer than k_r entries here);
      teacher_scores (N, 2 k_r): the teacher's score of each id, see below;
      overlap (N,) int64: ``|top-k_r(T) & top-k_r(S)|``.

    Teacher scores. A token of ``S`` that is in the row's cached top-k (all k entries, not just the first k_r) gets
    its cached log-prob. Every other token of ``S`` gets the SAME value (ties stay ties), strictly below every cached
    value::

        fill = min(a_min - 1, log P_tail)            (a_min - 1 when the tail is empty, log P_tail = -inf)

    where ``a_min`` is the row's lowest valid cached log-prob: one nat below the lowest cached entry, and never above
    the tail's whole mass, which bounds any single uncached token's log-prob. The true values are unknown; only
    their order relative to the cached ones (all below) is certain. This is why the cache keeps k >= k_r (e.g. 20).

    Unlike the official RLKD code, which takes ``torch.unique(torch.cat([teacher_topk, student_topk], -1), dim=-1)``
    over the whole (batch, 2 k_r) index tensor: ``unique(dim=-1)`` removes duplicate *columns* across the batch, not
    duplicate ids within a row, so rows keep duplicated tokens and the column set depends on the other rows. We do
    not reproduce that quirk; the union here is per row.
    """
    valid_all = targets.topk_valid  # (N, k)
    k = targets.k
    if k < k_r:
        raise ValueError(f"the ranking loss needs the cache's k >= rank_k, but the cache has k={k} and rank_k={k_r}: "
                         f"lower rank_k or rebuild the cache with a larger k")
    t_ids = targets.topk_ids[:, :k_r]  # (N, k_r) teacher top-k_r in rank order
    t_valid = valid_all[:, :k_r]  # (N, k_r)
    s_ids = top_ids(student_logits.detach(), k_r)  # (N, k_r), in torch.topk order
    dup = ((s_ids[:, :, None] == t_ids[:, None, :]) & t_valid[:, None, :]).any(dim=-1)  # (N, k_r)
    ids = torch.cat([t_ids, s_ids], dim=1)  # (N, 2 k_r)
    mask = torch.cat([t_valid, ~dup], dim=1)  # (N, 2 k_r)

    score_dtype = torch.promote_types(targets.topk_logprobs.dtype, torch.float32)
    a = targets.topk_logprobs.to(score_dtype)  # (N, k)
    match = (ids[:, :, None] == targets.topk_ids[:, None, :]) & valid_all[:, None, :]  # (N, 2 k_r, k)
    in_cache = match.any(dim=-1)  # (N, 2 k_r)
    cached_score = torch.where(match, a[:, None, :], torch.zeros((), device=a.device)).sum(dim=-1)  # (N, 2 k_r)
    a_min = torch.where(valid_all, a, torch.full_like(a, float("inf"))).amin(dim=1)  # (N,)
    a_min = torch.where(torch.isfinite(a_min), a_min, torch.zeros_like(a_min))  # rows with nothing cached
    fill = torch.minimum(a_min - 1.0, targets.tail_logmass.to(score_dtype))  # (N,)
    fill = torch.where(torch.isfinite(fill), fill, a_min - 1.0)
    teacher_scores = torch.where(in_cache, cached_score, fill[:, None])  # (N, 2 k_r)
    return ids, mask, teacher_scores, dup.sum(dim=1)


def _masked_pearson(x: Tensor, y: Tensor, mask: Tensor) -> Tensor:
    """Pearson correlation of each row of x, y (N, n) over the masked entries; 0 when either side is constant."""
    m = mask.to(x.dtype)
    count = m.sum(dim=1, keepdim=True).clamp_min(1)  # (N, 1)
    xc = (x - (x * m).sum(dim=1, keepdim=True) / count) * m  # (N, n)
    yc = (y - (y * m).sum(dim=1, keepdim=True) / count) * m
    cov = (xc * yc).sum(dim=1)  # (N,)
    var = (xc * xc).sum(dim=1) * (yc * yc).sum(dim=1)  # (N,)
    tiny = torch.finfo(x.dtype).tiny
    return torch.where(var > tiny, cov / var.clamp_min(tiny).sqrt(), torch.zeros_like(cov))


class RankLoss(nn.Module):
    """RLKD ranking loss: ``1 - Pearson(soft_rank(t_S), soft_rank(s_S))`` per position, i.e. 1 - soft Spearman.

    ``S`` is the per-row union of the teacher's and the student's top-``k`` (:func:`rank_union`, which also defines
    the teacher scores of uncached tokens); ``s_S`` are student log-probs (log-probs, not probabilities: soft ranks
    are shift- but not scale-invariant). Soft ranks: Blondel et al. 2020, L2, ``strength`` (1.0 in the paper), see
    :mod:`rlkd.trainer.softrank`. Range [0, 2]: 0 for identical orders, 2 for reversed ones (with well-separated
    scores). Positions where the teacher kept no entry give 0.

    Shapes: student_logits (N, V), :class:`TeacherTargets` with N rows -> (loss (N,), overlap (N,) int64). Logits
    and log-probs differ by a per-row constant, which neither the top-k nor the soft ranks see (the permutahedron
    lies in a hyperplane orthogonal to the all-ones vector), so the loss takes either and skips the log-softmax.
    Source: Peng & Zhang 2024, "Enhancing Knowledge Distillation of Large Language Models through Efficient
    Multi-Modal Distribution Alignment", arXiv 2409.12545 (their code: ``torchsort.soft_rank`` + Pearson).
    """

    def __init__(self, k: int = 5, strength: float = 1.0):
        super().__init__()
        self.k = k
        self.strength = strength

    def forward(self, student_logits: Tensor, targets: TeacherTargets) -> tuple[Tensor, Tensor]:
        ids, mask, teacher_scores, overlap = rank_union(student_logits, targets, self.k)
        student_scores = student_logits.gather(1, ids).to(compute_dtype(student_logits))  # (N, 2 k_r)
        return self.from_scores(student_scores, teacher_scores, mask, targets.topk_valid.any(dim=1)), overlap

    def from_scores(self, student_scores: Tensor, teacher_scores: Tensor, mask: Tensor, has_teacher: Tensor) -> Tensor:
        """The loss (N,) from the union's scores (N, 2 k_r) and mask, as given by :func:`rank_union`."""
        teacher_scores = teacher_scores.to(student_scores.dtype)
        r_t = soft_rank(teacher_scores, mask, self.strength)  # (N, 2 k_r), constant
        r_s = soft_rank(student_scores, mask, self.strength)  # (N, 2 k_r)
        loss = 1.0 - _masked_pearson(r_t, r_s, mask)  # (N,)
        return torch.where(has_teacher, loss, torch.zeros_like(loss))


# ----------------------------------------------------------------------------------------------------------------


class DistillLoss(nn.Module):
    """All terms per position from full-vocabulary logits: ``total = kd_weight * w * kd + rank_weight * rank +
    ce_weight * ce``, with ``w = overlap / k_r`` (detached) if ``cfg.dynamic`` else 1.

    forward(student_logits (N, V), targets: TeacherTargets with N rows) -> dict of (N,) tensors:
      ``kd`` (unweighted, already times ``tau^2``), ``rank``, ``ce``, ``total``, and ``overlap``
      (``|top-k_r(T) & top-k_r(S)| / k_r``, no gradient; 0 when the ranking loss is off and dynamic is False).
    Terms that are off (``kd="none"``, ``rank_weight=0``) are zeros; CE is always computed, for logging.
    Rows with nothing to learn from should be removed by the caller (the loss mask), not passed in.
    """

    def __init__(self, cfg: LossConfig):
        super().__init__()
        problems = cfg.validate()
        if cfg.kd not in ("forward_kl", "reverse_kl", "tvd", "none"):
            problems.append(f"kd must be one of forward_kl, reverse_kl, tvd, none; got {cfg.kd!r}")
        if cfg.tail not in ("bucket", "renormalize"):
            problems.append(f"tail must be bucket or renormalize; got {cfg.tail!r}")
        if problems:
            raise ValueError("invalid LossConfig: " + "; ".join(problems))
        self.cfg = cfg
        kd_cls = {"forward_kl": SparseForwardKL, "reverse_kl": SparseReverseKL, "tvd": SparseTVD}
        self.kd_loss = kd_cls[cfg.kd]() if cfg.kd != "none" else None
        self.rank_loss = RankLoss(cfg.rank_k, cfg.rank_strength)

    def check_targets(self, targets: TeacherTargets, vocab_size: int) -> None:
        """Raise a clear ValueError when the targets cannot be used with a vocabulary of ``vocab_size``.

        Note: reads the max id back from the device (a CPU-GPU sync point), so call it once per step, not per chunk.
        """
        if (self.cfg.rank_weight > 0 or self.cfg.dynamic) and targets.k < self.cfg.rank_k:
            raise ValueError(f"the ranking loss needs the cache's k >= rank_k, but the cache has k={targets.k} "
                             f"and rank_k={self.cfg.rank_k}: lower rank_k or rebuild the cache with a larger k")
        if targets.topk_ids.numel():
            max_id = int(torch.maximum(targets.topk_ids.max(), targets.target_ids.max()))
            if max_id >= vocab_size:
                raise ValueError(f"a cached token id ({max_id}) is outside the student's vocabulary of {vocab_size}: "
                                 f"the cache was built with a different tokenizer or a larger vocabulary")

    def forward(self, student_logits: Tensor, targets: TeacherTargets, *, check: bool = True) -> dict[str, Tensor]:
        cfg = self.cfg
        n_pos, vocab = student_logits.shape
        if len(targets) != n_pos:
            raise ValueError(f"student_logits has {n_pos} positions but the teacher targets have {len(targets)}")
        if check:
            self.check_targets(targets, vocab)
        dtype = compute_dtype(student_logits)
        z = student_logits.to(dtype)  # (N, V); a float32 copy only when the logits are bf16/fp16
        zeros = torch.zeros(n_pos, dtype=dtype, device=student_logits.device)
        valid = targets.topk_valid

        # The student's top-k_r (no gradient) decides the union before the one pass over the vocabulary below.
        union = None
        if cfg.rank_weight > 0 or cfg.dynamic:
            union = rank_union(z, targets, cfg.rank_k)  # ids (N, 2 k_r), mask, teacher scores, overlap count
        extra = [targets.target_ids[:, None]] + ([union[0]] if union is not None else [])
        # One fused pass gives logsumexp, the exact tail logsumexp and every gathered logit; no (N, V) log-softmax.
        lse, tail_lse, z_cached, z_extra = vocab_stats(z, targets.topk_ids, valid, torch.cat(extra, dim=1))

        ce = lse - z_extra[:, 0]  # (N,) cross-entropy on the real next token: logsumexp(z) - z[target]

        rank, overlap = zeros, zeros
        if union is not None:
            overlap = union[3].to(dtype) / cfg.rank_k
            if cfg.rank_weight > 0:
                # Logits, not log-probs: they differ by a per-row constant, which soft ranks ignore.
                rank = self.rank_loss.from_scores(z_extra[:, 1:], union[2], union[1], valid.any(dim=1))

        kd = zeros
        if self.kd_loss is not None:
            renorm_student = cfg.kd == "reverse_kl" and cfg.tail == "renormalize"
            if cfg.temperature == 1.0:
                view = bucket_view(z_cached - lse[:, None], tail_lse - lse, targets, 1.0, cfg.tail, renorm_student)
            else:
                view = sparse_view(z, targets, cfg.temperature, cfg.tail, renorm_student)
            kd = self.kd_loss(view) * (cfg.temperature ** 2)  # (N,)

        kd_w = overlap if cfg.dynamic else 1.0
        total = cfg.kd_weight * kd_w * kd + cfg.rank_weight * rank + cfg.ce_weight * ce
        return {"kd": kd, "rank": rank, "ce": ce, "total": total, "overlap": overlap}

