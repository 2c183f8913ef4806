"""Peak agreement of a student with the cached teacher (RLKD, Peng & Zhang 2024, section 5), plus its sparse KL and
cross-entropy: :func:`score` rates every position, :class:`PeakMetrics` averages. The trainer's evaluation and
``rlkd inspect --student`` both call them, so for the same student, cache and tail mode they report the same numbers.

Per position, ``T_k`` is the teacher's first ``k`` cached ids (the cache's rank order; the cache decided any teacher
ties) and ``S_k`` the student's top ``k`` ids in ``torch.topk`` order (how it orders exactly tied logits is torch's
choice: on CPU the lower id first in practice, but not guaranteed):

- ``cr@k`` (consistency rate): ``S_k == T_k`` element by element: the same k tokens in the same order.
- ``or@k`` (overlap rate, the paper's OR@k): ``|S_k & T_k| / k``, a fraction in [0, 1] *per position*;
  reported through its mean:
- ``mor@k`` (mean overlap rate, the paper's MOR@k): the mean of ``or@k`` over positions.
- ``set@k``: ``S_k`` and ``T_k`` are the same set (``or@k == 1``): the same k tokens in any order.
- ``top1_agreement``: ``S_1 == T_1`` (the same as ``cr@1``).
- ``kd``: the forward sparse KL(teacher || student) at temperature 1 with the given tail mode
  (:func:`rlkd.core.sparse.forward_kl`, the training loss's own function), nats per position.
- ``ce``: the student's cross-entropy on the actual next token, nats per position.

Each rate at ``k`` is averaged over the positions *eligible* at ``k``: those where the teacher kept at least ``k``
valid entries (with adaptive k a position may keep fewer; its ``T_k`` is undefined, so it is counted in
``eligible@k`` rather than scored as a miss). A rate with no eligible position is None. A metric whose ``k`` exceeds
the cache's k cannot be defined on that cache at all: it is left out, with a note (:func:`left_out`), never refused.

The names and k's import without torch (``rlkd --help`` and the demo list them); torch is imported where it is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

    from rlkd.core.targets import TeacherTargets

__all__ = ["CR_KS", "OVERLAP_KS", "TAILS", "PeakMetrics", "left_out", "left_out_note", "metric_keys",
           "peak_agreement", "score"]

CR_KS = (1, 2, 5)
"""The k of ``cr@k`` (the paper's CR@1/2/5)."""
OVERLAP_KS = (5, 10)
"""The k of ``mor@k`` (the paper's MOR@5/10) and ``set@k``."""
TAILS = ("bucket", "renormalize")
"""Tail modes of ``kd`` (see :mod:`rlkd.core.sparse`)."""


def _ks(cache_k: int | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    fits = (lambda k: True) if cache_k is None else (lambda k: k <= cache_k)
    return tuple(k for k in CR_KS if fits(k)), tuple(k for k in OVERLAP_KS if fits(k))


def metric_keys(cache_k: int | None = None) -> list[str]:
    """The reported metrics in display order; with ``cache_k``, only those a cache with that k defines."""
    cr_ks, overlap_ks = _ks(cache_k)
    return ([f"cr@{k}" for k in cr_ks] + [f"mor@{k}" for k in overlap_ks] + [f"set@{k}" for k in overlap_ks]
            + ["top1_agreement", "kd", "ce"])


def left_out(cache_k: int) -> dict[str, str]:
    """``{metric: why}`` for each metric a cache keeping the teacher's top-``cache_k`` cannot define."""
    kept = set(metric_keys(cache_k))
    return {key: f"compares the teacher's top-{key.split('@')[1]}, but the cache keeps only its top-{cache_k}"
            for key in metric_keys() if key not in kept}


def left_out_note(cache_k: int) -> str | None:
    """One line saying which metrics are left out and why (None when every metric fits)."""
    gone = left_out(cache_k)
    if not gone:
        return None
    need = max(int(key.split("@")[1]) for key in gone)
    return (f"left out {', '.join(gone)}: they compare the teacher's top-k beyond the cache's k={cache_k} (its "
            f"ranks past {cache_k} are unknown); write the cache with `rlkd cache-teacher --top-k {need}` or more "
            "to get them")


def peak_agreement(student_topk: Tensor, teacher_ids: Tensor, teacher_valid: Tensor, k: int) -> dict[str, Tensor]:
    """Per-position agreement at one ``k``, each value (N,): ``cr`` and ``set`` bool, ``or`` the overlap fraction
    ``|S_k & T_k| / k`` (float32; NaN where not eligible), ``eligible`` bool (the teacher kept at least ``k``
    entries; where it did not, ``T_k`` is undefined and ``cr``/``set`` are False but meaningless).

    student_topk (N, >=k) int64 in the student's rank order; teacher_ids / teacher_valid (N, >=k), valid first.
    """
    import torch

    s = student_topk[:, :k]  # (N, k)
    t = teacher_ids[:, :k]  # (N, k)
    eligible = teacher_valid[:, :k].all(dim=1)  # (N,)
    # |S_k & T_k|: ids are distinct within each side, so counting matching pairs counts common tokens.
    common = (s[:, :, None] == t[:, None, :]).any(dim=2).sum(dim=1)  # (N,)
    overlap = torch.where(eligible, common.float() / k, torch.full_like(common, float("nan"), dtype=torch.float32))
    return {"cr": (s == t).all(dim=1), "or": overlap, "set": common == k, "eligible": eligible}


def score(logits: Tensor, targets: TeacherTargets, *, tail: str = "bucket", cr_ks: tuple[int, ...] = CR_KS,
          overlap_ks: tuple[int, ...] = OVERLAP_KS) -> dict[str, Tensor]:
    """Every metric of every position: the one scoring function behind the trainer's evaluation and ``rlkd inspect
    --student``.

    Args:
        logits: (N, V) student logits at the N positions of ``targets`` (any float dtype; computed in float32 or
            wider).
        targets: the cached teacher at those positions.
        tail: ``bucket`` or ``renormalize``, the tail mode of ``kd``.
    Returns:
        (N,) tensors: ``kd``, ``ce`` (float), and for each k ``cr@k``, ``or@k``, ``set@k``, ``eligible@k``
        (``or@k`` a fraction, the others bool; for the k of ``cr_ks`` only ``cr@k``, of ``overlap_ks`` the other
        two).
    """
    import torch

    from rlkd.core.sparse import bucket_view, compute_dtype, forward_kl, vocab_stats

    if tail not in TAILS:
        raise ValueError(f"tail must be one of {', '.join(TAILS)}, got {tail!r}")
    k_max = max(cr_ks + overlap_ks + (1,))
    if targets.k < k_max:
        raise ValueError(f"peak metric k={k_max} exceeds the cache's k={targets.k}: ask only for k <= {targets.k} "
                         "(PeakMetrics(cache_k) does)")
    n, vocab = logits.shape
    if n != len(targets):
        raise ValueError(f"the student has {n} positions but the teacher targets have {len(targets)}")
    if vocab < k_max:
        raise ValueError(f"student logits have a vocabulary of {vocab}, fewer than the largest metric k ({k_max})")
    with torch.no_grad():
        z = logits.detach().to(compute_dtype(logits))  # (N, V)
        # One fused pass: logsumexp, the exact tail logsumexp, z at the cached ids and at the actual next token.
        lse, tail_lse, z_cached, z_next = vocab_stats(z, targets.topk_ids, targets.topk_valid,
                                                      targets.target_ids[:, None])
        view = bucket_view(z_cached - lse[:, None], tail_lse - lse, targets, 1.0, tail)
        out = {"kd": forward_kl(view), "ce": lse - z_next[:, 0]}  # (N,) each
        s_top = torch.topk(z, k_max, dim=-1, sorted=True).indices  # (N, k_max)
        valid = targets.topk_valid.bool()
        for k in sorted(set(cr_ks + overlap_ks)):
            agree = peak_agreement(s_top, targets.topk_ids, valid, k)
            out[f"eligible@{k}"] = agree["eligible"]
            if k in cr_ks:
                out[f"cr@{k}"] = agree["cr"]
            if k in overlap_ks:
                out[f"or@{k}"] = agree["or"]
                out[f"set@{k}"] = agree["set"]
    return out


class PeakMetrics:
    """Accumulates :func:`score` over batches; :meth:`compute` returns plain floats (JSON-safe).

    Args:
        cache_k: the cache's k. Metrics whose k exceeds it are left out (:attr:`left_out` says which and why).
        tail: the tail mode of ``kd`` (``bucket`` or ``renormalize``).
    """

    def __init__(self, cache_k: int, tail: str = "bucket"):
        if tail not in TAILS:
            raise ValueError(f"tail must be one of {', '.join(TAILS)}, got {tail!r}")
        self.cache_k = int(cache_k)
        self.tail = tail
        self.cr_ks, self.overlap_ks = _ks(self.cache_k)
        self.left_out = left_out(self.cache_k)
        """``{metric: why}`` for the metrics this cache cannot define."""
        self.reset()

    def reset(self) -> None:
        self.positions = 0
        self.sums: dict[str, float] = {key: 0.0 for key in self._sum_keys()}

    def _sum_keys(self) -> list[str]:
        ks = sorted(set(self.cr_ks + self.overlap_ks))
        return (["kd", "ce"] + [f"cr@{k}" for k in self.cr_ks] + [f"or@{k}" for k in self.overlap_ks]
                + [f"set@{k}" for k in self.overlap_ks] + [f"eligible@{k}" for k in ks])

    def score(self, logits: Tensor, targets: TeacherTargets) -> dict[str, Tensor]:
        """:func:`score` with this accumulator's ks and tail mode (per position, nothing accumulated)."""
        return score(logits, targets, tail=self.tail, cr_ks=self.cr_ks, overlap_ks=self.overlap_ks)

    def add(self, scores: dict[str, Tensor], mask: Tensor | None = None) -> None:
        """Accumulate per-position ``scores`` from :meth:`score` (only where ``mask`` (N,) bool is True)."""
        if mask is not None:
            scores = {key: v[mask.to(v.device)] for key, v in scores.items()}
        self.positions += int(scores["kd"].shape[0])
        for key in ("kd", "ce"):
            self.sums[key] += float(scores[key].double().sum())
        for k in sorted(set(self.cr_ks + self.overlap_ks)):
            eligible = scores[f"eligible@{k}"]
            self.sums[f"eligible@{k}"] += int(eligible.sum())
            for name in ("cr", "or", "set"):
                if f"{name}@{k}" in scores:
                    self.sums[f"{name}@{k}"] += float(scores[f"{name}@{k}"][eligible].double().sum())

    def update(self, logits: Tensor, targets: TeacherTargets) -> dict[str, Tensor]:
        """Score N positions and accumulate them; returns the per-position scores."""
        scores = self.score(logits, targets)
        self.add(scores)
        return scores

    def all_reduce(self, device="cpu") -> None:
        """Sum the counts over the processes of a distributed run (no-op otherwise), so every process computes the
        metrics of all positions. Every process must call it, with the same cache k."""
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        keys = list(self.sums)
        t = torch.tensor([float(self.positions)] + [self.sums[key] for key in keys], dtype=torch.float64,
                         device=device)
        dist.all_reduce(t)
        values = t.tolist()
        self.positions = int(values[0])
        self.sums = dict(zip(keys, values[1:]))

    def parts(self) -> dict[str, tuple[float, float]]:
        """Each metric of :meth:`compute` as ``(numerator, denominator)``; its value is their ratio. Summing the parts
        of several accumulators (rows, batches) gives the pooled value: ``rlkd eval`` bootstraps rows this way."""
        out: dict[str, tuple[float, float]] = {}
        for k in self.cr_ks:
            out[f"cr@{k}"] = (self.sums[f"cr@{k}"], self.sums[f"eligible@{k}"])
        for k in self.overlap_ks:
            out[f"mor@{k}"] = (self.sums[f"or@{k}"], self.sums[f"eligible@{k}"])  # the mean of or@k
        for k in self.overlap_ks:
            out[f"set@{k}"] = (self.sums[f"set@{k}"], self.sums[f"eligible@{k}"])
        out["top1_agreement"] = (self.sums["cr@1"], self.sums["eligible@1"])
        out["kd"] = (self.sums["kd"], float(self.positions))
        out["ce"] = (self.sums["ce"], float(self.positions))
        return out

    def compute(self) -> dict:
        """``{cr@k, mor@k, set@k, top1_agreement, kd, ce}`` for the k's the cache defines (:func:`metric_keys`, rates
        None without eligible positions), plus ``positions`` and the ``eligible@k`` counts."""
        out: dict = {key: (num / den if den else None) for key, (num, den) in self.parts().items()}
        out["positions"] = self.positions
        for k in sorted(set(self.cr_ks + self.overlap_ks)):
            out[f"eligible@{k}"] = int(self.sums[f"eligible@{k}"])
        return out
