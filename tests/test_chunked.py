"""The chunked LM head + loss equals the unchunked one (values and gradients) and never builds (N, V)."""

from __future__ import annotations

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from rlkd.trainer.chunked import chunked_distill_loss
from rlkd.trainer.config import LossConfig
from rlkd.trainer.losses import LOSS_TERMS, DistillLoss
from tests.test_losses import make_targets

N, V, H, K = 45, 60, 12, 8


def inputs(dtype, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, H, generator=gen, dtype=dtype)).requires_grad_()
    w = (torch.randn(V, H, generator=gen, dtype=dtype) * 0.5).requires_grad_()
    b = (torch.randn(V, generator=gen, dtype=dtype) * 0.1).requires_grad_() if bias else None
    tg = make_targets(N, V, K, seed=seed + 1, min_valid=5, dtype=torch.float32)
    return h, w, b, tg


def unchunked(h, w, b, tg, loss):
    logits = h @ w.t() + (b if b is not None else 0)  # (N, V): the naive reference
    return {name: v.sum() for name, v in loss(logits, tg).items()}


def grads(out: dict, params, coef: dict):
    obj = sum(c * out[name] for name, c in coef.items())
    return torch.autograd.grad(obj, [p for p in params if p is not None])


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 45, 1000])
def test_chunked_equals_unchunked_float32(chunk_size):
    h, w, b, tg = inputs(torch.float32)
    loss = DistillLoss(LossConfig(ce_weight=0.2, dynamic=True))
    got = chunked_distill_loss(h, w, tg, loss, chunk_size=chunk_size, lm_head_bias=b)
    ref = unchunked(h, w, b, tg, loss)
    for name in LOSS_TERMS:
        assert torch.allclose(got[name], ref[name], rtol=1e-5, atol=1e-5), name
    coef = {"total": 1.0}
    for g, r in zip(grads(got, (h, w, b), coef), grads(ref, (h, w, b), coef)):
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kd,tail", [("forward_kl", "bucket"), ("reverse_kl", "renormalize"), ("tvd", "bucket")])
def test_chunked_equals_unchunked_float64_any_combination(kd, tail):
    h, w, b, tg = inputs(torch.float64, seed=3)
    loss = DistillLoss(LossConfig(kd=kd, tail=tail, ce_weight=0.5, temperature=1.3))
    got = chunked_distill_loss(h, w, tg, loss, chunk_size=10, lm_head_bias=b)
    ref = unchunked(h, w, b, tg, loss)
    for name in LOSS_TERMS:
        assert torch.allclose(got[name], ref[name], rtol=1e-12, atol=1e-12), name
    # Back-propagating any combination of the returned sums, not only "total".
    coef = {"kd": 0.7, "rank": -1.3, "ce": 2.0}
    for g, r in zip(grads(got, (h, w, b), coef), grads(ref, (h, w, b), coef)):
        assert torch.allclose(g, r, rtol=1e-10, atol=1e-12)


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(5, 3, generator=gen, dtype=torch.float64).requires_grad_()
    w = torch.randn(8, 3, generator=gen, dtype=torch.float64).requires_grad_()
    b = torch.randn(8, generator=gen, dtype=torch.float64).requires_grad_()
    tg = make_targets(5, 8, 6, seed=5, min_valid=4)
    loss = DistillLoss(LossConfig(rank_k=3, ce_weight=0.3))
    assert torch.autograd.gradcheck(lambda *p: chunked_distill_loss(p[0], p[1], tg, loss, 2, p[2])["total"],
                                    (h, w, b))


def test_no_bias_and_frozen_weight():
    h, w, _, tg = inputs(torch.float32, seed=6, bias=False)
    w = w.detach()  # e.g. a frozen or separately handled head: no gradient is computed for it
    loss = DistillLoss(LossConfig())
    out = chunked_distill_loss(h, w, tg, loss, chunk_size=8)
    out["total"].backward()
    ref_h = h.grad.clone()
    h.grad = None
    unchunked(h, w, None, tg, loss)["total"].backward()
    assert torch.allclose(ref_h, h.grad, rtol=1e-4, atol=1e-6)


def test_no_positions():
    h, w, b, tg = inputs(torch.float32)
    out = chunked_distill_loss(h[:0], w, tg.slice(0, 0), DistillLoss(LossConfig()), chunk_size=8, lm_head_bias=b)
    assert all(float(v.detach()) == 0.0 for v in out.values())
    out["total"].backward()
    assert torch.all(w.grad == 0)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_materialises_positions_by_vocab():
    n, vocab, hid, chunk = 64, 400, 4, 16
    gen = torch.Generator().manual_seed(7)
    h = torch.randn(n, hid, generator=gen).requires_grad_()
    w = torch.randn(vocab, hid, generator=gen).requires_grad_()
    tg = make_targets(n, vocab, 8, seed=8, dtype=torch.float32)
    loss = DistillLoss(LossConfig(ce_weight=0.1))
    with _LargestTensor() as mode:
        chunked_distill_loss(h, w, tg, loss, chunk_size=chunk)["total"].backward()
    # Bounded by a chunk's logits (chunk x V; the tail mask has one spare column), far below N x V; the (V, H)
    # gradient is smaller still.
    assert mode.largest <= chunk * (vocab + 1) < n * vocab
    with _LargestTensor() as naive:
        unchunked(h, w, None, tg, loss)["total"].backward()
    assert naive.largest >= n * vocab  # the check above can fail


def test_shape_errors():
    h, w, _, tg = inputs(torch.float32)
    loss = DistillLoss(LossConfig())
    with pytest.raises(ValueError, match="hidden has 44 positions"):
        chunked_distill_loss(h[:44], w, tg, loss)
    with pytest.raises(ValueError, match=r"hidden \(N, H\)"):
        chunked_distill_loss(h, w[:, :3], tg, loss)
    with pytest.raises(ValueError, match="outside the student's vocabulary of 30"):
        chunked_distill_loss(h, w[:30], tg, loss)


def test_grad_in_forward_matches_recompute():
    h, w, b, tg = inputs(torch.float32, seed=9)
    loss = DistillLoss(LossConfig(ce_weight=0.2, dynamic=True))
    ref = unchunked(h, w, b, tg, loss)
    ref_grads = grads(ref, (h, w, b), {"total": 0.25})
    got = chunked_distill_loss(h, w, tg, loss, chunk_size=16, lm_head_bias=b, grad_in_forward=True)
    for name in LOSS_TERMS:
        assert torch.allclose(got[name], ref[name], rtol=1e-5, atol=1e-5), name
    assert not got["kd"].requires_grad  # only the total is differentiable in this mode
    for g, r in zip(grads(got, (h, w, b), {"total": 0.25}), ref_grads):
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-6)
    # Under no_grad (evaluation) it is a plain forward.
    with torch.no_grad():
        ev = chunked_distill_loss(h, w, tg, loss, chunk_size=16, lm_head_bias=b, grad_in_forward=True)
    assert torch.allclose(ev["total"], ref["total"], rtol=1e-5)


class _LiveBytes(TorchDispatchMode):
    """Peak bytes of live tensor storage made by ops while active (a storage counts until freed)."""

    def __init__(self):
        super().__init__()
        self.refs, self.current, self.peak = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key, (ref, nbytes) in list(self.refs.items()):
            if ref.expired():
                del self.refs[key]
                self.current -= nbytes
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if st.nbytes() and st._cdata not in self.refs:
                    self.refs[st._cdata] = (StorageWeakRef(st), st.nbytes())
                    self.current += st.nbytes()
        self.peak = max(self.peak, self.current)
        return out


@pytest.mark.parametrize("chunk", [16, 64])
def test_peak_memory_bounded_by_chunk(chunk):
    """Peak live bytes: at most three float32 (chunk, V) buffers (recomputed logits, the exp the loss saves, their
    gradient) plus the (V, H) and (N, H) gradients and a few (N, k) index tensors; the naive loss holds at least two
    (N, V)."""
    n, vocab, hid, k = 512, 3000, 8, 8
    gen = torch.Generator().manual_seed(10)
    h = torch.randn(n, hid, generator=gen).requires_grad_()
    w = torch.randn(vocab, hid, generator=gen).requires_grad_()
    tg = make_targets(n, vocab, k, seed=11, dtype=torch.float32)
    loss = DistillLoss(LossConfig(ce_weight=0.1))
    with _LiveBytes() as mode:
        chunked_distill_loss(h, w, tg, loss, chunk_size=chunk)["total"].backward()
    f32 = 4
    bound = 3 * chunk * (vocab + 1) * f32 + (vocab + n) * hid * f32 + 8 * n * k * 8  # + eight int64 (N, k)
    assert mode.peak <= bound, (mode.peak, bound)
    with _LiveBytes() as naive:
        unchunked(h, w, None, tg, loss)["total"].backward()
    assert naive.peak >= 2 * n * vocab * f32 > bound  # the check above can fail
