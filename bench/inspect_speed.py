"""How fast `rlkd inspect`'s summary is compared with just reading the cache.

Builds (once, under --dir) a synthetic cache of about --positions scored positions with top-k log-probs drawn from
random peaked distributions, then times, each best of --repeats:

* ``read``:     ``CacheReader.iter_rows()`` over every row (Parquet read + codec decode), positions/s;
* ``stats``:    the summary statistics alone over rows already decoded in memory, positions/s;
* ``summary``:  ``rlkd.inspect.stats.summary`` end to end (read + statistics + histograms), positions/s.

The issue asks that the summary not be slower than reading: ``stats`` should be well above ``read``, so the
end-to-end summary costs about one read. Usage::

    OMP_NUM_THREADS=1 python bench/inspect_speed.py --positions 1000000 --k 20
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np


def synthetic_rows(n_positions: int, k: int, vocab: int, seq_len: int, seed: int):
    from rlkd.cache import TeacherRow, make_row_id

    rng = np.random.default_rng(seed)
    done = 0
    i = 0
    while done < n_positions:
        T = int(min(seq_len, n_positions - done + 1))
        P = T - 1
        # k + 1 "buckets" (the top-k and the tail), with a per-position temperature: peaked and flat positions.
        z = rng.gumbel(size=(P, k + 1)) * rng.uniform(0.5, 4.0, size=(P, 1))
        z[:, -1] += np.log(rng.uniform(0.01, 30.0, size=P))  # the tail stands for many tokens
        lp = z - np.logaddexp.reduce(z, axis=1, keepdims=True)
        top = -np.sort(-lp[:, :k], axis=1)  # (P, k) non-increasing
        tail = lp[:, k]
        base = rng.integers(0, vocab, size=(P, 1))
        ids = (base + np.arange(k)[None, :] * 7919) % vocab  # distinct ids per position
        input_ids = rng.integers(0, vocab, size=T).astype(np.int32)
        yield TeacherRow(
            row_id=make_row_id(input_ids, i), source_index=i, input_ids=input_ids,
            loss_mask=np.arange(P) >= P // 3, topk_count=np.full(P, k, np.int32),
            topk_ids=ids.reshape(-1).astype(np.int32), topk_logprobs=top.reshape(-1).astype(np.float32),
            tail_logmass=tail.astype(np.float32), target_logprob=top[:, 1].astype(np.float32),
            target_rank=np.full(P, 2, np.int32))
        done += P
        i += 1


def build(path: Path, positions: int, k: int, vocab: int, seq_len: int, codec: str) -> None:
    from rlkd.cache import CacheWriter

    meta = {"teacher": {"name_or_path": "synthetic", "vocab_size": vocab},
            "tokenizer": {"sha256": "0" * 64, "vocab_size": vocab, "name_or_path": "synthetic"},
            "dataset": {"name": "synthetic", "positions": positions}, "config": {}}
    with CacheWriter(path, meta, k=k, codec=codec) as w:
        for row in synthetic_rows(positions, k, vocab, seq_len, seed=0):
            w.write(row)


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--positions", type=int, default=1_000_000)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--codec", default="q8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/rlkd-bench-inspect")
    args = ap.parse_args()

    from rlkd.cache import CacheReader, read_manifest
    from rlkd.inspect.stats import collect, summary

    path = Path(args.dir) / f"p{args.positions}-k{args.k}-{args.codec}"
    if not (path / "manifest.json").is_file() or not read_manifest(path).get("complete"):
        shutil.rmtree(path, ignore_errors=True)
        t0 = time.perf_counter()
        build(path, args.positions, args.k, args.vocab, args.seq_len, args.codec)
        print(f"built {path} in {time.perf_counter() - t0:.1f}s")
    m = read_manifest(path)
    N = m["positions"]

    def read():
        for _ in CacheReader(path, shuffle=False).iter_rows():
            pass

    rows = list(CacheReader(path, shuffle=False).iter_rows())
    t_read = best(read, args.repeats)
    t_stats = best(lambda: collect(iter(rows), N, sample=None, seed=0, vocab_size=args.vocab, threshold=0.1),
                   args.repeats)
    t_summary = best(lambda: summary(path), args.repeats)
    t_sample = best(lambda: summary(path, sample=10_000), args.repeats)
    out = {
        "positions": N, "k": m["k"], "codec": m["codec"], "bytes": m["bytes"],
        "read_positions_per_s": N / t_read,
        "stats_positions_per_s": N / t_stats,
        "summary_positions_per_s": N / t_summary,
        "summary_sample10k_positions_per_s": N / t_sample,
        "summary_over_read_time": t_summary / t_read,
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
