"""The student and the cached teacher on the same outcomes: the cached ids plus one tail bucket. Shared by the
training losses (:mod:`rlkd.trainer.losses`) and the metrics (:mod:`rlkd.core.metrics`), so both read the logits the
same way.

Per scored position the inputs are the student's logits ``z`` (its log-probs ``q = log_softmax(z)``, computed in
float32, or float64 when given float64), the teacher's cached top-k ids ``I`` (rank order) and log-probs ``a``, and
the teacher's tail mass ``P_tail = 1 - sum_{i in I} p_i`` (``tail_logmass = log P_tail``).

Tail bucket. With ``tail="bucket"`` (default) each distribution is collapsed to ``|I| + 1`` outcomes: the cached
tokens and one "everything else" bucket (teacher ``P_tail``, student ``Q_tail = 1 - sum_I e^{q_i}``, computed
exactly as a log-sum-exp over the uncached logits). Every divergence on a :class:`SparseView` is the exact
divergence between these bucketed distributions; why that is the right target, and how it relates to the dense
divergence, is in docs/design.md ("The tail bucket").

``tail="renormalize"``: the teacher is renormalised over ``I`` (zero outside it), DistillKit's ``zero`` mode. The
forward KL then compares it with the full-vocabulary student exactly; a reverse KL, which would be infinite, also
renormalises the student over ``I`` (``renormalize_student``).

Temperature ``tau``: the student is ``log_softmax(z / tau)``; the teacher's cached entries are re-tempered exactly
(``p_i^(1/tau)``, renormalised), but the tail is tempered as ONE bucket, ``P_tail^(1/tau)``, which stands for
``sum_j p_j^(1/tau)`` over the uncached tokens: an approximation (an upper bound for ``tau < 1``, a lower bound for
``tau > 1``) since the uncached probabilities are unknown.

The cached teacher values are renormalised over the ``|I| + 1`` buckets (a no-op for an exact ``fp32`` cache; it
absorbs the q8 codec's rounding, so every divergence stays >= 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rlkd.core.kernels import compute_dtype, vocab_stats
from rlkd.core.targets import TeacherTargets

__all__ = ["SparseView", "bucket_view", "compute_dtype", "forward_kl", "sparse_view", "vocab_stats", "xlogx_ratio"]


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


def xlogx_ratio(log_p: Tensor, log_q: Tensor) -> Tensor:
    """p * (log p - log q) elementwise with 0 * anything = 0 where p = 0 (log_p = -inf)."""
    p_pos = log_p > float("-inf")
    safe_p = torch.where(p_pos, log_p, torch.zeros_like(log_p))
    safe_q = torch.where(p_pos, log_q, torch.zeros_like(log_q))
    return torch.where(p_pos, safe_p.exp() * (safe_p - safe_q), torch.zeros_like(log_p))


def forward_kl(v: SparseView) -> Tensor:
    """Forward KL(teacher || student) per position over the cached ids plus the tail bucket: (N,).

    ``sum_{i in I} p_i (a_i - q_i) + P_tail (log P_tail - log Q_tail)``, with ``Q_tail = 1 - sum_I e^{q_i}``.
    Source: the tail bucket as in DistillKit's ``sparse_kl_div`` (``symmetric_uniform``, arcee-ai/DistillKit,
    ``distillkit/lossfuncs/kl.py``); the bias of dropping it: Sparse Logit Sampling (ACL 2025).
    """
    teacher_lp = v.teacher_topk.masked_fill(~v.valid, float("-inf"))  # (N, k)
    head = xlogx_ratio(teacher_lp, v.student_topk).sum(dim=1)  # (N,)
    return head + xlogx_ratio(v.teacher_tail, v.student_tail)  # (N,)
