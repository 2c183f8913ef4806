"""Ideal (adaptive, sequential) code lengths of context models for the cached top-k ids.

Every model here is a *sequential* code: the probability assigned to event i depends only on events < i (in
time order: position t, then rank r), so sum(-log2 p) is a code length an arithmetic coder reaches within a few
bytes, model cost included (no table is learned from the data it codes and then not paid for). The only free
parameters are a handful of smoothing constants picked from a small grid (a few bits of side information).

Estimator: a Pitman-Yor-style mixture per context c with back-off distribution q (another sequential model's
probability of the same symbol at the same time):
    p(s | c) = (max(n_cs - d, 0) + (beta + d * u_c) * q(s)) / (n_c + beta)
n_c: events seen in c so far, n_cs: of them equal to s, u_c: distinct symbols seen in c.
It is a proper distribution whenever q is, so chaining models (rank bucket -> order-0 -> uniform) stays a code.
"""
from __future__ import annotations

import numpy as np


def _rank_in_group(key: np.ndarray):
    """For events in time order: how many earlier events share each event's key; plus the stable sort by key and
    the group starts in that order (reused by the caller)."""
    idx = np.arange(key.size)
    order = np.argsort(key, kind="stable")
    ks = key[order]
    start = np.r_[True, ks[1:] != ks[:-1]]
    gstart = np.maximum.accumulate(np.where(start, idx, 0))
    rank = np.empty(key.size, np.int64)
    rank[order] = idx - gstart
    return rank, order, start


def seq_counts(ctx: np.ndarray, sym: np.ndarray):
    """For events in time order: (n_c, n_cs, u_c) counted over earlier events only."""
    ctx = np.asarray(ctx, dtype=np.int64)
    sym = np.asarray(sym, dtype=np.int64)
    n_c, o, start = _rank_in_group(ctx)  # earlier events in the same context
    n_cs, _, _ = _rank_in_group(ctx * (int(sym.max()) + 1) + sym)  # earlier events of the same (context, symbol)
    # u_c: first occurrences of (c, s) before this event within c
    first = (n_cs == 0).astype(np.int64)
    f = first[o]
    cum = np.cumsum(f)
    base = np.maximum.accumulate(np.where(start, cum - f, -1))  # cum before group start
    u = np.empty(ctx.size, np.int64)
    u[o] = cum - f - base
    return n_c, n_cs, u


def py_prob(counts, q, beta, d):
    n_c, n_cs, u = counts
    return (np.maximum(n_cs - d, 0.0) + (beta + d * u) * q) / (n_c + beta)


def best_py(counts, q, betas=(0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096), ds=(0.0, 0.25, 0.5, 0.75, 0.9)):
    """(bits total, p array, (beta, d)) minimising the code length over the grid."""
    best = None
    for b in betas:
        for d in ds:
            p = py_prob(counts, q, b, d)
            bits = -np.log2(p).sum()
            if best is None or bits < best[0]:
                best = (bits, p, (b, d))
    return best


def kt_bits(ctx, sym, A):
    """Adaptive additive (alpha=1/2, KT) estimator per context over an alphabet of size A."""
    n_c, n_cs, _ = seq_counts(ctx, sym)
    p = (n_cs + 0.5) / (n_c + 0.5 * A)
    return -np.log2(p).sum(), p


def static_entropy_bits(sym):
    _, c = np.unique(sym, return_counts=True)
    p = c / c.sum()
    return float(-(c * np.log2(p)).sum())


def rank_bucket(r):
    r = np.asarray(r)
    return np.where(r < 4, r, 2 + np.floor(np.log2(np.maximum(r, 1))).astype(np.int64))  # 0,1,2,3,4(4-7),5,...
