"""How fast a sequential replay of the best back-off chain runs in numba (model lookups + updates only, no
arithmetic decoder and no symbol search: an upper bound on what a decoder of this model could do per core)."""
import time
import numpy as np
from analyse2 import load, events, chain_exclusion

ids_all, counts_all, seq_len, input_ids = load(["topk.npz"])
sym, ev_t, ev_r, C, P = events(ids_all, counts_all, seq_len, input_ids)
lv = ["order0", "rank", "tok", "tok,rb", "r-1", "top1,rb", "r-2,r-1"]
keys = np.stack([C[x] for x in lv])
b = np.array([4096, 4096, 256, 64, 32, 8, 0.5]); d = np.array([0.5, 0.9, 0.75, 0.9, 0.9, 0.9, 0.9])
chain_exclusion(sym[:1000], ev_t[:1000], ev_r[:1000], keys[:, :1000], b, d, 10**9, 0)  # compile
for L in (1, 3, 7):
    t0 = time.process_time()
    chain_exclusion(sym, ev_t, ev_r, np.ascontiguousarray(keys[:L]), b[:L], d[:L], 10**9, 0)
    dt = time.process_time() - t0
    print(f"{L} levels: {sym.size / dt / 1e6:.2f} M ids/s, {P / dt / 1e3:.0f} k positions/s (process time)")
