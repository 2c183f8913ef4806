"""Summary statistics of a cache's teacher distributions, vectorised over many positions at once.

Per scored position (see :mod:`rlkd.cache.schema`) the cache keeps the teacher's top ``n`` probabilities
``p_1 >= ... >= p_n`` (``n = topk_count``, ``<= k``) and the tail mass ``m = 1 - sum p_i`` of the ``R = V - n``
tokens it dropped. The full distribution is unknown, so some statistics are given as bounds:

Entropy bounds (nats). ``H = H_top + H_tail`` with ``H_top = -sum_i p_i log p_i`` exact and
``H_tail = -sum_j q_j log q_j`` over the ``R`` dropped tokens, which satisfy ``0 <= q_j <= p_n`` (they rank below
every kept entry) and ``sum_j q_j = m``. ``-sum q log q`` is concave and symmetric (Schur-concave), so over that set:

* **upper bound**: the tail spread uniformly, ``q_j = m / R``: ``H_tail <= m log(R / m)`` (Jensen). This needs the
  vocabulary size ``V``: the larger of the tokenizer's and the teacher's (the manifest's ``vocab_limit``).
* **lower bound**: the tail as concentrated as the ranking allows, i.e. ``j = floor(m / p_n)`` tokens of exactly
  ``p_n`` and one of the remainder ``r = m - j p_n``: ``H_tail >= -j p_n log p_n - r log r`` (that vector
  majorises every other feasible one). It is never below the "one bucket" value ``-m log m``, and equals it when
  ``m <= p_n``.

Both are exact bounds on the entropy of the distribution the cache describes; with the lossy ``q8``/``fp16`` codecs
the kept probabilities are the decoded ones (q8: within 1/32 nat), so the bounds hold up to that rounding.

Peaks: the kept entries with ``p >= threshold``. A dropped token could also reach the threshold only if
``p_n >= threshold`` and ``m >= threshold``; such positions are counted in ``undercount_share``. With
``k >= 1 / threshold`` that cannot happen (at most ``1 / threshold`` tokens can each hold ``threshold``).

Everything here works on flat per-position arrays of many rows at a time (:class:`PositionArrays`), so the cost per
position is a few numpy element operations, not Python.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

GROUPS = ("all", "prompt", "response")
"""Position groups of every statistic: all scored positions, and split by ``loss_mask`` (False = prompt)."""

RANK_BUCKETS = ((1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 10), (11, 20), (21, 50), (51, 100), (101, 1000),
                (1001, None))
"""Histogram buckets (inclusive) of the actual next token's 1-based full-vocabulary rank."""

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass
class PositionArrays:
    """Flat per-position statistics of many positions (one entry per scored position, rows concatenated)."""

    top1: np.ndarray
    """(N,) float32: probability of the teacher's argmax."""
    entropy_lower: np.ndarray
    """(N,) float32: lower bound on the teacher's entropy (nats), see the module docstring."""
    entropy_upper: np.ndarray
    """(N,) float32: upper bound (nats); NaN when the vocabulary size is unknown."""
    peaks: np.ndarray
    """(N,) int16: kept entries with p >= threshold."""
    undercount: np.ndarray
    """(N,) bool: a dropped token could also be a peak (``p_n >= threshold`` and tail mass >= threshold)."""
    tail: np.ndarray
    """(N,) float32: probability mass outside the kept entries."""
    target_rank: np.ndarray
    """(N,) int32: 1-based full-vocabulary rank of the actual next token."""
    target_prob: np.ndarray
    """(N,) float32: the teacher's probability of the actual next token."""
    in_topk: np.ndarray
    """(N,) bool: the actual next token is among the kept entries (rank <= topk_count)."""
    response: np.ndarray
    """(N,) bool: the position's ``loss_mask`` (True = response, trained)."""

    def __len__(self) -> int:
        return int(self.top1.shape[0])

    def select(self, index) -> PositionArrays:
        return PositionArrays(**{k: v[index] for k, v in self.__dict__.items()})

    @staticmethod
    def concat(parts: list[PositionArrays]) -> PositionArrays:
        if not parts:
            return empty_arrays()
        return PositionArrays(**{k: np.concatenate([getattr(p, k) for p in parts]) for k in parts[0].__dict__})


def empty_arrays() -> PositionArrays:
    f = np.zeros(0, np.float32)
    return PositionArrays(top1=f, entropy_lower=f, entropy_upper=f, peaks=np.zeros(0, np.int16),
                          undercount=np.zeros(0, bool), tail=f, target_rank=np.zeros(0, np.int32), target_prob=f,
                          in_topk=np.zeros(0, bool), response=np.zeros(0, bool))


def entropy_bounds(top_entropy: np.ndarray, last_prob: np.ndarray, tail: np.ndarray, counts: np.ndarray,
                   vocab_size: int | None, *, log_last: np.ndarray | None = None,
                   log_tail: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper entropy bounds (float32, (P,)) from ``H_top``, ``p_n``, the tail mass and ``n`` per position.

    See the module docstring for why these are bounds. float32 throughout (numpy's float32 ``log`` is SIMD): every
    term is a sum of a few values of magnitude <= ~100 nats, so the rounding (~1e-7 relative) is far below the q8
    codec's.
    ``log_last`` / ``log_tail``: the log-probs ``last_prob`` / ``tail`` came from, when the caller has them (saves
    two ``log`` passes).
    """
    f32 = np.float32
    m = np.clip(np.asarray(tail, dtype=f32), f32(0), f32(1))  # (P,)
    c = np.asarray(last_prob, dtype=f32)  # (P,) cap on any dropped probability
    zero_cap = ~(c > 0)  # (P,)
    # A tail with a zero cap is inconsistent (only rounding can make it): treat the tail as one bucket then.
    c = np.where(zero_cap, np.maximum(m, np.finfo(f32).tiny), c)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        if log_last is None:
            log_c = np.log(c)  # (P,)
        else:
            log_c = np.array(log_last, dtype=f32)  # (P,) a copy: patched below
            if zero_cap.any():
                log_c[zero_cap] = np.log(c[zero_cap])
        log_m = np.log(m) if log_tail is None else np.minimum(np.asarray(log_tail, dtype=f32), f32(0))  # (P,)
        j = np.floor(m / c)  # (P,) dropped tokens at the cap
        jc = j * c  # (P,) their mass
        r = np.maximum(m - jc, f32(0))  # (P,) the remainder token
        lower_tail = -jc * log_c
        rlogr = r * np.log(r)  # NaN where r = 0
        lower_tail -= np.where(r > 0, rlogr, f32(0))
        if vocab_size is None:
            upper_tail = np.full_like(m, np.nan)
        else:
            k = int(counts[0])
            if (counts == k).all():  # fixed k: one scalar log
                log_r = f32(np.log(max(vocab_size - k, 1)))
            else:
                log_r = np.log(np.maximum(vocab_size - np.asarray(counts, dtype=f32), f32(1)))  # (P,)
            upper_tail = np.where(m > 0, m * (log_r - log_m), f32(0))
            # Rounding in a lossy codec can push m above R * p_n; the uniform tail is then the only feasible one.
            np.minimum(lower_tail, upper_tail, out=lower_tail)
    lower_tail = np.where(m > 0, lower_tail, f32(0))
    top_entropy = np.asarray(top_entropy, dtype=f32)
    return top_entropy + lower_tail, top_entropy + upper_tail


def position_arrays(counts: np.ndarray, logprobs: np.ndarray, tail_logmass: np.ndarray, target_logprob: np.ndarray,
                    target_rank: np.ndarray, loss_mask: np.ndarray, *, vocab_size: int | None,
                    threshold: float = 0.1) -> PositionArrays:
    """Statistics of P positions given their flat cache columns (any number of rows concatenated).

    Args:
        counts: (P,) entries per position; logprobs: (sum counts,) rank-ordered log-probs, position after position;
        tail_logmass, target_logprob, target_rank, loss_mask: (P,) as in :class:`rlkd.cache.TeacherRow`.
    """
    counts = np.asarray(counts)  # (P,)
    P = counts.shape[0]
    if P == 0:
        return empty_arrays()
    lp = np.asarray(logprobs, dtype=np.float32)  # (n,)
    log_thr = np.float32(np.log(threshold))
    k = int(counts[0])
    # At most 1/threshold tokens can each hold >= threshold (a little more allows for codec rounding), and the
    # entries are sorted, so the peak count only needs the first few ranks.
    peak_cols = int(1.05 / threshold) + 1
    with np.errstate(invalid="ignore", under="ignore"):
        if lp.shape[0] == P * k and (counts == k).all():
            # Fixed k (the common case): a (P, k) grid, row sums instead of segmented reductions.
            grid = lp.reshape(P, k)  # (P, k)
            p = np.exp(grid)  # (P, k); the one full-size transcendental pass, the cost of the summary
            top_entropy = -np.einsum("ij,ij->i", p, grid)  # (P,) float32 sums of k terms, no (P, k) temporary
            bad = ~np.isfinite(grid[:, -1])  # -inf entries (p = 0) sit at the end of a row; 0 * -inf is NaN
            if bad.any():
                pg = np.where(p[bad] > 0, p[bad] * grid[bad], np.float32(0))  # (B, k)
                top_entropy[bad] = -pg.sum(axis=1, dtype=np.float64)
            # Count along a short row with a matrix-vector product: numpy's axis=1 reductions over ~10 columns
            # pay a per-row overhead.
            hits = grid[:, :peak_cols] >= log_thr  # (P, <= peak_cols)
            peaks = hits.astype(np.float32) @ np.ones(hits.shape[1], np.float32)  # (P,) exact small integers
            top1, last, log_last = p[:, 0], p[:, -1], grid[:, -1]
        else:
            starts = np.cumsum(counts, dtype=np.int64) - counts  # (P,)
            p = np.exp(lp)  # (n,)
            plogp = np.where(p > 0, p * lp, np.float32(0))  # (n,)
            top_entropy = -np.add.reduceat(plogp, starts, dtype=np.float64)  # (P,)
            peaks = np.add.reduceat((lp >= log_thr).astype(np.int32), starts)  # (P,)
            top1, last, log_last = p[starts], p[starts + counts - 1], lp[starts + counts - 1]
    tail = np.exp(np.asarray(tail_logmass, dtype=np.float32))  # (P,); exp(-inf) = 0
    lower, upper = entropy_bounds(top_entropy, last, tail, counts, vocab_size, log_last=log_last,
                                  log_tail=tail_logmass)
    target_rank = np.asarray(target_rank, dtype=np.int32)
    return PositionArrays(
        top1=np.ascontiguousarray(top1, dtype=np.float32),
        entropy_lower=lower,
        entropy_upper=upper,
        peaks=peaks.astype(np.int16),
        undercount=(last >= threshold) & (tail >= threshold),
        tail=tail,
        target_rank=target_rank,
        target_prob=np.exp(np.asarray(target_logprob, dtype=np.float32)),
        in_topk=target_rank <= counts,
        response=np.asarray(loss_mask, dtype=bool),
    )


# --------------------------------------------------------------------------------------------------------------
# Reading a cache in chunks of many rows


_COLUMNS = ("topk_count", "topk_logprobs", "tail_logmass", "target_logprob", "target_rank", "loss_mask")
SUMMARY_COLUMNS = ("loss_mask", "topk_count", "topk_logprobs", "tail_logmass", "target_logprob", "target_rank")
"""The cache columns the summary reads (``topk_logprobs`` stands for the codec's log-prob columns)."""


def _columns(item) -> tuple[dict[str, np.ndarray], int]:
    """(per-position columns, positions) of a decoded cache block or of one TeacherRow."""
    if hasattr(item, "position_columns"):
        return item.position_columns(), item.num_positions
    return {n: np.asarray(getattr(item, n)) for n in _COLUMNS}, item.num_positions


CHUNK_POSITIONS = 1 << 15
"""Positions per statistics chunk: small rows are joined up to it (numpy's per-call overhead is paid per chunk) and
row groups are cut down to it (the (chunk, k) temporaries then stay in the CPU cache)."""


def iter_position_chunks(items, *, vocab_size: int | None, threshold: float, chunk_positions: int | None = None):
    """Yield :class:`PositionArrays` for runs of consecutive positions, about ``chunk_positions`` each (default
    :data:`CHUNK_POSITIONS`), in order.

    ``items`` are decoded cache blocks (``CacheReader.iter_blocks()``, the fast path: a row group's columns are
    already flat) or TeacherRows.
    """
    chunk_positions = chunk_positions or CHUNK_POSITIONS
    buf, n = [], 0
    for item in items:
        cols, p = _columns(item)
        buf.append(cols)
        n += p
        if n >= chunk_positions:
            yield from _chunks(buf, vocab_size, threshold, chunk_positions)
            buf, n = [], 0
    if buf:
        yield from _chunks(buf, vocab_size, threshold, chunk_positions)


def _chunks(parts: list[dict], vocab_size, threshold, size: int):
    c = parts[0] if len(parts) == 1 else {n: np.concatenate([p[n] for p in parts]) for n in _COLUMNS}
    counts = c["topk_count"]  # (P,)
    P = counts.shape[0]
    ends = np.cumsum(counts, dtype=np.int64)  # (P,) end of each position's entries in topk_logprobs
    # Cut into pieces of `size` positions; a short remainder joins the last piece.
    cuts = list(range(0, P, size))
    if len(cuts) > 1 and P - cuts[-1] < size // 2:
        cuts.pop()
    for i, s in enumerate(cuts):
        e = cuts[i + 1] if i + 1 < len(cuts) else P
        e0, e1 = (int(ends[s - 1]) if s else 0), int(ends[e - 1])
        yield position_arrays(counts[s:e], c["topk_logprobs"][e0:e1], c["tail_logmass"][s:e],
                              c["target_logprob"][s:e], c["target_rank"][s:e], c["loss_mask"][s:e],
                              vocab_size=vocab_size, threshold=threshold)


def collect(rows, total_positions: int | None, *, sample: int | None, seed: int, vocab_size: int | None,
            threshold: float) -> PositionArrays:
    """Per-position statistics of every position of ``rows`` (decoded blocks or TeacherRows, in file order), or of
    ``sample`` of them drawn uniformly without replacement (seeded).

    Sampling picks global position indices up front from ``total_positions`` (the manifest's count), so only the
    chosen positions are kept in memory; every row is still read.
    """
    if sample is not None and total_positions is not None and sample < total_positions:
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(total_positions, size=sample, replace=False))  # (sample,) global indices
    else:
        chosen = None
    parts, offset = [], 0
    for chunk in iter_position_chunks(rows, vocab_size=vocab_size, threshold=threshold):
        n = len(chunk)
        if chosen is not None:
            lo, hi = np.searchsorted(chosen, [offset, offset + n])
            chunk = chunk.select(chosen[lo:hi] - offset)
        parts.append(chunk)
        offset += n
    if total_positions is not None and offset != total_positions:
        raise ValueError(f"the cache's rows hold {offset} scored positions but its manifest says {total_positions}; "
                         "the manifest is stale or shards changed: run `rlkd verify CACHE`")
    return PositionArrays.concat(parts)


# --------------------------------------------------------------------------------------------------------------
# Summaries


RANK_EDGES = np.array([lo for lo, _ in RANK_BUCKETS] + [np.inf])
"""Histogram edges of :data:`RANK_BUCKETS` for ``np.histogram`` (its last bin is closed: every rank > 1000)."""


def _rank_labels() -> list[str]:
    return [str(lo) if lo == hi else (f"{lo}-{hi}" if hi is not None else f">{lo - 1}") for lo, hi in RANK_BUCKETS]


def describe(x: np.ndarray, edges: np.ndarray) -> dict | None:
    """Mean, std, min, quantiles, max and histogram (over ``edges``, equal widths) of the finite values of ``x``;
    None when there are none. Values outside the edges count in the first or last bin."""
    if not np.isfinite(x).all():  # NaN only where the vocabulary size is unknown (entropy_upper)
        x = x[np.isfinite(x)]
    if x.size == 0:
        return None
    x = x.astype(np.float64)  # a copy: float64 sums and quantiles of the float32 values
    vmin, vmax = float(x.min()), float(x.max())
    lo, hi = float(edges[0]), float(edges[-1])
    inside = x if lo <= vmin and vmax <= hi else np.clip(x, lo, hi)
    counts, _ = np.histogram(inside, bins=len(edges) - 1, range=(lo, hi))
    mean, std = float(x.mean()), float(x.std())
    quantiles = np.quantile(x, QUANTILES, overwrite_input=True)  # last: it may reorder our copy
    return {
        "mean": mean,
        "std": std,
        "min": vmin,
        **{f"p{round(100 * q):02d}": float(v) for q, v in zip(QUANTILES, quantiles)},
        "max": vmax,
        "hist": {"edges": [float(e) for e in edges], "counts": counts.tolist()},
    }


def entropy_edges_for(a: PositionArrays, bins: int = 20) -> np.ndarray:
    """Shared histogram edges for both entropy bounds: 0 to the largest finite upper (or lower) bound."""
    hi = 0.0
    for x in (a.entropy_upper, a.entropy_lower):
        x = x[np.isfinite(x)]
        if x.size:
            hi = max(hi, float(x.max()))
    hi = max(hi, 1e-3)
    return np.linspace(0.0, float(np.ceil(hi * 10) / 10), bins + 1)


FLOAT_STATS = {"top1_prob": "top1", "entropy_lower": "entropy_lower", "entropy_upper": "entropy_upper",
               "tail_mass": "tail", "target_prob": "target_prob"}
"""The summary's float statistics: JSON name -> :class:`PositionArrays` field."""


def summarize(a: PositionArrays) -> dict:
    """``{"all": ..., "prompt": ..., "response": ...}`` statistics (see the JSON schema in :mod:`rlkd.inspect`);
    a group with no position is None."""
    unit = np.linspace(0.0, 1.0, 21)
    entropy = entropy_edges_for(a)  # shared by both bounds and all groups, so their histograms line up
    edges = {name: entropy if name.startswith("entropy") else unit for name in FLOAT_STATS}
    out = {}
    for group, sel in (("all", slice(None)), ("prompt", ~a.response), ("response", a.response)):
        g = a.select(sel)
        m = len(g)
        if m == 0:
            out[group] = None
            continue
        stat = {name: describe(getattr(g, field), edges[name]) for name, field in FLOAT_STATS.items()}
        peaks = np.bincount(g.peaks)  # (largest peak count + 1,)
        out[group] = {
            "positions": m,
            "top1_prob": stat["top1_prob"],
            "entropy_lower": stat["entropy_lower"],
            "entropy_upper": stat["entropy_upper"],
            "peaks": {
                "mean": float(g.peaks.mean(dtype=np.float64)),
                "counts": {str(i): int(c) for i, c in enumerate(peaks)},
                "multi_peak_share": float(peaks[2:].sum() / m),
                "no_peak_share": float(peaks[0] / m),
                "undercount_share": float(np.count_nonzero(g.undercount) / m),
            },
            "tail_mass": stat["tail_mass"],
            "target_rank": {
                "mean": float(g.target_rank.sum(dtype=np.float64) / m),
                "p50": float(np.median(g.target_rank)),
                "top1_share": float(np.count_nonzero(g.target_rank == 1) / m),
                "in_topk_share": float(np.count_nonzero(g.in_topk) / m),
                "hist": {"labels": _rank_labels(), "counts": np.histogram(g.target_rank, RANK_EDGES)[0].tolist()},
            },
            "target_prob": stat["target_prob"],
        }
    return out


def manifest_facts(manifest: dict) -> dict:
    """The manifest facts the summary shows, with bytes/token derived."""
    tokens = int(manifest.get("tokens", 0))
    size = int(manifest.get("bytes", 0))
    return {
        "teacher": manifest.get("teacher"),
        "tokenizer": manifest.get("tokenizer"),
        "k": manifest.get("k"),
        "codec": manifest.get("codec"),
        "dataset": manifest.get("dataset"),
        "rows": int(manifest.get("rows", 0)),
        "positions": int(manifest.get("positions", 0)),
        "tokens": tokens,
        "shards": len(manifest.get("shards", [])),
        "bytes": size,
        "bytes_per_token": size / tokens if tokens else None,
        "complete": bool(manifest.get("complete", False)),
        "format_version": manifest.get("format_version"),
    }


def summary(cache_dir, *, sample: int | None = None, seed: int = 0, threshold: float = 0.1,
            vocab_size: int | None = None) -> tuple[dict, PositionArrays]:
    """The ``summary`` JSON object for a cache (see :mod:`rlkd.inspect`) and the per-position arrays behind it."""
    from rlkd.cache import CacheReader, read_manifest
    from rlkd.cache.manifest import vocab_limit

    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"--peak-threshold must lie in (0, 1], got {threshold}")
    if sample is not None and sample < 1:
        raise ValueError(f"--sample must be a positive number of positions, got {sample}")
    manifest = read_manifest(cache_dir)
    V = vocab_size if vocab_size is not None else vocab_limit(manifest)
    t0 = time.perf_counter()
    # Only the per-position columns: Parquet skips the pages of input_ids, topk_ids and row_id.
    blocks = CacheReader(cache_dir, shuffle=False).iter_blocks(columns=SUMMARY_COLUMNS)
    arrays = collect(blocks, int(manifest.get("positions", 0)) or None, sample=sample, seed=seed,
                     vocab_size=V, threshold=threshold)
    stats = summarize(arrays)
    seconds = time.perf_counter() - t0  # read + statistics + summary, what the positions/s below stands for
    out = {
        "cache": str(cache_dir),
        "manifest": manifest_facts(manifest),
        "vocab_size": V,
        "peak_threshold": threshold,
        "sample": {"requested": sample, "positions": len(arrays), "seed": seed},
        "stats": stats,
        "timing": {"seconds": seconds, "positions_per_s": int(manifest.get("positions", 0)) / max(seconds, 1e-9)},
    }
    return out, arrays
