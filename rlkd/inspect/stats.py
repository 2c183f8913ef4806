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

    See the module docstring for why these are bounds. float32 throughout: ~2x faster than float64 here (numpy's
    float32 ``log`` is SIMD on AVX2), and every term is a sum of a few values of magnitude <= ~100 nats, so the
    rounding (~1e-7 relative; <= 4e-6 nats against float64 on 1M positions) is far below the q8 codec's.
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
            # pay per-row overhead (4x slower).
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
row groups are cut down to it (the (chunk, k) temporaries then stay in the CPU cache: ~1.5x faster than whole
130k-position row groups at k=20)."""


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


def parallel_chunks(cache_dir, *, vocab_size: int | None, threshold: float, workers: int = 2, depth: int = 2):
    """:class:`PositionArrays` of every position of a cache, in file order, computed by ``workers`` threads.

    Thread ``w`` (with its own CacheReader) reads, decodes and computes the statistics of row groups
    ``w, w + workers, ...``; this generator hands them out in file order. Parquet decoding and numpy's large
    operations release the GIL, so on two free cores a pass costs about half of one thread's time. ``depth`` row
    groups per thread are done ahead (memory: ``workers * depth`` decoded row groups). Errors are re-raised here.
    """
    import queue
    import threading

    from rlkd.cache import CacheReader

    readers = [CacheReader(cache_dir, shuffle=False) for _ in range(workers)]  # one per thread: no shared state
    queues = [queue.Queue(maxsize=depth) for _ in range(workers)]
    done = object()
    stop = threading.Event()

    def put(q, item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work(w: int) -> None:
        try:
            for block in readers[w].iter_blocks(columns=SUMMARY_COLUMNS, part=(w, workers)):
                cols = block.position_columns()
                if not put(queues[w], list(_chunks([cols], vocab_size, threshold, CHUNK_POSITIONS))):
                    return
            put(queues[w], done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(queues[w], e)

    threads = [threading.Thread(target=work, args=(w,), name=f"rlkd-inspect-{w}", daemon=True)
               for w in range(workers)]
    for t in threads:
        t.start()
    try:
        b = 0
        while True:
            item = queues[b % workers].get()
            if item is done:  # row group b does not exist, so neither does any later one
                return
            if isinstance(item, BaseException):
                raise item
            yield from item
            b += 1
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=5)


def collect(rows, total_positions: int | None, *, sample: int | None, seed: int, vocab_size: int | None,
            threshold: float, chunks=None) -> PositionArrays:
    """Per-position statistics of every position of ``rows`` (decoded blocks or TeacherRows, in file order), or of
    ``sample`` of them drawn uniformly without replacement (seeded).

    Sampling picks global position indices up front from ``total_positions`` (the manifest's count), so only the
    chosen positions are kept in memory; every row is still read. ``chunks``: :class:`PositionArrays` already
    computed (:func:`parallel_chunks`), in place of ``rows``.
    """
    if sample is not None and total_positions is not None and sample < total_positions:
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(total_positions, size=sample, replace=False))  # (sample,) global indices
    else:
        chosen = None
    parts, offset, out = [], 0, None
    if chunks is None:
        chunks = iter_position_chunks(rows, vocab_size=vocab_size, threshold=threshold)
    for chunk in chunks:
        n = len(chunk)
        if chosen is not None:
            lo, hi = np.searchsorted(chosen, [offset, offset + n])
            parts.append(chunk.select(chosen[lo:hi] - offset))
        elif total_positions is not None:
            # Every position, count known: fill preallocated arrays (no final concatenation).
            if out is None:
                out = {f: np.empty(total_positions, v.dtype) for f, v in chunk.__dict__.items()}
            if offset + n <= total_positions:
                for f, v in chunk.__dict__.items():
                    out[f][offset:offset + n] = v
        else:
            parts.append(chunk)
        offset += n
    if total_positions is not None and offset != total_positions:
        raise ValueError(f"the cache's rows hold {offset} scored positions but its manifest says {total_positions}; "
                         "the manifest is stale or shards changed: run `rlkd verify CACHE`")
    if out is not None:
        return PositionArrays(**out)
    return PositionArrays.concat(parts)


# --------------------------------------------------------------------------------------------------------------
# Summaries


def _select_quantiles(x: np.ndarray, qs) -> list[float]:
    """Linear-interpolation quantiles (numpy's default method) of ``x``, which is reordered in place.

    Instead of a full sort, one ``partition`` per order statistic, each only within the gap between the order
    statistics already placed (median first, then the quartiles inside its halves, ...: ~2.5 passes over ``x`` for
    five quantiles, against a sort's ~log n). ``x[lo + 1]``, needed to interpolate, is the minimum of the gap after
    ``x[lo]``. About 2x cheaper than ``np.sort``.
    """
    n = x.shape[0]
    pos = {q: q * (n - 1) for q in qs}
    fixed: list[int] = []  # sorted indices that hold their order statistic

    def gap(k: int) -> tuple[int, int]:  # (start, end) of the unordered stretch holding index k
        i = int(np.searchsorted(fixed, k))
        return (fixed[i - 1] + 1 if i else 0), (fixed[i] if i < len(fixed) else n)

    pending = sorted({int(np.floor(v)) for v in pos.values()})
    while pending:
        # The kth in the largest stretch, nearest the middle first: median, quartiles, then the outer ones.
        k = max(pending, key=lambda j: (gap(j)[1] - gap(j)[0], -abs(j - n / 2)))
        pending.remove(k)
        a, b = gap(k)
        x[a:b].partition(k - a)
        fixed.insert(int(np.searchsorted(fixed, k)), k)
    out = []
    for q in qs:
        lo = int(np.floor(pos[q]))
        va = float(x[lo])
        if pos[q] > lo and lo + 1 < n:
            i = int(np.searchsorted(fixed, lo, side="right"))
            b = fixed[i] + 1 if i < len(fixed) else n  # x[lo + 1:b] lies between x[lo] and the next fixed value
            vb = float(x[lo + 1:b].min())
        else:
            vb = va
        out.append(va + (vb - va) * (pos[q] - lo))
    return out


def _group_values(x: np.ndarray, order: np.ndarray, n_prompt: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A copy of ``x`` laid out as [prompt positions | response positions] (one gather), its finite values only, and
    the groups as views of it: ``{"all": y, "prompt": y[:a], "response": y[a:]}``."""
    y = x.take(order)  # (N,)
    parts = {"prompt": y[:n_prompt], "response": y[n_prompt:]}
    if not np.isfinite(y).all():  # rare: an unknown vocabulary size makes entropy_upper NaN
        parts = {g: v[np.isfinite(v)] for g, v in parts.items()}
        y = np.concatenate([parts["prompt"], parts["response"]])
        parts = {"prompt": y[:parts["prompt"].shape[0]], "response": y[parts["prompt"].shape[0]:]}
    return y, {"all": y, **parts}


def _describe_groups(x: np.ndarray, order: np.ndarray, n_prompt: int, edges: np.ndarray) -> dict:
    """``{group: description or None}`` of one float statistic: mean, std, min, quantiles, max, histogram."""
    y, parts = _group_values(x, order, n_prompt)
    split = parts["prompt"].shape[0]
    # Equal-width bins: the bin index is arithmetic, no search (np.histogram with explicit edges sorts); float64 so
    # that a value on an edge lands in the bin np.histogram would put it in.
    lo, hi, bins = float(edges[0]), float(edges[-1]), len(edges) - 1
    idx = np.subtract(y, np.float64(lo))  # (N,) float64
    idx *= bins / (hi - lo)
    idx = idx.astype(np.int32)
    np.clip(idx, 0, bins - 1, out=idx)
    hist = {"prompt": np.bincount(idx[:split], minlength=bins), "response": np.bincount(idx[split:], minlength=bins)}
    hist["all"] = hist["prompt"] + hist["response"]
    # Mean and squared deviations per group (float64 sums); "all" combines them (Chan et al.) instead of a pass.
    moments = {}
    for g in ("prompt", "response"):
        v = parts[g]
        if v.size:
            mean = v.sum(dtype=np.float64) / v.size
            d = v - np.float32(mean)  # (n,) float32 deviations; their squares summed in float64
            np.square(d, out=d)
            moments[g] = (v.size, mean, float(d.sum(dtype=np.float64)))
    if len(moments) == 2:
        (na, ma, sa), (nb, mb, sb) = moments["prompt"], moments["response"]
        moments["all"] = (na + nb, (na * ma + nb * mb) / (na + nb), sa + sb + (mb - ma) ** 2 * na * nb / (na + nb))
    elif moments:
        moments["all"] = next(iter(moments.values()))
    out = {}
    for g in ("prompt", "response", "all"):  # groups first: "all" reorders the whole buffer
        v = parts[g]
        if v.size == 0:
            out[g] = None
            continue
        m, mean, ss = moments[g]
        vmin, vmax = float(v.min()), float(v.max())
        q = _select_quantiles(v, QUANTILES)
        out[g] = {
            "mean": float(mean),
            "std": float(np.sqrt(ss / m)),
            "min": vmin,
            **{f"p{int(round(100 * qq)):02d}": val for qq, val in zip(QUANTILES, q)},
            "max": vmax,
            "hist": {"edges": [float(e) for e in edges], "counts": [int(c) for c in hist[g]]},
        }
    return out


def _rank_bucket_table() -> np.ndarray:
    """(1002,) bucket index of ranks 0..1001 (rank 1001 stands for every larger one); rank 0 (invalid) -> no bucket."""
    lut = np.full(RANK_BUCKETS[-1][0] + 1, len(RANK_BUCKETS), dtype=np.int64)
    for b, (lo, hi) in enumerate(RANK_BUCKETS):
        lut[lo:(hi if hi is not None else lo) + 1] = b
    return lut


def _rank_labels() -> list[str]:
    return [str(lo) if lo == hi else (f"{lo}-{hi}" if hi is not None else f">{lo - 1}") for lo, hi in RANK_BUCKETS]


def _count_groups(a: PositionArrays, resp: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Counts per group of the small-integer statistics (peaks, undercount, in_topk, rank bucket), all from one
    ``bincount`` of a joint key ``((((peaks * 2 + undercount) * 2 + in_topk) * B + bucket) * 2 + response)``."""
    lut = _rank_bucket_table()
    B = len(RANK_BUCKETS) + 1  # the last one collects invalid ranks < 1
    peak_max = int(a.peaks.max()) if len(a) else 0
    key = lut.take(a.target_rank, mode="clip")  # (N,) int64 (bincount's index type: no conversion copy)
    key += a.peaks.astype(np.int64) * (4 * B)
    key += a.undercount.view(np.uint8) * (2 * B)
    key += a.in_topk.view(np.uint8) * B
    key *= 2
    key += resp
    c = np.bincount(key, minlength=(peak_max + 1) * 2 * 2 * B * 2).reshape(peak_max + 1, 2, 2, B, 2)
    marginals = {"peaks": c.sum(axis=(1, 2, 3)), "undercount": c.sum(axis=(0, 2, 3)),
                 "in_topk": c.sum(axis=(0, 1, 3)), "rank_bucket": c.sum(axis=(0, 1, 2))}  # each (values, 2 groups)
    return {name: {"prompt": m[:, 0], "response": m[:, 1], "all": m.sum(axis=1)} for name, m in marginals.items()}


def entropy_edges_for(a: PositionArrays, bins: int = 20) -> np.ndarray:
    """Shared histogram edges for both entropy bounds: 0 to the largest finite upper (or lower) bound."""
    hi = 0.0
    for x in (a.entropy_upper, a.entropy_lower):
        if not np.isfinite(x).all():
            x = x[np.isfinite(x)]
        if x.size:
            hi = max(hi, float(x.max()))
    hi = max(hi, 1e-3)
    return np.linspace(0.0, float(np.ceil(hi * 10) / 10), bins + 1)


def summarize(a: PositionArrays) -> dict:
    """``{"all": ..., "prompt": ..., "response": ...}`` statistics (see the JSON schema in :mod:`rlkd.inspect`);
    a group with no position is None.

    The counts are one ``bincount`` over all positions (:func:`_count_groups`); every float statistic is gathered
    once into a [prompt | response] buffer whose halves are the groups and whose whole is "all", and its quantiles
    come from partitions, not sorts (:func:`_select_quantiles`).
    """
    N = len(a)
    resp = a.response
    order = np.concatenate([np.flatnonzero(~resp), np.flatnonzero(resp)])  # (N,) prompt positions, then response
    n = {"all": N, "response": int(np.count_nonzero(resp))}
    n["prompt"] = N - n["response"]
    edges = entropy_edges_for(a)
    unit = np.linspace(0.0, 1.0, 21)
    jobs = [("top1_prob", a.top1, unit), ("entropy_lower", a.entropy_lower, edges),
            ("entropy_upper", a.entropy_upper, edges), ("tail_mass", a.tail, unit),
            ("target_prob", a.target_prob, unit)]
    # The float statistics are independent and spend their time in numpy calls that release the GIL (take,
    # partition, ufuncs): a second thread does three of them while this one does the other two and the counts, so
    # a machine with a free core runs them side by side.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlkd-inspect-summary") as pool:
        futures = {name: pool.submit(_describe_groups, x, order, n["prompt"], e) for name, x, e in jobs[:3]}
        floats = {name: _describe_groups(x, order, n["prompt"], e) for name, x, e in jobs[3:]}
        counts = _count_groups(a, resp)
        ranks, _ = _group_values(a.target_rank, order, n["prompt"])
        floats.update({name: f.result() for name, f in futures.items()})
    peak_max = counts["peaks"]["all"].shape[0] - 1
    peaks, under, in_topk, buckets = (counts[key] for key in ("peaks", "undercount", "in_topk", "rank_bucket"))
    rank_sum = {"prompt": float(ranks[:n["prompt"]].sum(dtype=np.float64)),
                "response": float(ranks[n["prompt"]:].sum(dtype=np.float64))}
    rank_sum["all"] = rank_sum["prompt"] + rank_sum["response"]
    groups = {"prompt": ranks[:n["prompt"]], "response": ranks[n["prompt"]:], "all": ranks}
    out = {}
    for g in ("prompt", "response", "all"):  # "all" last: its median reorders the shared buffer
        m = n[g]
        if m == 0:
            out[g] = None
            continue
        pk = peaks[g][:peak_max + 1]
        # Trim trailing zero counts so each group lists 0..its own largest peak count, like a per-group bincount.
        top = int(np.flatnonzero(pk)[-1]) if pk.any() else 0
        out[g] = {
            "positions": m,
            "top1_prob": floats["top1_prob"][g],
            "entropy_lower": floats["entropy_lower"][g],
            "entropy_upper": floats["entropy_upper"][g],
            "peaks": {
                "mean": float((pk * np.arange(pk.shape[0])).sum() / m),
                "counts": {str(i): int(c) for i, c in enumerate(pk[:top + 1])},
                "multi_peak_share": float(pk[2:].sum() / m),
                "no_peak_share": float(pk[0] / m),
                "undercount_share": float(under[g][1] / m),
            },
            "tail_mass": floats["tail_mass"][g],
            "target_rank": {
                "mean": rank_sum[g] / m,
                "p50": _select_quantiles(groups[g], (0.5,))[0],
                "top1_share": float(buckets[g][0] / m),
                "in_topk_share": float(in_topk[g][1] / m),
                "hist": {"labels": _rank_labels(), "counts": [int(c) for c in buckets[g][:len(RANK_BUCKETS)]]},
            },
            "target_prob": floats["target_prob"][g],
        }
    return {g: out[g] for g in GROUPS}


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
    from rlkd.cache import read_manifest
    from rlkd.cache.manifest import vocab_limit

    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"--peak-threshold must lie in (0, 1], got {threshold}")
    if sample is not None and sample < 1:
        raise ValueError(f"--sample must be a positive number of positions, got {sample}")
    manifest = read_manifest(cache_dir)
    V = vocab_size if vocab_size is not None else vocab_limit(manifest)
    t0 = time.perf_counter()
    # Two threads each read (only the per-position columns, not input_ids, topk_ids, row_id: on the 1M-position
    # bench cache a third of the bytes but ~70% of Parquet's read time), decode and compute every other row group.
    chunks = parallel_chunks(cache_dir, vocab_size=V, threshold=threshold)
    arrays = collect(None, int(manifest.get("positions", 0)) or None, sample=sample, seed=seed, vocab_size=V,
                     threshold=threshold, chunks=chunks)
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
