"""Peak metrics on hand-built positions whose values are counted by hand (see the comments)."""

from __future__ import annotations

import pytest
import torch

from rlkd.trainer.metrics import PeakMetrics

V = 12


def logits_for(order: list[int]) -> torch.Tensor:
    """Logits whose strict descending order starts with ``order`` (other ids far below, also strict)."""
    z = torch.arange(V, dtype=torch.float32) * -0.01 - 100.0
    for rank, token in enumerate(order):
        z[token] = 10.0 - rank
    return z


def teacher(ids: list[int], k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    valid = torch.zeros(k, dtype=torch.bool)
    valid[: len(ids)] = True
    return torch.tensor(ids + [0] * (k - len(ids))), valid


def crafted():
    ten = list(range(10))
    rows = [
        # A: the same order: every metric hits.
        (ten, ten),
        # B: first two swapped: every cr misses, every set agrees.
        (ten, [1, 0, 2, 3, 4, 5, 6, 7, 8, 9]),
        # C: top-4 right, then 10 at rank 5 and 11 at rank 10: cr@1, cr@2 hit, cr@5 misses; top-5 sets share 4
        # (mor@5 = 0.8), top-10 sets share 0..7 (mor@10 = 0.8); no or hits.
        (ten, [0, 1, 2, 3, 10, 4, 5, 6, 7, 11]),
        # D: the teacher kept 3 entries (adaptive k): scored at k = 1, 2 only. cr@1 hits, cr@2 misses.
        ([0, 1, 2], [0, 2, 1, 3, 4, 5, 6, 7, 8, 9]),
    ]
    t_ids, t_valid = zip(*(teacher(t) for t, _ in rows))
    student = torch.stack([logits_for(s) for _, s in rows])
    return student, torch.stack(t_ids), torch.stack(t_valid)


def test_hand_counted_values():
    student, t_ids, t_valid = crafted()
    m = PeakMetrics()
    m.update(student, t_ids, t_valid, kd_per_position=torch.tensor([0.0, 1.0, 2.0, 5.0]))
    out = m.compute()
    assert out["cr@1"] == pytest.approx(3 / 4)  # A, C, D of 4 eligible
    assert out["cr@2"] == pytest.approx(2 / 4)  # A, C
    assert out["cr@5"] == pytest.approx(1 / 3)  # A of A, B, C (D ineligible)
    assert out["or@5"] == pytest.approx(2 / 3)  # A, B
    assert out["or@10"] == pytest.approx(2 / 3)
    assert out["mor@5"] == pytest.approx((1 + 1 + 0.8) / 3)
    assert out["mor@10"] == pytest.approx((1 + 1 + 0.8) / 3)
    assert out["top1_agreement"] == pytest.approx(3 / 4)
    assert out["kd"] == pytest.approx(2.0)
    assert out["positions"] == 4
    assert (out["eligible@1"], out["eligible@2"], out["eligible@5"], out["eligible@10"]) == (4, 4, 3, 3)


def test_ids_input_and_accumulation_match():
    student, t_ids, t_valid = crafted()
    whole = PeakMetrics()
    whole.update(student, t_ids, t_valid)
    parts = PeakMetrics()
    ids = torch.topk(student, 10).indices  # the student's top ids instead of logits
    parts.update(ids[:1], t_ids[:1], t_valid[:1])
    parts.update(ids[1:], t_ids[1:], t_valid[1:])
    assert parts.compute() == whole.compute()
    assert whole.compute()["kd"] is None


def test_student_ties_follow_torch_topk():
    # Student logits tie on ids 0 and 1 at the top and on ids 4 and 5 at ranks 5-6. The metrics use whatever order
    # torch.topk returns (documented rule); the set metrics are unaffected by the first tie, the second decides or@5.
    z = logits_for([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    z[1] = z[0]
    z[5] = z[4]
    t_ids, t_valid = teacher([1, 0, 2, 3, 4, 5, 6, 7, 8, 9])
    m = PeakMetrics()
    m.update(z[None], t_ids[None], t_valid[None])
    out = m.compute()
    order = torch.topk(z, 10).indices.tolist()
    assert out["cr@1"] == float(order[0] == 1)
    assert out["or@5"] == float(set(order[:5]) == {1, 0, 2, 3, 4})
    assert out["mor@5"] == pytest.approx(len(set(order[:5]) & {0, 1, 2, 3, 4}) / 5)
    assert out["or@10"] == 1.0 and out["mor@10"] == 1.0


def test_no_eligible_position_gives_none():
    t_ids, t_valid = teacher([3, 4])
    m = PeakMetrics()
    m.update(logits_for([3, 4])[None], t_ids[None], t_valid[None])
    out = m.compute()
    assert out["cr@5"] is None and out["or@10"] is None and out["eligible@5"] == 0
    assert out["cr@2"] == 1.0


def test_k_larger_than_cache_is_an_error():
    student, t_ids, t_valid = crafted()
    with pytest.raises(ValueError, match=r"k=10 exceeds the cache's k=5"):
        PeakMetrics().update(student, t_ids[:, :5], t_valid[:, :5])
    small = PeakMetrics(cr_ks=(1, 2, 5), or_ks=(5,))
    small.update(student, t_ids[:, :5], t_valid[:, :5])
    assert small.compute()["or@5"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="K=4 columns"):
        PeakMetrics().update(torch.topk(student, 4).indices, t_ids, t_valid)
