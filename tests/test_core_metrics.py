"""rlkd.core.metrics: hand-counted positions, every metric against a brute-force per-position computation on random
data, the k's adapting to the cache, and the trainer's evaluation and `rlkd inspect --student` giving the same
numbers for the same student, cache and tail mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlkd.core.metrics import PeakMetrics, left_out, left_out_note, metric_keys, score
from rlkd.core.targets import TeacherTargets

V = 12


def logits_for(order: list[int]) -> torch.Tensor:
    """Logits whose strict descending order starts with ``order`` (other ids far below, also strict)."""
    z = torch.arange(V, dtype=torch.float32) * -0.01 - 100.0
    for rank, token in enumerate(order):
        z[token] = 10.0 - rank
    return z


def targets_of(teacher_ids: list[list[int]], k: int = 10) -> TeacherTargets:
    """Teacher targets with the given valid ids per position (rank order), the rest padding."""
    n = len(teacher_ids)
    ids = torch.zeros(n, k, dtype=torch.int64)
    valid = torch.zeros(n, k, dtype=torch.bool)
    for i, t in enumerate(teacher_ids):
        ids[i, :len(t)] = torch.tensor(t)
        valid[i, :len(t)] = True
    lp = torch.where(valid, -1.0 - torch.arange(k, dtype=torch.float32) * 0.3, torch.tensor(float("-inf")))
    return TeacherTargets(ids, lp.expand(n, k).clone(), valid, torch.full((n,), -3.0), torch.zeros(n, dtype=torch.int64))


def crafted():
    ten = list(range(10))
    rows = [
        # A: the same order: every metric hits.
        (ten, ten),
        # B: first two swapped: every cr misses, every set agrees.
        (ten, [1, 0, 2, 3, 4, 5, 6, 7, 8, 9]),
        # C: top-4 right, then 10 at rank 5 and 11 at rank 10: cr@1, cr@2 hit, cr@5 misses; top-5 sets share 4
        # (or@5 = 0.8), top-10 sets share 0..7 (or@10 = 0.8); no set hits.
        (ten, [0, 1, 2, 3, 10, 4, 5, 6, 7, 11]),
        # D: the teacher kept 3 entries (adaptive k): scored at k = 1, 2 only. cr@1 hits, cr@2 misses.
        ([0, 1, 2], [0, 2, 1, 3, 4, 5, 6, 7, 8, 9]),
    ]
    return torch.stack([logits_for(s) for _, s in rows]), targets_of([t for t, _ in rows])


def test_hand_counted_values():
    student, tg = crafted()
    m = PeakMetrics(cache_k=10)
    per = m.update(student, tg)
    assert per["or@5"][:3].tolist() == pytest.approx([1, 1, 0.8])
    assert per["or@5"][3].isnan()  # D's or@5 is undefined: the teacher kept 3 entries
    assert per["eligible@5"].tolist() == [True, True, True, False]
    out = m.compute()
    assert out["cr@1"] == pytest.approx(3 / 4)  # A, C, D of 4 eligible
    assert out["cr@2"] == pytest.approx(2 / 4)  # A, C
    assert out["cr@5"] == pytest.approx(1 / 3)  # A of A, B, C (D ineligible)
    assert out["set@5"] == pytest.approx(2 / 3)  # A, B
    assert out["set@10"] == pytest.approx(2 / 3)
    assert out["mor@5"] == pytest.approx((1 + 1 + 0.8) / 3)  # the mean of or@5
    assert out["mor@10"] == pytest.approx((1 + 1 + 0.8) / 3)
    assert out["top1_agreement"] == pytest.approx(3 / 4)
    assert out["positions"] == 4
    assert (out["eligible@1"], out["eligible@2"], out["eligible@5"], out["eligible@10"]) == (4, 4, 3, 3)
    assert "or@5" not in out  # or@k is per position; its mean is reported as mor@k


def test_accumulation_in_parts_equals_whole():
    student, tg = crafted()
    whole, parts = PeakMetrics(10), PeakMetrics(10)
    whole.update(student, tg)
    parts.update(student[:1], tg.slice(0, 1))
    parts.update(student[1:], tg.slice(1, 4))
    a, b = whole.compute(), parts.compute()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-12), key
    masked = PeakMetrics(10)
    masked.add(masked.score(student, tg), mask=torch.tensor([False, True, True, False]))
    assert masked.compute()["set@5"] == pytest.approx(1 / 2) and masked.positions == 2


def test_student_ties_follow_torch_topk():
    # Student logits tie on ids 0 and 1 at the top and on ids 4 and 5 at ranks 5-6. The metrics use whatever order
    # torch.topk returns (documented rule); the set metrics are unaffected by the first tie, the second decides set@5.
    z = logits_for([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    z[1] = z[0]
    z[5] = z[4]
    m = PeakMetrics(10)
    m.update(z[None], targets_of([[1, 0, 2, 3, 4, 5, 6, 7, 8, 9]]))
    out = m.compute()
    order = torch.topk(z, 10).indices.tolist()
    assert out["cr@1"] == float(order[0] == 1)
    assert out["set@5"] == float(set(order[:5]) == {1, 0, 2, 3, 4})
    assert out["mor@5"] == pytest.approx(len(set(order[:5]) & {0, 1, 2, 3, 4}) / 5)
    assert out["set@10"] == 1.0 and out["mor@10"] == 1.0


def test_no_eligible_position_gives_none():
    m = PeakMetrics(10)
    m.update(logits_for([3, 4])[None], targets_of([[3, 4]]))
    out = m.compute()
    assert out["cr@5"] is None and out["set@10"] is None and out["mor@10"] is None and out["eligible@5"] == 0
    assert out["cr@2"] == 1.0


def test_metrics_adapt_to_the_cache_k():
    """A k=8 cache gives cr@1/2/5, mor@5, set@5 and says why @10 is left out; never a refusal."""
    assert metric_keys(8) == ["cr@1", "cr@2", "cr@5", "mor@5", "set@5", "top1_agreement", "kd", "ce"]
    assert set(left_out(8)) == {"mor@10", "set@10"} and "top-8" in left_out(8)["mor@10"]
    note = left_out_note(8)
    assert "mor@10, set@10" in note and "k=8" in note and "--top-k 10" in note
    assert left_out_note(10) is None and left_out(10) == {}
    assert metric_keys(1) == ["cr@1", "top1_agreement", "kd", "ce"] and "--top-k 10" in left_out_note(1)
    student, tg = crafted()
    small = TeacherTargets(*(getattr(tg, f)[:, :8] if getattr(tg, f).dim() == 2 else getattr(tg, f)
                             for f in ("topk_ids", "topk_logprobs", "topk_valid", "tail_logmass", "target_ids")))
    m = PeakMetrics(8)
    m.update(student, small)
    out = m.compute()
    assert {k for k in out if "@10" in k} == set() and out["set@5"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="exceeds the cache's k=8"):
        score(student, small)  # asking for more than the cache holds is a caller's bug, not a user error


def brute_force(z: np.ndarray, ids: np.ndarray, counts: np.ndarray, lp: np.ndarray, tail: np.ndarray,
                nxt: np.ndarray, mode: str) -> list[dict]:
    """Every metric of every position with Python loops and float64 numpy, from the definitions."""
    out = []
    for i in range(z.shape[0]):
        q = z[i] - np.logaddexp.reduce(z[i])  # student log-probs (V,)
        s = list(np.argsort(-z[i], kind="stable"))
        n = int(counts[i])
        t = [int(x) for x in ids[i, :n]]
        row = {"ce": -q[nxt[i]]}
        for k in (1, 2, 5, 10):
            row[f"eligible@{k}"] = n >= k
            if n >= k and k in (1, 2, 5):
                row[f"cr@{k}"] = s[:k] == t[:k]
            if n >= k and k in (5, 10):
                row[f"or@{k}"] = len(set(s[:k]) & set(t[:k])) / k
                row[f"set@{k}"] = set(s[:k]) == set(t[:k])
        a = lp[i, :n].astype(np.float64)
        t_tail = float(tail[i]) if mode == "bucket" else -np.inf
        log_z = np.logaddexp.reduce(np.append(a, t_tail))  # the teacher renormalised over its buckets
        p, p_tail = np.exp(a - log_z), np.exp(t_tail - log_z)
        uncached = np.ones(z.shape[1], dtype=bool)
        uncached[t] = False
        q_tail = np.logaddexp.reduce(q[uncached])
        kd = float(np.sum(p * (a - log_z - q[t])))
        if p_tail > 0:
            kd += p_tail * (t_tail - log_z - q_tail)
        row["kd"] = kd
        out.append(row)
    return out


@pytest.mark.parametrize("mode", ["bucket", "renormalize"])
def test_every_metric_against_brute_force_on_random_data(mode):
    rng = np.random.default_rng(7 if mode == "bucket" else 8)
    N, vocab, k = 300, 40, 12
    z = rng.standard_normal((N, vocab)) * 2.0
    # The teacher agrees with the student more often than chance: its ranking is the student's, perturbed.
    noisy = z + rng.standard_normal((N, vocab)) * 1.5
    ids = np.argsort(-noisy, axis=1)[:, :k]  # (N, k) distinct ids in teacher rank order
    counts = rng.integers(1, k + 1, size=N)  # adaptive k
    counts[: N // 2] = k
    raw = np.sort(rng.uniform(-6, -0.5, size=(N, k)), axis=1)[:, ::-1]  # non-increasing log-probs
    mass = np.exp(raw).sum(axis=1, keepdims=True)
    lp = raw - np.log(mass / rng.uniform(0.3, 0.99, size=(N, 1)))  # cached mass < 1, so a real tail remains
    kept = np.arange(k)[None, :] < counts[:, None]
    tail = np.log1p(-np.where(kept, np.exp(lp), 0).sum(axis=1))
    nxt = rng.integers(0, vocab, size=N)
    tg = TeacherTargets(torch.tensor(np.where(kept, ids, 0)), torch.tensor(np.where(kept, lp, -np.inf), dtype=torch.float32),
                        torch.tensor(kept), torch.tensor(tail, dtype=torch.float32), torch.tensor(nxt))
    ref = brute_force(z, ids, counts, tg.topk_logprobs.numpy(), tg.tail_logmass.numpy(), nxt, mode)
    m = PeakMetrics(k, tail=mode)
    per = m.update(torch.tensor(z, dtype=torch.float64), tg)
    for i, r in enumerate(ref):
        for key, v in r.items():
            if key in ("kd", "ce"):
                assert per[key][i].item() == pytest.approx(v, rel=1e-9, abs=1e-12), (i, key)
            else:
                assert per[key][i].item() == pytest.approx(v), (i, key)
    out = m.compute()
    for k_ in (1, 2, 5):
        assert out[f"cr@{k_}"] == pytest.approx(np.mean([r[f"cr@{k_}"] for r in ref if r[f"eligible@{k_}"]]))
    for k_ in (5, 10):
        el = [r for r in ref if r[f"eligible@{k_}"]]
        assert out[f"mor@{k_}"] == pytest.approx(np.mean([r[f"or@{k_}"] for r in el]))
        assert out[f"set@{k_}"] == pytest.approx(np.mean([r[f"set@{k_}"] for r in el]))
        assert out[f"eligible@{k_}"] == len(el)
    assert out["top1_agreement"] == pytest.approx(np.mean([r["cr@1"] for r in ref]))
    assert out["kd"] == pytest.approx(np.mean([r["kd"] for r in ref]), rel=1e-9)
    assert out["ce"] == pytest.approx(np.mean([r["ce"] for r in ref]), rel=1e-9)
    # the data exercise every outcome: some hits and some misses of each rate
    for key in ("cr@1", "cr@2", "set@5", "mor@5", "mor@10"):
        assert 0 < out[key] < 1, key


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_trainer_eval_and_inspect_report_the_same_numbers(tmp_path_factory, tiny_teacher_dir, tiny_student_dir,
                                                          tail):
    """The same tiny student and k=8 cache through `train-student`'s evaluate (batched, chunked LM head, the
    trained positions) and `rlkd inspect --student` (one row at a time, full logits; its response group)."""
    from transformers import AutoModelForCausalLM

    from rlkd.cache import CacheReader
    from rlkd.inspect.student import StudentScorer
    from rlkd.trainer.data import load_eval_batches
    from rlkd.trainer.loop import evaluate
    from rlkd.trainer.config import LossConfig
    from rlkd.trainer.student import StudentWithHead
    from tests.cache_from_model import write_cache_from_model

    cache = tmp_path_factory.getbasetemp() / "metrics-k8-cache"
    if not (cache / "manifest.json").is_file():
        write_cache_from_model(tiny_teacher_dir, cache, n_rows=12, k=8, codec="q8", seed=4)
    batches = load_eval_batches(CacheReader(cache, batch_size=5, shuffle=False), batch_size=5, eval_fraction=0.0,
                                max_rows=10**6)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_student_dir), dtype=torch.float32).eval()
    trainer = evaluate(StudentWithHead(model), batches, LossConfig(tail=tail, rank_k=4, chunk_size=7),
                       torch.device("cpu"))
    inspect = StudentScorer(tiny_student_dir, cache, tail=tail).agreement()
    assert inspect["tail"] == tail and set(inspect["left_out"]) == {"mor@10", "set@10"}
    got = inspect["metrics"]["response"]
    assert trainer["positions"] == got["positions"] == sum(b.positions for b in batches) > 0
    assert trainer["eval_kd"] == pytest.approx(got["kd"], rel=1e-5)
    assert trainer["eval_ce"] == pytest.approx(got["ce"], rel=1e-5)
    for key in metric_keys(8):
        if key not in ("kd", "ce"):
            assert trainer[key] == pytest.approx(got[key], abs=1e-12), key
    for key in ("eligible@1", "eligible@2", "eligible@5"):
        assert trainer[key] == got[key], key
    assert not any("@10" in key for key in list(trainer) + list(got))
    # the tail mode is honoured on both sides: the two modes give different KLs
    other = StudentScorer(tiny_student_dir, cache, tail="bucket" if tail == "renormalize" else "renormalize")
    assert abs(other.agreement()["metrics"]["response"]["kd"] - got["kd"]) > 1e-3
