"""Autograd kernels on the (positions x vocabulary) logits: the fused vocabulary statistics and a blocked top-k.

Both exist for speed: the logits dominate the cost of the losses and the metrics. Each is tested against the plain
PyTorch computation it replaces (``tests/test_losses.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


def compute_dtype(t: Tensor) -> torch.dtype:
    # log_softmax in float32 at least (bf16/fp16 logits are upcast); float64 stays float64 for gradcheck.
    return torch.promote_types(t.dtype, torch.float32)


class _VocabStats(torch.autograd.Function):
    """Everything the losses need from the full-vocabulary logits, in ~3 passes over (N, V) forward and 1 backward.

    forward(z (N, V), cached_ids (N, k), cached_valid (N, k), extra_ids (N, E)) ->
        lse (N,)        logsumexp over the vocabulary,
        tail_lse (N,)   logsumexp over the tokens NOT among the valid cached ids (-inf if none),
        gathered (N, k + E)  z at cached_ids then at extra_ids.
    The tail is summed directly over the uncached tokens (positive terms, no cancellation; torch's cascade sum keeps
    the relative error near float32 rounding), never as ``1 - sum_I e^q``, which loses all precision in float32
    once the student puts ~1 - 1e-7 of its mass on I.
    Backward: ``dz = (g_lse / S_all) e + (g_tail / S_tail) e [uncached] + scatter(g_gathered)`` with
    ``e = exp(z - max)`` saved from forward; autograd's generic path (log-softmax, masked copies, one zero-filled
    (N, V) gradient per gather) made ~25 passes and was the bulk of the loss time on CPU.
    """

    @staticmethod
    def forward(ctx, z: Tensor, cached_ids: Tensor, cached_valid: Tensor, extra_ids: Tensor):
        m = z.amax(dim=1, keepdim=True)  # (N, 1)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = torch.sub(z, m).exp_()  # (N, V), one buffer
        # Zero the cached entries in place, sum what is left (the tail, no cancellation), then restore them.
        # Invalid entries point at the row's first valid id, so every duplicate write is the same value.
        first = cached_ids.gather(1, cached_valid.float().argmax(dim=1, keepdim=True))  # (N, 1)
        safe_ids = torch.where(cached_valid, cached_ids, first)  # (N, k)
        e_cached = e.gather(1, safe_ids)  # (N, k), exact copies of the entries of e
        e.scatter_(1, safe_ids, 0.0)
        s_tail = e.sum(dim=1)  # (N,)
        e.scatter_(1, safe_ids, e_cached)
        s_cached = torch.where(cached_valid, e_cached, torch.zeros_like(e_cached)).sum(dim=1)  # (N,)
        no_valid = ~cached_valid.any(dim=1)  # such rows zeroed one real token above: count it back
        s_tail = s_tail + torch.where(no_valid, e_cached[:, 0], torch.zeros_like(s_tail))
        s_all = s_tail + s_cached  # (N,)
        lse = m.squeeze(1) + s_all.log()
        tail_lse = m.squeeze(1) + s_tail.log()  # -inf when nothing is left
        gathered = z.gather(1, torch.cat([cached_ids, extra_ids], dim=1))  # (N, k + E)
        ctx.save_for_backward(e, safe_ids, cached_valid, torch.cat([cached_ids, extra_ids], dim=1),
                              s_all, s_tail)
        return lse, tail_lse, gathered

    @staticmethod
    @once_differentiable
    def backward(ctx, g_lse: Tensor, g_tail: Tensor, g_gathered: Tensor):
        e, safe_ids, cached_valid, all_ids, s_all, s_tail = ctx.saved_tensors
        dtype = e.dtype
        coef_all = g_lse.to(dtype) / s_all  # (N,)
        coef_tail = torch.where(s_tail > 0, g_tail.to(dtype) / s_tail, torch.zeros_like(s_tail))  # (N,)
        grad = e * (coef_all + coef_tail)[:, None]  # (N, V)
        # The cached tokens are not in the tail: take their tail share back (0 for invalid / duplicate entries).
        e_cached = e.gather(1, safe_ids)  # (N, k)
        back = torch.where(cached_valid, -coef_tail[:, None] * e_cached, torch.zeros_like(e_cached))
        grad.scatter_add_(1, safe_ids, back)
        grad.scatter_add_(1, all_ids, g_gathered.to(dtype))
        return grad, None, None, None


def vocab_stats(z: Tensor, cached_ids: Tensor, cached_valid: Tensor, extra_ids: Tensor | None = None):
    """(lse (N,), tail_lse (N,), z at cached ids (N, k), z at extra ids (N, E)); see :class:`_VocabStats`."""
    if extra_ids is None:
        extra_ids = cached_ids[:, :0]
    lse, tail_lse, gathered = _VocabStats.apply(z, cached_ids, cached_valid, extra_ids)
    k = cached_ids.shape[1]
    return lse, tail_lse, gathered[:, :k], gathered[:, k:]


def top_ids(scores: Tensor, k: int, block: int = 128) -> Tensor:
    """Ids of the ``k`` largest entries of each row of ``scores`` (N, V), largest first: (N, k) int64.

    The same values as ``torch.topk(scores, k).indices`` (which of several exactly tied entries is taken may differ),
    several times faster on CPU at a 49k vocabulary, where ``torch.topk`` was most of the ranking loss's cost (see
    ``bench/stage2.py``). Split each row into
    blocks of ``block`` entries and take every block's max (one vectorised pass, no sort), then the k blocks with the
    largest maxima. An entry outside them is at most its block's max, hence at most each chosen block's max: k
    candidates are at least as large, so a ``topk`` over the k * block candidates is exact. Entries past the last
    whole block are candidates too.
    """
    n, v = scores.shape
    n_blocks = v // block
    if n_blocks <= k:  # small vocabularies: nothing to gain
        return torch.topk(scores, k, dim=-1).indices
    block_max = scores[:, : n_blocks * block].unfold(1, block, block).amax(dim=2)  # (N, n_blocks), a view: no copy
    best = torch.topk(block_max, k, dim=1).indices  # (N, k) block numbers
    offsets = torch.arange(block, device=scores.device)
    cand = (best[:, :, None] * block + offsets).reshape(n, k * block)  # (N, k * block) candidate ids
    if n_blocks * block < v:
        rest = torch.arange(n_blocks * block, v, device=scores.device).expand(n, -1)  # (N, V mod block)
        cand = torch.cat([cand, rest], dim=1)
    pick = torch.topk(scores.gather(1, cand), k, dim=1).indices  # (N, k) positions among the candidates
    return cand.gather(1, pick)
