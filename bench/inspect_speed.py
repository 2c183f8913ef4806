"""How fast `rlkd inspect`'s summary is compared with just reading the cache.

Builds (once, under --dir) a synthetic cache of about --positions scored positions with top-k log-probs drawn from
random peaked distributions, then times, interleaved (read, summary, stats, read, ...) so that a change in the
machine's load hits every figure alike, the best of --repeats of:

* ``read``:        ``CacheReader.iter_rows()`` over every row (Parquet read + codec decode), positions/s;
* ``read_blocks``: ``CacheReader.iter_blocks()``: the same read and decode without the per-row objects;
* ``stats``:       the summary statistics alone (per-position arrays + summarize) over blocks already decoded in
  memory, positions/s;
* ``summary``:     ``rlkd.inspect.stats.summary`` end to end (read + statistics + histograms; two threads each read,
  decode and compute every other row group), positions/s;
* ``summary_sample10k``: the same with ``--sample 10000``.

The issue asks that the summary not be slower than reading: ``summary_over_read_time`` <= 1. Each figure is also
given in CPU seconds of the process (all threads): on a loaded machine the wall-clock overlap of reading and
statistics on two threads comes and goes, the CPU work does not. Usage::

    OMP_NUM_THREADS=1 python bench/inspect_speed.py --positions 1000000 --k 20 [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import os
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


def measure(fns: dict, repeats: int) -> dict:
    """``{name: (best wall seconds, best CPU seconds)}`` over ``repeats`` runs of the functions, interleaved."""
    runs = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            runs[name].append((time.perf_counter() - t0, time.process_time() - c0))
    return {name: (min(w for w, _ in r), min(c for _, c in r)) for name, r in runs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--positions", type=int, default=1_000_000)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--codec", default="q8")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default="/tmp/rlkd-bench-inspect")
    ap.add_argument("--out", default=None, help="also write the JSON result to this file")
    args = ap.parse_args()

    from rlkd.cache import CacheReader, read_manifest
    from rlkd.inspect.stats import SUMMARY_COLUMNS, collect, summarize, summary

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

    def read_blocks():
        for _ in CacheReader(path, shuffle=False).iter_blocks():
            pass

    blocks = list(CacheReader(path, shuffle=False).iter_blocks(columns=SUMMARY_COLUMNS))

    def stats():
        summarize(collect(iter(blocks), N, sample=None, seed=0, vocab_size=args.vocab, threshold=0.1))

    t = measure({"read": read, "summary": lambda: summary(path), "stats": stats, "read_blocks": read_blocks,
                 "summary_sample10k": lambda: summary(path, sample=10_000)}, args.repeats)
    out = {
        "positions": N, "k": m["k"], "codec": m["codec"], "bytes": m["bytes"], "repeats": args.repeats,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpus": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "read_positions_per_s": N / t["read"][0],
        "read_blocks_positions_per_s": N / t["read_blocks"][0],
        "stats_positions_per_s": N / t["stats"][0],
        "summary_positions_per_s": N / t["summary"][0],
        "summary_sample10k_positions_per_s": N / t["summary_sample10k"][0],
        "summary_over_read_time": t["summary"][0] / t["read"][0],
        "summary_over_read_blocks_time": t["summary"][0] / t["read_blocks"][0],
        "summary_over_read_cpu": t["summary"][1] / t["read"][1],
        "seconds": {name: {"wall": w, "cpu": c} for name, (w, c) in t.items()},
    }
    text = json.dumps(out, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
