"""Where the bits go: cost per rank bucket of the best back-off chain (no priming) vs adaptive order-0."""
import numpy as np
from analyse2 import load, events, chain
from models import rank_bucket

ids_all, counts_all, seq_len, input_ids = load(["topk.npz"])
sym, ev_t, ev_r, C, P = events(ids_all, counts_all, seq_len, input_ids)
mask = np.ones(sym.size, bool)
_, q0, _ = chain(sym, C, ["order0"], mask)
_, qb, _ = chain(sym, C, ["order0", "rank", "tok", "tok,rb", "r-1", "top1,rb", "r-2,r-1"], mask)
rb = rank_bucket(ev_r)
print("rank bucket  ids/pos  order0 b/id  best b/id  best B/pos")
for b, lbl in enumerate(["0", "1", "2", "3", "4-7", "8-15", "16-31", "32-63", "64-127"]):
    m = rb == b
    print(f"{lbl:>10} {m.sum() / P:8.1f} {-np.log2(q0[m]).mean():11.2f} {-np.log2(qb[m]).mean():10.2f} "
          f"{-np.log2(qb[m]).sum() / 8 / P:10.1f}")
