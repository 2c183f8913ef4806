"""Soft ranks (Blondel et al. 2020) against independent references: hand values, a QP over the permutahedron's
defining inequalities solved by scipy, and scipy's own isotonic regression; exact gradients by gradcheck."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import isotonic_regression, minimize

from rlkd.trainer.softrank import isotonic_decreasing, soft_rank


def qp_soft_rank(theta: np.ndarray, eps: float = 1.0) -> np.ndarray:
    """argmin_{mu in permutahedron(1..n)} ||mu - theta/eps||^2, straight from the definition of the permutahedron
    (Rado: sum(mu) = n(n+1)/2 and, for every subset A, sum_A mu <= the |A| largest of 1..n), solved as a QP.
    Shares nothing with the sort + isotonic-regression reduction under test."""
    n = len(theta)
    z = np.asarray(theta, dtype=np.float64) / eps
    rows, bounds = [], []
    for size in range(1, n):
        bound = sum(range(n, n - size, -1))
        for subset in itertools.combinations(range(n), size):
            row = np.zeros(n)
            row[list(subset)] = 1.0
            rows.append(row)
            bounds.append(bound)
    a, b = np.array(rows), np.array(bounds, dtype=np.float64)
    cons = [{"type": "ineq", "fun": lambda m: b - a @ m, "jac": lambda m: -a},
            {"type": "eq", "fun": lambda m: np.array([m.sum() - n * (n + 1) / 2]), "jac": lambda m: np.ones((1, n))}]
    res = minimize(lambda m: 0.5 * np.sum((m - z) ** 2), x0=np.full(n, (n + 1) / 2), jac=lambda m: m - z,
                   constraints=cons, method="SLSQP", options={"ftol": 1e-15, "maxiter": 1000})
    assert res.success, res.message
    return res.x


def isotonic_soft_rank(theta: np.ndarray, eps: float = 1.0) -> np.ndarray:
    """The paper's reduction with scipy's PAV: sort descending, antitonic fit of s - rho, un-sort."""
    z = np.asarray(theta, dtype=np.float64) / eps
    n = len(z)
    order = np.argsort(-z, kind="stable")
    s = z[order]
    v = isotonic_regression(s - np.arange(n, 0, -1), increasing=False).x
    out = np.empty(n)
    out[order] = s - v
    return out


def test_hand_values():
    # Values at least eps apart give the hard ranks exactly: sorted descending, s - rho is already non-increasing.
    x = torch.tensor([[8.0, 0.0, 5.0, 3.0, 2.0, 1.0, 6.0, 7.0, 9.0]])
    assert torch.equal(soft_rank(x), torch.tensor([[8.0, 1.0, 5.0, 4.0, 3.0, 2.0, 6.0, 7.0, 9.0]]))
    # (0, 0.5): s = (0.5, 0), s - rho = (-1.5, -1) violates the order, pooled mean -1.25 -> ranks (1.25, 1.75).
    assert torch.allclose(soft_rank(torch.tensor([[0.0, 0.5]])), torch.tensor([[1.25, 1.75]]))
    # Ties are tied, strength scales: (0, 1) with eps = 2 is (0, 0.5) with eps = 1.
    assert torch.equal(soft_rank(torch.tensor([[3.0, 3.0, 3.0]])), torch.tensor([[2.0, 2.0, 2.0]]))
    assert torch.allclose(soft_rank(torch.tensor([[0.0, 1.0]]), regularization_strength=2.0),
                          torch.tensor([[1.25, 1.75]]))
    # Very strong regularisation: everything at the centroid (n + 1) / 2.
    assert torch.allclose(soft_rank(torch.tensor([[1.0, -2.0, 0.5, 3.0]]), regularization_strength=1e6),
                          torch.full((1, 4), 2.5), atol=1e-5)


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_matches_qp_over_permutahedron(n):
    rng = np.random.default_rng(n)
    theta = rng.normal(scale=1.5, size=(6, n))
    theta[0, :2] = theta[0, 0]  # a tie
    got = soft_rank(torch.from_numpy(theta)).numpy()
    for row, g in zip(theta, got):
        ref = qp_soft_rank(row)
        np.testing.assert_allclose(g, ref, atol=1e-5)


def test_matches_scipy_isotonic_batched_with_padding():
    # n = 30 = 2 * k_r for k_r = 15 (ranking alone), 500 rows with random numbers of real entries.
    gen = torch.Generator().manual_seed(0)
    n_rows, n = 500, 30
    x = torch.randn(n_rows, n, generator=gen, dtype=torch.float64) * 4
    x[:50] = torch.round(x[:50])  # many ties
    lengths = torch.randint(1, n + 1, (n_rows,), generator=gen)
    mask = torch.rand(n_rows, n, generator=gen).argsort(dim=1) < lengths[:, None]  # padding anywhere in the row
    for eps in (1.0, 0.3):
        got = soft_rank(x, mask, eps)
        for b in range(n_rows):
            m = mask[b]
            ref = isotonic_soft_rank(x[b][m].numpy(), eps)
            np.testing.assert_allclose(got[b][m].numpy(), ref, atol=1e-9)
            assert torch.all(got[b][~m] == 0)
    # float32 stays within float32 rounding of the float64 result.
    got32 = soft_rank(x.float(), mask)
    assert torch.allclose(got32.double(), soft_rank(x, mask), atol=2e-5)


def test_rank_properties():
    x = torch.randn(200, 10, dtype=torch.float64)
    mask = torch.rand(200, 10) < 0.7
    r = soft_rank(x, mask)
    m = mask.sum(1).double()
    assert torch.allclose(r.sum(1), m * (m + 1) / 2)  # on the permutahedron's affine hull
    assert torch.all(r[mask] >= 1 - 1e-9) and torch.all(r[mask] <= m.repeat_interleave(mask.sum(1)) + 1e-9)
    # Order-preserving: a larger value never gets a smaller soft rank.
    for b in range(200):
        v, rr = x[b][mask[b]], r[b][mask[b]]
        order = torch.argsort(v)
        assert torch.all(rr[order].diff() >= -1e-12)


def test_isotonic_against_scipy():
    gen = torch.Generator().manual_seed(1)
    y = torch.randn(300, 12, generator=gen, dtype=torch.float64) * 10
    y[:100] = torch.round(y[:100] / 5)
    got = isotonic_decreasing(y)
    for b in range(300):
        np.testing.assert_allclose(got[b].numpy(), isotonic_regression(y[b].numpy(), increasing=False).x, atol=1e-10)


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(8, 7, generator=gen, dtype=torch.float64) * 1.5).requires_grad_()
    mask = torch.rand(8, 7, generator=gen) < 0.8
    mask[:, 0] = True
    assert torch.autograd.gradcheck(lambda t: soft_rank(t, mask), (x,))
    assert torch.autograd.gradcheck(lambda t: soft_rank(t, None, 0.5), (x,))
    # Padded entries get no gradient.
    soft_rank(x, mask).pow(2).sum().backward()
    assert torch.all(x.grad[~mask] == 0)


def test_jacobian_is_block_averaging():
    # For (0, 0.5) both entries form one block: rank_i = z_i - mean(z) + 1.5 -> dr/dz = I - 1/2.
    x = torch.tensor([[0.0, 0.5]], dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda t: soft_rank(t)[0], x)[:, 0, :]
    assert torch.allclose(jac, torch.tensor([[0.5, -0.5], [-0.5, 0.5]], dtype=torch.float64))
    # Separated values: hard ranks, zero Jacobian.
    x = torch.tensor([[0.0, 5.0, -3.0]], dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda t: soft_rank(t)[0], x)
    assert torch.all(jac == 0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="2-D"):
        soft_rank(torch.zeros(3))
    with pytest.raises(ValueError, match="regularization_strength"):
        soft_rank(torch.zeros(2, 3), regularization_strength=0.0)
    with pytest.raises(ValueError, match="mask shape"):
        soft_rank(torch.zeros(2, 3), torch.ones(2, 2, dtype=torch.bool))
