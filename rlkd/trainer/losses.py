"""Distillation losses from the cached teacher top-k: sparse KL / reverse KL / TVD with a tail bucket, the RLKD
ranking loss, and cross-entropy on the real next token.

Per scored position the inputs are the student's logits ``z`` (its log-probs ``q = log_softmax(z)``, computed in
float32, or float64 when given float64), the teacher's cached top-k ids ``I`` (rank order) and log-probs ``a``, and
the teacher's tail mass ``P_tail = 1 - sum_{i in I} p_i`` (``tail_logmass = log P_tail``). Every module returns one
value per position, shape ``(N,)``; reduction is the caller's (see :func:`rlkd.trainer.chunked.chunked_distill_loss`).

Tail bucket. With ``tail="bucket"`` (default) each distribution is collapsed to ``|I| + 1`` outcomes: the cached
tokens and one "everything else" bucket (teacher ``P_tail``, student ``Q_tail = 1 - sum_I e^{q_i}``, computed
exactly as a log-sum-exp over the uncached logits). Every divergence below is the exact divergence between these
bucketed distributions. It equals the dense divergence against a teacher that spreads ``P_tail`` uniformly over the
uncached tokens iff the student's own tail is uniform too, and is a lower bound otherwise (data processing).
Plain top-k KL without the bucket is biased (Anshumann et al., "Sparse Logit Sampling: Accelerating Knowledge
Distillation in LLMs", ACL 2025); DistillKit calls the bucket ``symmetric_uniform``.

``tail="renormalize"``: the teacher is renormalised over ``I`` (zero outside it), DistillKit's ``zero`` mode. The
forward KL and TVD then compare it with the full-vocabulary student exactly; the reverse KL, which would be
infinite, also renormalises the student over ``I``.

Temperature ``tau``: the student is ``log_softmax(z / tau)``; the teacher's cached entries are re-tempered exactly
(``p_i^(1/tau)``, renormalised), but the tail is tempered as ONE bucket, ``P_tail^(1/tau)``, which stands for
``sum_j p_j^(1/tau)`` over the uncached tokens: an approximation (an upper bound for ``tau < 1``, a lower bound for
``tau > 1``) since the uncached probabilities are unknown. The kd term is multiplied by ``tau^2`` (Hinton et al.
2015) so its gradient scale does not change with ``tau``. The rank and CE terms always use ``tau = 1``.

The cached teacher values are renormalised over the ``|I| + 1`` buckets (a no-op for an exact ``fp32`` cache; it
absorbs the q8 codec's rounding, so every divergence stays >= 0).

Ranking loss: :class:`RankLoss`; the union and the teacher score of uncached tokens are defined in
:func:`rank_union`.

Cost: :class:`DistillLoss` reads the (N, V) logits in one fused pass (:func:`rlkd.trainer.kernels.vocab_stats`: logsumexp, the exact
tail logsumexp, every gather) plus one blocked top-k (:func:`rlkd.trainer.kernels.top_ids`) for the ranking union, and writes one (N, V)
gradient; on CPU the whole loss costs less than ``F.cross_entropy`` on the same logits.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from rlkd.trainer.config import LossConfig
from rlkd.trainer.kernels import compute_dtype, top_ids, vocab_stats
from rlkd.trainer.softrank import soft_rank

__all__ = [
    "LOSS_TERMS",
    "DistillLoss",
    "RankLoss",
    "SparseForwardKL",
    "SparseReverseKL",
    "SparseTVD",
    "TeacherTargets",
    "bucket_view",
    "rank_union",
    "sparse_view",
]

LOSS_TERMS = ("kd", "rank", "ce", "total", "overlap")
"""Keys of :meth:`DistillLoss.forward`'s result, in a fixed order (the chunked loss stacks them in this order)."""

LOG_FLOOR = -100.0
"""Floor for teacher log-probabilities inside the reverse KL: a teacher tail of exactly 0 (top-k holding all the
mass) would make it infinite for any student; -100 nats keeps it finite and still dominant."""


@dataclass
class TeacherTargets:
    """The cached teacher at the ``N`` positions being trained (already flattened with the loss mask)."""

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

    def to(self, device) -> TeacherTargets:
        return TeacherTargets(*(getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)))

    def __len__(self) -> int:
        return int(self.topk_ids.shape[0])

    @property
    def k(self) -> int:
        return int(self.topk_ids.shape[1])

    @classmethod
    def from_batch(cls, batch: dict, mask: Tensor | None = None) -> TeacherTargets:
        """Flatten a :class:`rlkd.cache.CacheReader` batch to the positions where ``mask`` (default the batch's
        ``loss_mask``) is True, in row-major ``(b, t)`` order: the same order as ``hidden[mask]`` for hidden
        states of shape (B, T, H), since position ``t`` predicts token ``t + 1``.
        """
        mask = batch["loss_mask"] if mask is None else mask  # (B, T) bool
        input_ids = batch["input_ids"]  # (B, T)
        next_ids = torch.zeros_like(input_ids)
        next_ids[:, :-1] = input_ids[:, 1:]  # (B, T): token t+1 is position t's target
        return cls(
            topk_ids=batch["topk_ids"][mask],  # (N, k)
            topk_logprobs=batch["topk_logprobs"][mask].float(),  # (N, k)
            topk_valid=batch["topk_valid"][mask],  # (N, k)
            tail_logmass=batch["tail_logmass"][mask].float(),  # (N,)
            target_ids=next_ids[mask],  # (N,)
        )


# ----------------------------------------------------------------------------------------------------------------
# Shared preparation: the bucketed (or renormalised) teacher and student, gathered at the cached ids.


@dataclass
class SparseView:
    """Both distributions over the cached ids plus the tail bucket, in log space, shape-aligned."""

    student_topk: Tensor
    """(N, k) student log-probs at the cached ids (0 where invalid)."""
    student_tail: Tensor
    """(N,) student log mass outside the valid cached ids (-inf when renormalised)."""
    teacher_topk: Tensor
    """(N, k) teacher log-probs, re-tempered and renormalised (0 where invalid)."""
    teacher_tail: Tensor
    """(N,) teacher log tail mass (-inf when empty or renormalised)."""
    valid: Tensor
    """(N, k) bool."""


def _lse_masked(x: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    return torch.logsumexp(x.masked_fill(~mask, float("-inf")), dim=dim)


def sparse_view(logits: Tensor, targets: TeacherTargets, temperature: float = 1.0, tail: str = "bucket",
                renormalize_student: bool = False) -> SparseView:
    """Gather both distributions on the cached ids and their tail buckets. ``logits`` (N, V), any float dtype."""
    z = logits.to(compute_dtype(logits))
    if temperature != 1.0:
        z = z / temperature
    lse, tail_lse, z_cached, _ = vocab_stats(z, targets.topk_ids, targets.topk_valid)
    return bucket_view(z_cached - lse[:, None], tail_lse - lse, targets, temperature, tail, renormalize_student)


def bucket_view(s_topk: Tensor, s_tail: Tensor, targets: TeacherTargets, temperature: float = 1.0,
                tail: str = "bucket", renormalize_student: bool = False) -> SparseView:
    """Pair the student's log-probs at the cached ids (N, k) and tail log mass (N,) with the teacher's buckets."""
    dtype = s_topk.dtype
    valid = targets.topk_valid  # (N, k)
    a = targets.topk_logprobs.to(dtype).masked_fill(~valid, float("-inf"))  # (N, k)
    t_tail = targets.tail_logmass.to(dtype)  # (N,)
    if tail == "renormalize":
        t_tail = torch.full_like(t_tail, float("-inf"))
    elif tail != "bucket":
        raise ValueError(f"tail must be 'bucket' or 'renormalize', got {tail!r}")
    if temperature != 1.0:
        # Exact for the cached entries (p_i^(1/tau)); the tail bucket is tempered as one outcome (approximation).
        a = a / temperature
        t_tail = t_tail / temperature
    log_z = torch.logsumexp(torch.cat([a, t_tail[:, None]], dim=1), dim=1)  # (N,)
    log_z = torch.where(torch.isfinite(log_z), log_z, torch.zeros_like(log_z))  # rows with nothing cached
    a = a - log_z[:, None]
    t_tail = t_tail - log_z

    if renormalize_student:
        s_norm = _lse_masked(s_topk, valid)  # (N,)
        s_norm = torch.where(torch.isfinite(s_norm), s_norm, torch.zeros_like(s_norm))
        s_topk = s_topk - s_norm[:, None]
        s_tail = torch.full_like(s_tail, float("-inf"))

    zero = torch.zeros((), dtype=dtype, device=s_topk.device)
    return SparseView(
        student_topk=torch.where(valid, s_topk, zero),
        student_tail=s_tail,
        teacher_topk=torch.where(valid, a, zero),
        teacher_tail=t_tail,
        valid=valid,
    )


def _xlogx_ratio(log_p: Tensor, log_q: Tensor) -> Tensor:
    """p * (log p - log q) elementwise with 0 * anything = 0 where p = 0 (log_p = -inf)."""
    p_pos = log_p > float("-inf")
    safe_p = torch.where(p_pos, log_p, torch.zeros_like(log_p))
    safe_q = torch.where(p_pos, log_q, torch.zeros_like(log_q))
    return torch.where(p_pos, safe_p.exp() * (safe_p - safe_q), torch.zeros_like(log_p))


class SparseForwardKL(nn.Module):
    """Forward KL(teacher || student) over the cached ids plus the tail bucket.

    ``sum_{i in I} p_i (a_i - q_i) + P_tail (log P_tail - log Q_tail)``, with ``Q_tail = 1 - sum_I e^{q_i}``.
    Shapes: a :class:`SparseView` of (N, k) / (N,) tensors -> (N,).
    Source: the tail bucket as in DistillKit's ``sparse_kl_div`` (``symmetric_uniform``, arcee-ai/DistillKit,
    ``distillkit/lossfuncs/kl.py``); the bias of dropping it: Sparse Logit Sampling (ACL 2025).
    """

    def forward(self, v: SparseView) -> Tensor:
        teacher_lp = v.teacher_topk.masked_fill(~v.valid, float("-inf"))  # (N, k)
        head = _xlogx_ratio(teacher_lp, v.student_topk).sum(dim=1)  # (N,)
        return head + _xlogx_ratio(v.teacher_tail, v.student_tail)  # (N,)


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
        head = _xlogx_ratio(student_lp, teacher_lp).sum(dim=1)  # (N,)
        return head + _xlogx_ratio(v.student_tail, v.teacher_tail.clamp_min(LOG_FLOOR))  # (N,)


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

    def forward(self, student_scores: Tensor, teacher_scores: Tensor, mask: Tensor, has_teacher: Tensor) -> Tensor:
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
                rank = self.rank_loss(z_extra[:, 1:], union[2], union[1], valid.any(dim=1))

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

