"""Peak-agreement metrics between a student and the cached teacher (RLKD, Peng & Zhang 2024, section 5).

Shared by the trainer's evaluation and ``rlkd inspect --student``. Definitions, per position, with ``T_k`` the
teacher's first ``k`` cached ids (the cache's rank order; the cache decided any teacher ties) and ``S_k`` the
student's top ``k`` ids in ``torch.topk`` order (``torch.topk(logits, k, sorted=True)``; how it orders exactly tied
logits is torch's choice: on CPU the lower id first in practice, but not guaranteed):

- ``cr@k`` (consistency rate): ``S_k == T_k`` element by element, i.e. the same k tokens in the same order.
- ``or@k`` (overlap rate): ``set(S_k) == set(T_k)``, same k tokens, any order.
- ``mor@k`` (mean overlap rate): ``|set(S_k) & set(T_k)| / k``.
- ``top1_agreement``: ``S_1 == T_1``; over the positions where the teacher kept at least one entry.
- ``kd``: the mean of the per-position sparse KL given to :meth:`PeakMetrics.update` (None if never given).

Each rate is averaged over the *eligible* positions for its ``k``: those where the teacher kept at least ``k`` valid
entries. With adaptive k a position may keep fewer; it is then ineligible for that ``k`` (its ``T_k`` is undefined)
and counted in ``eligible@k`` / ``positions`` rather than scored as a miss. A rate with no eligible position is None.
Asking for a ``k`` larger than the cache's ``k`` is an error, not an empty metric.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["PeakMetrics", "peak_agreement"]


def _student_topk(student: Tensor, k_max: int) -> Tensor:
    if student.is_floating_point():
        if student.shape[1] < k_max:
            raise ValueError(f"student logits have a vocabulary of {student.shape[1]}, fewer than the largest "
                             f"metric k ({k_max})")
        return torch.topk(student, k_max, dim=-1, sorted=True).indices  # (N, k_max)
    if student.shape[1] < k_max:
        raise ValueError(f"student_topk_ids has K={student.shape[1]} columns but the metrics need the student's top "
                         f"{k_max}: pass at least {k_max} ids per position (or full logits)")
    return student[:, :k_max].long()


def peak_agreement(student_topk: Tensor, teacher_ids: Tensor, teacher_valid: Tensor, k: int) -> dict[str, Tensor]:
    """Per-position agreement at one ``k``: each value (N,); rates are 0/1 or fractions, ``eligible`` bool.

    student_topk (N, >=k) int64 in the student's rank order; teacher_ids / teacher_valid (N, >=k), valid first.
    """
    s = student_topk[:, :k]  # (N, k)
    t = teacher_ids[:, :k]  # (N, k)
    eligible = teacher_valid[:, :k].all(dim=1)  # (N,) teacher kept >= k entries
    same_order = (s == t).all(dim=1)  # (N,)
    # |S_k & T_k|: ids are distinct within each side, so counting matching pairs counts common tokens.
    common = (s[:, :, None] == t[:, None, :]).any(dim=2).sum(dim=1)  # (N,)
    return {"cr": same_order, "or": common == k, "mor": common.float() / k, "eligible": eligible}


class PeakMetrics:
    """Accumulates peak metrics over batches; :meth:`compute` returns plain floats (JSON-safe).

    Args:
        cr_ks: the k of ``cr@k`` (default 1, 2, 5, as in the paper).
        or_ks: the k of ``or@k`` and ``mor@k`` (default 5, 10).
    """

    def __init__(self, cr_ks: tuple[int, ...] = (1, 2, 5), or_ks: tuple[int, ...] = (5, 10)):
        self.cr_ks = tuple(cr_ks)
        self.or_ks = tuple(or_ks)
        self.k_max = max(self.cr_ks + self.or_ks + (1,))
        self.reset()

    def reset(self) -> None:
        self.positions = 0
        self.top1_hits = 0
        self.top1_count = 0
        self.kd_sum = 0.0
        self.kd_count = 0
        self.hits: dict[str, float] = {}  # "cr@1" -> number of hits (float sum for mor)
        self.eligible: dict[int, int] = {k: 0 for k in set(self.cr_ks + self.or_ks)}

    @torch.no_grad()
    def update(self, student_logits: Tensor, teacher_topk_ids: Tensor, teacher_valid: Tensor,
               kd_per_position: Tensor | None = None) -> None:
        """Add N positions.

        Args:
            student_logits: (N, V) logits (or log-probs), or (N, K) int64 ids of the student's top K in rank
                order, K >= the largest metric k (10 by default).
            teacher_topk_ids: (N, k) cached ids in teacher rank order; teacher_valid: (N, k) bool, valid first.
            kd_per_position: optional (N,) sparse KL per position, averaged into ``kd``.
        """
        cache_k = teacher_topk_ids.shape[1]
        if self.k_max > cache_k:
            raise ValueError(f"peak metric k={self.k_max} exceeds the cache's k={cache_k}: rebuild the cache with "
                             f"k >= {self.k_max} or use PeakMetrics(cr_ks=..., or_ks=...) with k <= {cache_k}")
        if student_logits.shape[0] != teacher_topk_ids.shape[0]:
            raise ValueError(f"the student has {student_logits.shape[0]} positions but the teacher has "
                             f"{teacher_topk_ids.shape[0]}")
        s_top = _student_topk(student_logits, self.k_max).to(teacher_topk_ids.device)  # (N, k_max)
        t_ids, t_valid = teacher_topk_ids, teacher_valid.bool()
        n = int(t_ids.shape[0])
        self.positions += n
        for k in sorted(self.eligible):
            res = peak_agreement(s_top, t_ids, t_valid, k)
            el = res["eligible"]
            self.eligible[k] += int(el.sum())
            if k in self.cr_ks:
                self.hits[f"cr@{k}"] = self.hits.get(f"cr@{k}", 0.0) + float(res["cr"][el].sum())
            if k in self.or_ks:
                self.hits[f"or@{k}"] = self.hits.get(f"or@{k}", 0.0) + float(res["or"][el].sum())
                self.hits[f"mor@{k}"] = self.hits.get(f"mor@{k}", 0.0) + float(res["mor"][el].sum())
        top1 = peak_agreement(s_top, t_ids, t_valid, 1)
        self.top1_hits += int(top1["cr"][top1["eligible"]].sum())
        self.top1_count += int(top1["eligible"].sum())
        if kd_per_position is not None:
            kd = kd_per_position.detach().double()
            self.kd_sum += float(kd.sum())
            self.kd_count += int(kd.numel())

    def all_reduce(self, device: torch.device | str = "cpu") -> None:
        """Sum the counts over the processes of a distributed run (no-op otherwise), so every process computes the
        metrics of all positions. Every process must call it, with the same ks."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        hit_keys = [f"cr@{k}" for k in self.cr_ks] + [f"{m}@{k}" for k in self.or_ks for m in ("or", "mor")]
        el_keys = sorted(self.eligible)
        counts = [self.positions, self.top1_hits, self.top1_count, self.kd_sum, self.kd_count]
        counts += [self.hits.get(key, 0.0) for key in hit_keys] + [self.eligible[k] for k in el_keys]
        t = torch.tensor(counts, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        v = t.tolist()
        self.positions, self.top1_hits, self.top1_count = int(v[0]), int(v[1]), int(v[2])
        self.kd_sum, self.kd_count = v[3], int(v[4])
        self.hits = dict(zip(hit_keys, v[5:5 + len(hit_keys)]))
        self.eligible = {k: int(x) for k, x in zip(el_keys, v[5 + len(hit_keys):])}

    def compute(self) -> dict:
        """``{"cr@1", "cr@2", "cr@5", "or@5", "or@10", "mor@5", "mor@10", "top1_agreement", "kd", "positions"}``
        (for the default ks) plus ``eligible@k`` counts; rates are None without eligible positions."""
        out: dict = {}
        for k in self.cr_ks:
            out[f"cr@{k}"] = self._rate(f"cr@{k}", k)
        for k in self.or_ks:
            out[f"or@{k}"] = self._rate(f"or@{k}", k)
        for k in self.or_ks:
            out[f"mor@{k}"] = self._rate(f"mor@{k}", k)
        out["top1_agreement"] = self.top1_hits / self.top1_count if self.top1_count else None
        out["kd"] = self.kd_sum / self.kd_count if self.kd_count else None
        out["positions"] = self.positions
        for k in sorted(self.eligible):
            out[f"eligible@{k}"] = self.eligible[k]
        return out

    def _rate(self, key: str, k: int) -> float | None:
        return self.hits.get(key, 0.0) / self.eligible[k] if self.eligible[k] else None
