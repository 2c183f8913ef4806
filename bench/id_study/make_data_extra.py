"""Rows 200..499 of Dolly dev, 100 at a time, to prime models with more
history than the 200 coded rows: extra_{i}.npz, same layout as topk.npz."""
import os
os.environ.setdefault("OMP_NUM_THREADS", "1")
import json
import sys
from pathlib import Path
import numpy as np
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE.parent))
from cache_codec import topk_from_model, rows_at, DEFAULT_TEACHER, DEFAULT_DOLLY  # noqa

src = DEFAULT_DOLLY.read_text().splitlines()[200:500]
for i in range(3):
    part = HERE / f"part_{i}.jsonl"
    part.write_text("\n".join(src[100 * i: 100 * (i + 1)]) + "\n")
    data = topk_from_model(DEFAULT_TEACHER, part, 100, 128, 512)
    rows = rows_at(data, 128, min_prob=1e-4)
    np.savez_compressed(str(HERE / f"extra_{i}.npz"),
                        input_ids=np.concatenate([t.input_ids for t in data]),
                        seq_len=np.array([len(t.input_ids) for t in data]),
                        ids=np.concatenate([t.ids for t in data]).astype(np.int32),
                        counts=np.concatenate([r.topk_count for r in rows]).astype(np.int32))
    print("saved part", i, flush=True)
