"""Back-off chains of context models for the ids, optional priming with extra rows, and the gain of excluding
ids already coded at the same position (which a real coder gets for free: ids in a list are distinct).

Run: OMP_NUM_THREADS=1 nice -n 19 python analyse2.py [--prime extra_0.npz ...] [--exclusion-sample 10]
Costs are reported over the events of topk.npz only; primed rows come first in time and are not counted.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numba
import numpy as np
from numba import types
from numba.typed import Dict

from models import best_py, rank_bucket, seq_counts

V = 49152
OTHER_B = 167.9 - 135.6


def load(paths):
    ids, counts, seq_len, input_ids = [], [], [], []
    for p in paths:
        z = np.load(p)
        ids.append(z["ids"]), counts.append(z["counts"].astype(np.int64)), seq_len.append(z["seq_len"])
        input_ids.append(z["input_ids"])
    return np.concatenate(ids), np.concatenate(counts), np.concatenate(seq_len), np.concatenate(input_ids)


def events(ids_all, counts_all, seq_len, input_ids):
    npos = seq_len - 1
    P = int(npos.sum())
    pos_in_row = np.arange(P) - np.repeat(np.cumsum(npos) - npos, npos)
    tok_start = np.cumsum(seq_len) - seq_len
    cur_tok = input_ids[np.repeat(tok_start, npos) + pos_in_row].astype(np.int64)
    keep = np.arange(ids_all.shape[1])[None] < counts_all[:, None]
    sym = ids_all[keep].astype(np.int64)
    ev_t = np.repeat(np.arange(P), counts_all)
    ev_r = np.nonzero(keep)[1].astype(np.int64)
    rb = rank_bucket(ev_r).astype(np.int64)
    prev1 = np.where(ev_r > 0, np.r_[V, sym[:-1]], V)
    prev2 = np.where(ev_r > 1, np.r_[V, V, sym[:-2]], V)
    top1 = sym[np.r_[0, np.cumsum(counts_all)[:-1]]][ev_t]
    tok = cur_tok[ev_t]
    C = {
        "order0": np.zeros(sym.size, np.int64),
        "rank": ev_r,
        "rb": rb,
        "tok": tok,
        "tok,rb": tok * 16 + rb,
        "r-1": prev1,
        "r-1,rb": prev1 * 16 + rb,
        "tok,r-1": tok * (V + 1) + prev1,
        "r-2,r-1": prev2 * (V + 1) + prev1,
        "top1,rb": np.where(ev_r > 0, top1, V) * 16 + rb,
    }
    return sym, ev_t, ev_r, C, P


def chain(sym, C, levels, mask, cache={}):
    """Fit a back-off chain bottom-up (levels[0] is the lowest, backing off to uniform over V)."""
    q = np.full(sym.size, 1.0 / V)
    params = []
    for i, lv in enumerate(levels):
        key = tuple(levels[: i + 1])
        if key in cache:
            q, par = cache[key]
        else:
            _, q, par = best_py(seq_counts(C[lv], sym), q)
            cache[key] = (q, par)
        params.append(par)
    return -np.log2(q[mask]).sum(), q, params


@numba.njit(cache=True)
def chain_exclusion(sym, ev_t, ev_r, keys, betas, ds, sample_every, first_t):
    """Sequential replay of a back-off chain (keys[l] = context key of level l per event, l = 0 lowest) that also
    returns, for positions t >= first_t with t % sample_every == 0, the code length with exclusion of the ids
    already coded at the position. Returns (bits without exclusion over all counted events, bits with exclusion
    over sampled events, bits without exclusion over the same sampled events)."""
    L = keys.shape[0]
    ncs = Dict.empty(key_type=types.int64, value_type=types.int64)
    nc = Dict.empty(key_type=types.int64, value_type=types.int64)
    uc = Dict.empty(key_type=types.int64, value_type=types.int64)
    N = sym.size
    bits_all = 0.0
    bits_ex = 0.0
    bits_noex = 0.0
    coded = np.empty(256, np.int64)
    for i in range(N):
        t = ev_t[i]
        r = ev_r[i]
        # probability of the actual symbol
        q = 1.0 / V
        for l in range(L):
            ck = (l << 34) + keys[l, i]
            sk = (ck << 16) + sym[i]
            a = ncs.get(sk, 0)
            n = nc.get(ck, 0)
            u = uc.get(ck, 0)
            q = (max(a - ds[l], 0.0) + (betas[l] + ds[l] * u) * q) / (n + betas[l])
        if t >= first_t:
            bits_all -= np.log2(q)
            if t % sample_every == 0:
                ex = 0.0
                for j in range(r):
                    y = coded[j]
                    qy = 1.0 / V
                    for l in range(L):
                        ck = (l << 34) + keys[l, i]
                        sk = (ck << 16) + y
                        a = ncs.get(sk, 0)
                        n = nc.get(ck, 0)
                        u = uc.get(ck, 0)
                        qy = (max(a - ds[l], 0.0) + (betas[l] + ds[l] * u) * qy) / (n + betas[l])
                    ex += qy
                bits_ex -= np.log2(q / (1.0 - ex))
                bits_noex -= np.log2(q)
        coded[r] = sym[i]
        # update every level (full updates, as seq_counts counts)
        for l in range(L):
            ck = (l << 34) + keys[l, i]
            sk = (ck << 16) + sym[i]
            a = ncs.get(sk, 0)
            if a == 0:
                uc[ck] = uc.get(ck, 0) + 1
            ncs[sk] = a + 1
            nc[ck] = nc.get(ck, 0) + 1
    return bits_all, bits_ex, bits_noex


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--prime", nargs="*", default=[])
    ap.add_argument("--exclusion-sample", type=int, default=10)
    ap.add_argument("--chains", default="all")
    ap.add_argument("--json", default="results2.json")
    args = ap.parse_args(argv)
    paths = list(args.prime) + ["topk.npz"]
    ids_all, counts_all, seq_len, input_ids = load(paths)
    n_main_pos = int(np.load("topk.npz")["seq_len"].sum() - len(np.load("topk.npz")["seq_len"]))
    sym, ev_t, ev_r, C, P = events(ids_all, counts_all, seq_len, input_ids)
    first_t = P - n_main_pos
    mask = ev_t >= first_t
    N = int(mask.sum())
    print(f"primed with {first_t} positions ({len(args.prime)} files); coding {n_main_pos} positions, {N} ids")
    res = {"prime_positions": first_t, "chains": {}}
    chains = [
        ["order0"],
        ["order0", "rank"],
        ["order0", "rank", "tok"],
        ["order0", "rank", "tok", "tok,rb"],
        ["order0", "rank", "tok", "tok,rb", "r-1"],
        ["order0", "rank", "tok", "tok,rb", "r-1", "r-2,r-1"],
        ["order0", "rank", "tok", "tok,rb", "r-1,rb", "r-2,r-1"],
        ["order0", "rank", "tok", "tok,rb", "r-1", "tok,r-1", "r-2,r-1"],
        ["order0", "rank", "r-1", "tok", "tok,rb", "tok,r-1", "r-2,r-1"],
        ["order0", "rank", "tok", "tok,rb", "r-1", "top1,rb", "r-2,r-1"],
    ]
    if args.chains != "all":
        chains = [chains[int(i)] for i in args.chains.split(",")]
    best = None
    t0 = time.time()
    for lv in chains:
        bits, q, params = chain(sym, C, lv, mask)
        b = bits / N
        Bp = bits / 8 / n_main_pos
        name = " -> ".join(reversed(lv))
        res["chains"][name] = {"bits_per_id": b, "B_per_pos": Bp, "total_B_per_pos": Bp + OTHER_B,
                               "params": params}
        print(f"  {name:70s} {b:6.2f} bits/id {Bp:7.1f} B/pos total {Bp + OTHER_B:6.1f}  [{time.time() - t0:.0f} s]",
              flush=True)
        if best is None or bits < best[0]:
            best = (bits, lv, params)
    if args.exclusion_sample:
        bits, lv, params = best
        keys = np.stack([C[x] for x in lv])
        betas = np.array([p[0] for p in params], float)
        ds = np.array([p[1] for p in params], float)
        ball, bex, bnoex = chain_exclusion(sym, ev_t, ev_r, keys, betas, ds, args.exclusion_sample, first_t)
        ns = int((mask & (ev_t % args.exclusion_sample == 0)).sum())
        print(f"  replay check: numba {ball / N:.4f} bits/id vs numpy {bits / N:.4f}")
        gain = (bnoex - bex) / ns
        print(f"  exclusion on best chain (every {args.exclusion_sample}th position, {ns} ids): "
              f"{bnoex / ns:.2f} -> {bex / ns:.2f} bits/id (gain {gain:.2f}); whole-data estimate "
              f"{bits / N - gain:.2f} bits/id, {(bits / N - gain) * N / 8 / n_main_pos + OTHER_B:.1f} B/pos total")
        res["exclusion"] = {"chain": " -> ".join(reversed(lv)), "sampled_ids": ns, "noex": bnoex / ns,
                            "ex": bex / ns, "estimate_bits_per_id": bits / N - gain}
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
