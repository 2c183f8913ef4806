"""Losses against dense brute-force references built from the cached top-k plus the tail.

Which references are exact. The teacher's full-vocabulary distribution is rebuilt as p~: the cached p_i on the
cached ids I and the tail mass P_tail spread uniformly over the other V - |I| tokens. The sparse bucketed losses
are, exactly, the dense divergences between the two *bucketed* distributions (|I| outcomes plus one "rest"
outcome, each summed from the dense vectors here). Against the full dense p~ they are equal only when the student's
tail is uniform too (then each rest-token ratio is the same and the bucket loses nothing) and lower bounds otherwise
(data processing inequality): both are tested. ``renormalize`` forward KL and TVD equal the dense divergence
against p' (p~ renormalised over I, zero elsewhere) exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rlkd.config import ConfigError, build_config
from rlkd.core.kernels import top_ids, vocab_stats
from rlkd.core.targets import TeacherTargets
from rlkd.trainer.config import LossConfig
from rlkd.trainer.losses import DistillLoss, rank_union
from rlkd.trainer.softrank import soft_rank
from tests.test_softrank import isotonic_soft_rank


def make_targets(n: int, vocab: int, k: int, *, seed: int = 0, min_valid: int | None = None, scale: float = 2.0,
                 dtype=torch.float64) -> TeacherTargets:
    """A random teacher's top-k (adaptive: each row keeps between min_valid and k entries) and exact tail mass."""
    gen = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(torch.randn(n, vocab, generator=gen, dtype=torch.float64) * scale, dim=-1)
    a, ids = logp.topk(k, dim=-1)  # (n, k)
    counts = torch.randint(min_valid or k, k + 1, (n,), generator=gen)
    valid = torch.arange(k)[None, :] < counts[:, None]
    a = a.masked_fill(~valid, float("-inf"))
    ids = ids.masked_fill(~valid, 0)
    tail = torch.log1p(-torch.where(valid, a.exp(), torch.zeros_like(a)).sum(-1))
    target = torch.randint(0, vocab, (n,), generator=gen)
    return TeacherTargets(ids, a.to(dtype), valid, tail.to(dtype), target)


def dense_teacher(tg: TeacherTargets, vocab: int) -> np.ndarray:
    """p~ (N, V): cached probabilities on I, P_tail spread uniformly over the other tokens."""
    n = len(tg)
    p = np.zeros((n, vocab))
    for b in range(n):
        m = tg.topk_valid[b].numpy()
        ids = tg.topk_ids[b].numpy()[m]
        rest = np.setdiff1d(np.arange(vocab), ids)
        p[b, rest] = math.exp(float(tg.tail_logmass[b])) / len(rest)
        p[b, ids] = np.exp(tg.topk_logprobs[b].double().numpy()[m])
    return p


def bucketize(p: np.ndarray, tg: TeacherTargets) -> np.ndarray:
    """(N, k + 1): the dense distribution's mass on each cached id (0 for invalid entries) and on everything else."""
    n, k = tg.topk_ids.shape
    out = np.zeros((n, k + 1))
    for b in range(n):
        m = tg.topk_valid[b].numpy()
        ids = tg.topk_ids[b].numpy()
        out[b, :k][m] = p[b, ids[m]]
        out[b, k] = p[b].sum() - p[b, ids[m]].sum()
    return out


def kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0).sum(-1)


def tvd(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return 0.5 * np.abs(p - q).sum(-1)


def softmax(z: torch.Tensor) -> np.ndarray:
    return torch.softmax(z.double(), dim=-1).numpy()


N, V, K = 24, 40, 8


@pytest.fixture
def setup():
    tg = make_targets(N, V, K, seed=0, min_valid=5)
    logits = torch.randn(N, V, generator=torch.Generator().manual_seed(1)) * 2  # float32, as in training
    return tg, logits


def loss_of(kd: str, tail: str = "bucket", **kw) -> DistillLoss:
    return DistillLoss(LossConfig(kd=kd, tail=tail, rank_weight=0.0, **kw))


@pytest.mark.parametrize("kd", ["forward_kl", "reverse_kl", "tvd"])
def test_bucket_equals_dense_on_bucketed_distributions(setup, kd):
    tg, logits = setup
    p = bucketize(dense_teacher(tg, V), tg)
    q = bucketize(softmax(logits), tg)
    ref = {"forward_kl": kl(p, q), "reverse_kl": kl(q, p), "tvd": tvd(p, q)}[kd]
    got = loss_of(kd)(logits, tg)["kd"]
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kd", ["forward_kl", "reverse_kl", "tvd"])
def test_bucket_equals_full_dense_when_student_tail_is_uniform(setup, kd):
    tg, logits = setup
    # The student puts the same logit on every uncached token of a row: its tail is uniform like p~'s.
    uncached = torch.ones(N, V, dtype=torch.bool)
    for b in range(N):
        uncached[b, tg.topk_ids[b][tg.topk_valid[b]]] = False
    logits = torch.where(uncached, logits[:, :1] - 1.0, logits)
    p, q = dense_teacher(tg, V), softmax(logits)
    ref = {"forward_kl": kl(p, q), "reverse_kl": kl(q, p), "tvd": tvd(p, q)}[kd]
    got = loss_of(kd)(logits, tg)["kd"]
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kd", ["forward_kl", "reverse_kl", "tvd"])
def test_bucket_lower_bounds_full_dense(setup, kd):
    tg, logits = setup
    p, q = dense_teacher(tg, V), softmax(logits)
    dense = {"forward_kl": kl(p, q), "reverse_kl": kl(q, p), "tvd": tvd(p, q)}[kd]
    got = loss_of(kd)(logits, tg)["kd"].double().numpy()
    assert np.all(got <= dense + 1e-5)
    assert np.any(got < dense - 1e-3)  # the student's random tail is not uniform: the bound is strict somewhere


def test_renormalize_against_dense(setup):
    tg, logits = setup
    p = dense_teacher(tg, V)
    cached = bucketize(p, tg)[:, :K] > 0  # (N, K) valid entries
    p_r = np.zeros_like(p)  # teacher renormalised over I, zero elsewhere
    for b in range(N):
        ids = tg.topk_ids[b].numpy()[cached[b]]
        p_r[b, ids] = p[b, ids] / p[b, ids].sum()
    q = softmax(logits)
    np.testing.assert_allclose(loss_of("forward_kl", "renormalize")(logits, tg)["kd"].double().numpy(), kl(p_r, q),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loss_of("tvd", "renormalize")(logits, tg)["kd"].double().numpy(), tvd(p_r, q),
                               rtol=1e-5, atol=1e-5)
    # Reverse KL renormalises the student over I as well (else it is infinite).
    q_r = np.zeros_like(q)
    for b in range(N):
        ids = tg.topk_ids[b].numpy()[cached[b]]
        q_r[b, ids] = q[b, ids] / q[b, ids].sum()
    np.testing.assert_allclose(loss_of("reverse_kl", "renormalize")(logits, tg)["kd"].double().numpy(),
                               kl(q_r, p_r), rtol=1e-5, atol=1e-5)


def test_temperature(setup):
    tg, logits = setup
    tau = 2.0
    # Teacher: cached entries tempered exactly, the tail as one bucket, renormalised; student: softmax(z / tau).
    pb = bucketize(dense_teacher(tg, V), tg) ** (1 / tau)
    pb /= pb.sum(-1, keepdims=True)
    qb = bucketize(softmax(logits / tau), tg)
    got = loss_of("forward_kl", temperature=tau)(logits, tg)["kd"]
    np.testing.assert_allclose(got.double().numpy(), tau**2 * kl(pb, qb), rtol=1e-5, atol=1e-5)


def test_zero_when_student_equals_teacher(setup):
    tg, _ = setup
    logits = torch.from_numpy(np.log(dense_teacher(tg, V))).float()
    for kd in ("forward_kl", "reverse_kl", "tvd"):
        out = DistillLoss(LossConfig(kd=kd))(logits, tg)
        assert out["kd"].abs().max() < 1e-5, kd
        # Identical scores on the union: identical soft ranks, Pearson 1, rank loss 0.
        assert out["rank"].abs().max() < 1e-5
        assert torch.all(out["overlap"] == 1.0)


def test_rounded_cache_is_renormalised():
    # A q8-like cache whose top-k plus tail sum to more than 1: the buckets are renormalised, so KL stays >= 0 and
    # is 0 for the renormalised teacher.
    tg = make_targets(6, 20, 5, seed=3)
    tg.topk_logprobs = tg.topk_logprobs + 0.01
    p = bucketize(dense_teacher(tg, 20), tg)
    p /= p.sum(-1, keepdims=True)
    logits = torch.zeros(6, 20, dtype=torch.float64)
    for b in range(6):
        logits[b] = math.log(p[b, 5] / 15)
        logits[b, tg.topk_ids[b]] = torch.from_numpy(np.log(p[b, :5]))
    assert loss_of("forward_kl")(logits, tg)["kd"].abs().max() < 1e-12


def test_ce_matches_torch(setup):
    tg, logits = setup
    out = DistillLoss(LossConfig(ce_weight=0.5, rank_weight=0.0))(logits, tg)
    ref = F.cross_entropy(logits, tg.target_ids, reduction="none")
    assert torch.allclose(out["ce"], ref, atol=1e-6)
    assert torch.allclose(out["total"], out["kd"] + 0.5 * ref, atol=1e-6)


@pytest.mark.parametrize("kd,tail", [("forward_kl", "bucket"), ("forward_kl", "renormalize"),
                                     ("reverse_kl", "bucket"), ("reverse_kl", "renormalize"),
                                     ("tvd", "bucket"), ("tvd", "renormalize")])
def test_gradcheck_float64(kd, tail):
    tg = make_targets(5, 9, 6, seed=4, min_valid=3)
    z = torch.randn(5, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).requires_grad_()
    loss = DistillLoss(LossConfig(kd=kd, tail=tail, rank_k=3, ce_weight=0.3, temperature=1.5))
    assert torch.autograd.gradcheck(lambda t: loss(t, tg)["total"], (z,))


def test_gradcheck_rank_and_dynamic():
    tg = make_targets(5, 9, 6, seed=6, min_valid=3)
    z = torch.randn(5, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).requires_grad_()
    loss = DistillLoss(LossConfig(rank_k=3, dynamic=True))
    assert torch.autograd.gradcheck(lambda t: loss(t, tg)["total"], (z,))
    assert torch.autograd.gradcheck(lambda t: loss(t, tg)["rank"], (z,))


def test_dynamic_weight_is_detached_overlap(setup):
    tg, logits = setup
    z = logits.double().requires_grad_()
    out = DistillLoss(LossConfig(dynamic=True))(z, tg)
    # Hand count of |top-5(T) & top-5(S)| / 5 with Python sets.
    s_top = z.detach().topk(5, dim=-1).indices
    expected = torch.tensor([len(set(s_top[b].tolist()) & set(tg.topk_ids[b, :5].tolist())) / 5 for b in range(N)],
                            dtype=torch.float64)
    assert torch.equal(out["overlap"], expected)
    assert torch.allclose(out["total"], expected * out["kd"] + 2 * out["rank"])
    (g,) = torch.autograd.grad(out["total"].sum(), z, retain_graph=True)
    (g_ref,) = torch.autograd.grad((expected * out["kd"] + 2 * out["rank"]).sum(), z)
    assert torch.allclose(g, g_ref)


def test_vocab_stats_gradcheck_and_tail_precision():
    gen = torch.Generator().manual_seed(10)
    tg = make_targets(6, 11, 5, seed=11, min_valid=2)
    tg.topk_valid[5] = False  # a row with nothing cached: the tail is the whole vocabulary
    z = torch.randn(6, 11, generator=gen, dtype=torch.float64).requires_grad_()
    extra = torch.randint(0, 11, (6, 3), generator=gen)
    assert torch.autograd.gradcheck(lambda t: vocab_stats(t, tg.topk_ids, tg.topk_valid, extra), (z,))
    lse, tail, _, z_extra = vocab_stats(z, tg.topk_ids, tg.topk_valid, extra)
    for b in range(6):
        rest = [j for j in range(11) if j not in tg.topk_ids[b][tg.topk_valid[b]].tolist()]
        assert torch.allclose(tail[b], torch.logsumexp(z[b, rest], 0))
    assert torch.allclose(lse, torch.logsumexp(z, 1)) and torch.equal(z_extra, z.gather(1, extra))
    # A student with 1 - 1e-12 of its mass on the cached ids: float32 keeps the tail's log mass to ~1e-6, where
    # log(1 - sum_I e^q) would give -inf or garbage.
    z = torch.full((1, 1000), -40.0)
    z[0, :5] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    ids, valid = torch.arange(5)[None], torch.ones(1, 5, dtype=torch.bool)
    lse, tail, _, _ = vocab_stats(z, ids, valid)
    exact = torch.logsumexp(z[0, 5:].double(), 0) - torch.logsumexp(z[0].double(), 0)
    assert abs(float(tail[0] - lse[0]) - float(exact)) < 1e-5


# ---- ranking loss -----------------------------------------------------------------------------------------------


def crafted(student_row: list[float], teacher_ids: list[int], teacher_lp: list[float], vocab: int,
            tail: float | None = None) -> tuple[torch.Tensor, TeacherTargets]:
    k = len(teacher_ids)
    a = torch.tensor([teacher_lp], dtype=torch.float64)
    tail_t = torch.log1p(-a.exp().sum(-1)) if tail is None else torch.tensor([tail], dtype=torch.float64)
    tg = TeacherTargets(torch.tensor([teacher_ids]), a, torch.ones(1, k, dtype=torch.bool), tail_t,
                        torch.tensor([0]))
    z = torch.tensor([student_row], dtype=torch.float64)
    assert z.shape == (1, vocab)
    return z, tg


def test_rank_identical_and_reversed():
    vocab = 30
    teacher_ids = [3, 7, 1, 20, 11]
    teacher_lp = [-1.0, -5.0, -9.0, -13.0, -17.0]  # gaps >= 1 nat: soft ranks equal the hard ranks
    base = torch.full((vocab,), -60.0)
    same = base.clone()
    same[teacher_ids] = torch.tensor(teacher_lp)
    rev = base.clone()
    rev[teacher_ids] = torch.tensor(teacher_lp[::-1])
    loss = DistillLoss(LossConfig(kd="none", rank_weight=1.0, rank_k=5))
    for row, expected in ((same, 0.0), (rev, 2.0)):
        z, tg = crafted(row.tolist(), teacher_ids, teacher_lp, vocab)
        assert abs(float(loss(z, tg)["rank"][0]) - expected) < 1e-6


def test_union_duplicates_and_ties():
    # Cache k = 6, k_r = 3. Teacher top-3: ids 5, 6, 7; id 8 is cached at rank 4 only; 9, 10 are not cached.
    vocab = 12
    teacher_ids = [5, 6, 7, 8, 2, 3]
    teacher_lp = [-1.0, -1.5, -2.5, -3.0, -4.0, -4.5]  # sum p = 0.75
    row = [-20.0] * vocab
    row[6], row[8], row[9], row[10] = -0.1, -0.2, -0.3, -0.3  # student top-3: 6 (shared), 8, 9 (10 ties 9)
    z, tg = crafted(row, teacher_ids, teacher_lp, vocab)
    ids, mask, scores, overlap = rank_union(z, tg, 3)
    s_top = torch.topk(z, 3).indices[0].tolist()
    assert ids[0, :3].tolist() == [5, 6, 7] and ids[0, 3:].tolist() == s_top
    union = {i for i, m in zip(ids[0].tolist(), mask[0].tolist()) if m}
    assert union == {5, 6, 7} | set(s_top) and mask.sum() == len(union) == 5  # 6 counted once
    assert int(overlap[0]) == 1
    by_id = {i: float(s) for i, s, m in zip(ids[0].tolist(), scores[0].tolist(), mask[0].tolist()) if m}
    assert by_id[5] == -1.0 and by_id[6] == -1.5 and by_id[7] == -2.5
    assert by_id[8] == -3.0  # cached beyond the top-k_r: its cached value
    # Uncached: min(a_min - 1, log P_tail) = min(-5.5, log 0.25) = -5.5.
    fill = min(-5.5, math.log1p(-sum(math.exp(v) for v in teacher_lp)))
    assert fill == -5.5
    uncached = [i for i in s_top if i not in teacher_ids]
    assert all(by_id[i] == pytest.approx(fill) for i in uncached)


def test_fill_ties_stay_tied_and_respect_small_tail():
    # Two uncached student tokens get the same teacher score, hence the same teacher soft rank; with a tiny tail
    # the fill is log P_tail (below a_min - 1).
    vocab = 10
    teacher_ids = [0, 1, 2]
    teacher_lp = [math.log(0.6), math.log(0.3), math.log(0.1 - 1e-6)]
    row = [-30.0] * vocab
    row[7], row[8], row[9] = 1.0, 0.5, 0.2  # student top-3 all uncached
    z, tg = crafted(row, teacher_ids, teacher_lp, vocab)
    _, mask, scores, _ = rank_union(z, tg, 3)
    assert mask.all()
    assert torch.allclose(scores[0, 3:], torch.full((3,), math.log(1e-6), dtype=torch.float64), atol=1e-6)
    r = soft_rank(scores, mask)
    assert r[0, 3] == r[0, 4] == r[0, 5]
    # Empty tail (top-k holds everything): the fill is a_min - 1.
    z, tg = crafted(row, teacher_ids, teacher_lp, vocab, tail=float("-inf"))
    assert torch.allclose(rank_union(z, tg, 3)[2][0, 3:], torch.full((3,), teacher_lp[2] - 1, dtype=torch.float64))


@pytest.mark.parametrize("vocab,block", [(49_152, 128), (1_000, 64), (300, 128), (37, 128)])
def test_top_ids_matches_torch_topk(vocab, block):
    """The blocked top-k gives exactly torch.topk's ids (distinct values) and its values (with ties)."""
    g = torch.Generator().manual_seed(vocab)
    z = torch.randn(64, vocab, generator=g)  # (N, V), distinct values
    z[:8, : vocab // 2] += 5.0  # peaks bunched in the first blocks of some rows
    z[8:16] *= 0.01  # a flat row set
    for k in (1, 5, 10):
        assert torch.equal(top_ids(z, k, block), torch.topk(z, k, dim=-1).indices)
    tied = torch.randint(0, 4, (64, vocab), generator=g).float()  # (N, V), many exact ties
    ids = top_ids(tied, 5, block)
    assert torch.equal(tied.gather(1, ids), torch.topk(tied, 5, dim=-1).values)
    assert (ids.sort(dim=1).values.diff(dim=1) > 0).all()  # k distinct ids per row


def test_rank_against_per_row_reference():
    # Brute force per row: Python sets for the union, scipy PAV soft ranks, numpy Pearson.
    vocab, k, k_r = 25, 8, 4
    tg = make_targets(40, vocab, k, seed=8, min_valid=4, scale=1.0)
    gen = torch.Generator().manual_seed(9)
    z = torch.randn(40, vocab, generator=gen, dtype=torch.float64)
    # Half the rows: student close to the teacher, so the top sets overlap a lot.
    z[:20] = torch.from_numpy(np.log(dense_teacher(tg.slice(0, 20), vocab))) + 0.3 * z[:20]
    got = DistillLoss(LossConfig(kd="none", rank_weight=1.0, rank_k=k_r))(z, tg)["rank"].numpy()
    q = torch.log_softmax(z, -1).numpy()
    for b in range(40):
        valid = tg.topk_valid[b].numpy()
        cached = dict(zip(tg.topk_ids[b].numpy()[valid].tolist(), tg.topk_logprobs[b].numpy()[valid].tolist()))
        t_top = tg.topk_ids[b].numpy()[:k_r].tolist()
        s_top = np.argsort(-q[b], kind="stable")[:k_r].tolist()
        union = list(dict.fromkeys(t_top + s_top))
        fill = min(min(cached.values()) - 1, float(tg.tail_logmass[b]))
        t = np.array([cached.get(i, fill) for i in union])
        s = q[b, union]
        rt, rs = isotonic_soft_rank(t), isotonic_soft_rank(s)
        ref = 1 - np.corrcoef(rt, rs)[0, 1]
        assert got[b] == pytest.approx(ref, abs=1e-9), b


# ---- config, shapes, errors -------------------------------------------------------------------------------------


def test_config_reports_every_problem():
    with pytest.raises(ConfigError) as e:
        build_config(LossConfig, {"kd": "kl", "temperature": 0, "rank_k": 1, "dynamic": True, "chunk_size": 0})
    assert "kd (--loss): 'kl' is not one of" in str(e.value)
    with pytest.raises(ConfigError) as e:
        build_config(LossConfig, {"kd": "none", "temperature": 0, "rank_k": 1, "dynamic": True, "chunk_size": 0})
    msg = str(e.value)
    for part in ("temperature", "rank_k", "dynamic=true", "chunk_size"):
        assert part in msg
    assert build_config(LossConfig, {"kd": "tvd", "rank-k": "10"}).rank_k == 10


def test_errors_name_the_problem(setup):
    tg, logits = setup
    with pytest.raises(ValueError, match=r"k=8 and rank_k=10"):
        DistillLoss(LossConfig(rank_k=10))(logits, tg)
    with pytest.raises(ValueError, match="outside the student's vocabulary of 30"):
        DistillLoss(LossConfig())(logits[:, :30], tg)
    with pytest.raises(ValueError, match="invalid LossConfig"):
        DistillLoss(LossConfig(temperature=-1.0))


def test_no_positions():
    tg = make_targets(3, V, K).slice(0, 0)
    out = DistillLoss(LossConfig(ce_weight=1.0))(torch.zeros(0, V, requires_grad=True), tg)
    assert all(v.shape == (0,) for v in out.values())
    assert out["total"].sum() == 0
