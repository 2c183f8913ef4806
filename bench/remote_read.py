"""Reading a cache from object storage vs local disk: positions/s, and bytes downloaded per epoch.

Uploads a cache folder to a local S3-compatible server (moto, on 127.0.0.1, the one the tests use) and times, round
by round (local, remote, remote + local cache, local, ...) so that machine load hits every arm alike, one shuffled
epoch of ``CacheReader`` (the trainer's reader: batches, collate included) per arm:

* ``local``:         the folder on local disk;
* ``remote``:        ``s3://`` with ranged reads, ``--prefetch`` row groups in flight (the default path);
* ``remote_p0``:     ``s3://`` without prefetch (info: what prefetching buys);
* ``remote_cached``: ``s3://`` with ``--local-cache``; its first epoch downloads every shard, later epochs read the
  local copies.

Bytes are counted by the server (response bodies of GETs of shard objects), independent of rlkd's own counters.
Goals (issue #15): remote ÷ local positions/s >= 0.8 with prefetch on; remote reader >= 20x the trainer's
consumption (``--trainer-positions-per-s``, which ``run_all.py`` takes from stage2's result); epoch 1 downloads
about 1x the cache's bytes, epoch 2 with the local cache about 0. Timed ratios come with a 95% interval over the
paired rounds (``bench/_common.py``). Usage::

    python bench/remote_read.py CACHE [--prefetch 4] [--rounds 5] [--json out.json]
    python bench/remote_read.py --dolly 800 --shard-mb 2 --row-group-rows 32   # a real Dolly cache (SmolLM2 teacher)
    python bench/remote_read.py --synthetic 2000000 --dir /tmp/rlkd-bench-remote   # a realistic synthetic cache
    python bench/remote_read.py --smoke                                            # seconds, tiny cache

The server (moto, pure Python) runs in its own process but shares the machine's cores with the reader, so it is a
pessimistic stand-in for a real store on bandwidth and CPU, and an optimistic one on latency (no network round
trip).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from _common import data_file, default_teacher, format_interval, ratio_interval  # noqa: E402


def build_synthetic(path: Path, positions: int, shard_mb: float, row_group_rows: int = 256, seed: int = 0) -> None:
    """k=20 q8 rows of 512 tokens over a 49,152-token vocabulary (SmolLM2's), 256-row row groups (the writer's
    default), shards of ``shard_mb`` MB: the shape of a real cache (bench/inspect_speed.py's generator)."""
    from inspect_speed import synthetic_rows

    from rlkd.cache import CacheWriter

    vocab, k = 49152, 20
    meta = {"teacher": {"name_or_path": "synthetic", "vocab_size": vocab},
            "tokenizer": {"sha256": "0" * 64, "vocab_size": vocab, "name_or_path": "synthetic"},
            "dataset": {"name": "synthetic", "positions": positions}, "config": {}}
    with CacheWriter(path, meta, k=k, codec="q8", shard_max_bytes=int(shard_mb * 1e6),
                     row_group_rows=row_group_rows) as w:
        for row in synthetic_rows(positions, k, vocab, 512, seed=seed):
            w.write(row)


def build_dolly(path: Path, teacher: Path, data: Path, rows: int, shard_mb: float, row_group_rows: int) -> None:
    """A real cache: the first ``rows`` Dolly rows (<= 512 tokens) scored by the teacher with a transformers forward
    (bench/stage2.py's recipe, no vLLM needed), k=20, q8."""
    import numpy as np
    import torch
    from stage2 import dolly_sequences, teacher_targets_from_logits
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlkd.cache import CacheWriter, TeacherRow, make_row_id, tokenizer_identity

    k = 20
    tok = AutoTokenizer.from_pretrained(str(teacher))
    model = AutoModelForCausalLM.from_pretrained(str(teacher), dtype=torch.float32).eval()
    meta = {"teacher": {"name_or_path": str(teacher), "vocab_size": model.config.vocab_size},
            "tokenizer": tokenizer_identity(tok), "dataset": {"path": str(data), "rows": rows},
            "config": {"seq_len": 512, "source": "bench/remote_read.py"}, "logprobs_mode": "raw_logprobs",
            "temperature": 1.0, "engine": "transformers"}
    with CacheWriter(path, meta, k=k, codec="q8", row_group_rows=row_group_rows,
                     shard_max_bytes=int(shard_mb * 1e6)) as w, torch.no_grad():
        for i, (ids, loss_mask) in enumerate(dolly_sequences(tok, data, rows, 512)):
            logits = model(torch.as_tensor(ids[None], dtype=torch.long)).logits[0, :-1]  # (P, V)
            top_ids, top_lp, tail, logp = teacher_targets_from_logits(logits, k)
            nxt = torch.as_tensor(ids[1:], dtype=torch.long)
            target_lp = logp.gather(1, nxt[:, None]).squeeze(1)
            P = len(ids) - 1
            w.write(TeacherRow(
                row_id=make_row_id(ids, i), source_index=i, input_ids=ids, loss_mask=loss_mask,
                topk_count=np.full(P, k, np.int32), topk_ids=top_ids.numpy().astype(np.int32).ravel(),
                topk_logprobs=top_lp.numpy().ravel(), tail_logmass=tail.numpy(),
                target_logprob=target_lp.numpy(), target_rank=((logp > target_lp[:, None]).sum(1) + 1).numpy()))


def built(cache: Path) -> bool:
    """A finished cache from an earlier run (an interrupted build leaves an incomplete one: rebuilt)."""
    from rlkd.cache import read_manifest

    return (cache / "manifest.json").is_file() and bool(read_manifest(cache).get("complete")) \
        and read_manifest(cache).get("rows", 0) > 0


def upload(cache: Path, bucket, prefix: str) -> str:
    from tests.s3_server import upload_dir

    return upload_dir(cache, bucket, prefix)


def epoch(reader, e: int) -> tuple[int, float]:
    """(positions, seconds) of one shuffled epoch ``e``."""
    reader.set_epoch(e)
    positions = 0
    t0 = time.perf_counter()
    for rows in reader:
        positions += sum(r.num_positions for r in rows)
    return positions, time.perf_counter() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cache", nargs="?", help="a local cache folder to upload and read")
    ap.add_argument("--synthetic", type=int, metavar="POSITIONS", help="build a synthetic cache of this many positions")
    ap.add_argument("--dolly", type=int, metavar="ROWS",
                    help="build a real cache: the first ROWS rows of --data scored by --teacher (transformers)")
    ap.add_argument("--teacher", type=Path, default=None, help="HF teacher folder [rlkd convert-teacher's]")
    ap.add_argument("--data", type=Path, default=None,
                    help="the Dolly train.jsonl of --dolly [$RLKD_BENCH_DATA/train.jsonl]")
    ap.add_argument("--shard-mb", type=float, default=8.0, help="shard size of built caches (default 8 MB)")
    ap.add_argument("--row-group-rows", type=int, default=256, help="row groups of --synthetic caches")
    ap.add_argument("--dir", default=None, help="where --synthetic builds (and keeps) its cache")
    ap.add_argument("--smoke", action="store_true", help="a tiny synthetic cache and two rounds: seconds")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--prefetch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5,
                    help="timed rounds (each arm once per round); ratios get a 95%% interval over them")
    ap.add_argument("--trainer-positions-per-s", type=float, default=None,
                    help="the trainer's consumption (bench/stage2.py's trainer_positions_per_s)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)
    if args.smoke:
        args.synthetic, args.shard_mb, args.rounds = args.synthetic or 30_000, 0.25, 2
        args.row_group_rows = 8
    if not args.cache and not args.synthetic and not args.dolly:
        ap.error("give a CACHE folder, --dolly ROWS, --synthetic POSITIONS or --smoke")
    if args.dolly:
        args.data = data_file(args.data, "train.jsonl", ap)
        args.teacher = args.teacher or default_teacher()

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(name, None)
    work = Path(tempfile.mkdtemp(prefix="rlkd-remote-bench-"))
    try:
        if args.cache:
            cache = Path(args.cache)
            what = f"cache {cache}"
        elif args.dolly:
            base = Path(args.dir) if args.dir else work
            cache = base / f"dolly-{args.dolly}-{args.shard_mb:g}mb-rg{args.row_group_rows}"
            if not built(cache):
                shutil.rmtree(cache, ignore_errors=True)
                t0 = time.perf_counter()
                build_dolly(cache, args.teacher, args.data, args.dolly, args.shard_mb, args.row_group_rows)
                print(f"built {cache} in {time.perf_counter() - t0:.0f} s", flush=True)
            what = (f"Dolly cache (first {args.dolly} rows of {args.data.name} <= 512 tokens, {args.teacher.name}, "
                    f"k=20 q8, {args.row_group_rows}-row row groups, {args.shard_mb:g} MB shards)")
        else:
            base = Path(args.dir) if args.dir else work
            cache = base / f"synthetic-{args.synthetic}-{args.shard_mb:g}mb-rg{args.row_group_rows}"
            if not built(cache):
                shutil.rmtree(cache, ignore_errors=True)
                t0 = time.perf_counter()
                build_synthetic(cache, args.synthetic, args.shard_mb, args.row_group_rows)
                print(f"built {cache} in {time.perf_counter() - t0:.0f} s", flush=True)
            what = (f"synthetic cache ({args.synthetic:,} positions, k=20 q8, vocab 49,152, rows of 512 tokens, "
                    f"{args.shard_mb:g} MB shards)")
        results = run(cache, args, work)
        results["cache_description"] = what
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(results, args)
    return results


def run(cache: Path, args, work: Path) -> dict:
    import subprocess
    from types import SimpleNamespace

    from rlkd.cache import CacheReader, read_manifest
    from tests.s3_server import Bucket, fetch_log

    # The server runs in its own process: a pure-Python server sharing the reader's GIL would slow both.
    proc = subprocess.Popen([sys.executable, "-m", "tests.s3_server"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    endpoint = proc.stdout.readline().strip()
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    try:
        bucket = Bucket("rlkd-bench", SimpleNamespace(endpoint=endpoint))
        bucket.client().create_bucket(Bucket=bucket.name)
        t0 = time.perf_counter()
        url = upload(cache, bucket, "cache")
        upload_s = time.perf_counter() - t0
        manifest = read_manifest(cache)
        size = sum(s["bytes"] for s in manifest["shards"])
        kw = dict(batch_size=args.batch_size, shuffle=True, seed=0)

        def log_size() -> int:
            return len(fetch_log(endpoint))

        def served(since: int) -> int:
            return sum(r.bytes for r in fetch_log(endpoint)[since:] if r.method == "GET" and "/shard-" in r.path)

        arms = {
            "local": CacheReader(cache, prefetch=args.prefetch, **kw),
            "remote": CacheReader(url, prefetch=args.prefetch, **kw),
            "remote_p0": CacheReader(url, prefetch=0, **kw),
        }
        next(iter(arms["local"]))  # warm-up (imports, first allocations), untimed
        arms["local"].reset()
        rates: dict[str, list[float]] = {}
        bytes_epoch: dict[str, int] = {}
        positions = None
        for r in range(args.rounds):
            for name, reader in arms.items():
                since = log_size()
                n, s = epoch(reader, r)
                positions = positions or n
                assert n == positions, f"{name} read {n} positions, {positions} expected"
                rates.setdefault(name, []).append(n / s)
                bytes_epoch.setdefault(name, served(since))
            # the local cache: epoch 1 downloads into a fresh folder, epoch 2 reads it
            lc = work / f"local-cache-{r}"
            cached = CacheReader(url, prefetch=args.prefetch, local_cache=lc, **kw)
            for e, name in ((0, "remote_cached_epoch1"), (1, "remote_cached_epoch2")):
                since = log_size()
                n, s = epoch(cached, e)
                assert n == positions
                rates.setdefault(name, []).append(n / s)
                bytes_epoch.setdefault(name, served(since))
            shutil.rmtree(lc, ignore_errors=True)
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in rates.items())
                  + " positions/s", flush=True)
    finally:
        proc.terminate()
        proc.wait()
    return {
        "cache_bytes": size, "shards": len(manifest["shards"]), "positions": positions,
        "row_groups": sum(len(s.get("row_group_rows", [])) for s in manifest["shards"]),
        "upload_seconds": upload_s, "prefetch": args.prefetch, "batch_size": args.batch_size, "rounds": args.rounds,
        "positions_per_s_per_round": rates, "bytes_downloaded": bytes_epoch,
    }


def report(res: dict, args) -> None:
    """Ratios with 95% intervals over the paired rounds (bench/_common.py), printed and written to ``--json``."""
    rates, by, size = res["positions_per_s_per_round"], res["bytes_downloaded"], res["cache_bytes"]
    local = rates["local"]
    res["positions_per_s"] = {name: statistics.mean(v) for name, v in rates.items()}
    res["remote_over_local"] = ratio_interval(rates["remote"], local)
    res["remote_no_prefetch_over_local"] = ratio_interval(rates["remote_p0"], local)
    res["remote_cached_epoch2_over_local"] = ratio_interval(rates["remote_cached_epoch2"], local)
    res["epoch1_bytes_over_cache"] = by["remote"] / size
    res["epoch1_cached_bytes_over_cache"] = by["remote_cached_epoch1"] / size
    res["epoch2_cached_bytes_over_cache"] = by["remote_cached_epoch2"] / size
    if args.trainer_positions_per_s:
        res["trainer_positions_per_s"] = args.trainer_positions_per_s
        res["remote_over_trainer"] = ratio_interval(rates["remote"], [args.trainer_positions_per_s] * len(local))
        res["remote_over_trainer_source"] = "--trainer-positions-per-s"
    print(f"\n{res['cache_description']}: {res['shards']} shards, {res['row_groups']} row groups, "
          f"{size / 1e6:.1f} MB, {res['positions']:,} positions; batch {res['batch_size']}, prefetch "
          f"{res['prefetch']}, {res['rounds']} round(s)")
    for name, v in res["positions_per_s"].items():
        print(f"  {name:<22} {v:>12,.0f} positions/s (mean)   downloaded {by[name] / 1e6:8.2f} MB "
              f"({by[name] / size:.3f}x the cache)")
    print(f"remote ÷ local (prefetch {res['prefetch']}): {format_interval(res['remote_over_local'], '{:.2f}')} "
          "(goal >= 0.8)")
    if "remote_over_trainer" in res:
        print(f"remote ÷ trainer: {format_interval(res['remote_over_trainer'], '{:,.0f}')}x (goal >= 20)")
    print(f"epoch 1 downloads {res['epoch1_bytes_over_cache']:.3f}x the cache (ranged reads), "
          f"{res['epoch1_cached_bytes_over_cache']:.3f}x with the local cache (goal ~1); epoch 2 with the local "
          f"cache {res['epoch2_cached_bytes_over_cache']:.3f}x (goal ~0)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
