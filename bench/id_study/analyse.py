"""Ideal code lengths (bits/id, B/position) of context models for the adaptive-k top-k ids in topk.npz.

Run: OMP_NUM_THREADS=1 nice -n 19 python analyse.py [--npz topk.npz] [--json results.json]
All figures are sequential (adaptive) code lengths: see models.py for why that pays the model cost.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numba
import numpy as np
from scipy.special import gammaln

from models import best_py, rank_bucket, seq_counts, static_entropy_bits

V = 49152
OTHER_B = 167.9 - 135.6  # measured B/position of every other column (q8 gaps 22.6 + the rest)


# ---- reference lists (numba: a sequential pass, as a decoder would make it) -------------------------------------

@numba.njit(cache=True)
def ref_index(ids, counts, refs, nref):
    """For every kept entry (t, r): its index in the candidate list built from positions refs[t, :nref[t]]
    (each list in rank order, concatenated in the order given, duplicates dropped), or -1; and the list size."""
    P = ids.shape[0]
    stamp = np.full(V, -1, np.int64)
    where = np.zeros(V, np.int64)
    out = np.empty(counts.sum(), np.int64)
    size = np.empty(P, np.int64)
    e = 0
    for t in range(P):
        n = 0
        for a in range(nref[t]):
            s = refs[t, a]
            for r in range(counts[s]):
                x = ids[s, r]
                if stamp[x] != t:
                    stamp[x] = t
                    where[x] = n
                    n += 1
        size[t] = n
        for r in range(counts[t]):
            x = ids[t, r]
            out[e] = where[x] if stamp[x] == t else -1
            e += 1
    return out, size


@numba.njit(cache=True)
def lehmer_adaptive_freq(ids, counts, mode, prev):
    """Lehmer code of each position's rank order relative to a reference order known to the decoder before the
    position: mode 0: ids by adaptive frequency (count over earlier positions, ties by id); mode 1: ids present
    in the previous position's list first (by their rank there), then by adaptive frequency.
    Returns, per kept entry, its index among the not-yet-coded set members sorted by the reference order."""
    P = ids.shape[0]
    freq = np.zeros(V, np.int64)
    out = np.empty(counts.sum(), np.int64)
    prank = np.full(V, -1, np.int64)
    pstamp = np.full(V, -1, np.int64)
    e = 0
    for t in range(P):
        m = counts[t]
        if mode == 1 and prev[t] >= 0:
            s = prev[t]
            for r in range(counts[s]):
                pstamp[ids[s, r]] = t
                prank[ids[s, r]] = r
        key = np.empty(m, np.float64)
        for r in range(m):
            x = ids[t, r]
            k = -freq[x] + x * 1e-6  # larger freq first, ties by id
            if mode == 1 and pstamp[x] == t:
                k = -1e12 + prank[x]
            key[r] = k
        # index of entry r among remaining entries r..m-1 in key order = number of entries r' > r with key < key[r]
        for r in range(m):
            c = 0
            for r2 in range(r + 1, m):
                if key[r2] < key[r]:
                    c += 1
            out[e] = c
            e += 1
        for r in range(m):
            freq[ids[t, r]] += 1
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--npz", default="topk.npz")
    ap.add_argument("--json", default="results.json")
    ap.add_argument("--rows", type=int, default=0, help="use only the first N rows (quick test)")
    args = ap.parse_args(argv)
    z = np.load(args.npz)
    ids_all, counts_all, seq_len, input_ids = z["ids"], z["counts"].astype(np.int64), z["seq_len"], z["input_ids"]
    npos = seq_len - 1
    if args.rows:
        seq_len, npos = seq_len[: args.rows], npos[: args.rows]
        ids_all, counts_all = ids_all[: npos.sum()], counts_all[: npos.sum()]
        input_ids = input_ids[: seq_len.sum()]
    P = int(npos.sum())
    row = np.repeat(np.arange(len(npos)), npos)
    pos_in_row = np.arange(P) - np.repeat(np.cumsum(npos) - npos, npos)
    tok_start = np.cumsum(seq_len) - seq_len
    cur_tok = input_ids[np.repeat(tok_start, npos) + pos_in_row]  # the last prefix token at each position
    prev_tok = np.where(pos_in_row > 0, input_ids[np.maximum(np.repeat(tok_start, npos) + pos_in_row - 1, 0)], V)
    keep = np.arange(ids_all.shape[1])[None] < counts_all[:, None]
    sym = ids_all[keep].astype(np.int64)  # events in time order (position, then rank)
    N = sym.size
    ev_t = np.repeat(np.arange(P), counts_all)
    ev_r = np.nonzero(keep)[1]
    per_pos = N / P
    print(f"{len(npos)} rows, {P} positions, {N} kept ids ({per_pos:.1f}/position)")
    res = {"positions": P, "ids": N, "ids_per_pos": per_pos, "models": {}}

    def report(name, bits, note=""):
        b = bits / N
        Bp = bits / 8 / P
        res["models"][name] = {"bits_per_id": b, "B_per_pos": Bp, "total_B_per_pos": Bp + OTHER_B, "note": note}
        print(f"  {name:58s} {b:6.2f} bits/id {Bp:7.1f} B/pos  total {Bp + OTHER_B:6.1f}  {note}", flush=True)

    t0 = time.time()
    report("order-0 static empirical entropy (no model cost)", static_entropy_bits(sym))
    # adaptive order-0, back-off to uniform over the vocab
    q_uni = np.full(N, 1.0 / V)
    bits0, p0, par = best_py(seq_counts(np.zeros(N, np.int64), sym), q_uni)
    report("order-0 adaptive (PY mix, uniform base)", bits0, f"beta,d={par}")
    # model cost of a static order-0 table: code the (id, count) table ~ log2 C(V, used) + counts
    # rank-conditional
    rb = rank_bucket(ev_r)
    bits_rb, p_rb, par = best_py(seq_counts(rb, sym), p0)
    report("rank bucket (9 buckets) -> order-0", bits_rb, f"{par}")
    bits_r, p_r, par = best_py(seq_counts(ev_r, sym), p0)
    report("exact rank (128 ctx) -> order-0", bits_r, f"{par}")
    p_lit = p_rb if bits_rb <= bits_r else p_r
    # input-token context
    ct = cur_tok[ev_t].astype(np.int64)
    bits_tok, p_tok, par = best_py(seq_counts(ct, sym), p_lit)
    report("input token -> rank bucket -> order-0", bits_tok, f"{par}")
    bits_tokrb, p_tokrb, par = best_py(seq_counts(ct * 16 + rb, sym), p_tok)
    report("(input token, rank bucket) -> input token -> ...", bits_tokrb, f"{par}")
    pt = prev_tok[ev_t].astype(np.int64)
    bits_bi, p_bi, par = best_py(seq_counts(pt * (V + 1) + ct, sym), p_tok)
    report("(prev token, input token) -> input token -> ...", bits_bi, f"{par}")
    # contexts along the list: the id one rank above (order-1 in rank order), the position's top-1 id
    p_best_tok = p_tokrb if bits_tokrb < bits_tok else p_tok
    prev_id = np.where(ev_r > 0, np.r_[V, sym[:-1]], V)
    bits_o1, p_o1, par = best_py(seq_counts(prev_id, sym), p_best_tok)
    report("id at rank r-1 -> token ctx -> ...", bits_o1, f"{par}")
    bits_o1b, p_o1b, par = best_py(seq_counts(prev_id, sym), p_lit)
    report("id at rank r-1 -> rank -> order-0", bits_o1b, f"{par}")
    prev2 = np.where(ev_r > 1, np.r_[V, V, sym[:-2]], V)
    bits_o2, p_o2, par = best_py(seq_counts(prev2 * (V + 1) + prev_id, sym), p_o1)
    report("ids at r-2,r-1 -> id at r-1 -> token ctx -> ...", bits_o2, f"{par}")
    top1 = sym[np.r_[0, np.cumsum(counts_all)[:-1]]][ev_t]
    bits_t1, p_t1, par = best_py(seq_counts(np.where(ev_r > 0, top1, V) * 16 + rb, sym), p_o1)
    report("(top-1 id, rank bucket) -> id at r-1 -> token ctx -> ...", bits_t1, f"{par}")
    print(f"  [{time.time() - t0:.0f} s]", flush=True)

    # ---- reference lists: flag + index in the list, else literal --------------------------------------------
    def refs_prev(W):
        refs = np.full((P, W), -1, np.int64)
        nref = np.zeros(P, np.int64)
        for a in range(W):
            ok = pos_in_row > a
            refs[ok, a] = np.arange(P)[ok] - 1 - a
        nref = np.minimum(pos_in_row, W)
        return refs, nref

    def refs_same_token(W):
        """The W most recent earlier positions (any row, same row group) whose input token equals this one's."""
        last = {}
        refs = np.full((P, W), -1, np.int64)
        nref = np.zeros(P, np.int64)
        for t in range(P):
            lst = last.get(int(cur_tok[t]), [])
            refs[t, : len(lst)] = lst[::-1][:W]
            nref[t] = min(len(lst), W)
            lst = lst + [t]
            last[int(cur_tok[t])] = lst[-W:]
        return refs, nref

    ids32 = np.ascontiguousarray(ids_all.astype(np.int64))
    lit_models = {"rank->order-0": p_lit, "token ctx": p_best_tok, "r-1 id->token ctx": p_o1}
    for label, (refs, nref) in [("prev position", refs_prev(1)), ("union of last 4 positions", refs_prev(4)),
                                ("last earlier pos. with same input token", refs_same_token(1)),
                                ("union of last 4 with same input token", refs_same_token(4))]:
        j, size = ref_index(ids32, counts_all, refs, nref)
        hit = j >= 0
        # index symbol: j+1 (0 = escape) in the context of the exact rank; PY with uniform base over list size+1
        sz = size[ev_t]
        idx_sym = j + 1
        for ctxname, ctx in [("rank", ev_r), ("rank x log2 listsize", ev_r * 16 + np.ceil(np.log2(sz + 1)).astype(np.int64))]:
            bits_idx, p_idx, par = best_py(seq_counts(ctx, idx_sym), 1.0 / (sz + 1))
            for lname, pl in lit_models.items():
                bits = bits_idx - np.log2(pl[~hit]).sum()
                report(f"ref[{label}] idx|{ctxname}, literal {lname}", bits,
                       f"hit {hit.mean():.1%}, idx {bits_idx / N:.2f} b/id")
        # delta of index from rank (same information as index given exact rank; context-free version)
        dsym = np.where(hit, j - ev_r + 200, 0)
        bits_d, _, par = best_py(seq_counts(rb, dsym), 1.0 / 400)
        bits = bits_d - np.log2(lit_models["token ctx"][~hit]).sum()
        report(f"ref[{label}] (idx-rank)|rank bucket, literal token ctx", bits, f"{par}")
    print(f"  [{time.time() - t0:.0f} s]", flush=True)

    # ---- set + permutation -------------------------------------------------------------------------------------
    s_sorted = np.sort(np.where(keep, ids_all, V + 1), axis=1)
    gaps = np.diff(np.concatenate([np.full((P, 1), -1), s_sorted], axis=1), axis=1)[keep]  # >= 1
    gi = np.nonzero(keep)[1]  # index within the sorted set
    lg = np.floor(np.log2(gaps)).astype(np.int64)
    # gap = bucket (adaptive) + offset within bucket: exact value adaptive over a uniform-in-bucket base
    bits_lg, p_lg, _ = best_py(seq_counts(rank_bucket(gi), lg), np.full(N, 1 / 17))
    q_gap = p_lg / (2.0 ** lg)
    bits_set, _, par = best_py(seq_counts(rank_bucket(gi), gaps), q_gap)
    m = counts_all
    perm_ub = float(gammaln(m + 1).sum() / math.log(2))
    report("set: sorted-id gaps | sorted index bucket (set only)", bits_set, f"{par}")
    report("set (gaps) + rank order at log2(m!)", bits_set + perm_ub, f"perm {perm_ub / N:.2f} b/id")
    mm = m[ev_t]
    for mode, lbl in [(0, "adaptive frequency"), (1, "prev-position rank, then frequency")]:
        prev = np.where(pos_in_row > 0, np.arange(P) - 1, -1)
        leh = lehmer_adaptive_freq(ids32, counts_all, mode, prev)
        q = 1.0 / (mm - ev_r)
        best = None
        for ctxname, ctx in [("rank bucket", rb), ("rank", ev_r), ("remaining", mm - ev_r)]:
            b, _, par = best_py(seq_counts(ctx, leh), q)
            if best is None or b < best[0]:
                best = (b, ctxname, par)
        report(f"set (gaps) + Lehmer vs {lbl}", bits_set + best[0],
               f"perm {best[0] / N:.2f} b/id (ctx {best[1]}, {best[2]})")
    print(f"  [{time.time() - t0:.0f} s]", flush=True)

    # ---- zstd baselines ----------------------------------------------------------------------------------------
    import zstandard as zstd

    raw32 = sym.astype("<u4")
    bss = raw32.view(np.uint8).reshape(-1, 4).T.copy()  # BYTE_STREAM_SPLIT planes
    u16 = sym.astype("<u2")
    for lbl, data in [("uint32", raw32.tobytes()), ("uint32 BYTE_STREAM_SPLIT", bss.tobytes()),
                      ("uint16", u16.tobytes()), ("uint16 BYTE_STREAM_SPLIT", u16.view(np.uint8).reshape(-1, 2).T.copy().tobytes())]:
        for lvl, ldm in [(3, False), (19, False), (19, True)]:
            params = zstd.ZstdCompressionParameters.from_level(lvl, window_log=27 if ldm else 0,
                                                                enable_ldm=ldm) if ldm else None
            c = (zstd.ZstdCompressor(compression_params=params) if ldm else zstd.ZstdCompressor(level=lvl)).compress(data)
            report(f"zstd -{lvl}{' --long=27' if ldm else ''} on {lbl}", 8 * len(c))
    # trained dictionary: train on the first half rows' id streams (one sample per row), code the second half
    half = P // 2
    e_half = int(counts_all[:half].sum())
    rows_split = np.cumsum(npos)[:-1]
    ev_row_start = np.r_[0, np.cumsum(counts_all)][np.r_[0, rows_split]]
    samples, tests = [], []
    for a, b in zip(ev_row_start, np.r_[ev_row_start[1:], N]):
        (samples if b <= e_half else tests).append(u16[a:b].tobytes())
    try:
        d = zstd.train_dictionary(112_640, samples)
    except zstd.ZstdError as err:
        d = None
        print(f"  zstd dictionary: {err}")
    if d is not None:
        n_test = sum(len(s) // 2 for s in tests)
        c_dict = sum(len(zstd.ZstdCompressor(level=19, dict_data=d).compress(s)) for s in tests)
        c_nodict_rows = sum(len(zstd.ZstdCompressor(level=19).compress(s)) for s in tests)
        c_whole = len(zstd.ZstdCompressor(level=19).compress(b"".join(tests)))
        res["zstd_dict_second_half"] = {"bits_per_id_dict_per_row": 8 * c_dict / n_test,
                                        "bits_per_id_nodict_per_row": 8 * c_nodict_rows / n_test,
                                        "bits_per_id_whole_half": 8 * c_whole / n_test,
                                        "dict_bytes": len(d.as_bytes())}
        print(f"  zstd -19 uint16, second half of rows: per row with 110 KiB dict (trained on first half) "
              f"{8 * c_dict / n_test:.2f} b/id, per row no dict {8 * c_nodict_rows / n_test:.2f}, whole half "
              f"{8 * c_whole / n_test:.2f} (dict itself {len(d.as_bytes())} B not counted)")

    # ---- learning curve: the best sequential models on the second half vs the first ------------------------
    second = ev_t >= half
    for name, p in [("order-0 adaptive", p0), ("rank bucket", p_rb), ("input token", p_tok),
                    ("(input token, rank bucket)", p_tokrb)]:
        b1 = -np.log2(p[~second]).mean()
        b2 = -np.log2(p[second]).mean()
        res.setdefault("halves", {})[name] = [b1, b2]
        print(f"  learning curve {name:30s}: first half {b1:.2f} b/id, second half {b2:.2f} b/id")
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
