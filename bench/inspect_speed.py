"""How fast `rlkd inspect`'s summary is compared with just reading the cache.

Builds (once, under --dir) a synthetic cache of about --positions scored positions with top-k log-probs drawn from
random peaked distributions, then times, in --repeats rounds (each round runs every function once, in an order
rotated every round, so a change in the machine's load hits every figure alike):

* ``read``:        ``CacheReader.iter_rows()`` over every row (Parquet read + codec decode), positions/s;
* ``read_blocks``: ``CacheReader.iter_blocks()``: the same read and decode without the per-row objects;
* ``stats``:       the summary statistics alone (per-position arrays + summarize) over blocks already decoded in
  memory, positions/s;
* ``summary``:     ``rlkd.inspect.stats.summary`` end to end (read of the columns it needs + statistics +
  histograms), positions/s;
* ``summary_sample10k``: the same with ``--sample 10000``.

The goal: the summary is not slower than reading, ``summary_over_read_time`` <= 1, judged on the 95% interval of
the per-round ratio summary ÷ read (wall clock: what a user waits for; ``bench/_common.py``). The same ratio by the
process's CPU time is beside it (``summary_over_read_cpu``). Usage::

    OMP_NUM_THREADS=1 python bench/inspect_speed.py --positions 1000000 --k 20 [--json result.json]
    python bench/inspect_speed.py --smoke     # a few thousand positions: a check, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

from _common import ratio_interval


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
    """``{name: [(wall s, CPU s) per round]}``: ``repeats`` rounds, each running every function once, in an order
    rotated every round."""
    runs = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            c0, t0 = time.process_time(), time.perf_counter()
            fns[name]()
            runs[name].append((time.perf_counter() - t0, time.process_time() - c0))
    return runs


SMOKE = {"positions": 3000, "k": 8, "vocab": 512, "seq_len": 100, "repeats": 3}
"""--smoke sizes."""


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--positions", type=int, default=1_000_000)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--codec", default="q8")
    ap.add_argument("--repeats", type=int, default=10, help="timed rounds [%(default)s]")
    ap.add_argument("--dir", default="/tmp/rlkd-bench-inspect", help="where the synthetic cache is built [%(default)s]")
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON result to this file")
    ap.add_argument("--smoke", action="store_true", help="a few thousand positions: a check, not a measurement")
    args = ap.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)

    from rlkd.cache import CacheReader, read_manifest
    from rlkd.inspect.stats import SUMMARY_COLUMNS, collect, summarize, summary

    path = Path(args.dir) / f"p{args.positions}-k{args.k}-v{args.vocab}-{args.codec}"
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

    runs = measure({"read": read, "summary": lambda: summary(path), "stats": stats, "read_blocks": read_blocks,
                    "summary_sample10k": lambda: summary(path, sample=10_000)}, args.repeats)
    wall = {name: [w for w, _ in r] for name, r in runs.items()}
    cpu = {name: [c for _, c in r] for name, r in runs.items()}
    med = {name: statistics.median(v) for name, v in wall.items()}
    out = {
        "positions": N, "k": m["k"], "codec": m["codec"], "bytes": m["bytes"], "repeats": args.repeats,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpus": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0], "smoke": args.smoke,
        **{f"{name}_positions_per_s": N / t for name, t in med.items()},
        "summary_over_read_time": ratio_interval(wall["summary"], wall["read"]),
        "summary_over_read_blocks_time": ratio_interval(wall["summary"], wall["read_blocks"]),
        "summary_over_read_cpu": ratio_interval(cpu["summary"], cpu["read"]),
        "seconds": {name: {"wall": wall[name], "cpu": cpu[name]} for name in runs},
    }
    text = json.dumps(out, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return out


if __name__ == "__main__":
    main()
