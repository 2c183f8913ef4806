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
                   vocab_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper entropy bounds (float64, (P,)) from ``H_top``, ``p_n``, the tail mass and ``n`` per position.

    See the module docstring for why these are bounds.
    """
    m = np.clip(tail.astype(np.float64), 0.0, 1.0)  # (P,)
    c = last_prob.astype(np.float64)  # (P,) cap on any dropped probability
    # A tail with a zero cap is inconsistent (only rounding can make it): treat the tail as one bucket then.
    c = np.where(c > 0, c, np.maximum(m, 1e-300))
    with np.errstate(divide="ignore", invalid="ignore"):
        j = np.floor(m / c)  # (P,) dropped tokens at the cap
        r = np.clip(m - j * c, 0.0, None)  # (P,) the remainder token
        lower_tail = -j * c * np.log(c) - np.where(r > 0, r * np.log(r), 0.0)
        if vocab_size is None:
            upper_tail = np.full_like(m, np.nan)
        else:
            R = np.maximum(vocab_size - counts.astype(np.float64), 1.0)  # (P,) dropped tokens
            upper_tail = np.where(m > 0, m * (np.log(R) - np.log(m)), 0.0)
            # Rounding in a lossy codec can push m above R * p_n; the uniform tail is then the only feasible one.
            lower_tail = np.minimum(lower_tail, upper_tail)
    lower_tail = np.where(m > 0, lower_tail, 0.0)
    return top_entropy + lower_tail, top_entropy + upper_tail


def position_arrays(counts: np.ndarray, logprobs: np.ndarray, tail_logmass: np.ndarray, target_logprob: np.ndarray,
                    target_rank: np.ndarray, loss_mask: np.ndarray, *, vocab_size: int | None,
                    threshold: float = 0.1) -> PositionArrays:
    """Statistics of P positions given their flat cache columns (any number of rows concatenated).

    Args:
        counts: (P,) entries per position; logprobs: (sum counts,) rank-ordered log-probs, position after position;
        tail_logmass, target_logprob, target_rank, loss_mask: (P,) as in :class:`rlkd.cache.TeacherRow`.
    """
    counts = np.asarray(counts, dtype=np.int64)  # (P,)
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
            p = np.exp(grid)  # (P, k)
            top_entropy = -np.einsum("ij,ij->i", p, grid, dtype=np.float64)  # (P,) no (P, k) temporary
            bad = ~np.isfinite(grid[:, -1])  # -inf entries (p = 0) sit at the end of a row; 0 * -inf is NaN
            if bad.any():
                pg = np.where(p[bad] > 0, p[bad] * grid[bad], np.float32(0))  # (B, k)
                top_entropy[bad] = -pg.sum(axis=1, dtype=np.float64)
            peaks = np.count_nonzero(grid[:, :peak_cols] >= log_thr, axis=1)  # (P,)
            top1, last = p[:, 0], p[:, -1]
        else:
            starts = np.cumsum(counts) - counts  # (P,)
            p = np.exp(lp)  # (n,)
            plogp = np.where(p > 0, p * lp, np.float32(0))  # (n,)
            top_entropy = -np.add.reduceat(plogp, starts, dtype=np.float64)  # (P,)
            peaks = np.add.reduceat((lp >= log_thr).astype(np.int32), starts)  # (P,)
            top1, last = p[starts], p[starts + counts - 1]
    tail = np.exp(np.asarray(tail_logmass, dtype=np.float32))  # (P,); exp(-inf) = 0
    lower, upper = entropy_bounds(top_entropy, last, tail, counts, vocab_size)
    target_rank = np.asarray(target_rank, dtype=np.int32)
    return PositionArrays(
        top1=top1.astype(np.float32),
        entropy_lower=lower.astype(np.float32),
        entropy_upper=upper.astype(np.float32),
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


def _columns(item) -> tuple[dict[str, np.ndarray], int]:
    """(per-position columns, positions) of a decoded cache block or of one TeacherRow."""
    if hasattr(item, "position_columns"):
        return item.position_columns(), item.num_positions
    return {n: np.asarray(getattr(item, n)) for n in _COLUMNS}, item.num_positions


def iter_position_chunks(items, *, vocab_size: int | None, threshold: float, chunk_positions: int = 1 << 16):
    """Yield :class:`PositionArrays` for runs of consecutive rows holding about ``chunk_positions`` positions.

    ``items`` are decoded cache blocks (``CacheReader.iter_blocks()``, the fast path: a row group's columns are
    already flat) or TeacherRows. They are concatenated first so numpy's per-call overhead is paid per chunk.
    """
    buf, n = [], 0
    for item in items:
        cols, p = _columns(item)
        buf.append(cols)
        n += p
        if n >= chunk_positions:
            yield _chunk(buf, vocab_size, threshold)
            buf, n = [], 0
    if buf:
        yield _chunk(buf, vocab_size, threshold)


def _chunk(parts: list[dict], vocab_size, threshold) -> PositionArrays:
    c = parts[0] if len(parts) == 1 else {n: np.concatenate([p[n] for p in parts]) for n in _COLUMNS}
    return position_arrays(c["topk_count"], c["topk_logprobs"], c["tail_logmass"], c["target_logprob"],
                           c["target_rank"], c["loss_mask"], vocab_size=vocab_size, threshold=threshold)


def prefetch(iterable, depth: int = 512):
    """Run ``iterable`` (the cache reader: Parquet read + decode, which release the GIL) in a background thread, so
    the statistics of one chunk overlap the reading of the next. Exceptions are re-raised here."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work():
        try:
            for item in iterable:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(e)

    thread = threading.Thread(target=work, name="rlkd-inspect-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def collect(rows, total_positions: int | None, *, sample: int | None, seed: int, vocab_size: int | None,
            threshold: float) -> PositionArrays:
    """Per-position statistics of every position of ``rows`` (decoded blocks or TeacherRows, in file order), or of ``sample`` of
    them drawn uniformly without replacement (seeded).

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


def _quantiles(sorted_x: np.ndarray, qs) -> list[float]:
    """Linear-interpolation quantiles (numpy's default method) of an already sorted array."""
    n = sorted_x.shape[0]
    out = []
    for q in qs:
        pos = q * (n - 1)
        lo = int(np.floor(pos))
        hi = min(lo + 1, n - 1)
        a, b = float(sorted_x[lo]), float(sorted_x[hi])
        out.append(a + (b - a) * (pos - lo))
    return out


def _describe(x: np.ndarray, edges: np.ndarray) -> dict | None:
    x = x[np.isfinite(x)]
    if x.size == 0:
        return None
    xs = np.sort(x)  # one (SIMD) sort gives every quantile, min and max
    q = _quantiles(xs, QUANTILES)
    # Equal-width bins: the bin index is arithmetic, no search (np.histogram with explicit edges sorts).
    lo, hi, bins = float(edges[0]), float(edges[-1]), len(edges) - 1
    idx = np.clip(((xs.astype(np.float64) - lo) * (bins / (hi - lo))).astype(np.int64), 0, bins - 1)
    counts = np.bincount(idx, minlength=bins)
    return {
        "mean": float(x.mean(dtype=np.float64)),
        "std": float(x.std(dtype=np.float64)),
        "min": float(xs[0]),
        **{f"p{int(round(100 * qq)):02d}": float(v) for qq, v in zip(QUANTILES, q)},
        "max": float(xs[-1]),
        "hist": {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]},
    }


def _rank_hist(rank: np.ndarray) -> dict:
    labels, counts = [], []
    for lo, hi in RANK_BUCKETS:
        labels.append(str(lo) if lo == hi else (f"{lo}-{hi}" if hi is not None else f">{lo - 1}"))
        counts.append(int(((rank >= lo) & (rank <= (hi if hi is not None else np.iinfo(np.int32).max))).sum()))
    return {"labels": labels, "counts": counts}


def summarize_group(a: PositionArrays, entropy_edges: np.ndarray) -> dict | None:
    """Statistics of one position group (see the JSON schema in :mod:`rlkd.inspect`); None when it is empty."""
    n = len(a)
    if n == 0:
        return None
    unit = np.linspace(0.0, 1.0, 21)
    peak_counts = np.bincount(a.peaks.astype(np.int64), minlength=1)
    return {
        "positions": n,
        "top1_prob": _describe(a.top1, unit),
        "entropy_lower": _describe(a.entropy_lower, entropy_edges),
        "entropy_upper": _describe(a.entropy_upper, entropy_edges),
        "peaks": {
            "mean": float(a.peaks.mean(dtype=np.float64)),
            "counts": {str(i): int(c) for i, c in enumerate(peak_counts)},
            "multi_peak_share": float((a.peaks >= 2).mean()),
            "no_peak_share": float((a.peaks == 0).mean()),
            "undercount_share": float(a.undercount.mean()),
        },
        "tail_mass": _describe(a.tail, unit),
        "target_rank": {
            "mean": float(a.target_rank.mean(dtype=np.float64)),
            "p50": float(np.median(a.target_rank)),
            "top1_share": float((a.target_rank == 1).mean()),
            "in_topk_share": float(a.in_topk.mean()),
            "hist": _rank_hist(a.target_rank),
        },
        "target_prob": _describe(a.target_prob, unit),
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


def summarize(a: PositionArrays) -> dict:
    """``{"all": ..., "prompt": ..., "response": ...}`` statistics (groups with no position are None)."""
    edges = entropy_edges_for(a)
    return {
        "all": summarize_group(a, edges),
        "prompt": summarize_group(a.select(~a.response), edges),
        "response": summarize_group(a.select(a.response), edges),
    }


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
    reader = CacheReader(cache_dir, shuffle=False)
    arrays = collect(prefetch(reader.iter_blocks(), depth=4), int(manifest.get("positions", 0)) or None, sample=sample, seed=seed,
                     vocab_size=V, threshold=threshold)
    seconds = time.perf_counter() - t0
    out = {
        "cache": str(cache_dir),
        "manifest": manifest_facts(manifest),
        "vocab_size": V,
        "peak_threshold": threshold,
        "sample": {"requested": sample, "positions": len(arrays), "seed": seed},
        "stats": summarize(arrays),
        "timing": {"seconds": seconds, "positions_per_s": int(manifest.get("positions", 0)) / max(seconds, 1e-9)},
    }
    return out, arrays
