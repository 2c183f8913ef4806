"""Compute the teacher's top-128 ids + log-probs over the first 200 Dolly dev rows once, via bench/cache_codec.py,
and save them (plus the adaptive counts at min_prob=1e-4) to topk.npz."""
import os
os.environ.setdefault("OMP_NUM_THREADS", "1")
import sys
from pathlib import Path
import numpy as np
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE.parent))
from cache_codec import topk_from_model, rows_at, DEFAULT_TEACHER, DEFAULT_DOLLY  # noqa

data = topk_from_model(DEFAULT_TEACHER, DEFAULT_DOLLY, 200, 128, 512)
rows = rows_at(data, 128, min_prob=1e-4)
P = [len(t.input_ids) - 1 for t in data]
np.savez_compressed(
    str(HERE / "topk.npz"),
    input_ids=np.concatenate([t.input_ids for t in data]),
    seq_len=np.array([len(t.input_ids) for t in data]),
    ids=np.concatenate([t.ids for t in data]).astype(np.int32),  # (sumP, 128)
    lp=np.concatenate([t.lp for t in data]).astype(np.float32),
    counts=np.concatenate([r.topk_count for r in rows]).astype(np.int32),
    loss_mask=np.concatenate([t.loss_mask for t in data]),
)
print("rows", len(data), "positions", sum(P), "mean kept", np.concatenate([r.topk_count for r in rows]).mean())
