"""Differentiable soft ranks (Blondel, Teboul, Berthet & Djolonga 2020, "Fast Differentiable Sorting and Ranking",
ICML, arXiv 2002.08871), L2 regularisation, batched over rows, in plain PyTorch.

Same convention as ``torchsort.soft_rank(x, regularization="l2", regularization_strength=eps)``, which the RLKD
paper's code calls: ranks are ascending, ``1..n``, the largest value gets rank ``n``; as ``eps -> 0`` they become
the hard ranks, as ``eps -> inf`` every entry tends to ``(n + 1) / 2``. ``torchsort`` itself does not build here
(it compiles a CUDA/C++ extension), hence this module.

Definition (paper, section 4 and Prop. 3). With ``rho = (n, n-1, ..., 1)`` and ``z = theta / eps``::

    soft_rank(theta) = P(z) = argmin_{mu in permutahedron(rho)} 0.5 * ||mu - z||^2

Reduction to isotonic regression: sort ``z`` descending (``s = z[sigma]``), solve the antitonic (non-increasing)
regression ``v = argmin_{v_1 >= ... >= v_n} 0.5 * ||v - (s - rho)||^2`` and return ``s - v`` un-permuted.

Isotonic regression, batched. Pool-adjacent-violators is a sequential stack algorithm; a Python loop over 4,096
rows per step is too slow, and a masked vectorised PAV needs up to ``n^2`` tiny kernel launches. Instead we use the
equivalent geometric characterisation (Barlow et al. 1972, "Statistical Inference under Order Restrictions"):
the antitonic fit is the left derivative of the least concave majorant of the cumulative-sum diagram
``P_m = (m, y_0 + ... + y_{m-1})``. Its blocks end exactly at the strict vertices of that majorant, and ``P_m``
(``0 < m < n``) is a strict vertex iff::

    min_{j < m} mean(y[j : m]) > max_{k > m} mean(y[m : k])

All of these block means for one row form an ``(n, n)`` matrix, so the whole batch costs ``O(N n^2)`` tensor work
with no data-dependent loop; ``n`` here is at most ``2 * k_r`` (10 by default). Ties (a mean on the left equal to
one on the right) merge the blocks, as PAV does, so tied inputs always get tied ranks. The fitted values are then
recomputed as plain block means, so the forward value and the Jacobian use the same partition.

Backward is exact: the Jacobian of isotonic regression is block-wise averaging (paper, Lemma 2), implemented as a
custom ``autograd.Function``; sorting and un-sorting are gathers that autograd already differentiates.

Padding: rows may hold a variable number of valid entries (``mask``). Padded entries take no part in the ranking
(the valid entries are ranked ``1..m`` among themselves) and get rank 0 and zero gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["isotonic_decreasing", "soft_rank"]


def _block_ids(y: Tensor, valid_len: Tensor) -> Tensor:
    """Block index of every entry in the antitonic fit of ``y`` (valid prefix ``valid_len``); (N, n) int64.

    Entries at or after ``valid_len`` each get a block of their own, so padding never pools with real entries.
    """
    n = y.shape[1]
    ar = torch.arange(n, device=y.device)
    # seg[b, j, k] = sum(y[b, j..k]) for k >= j, built by a cumsum over k of the row masked to k >= j: no
    # prefix-sum differences, so no cancellation between large partial sums.
    upper = ar[None, :] >= ar[:, None]  # (n, n)  [j, k]: k >= j
    seg = torch.cumsum(y[:, None, :] * upper, dim=-1)  # (N, n, n)
    length = (ar[None, :] - ar[:, None] + 1).clamp_min(1).to(y.dtype)  # (n, n)
    means = seg / length  # (N, n, n)  means[b, j, k] = mean(y[b, j..k]), valid where k >= j

    inside = ar[None, :] < valid_len[:, None]  # (N, n)  entry is a real (unpadded) one
    # left[b, m] = min over j <= m-1 of means[b, j, m-1], i.e. column m-1 restricted to rows j <= m-1.
    big = torch.finfo(y.dtype).max
    col_ok = upper  # [j, k]: j <= k
    left_all = means.masked_fill(~col_ok, big).amin(dim=1)  # (N, n)  left_all[b, k] = min_{j<=k} mean(y[j..k])
    # right[b, m] = max over k >= m (and k < valid_len) of means[b, m, k].
    row_ok = upper[None, :, :] & inside[:, None, :]  # (N, n, n)  [m, k]: k >= m and k real
    right_all = means.masked_fill(~row_ok, -big).amax(dim=2)  # (N, n)  right_all[b, m] = max_{k>=m} mean(y[m..k])

    # A new block starts at m (1 <= m < n) when P_m is a strict vertex of the concave majorant, or at padding.
    starts = torch.zeros_like(inside)  # (N, n) bool
    starts[:, 1:] = left_all[:, :-1] > right_all[:, 1:]
    starts = starts | ~inside
    starts[:, 0] = False
    return torch.cumsum(starts.to(torch.int64), dim=1)  # (N, n)


def _block_average(x: Tensor, block: Tensor, counts: Tensor) -> Tensor:
    """Replace every entry of ``x`` (N, n) by the mean of its block."""
    sums = torch.zeros_like(x).scatter_add_(1, block, x)  # (N, n): block sums, indexed by block id
    return (sums / counts).gather(1, block)


class _IsotonicDecreasing(torch.autograd.Function):
    """v = argmin_{v_1 >= v_2 >= ... (over the valid prefix)} 0.5 * ||v - y||^2, rows independent."""

    @staticmethod
    def forward(ctx, y: Tensor, valid_len: Tensor) -> Tensor:
        block = _block_ids(y, valid_len)  # (N, n)
        counts = torch.zeros_like(y).scatter_add_(1, block, torch.ones_like(y)).clamp_min(1)  # (N, n) block sizes
        ctx.save_for_backward(block, counts)
        return _block_average(y, block, counts)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_v: Tensor):
        block, counts = ctx.saved_tensors
        # The Jacobian is block-diagonal with blocks (1/|B|) * ones: symmetric, so the VJP is the same averaging.
        return _block_average(grad_v, block, counts), None


def isotonic_decreasing(y: Tensor, valid_len: Tensor | None = None) -> Tensor:
    """Batched antitonic (non-increasing) L2 isotonic regression of each row of ``y`` (N, n), differentiable.

    ``valid_len`` (N,) int64: only the first ``valid_len[b]`` entries of row ``b`` are constrained; the rest are
    returned unchanged (each is a block of its own).
    """
    if valid_len is None:
        valid_len = torch.full(y.shape[:1], y.shape[1], dtype=torch.int64, device=y.device)
    return _IsotonicDecreasing.apply(y, valid_len)


def soft_rank(values: Tensor, mask: Tensor | None = None, regularization_strength: float = 1.0) -> Tensor:
    """Soft ranks of each row of ``values`` (N, n), ascending (largest = n), L2-regularised with strength ``eps``.

    Args:
        values: (N, n) floating tensor; float32 or float64 (the computation keeps its dtype).
        mask: optional (N, n) bool, True for real entries. Row ``b`` is ranked among its ``m_b`` real entries
            (ranks in ``[1, m_b]``, summing to ``m_b (m_b + 1) / 2``); padded entries get 0 and no gradient.
        regularization_strength: ``eps > 0``; 1.0 in the RLKD paper.

    Returns:
        (N, n) soft ranks, same dtype as ``values``. Differentiable with the exact Jacobian.
    """
    if values.dim() != 2:
        raise ValueError(f"soft_rank expects a 2-D (rows, n) tensor, got shape {tuple(values.shape)}")
    if regularization_strength <= 0:
        raise ValueError(f"regularization_strength must be > 0, got {regularization_strength}")
    n = values.shape[1]
    if mask is None:
        mask = torch.ones_like(values, dtype=torch.bool)
    elif mask.shape != values.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from values shape {tuple(values.shape)}")
    z = values / regularization_strength  # (N, n)
    # Descending sort with padding last; padding is sorted on a finite stand-in (the row's -inf is never used in
    # arithmetic), the real values are gathered from z so the gradient flows through them.
    key = z.detach().masked_fill(~mask, float("-inf"))
    perm = torch.sort(key, dim=1, descending=True, stable=True).indices  # (N, n)
    valid_len = mask.sum(dim=1)  # (N,)
    sorted_mask = torch.arange(n, device=values.device)[None, :] < valid_len[:, None]  # (N, n)
    s = torch.where(sorted_mask, z.gather(1, perm), torch.zeros((), dtype=z.dtype, device=z.device))  # (N, n)
    # rho for a row with m real entries is (m, m-1, ..., 1) over its sorted prefix.
    rho = (valid_len[:, None] - torch.arange(n, device=values.device)[None, :]).clamp_min(0).to(z.dtype)  # (N, n)
    v = isotonic_decreasing(s - rho, valid_len)  # (N, n)
    ranks_sorted = torch.where(sorted_mask, s - v, torch.zeros((), dtype=z.dtype, device=z.device))  # (N, n)
    return torch.zeros_like(ranks_sorted).scatter(1, perm, ranks_sorted)  # (N, n), back in input order
