"""Writing a cache to object storage vs local disk: the writer alone (no teacher), side by side.

The same rows (synthetic, the shape of a real cache: k=20 q8, 512-token rows over SmolLM2's 49,152-token vocabulary,
256-row row groups) are written, round by round so that machine load hits both arms alike, by ``CacheWriter``:

* ``local``:  a local folder (temporary file, fsync, rename per shard);
* ``remote``: ``s3://`` on a local S3-compatible server (moto, in its own process): each shard spooled to $TMPDIR,
  uploaded whole, then read back (HEAD + a streamed GET, sha256) before the manifest lists it; the writer's lease
  is taken, renewed and given back.

Prints positions/s and MB/s per arm, remote ÷ local, and where the remote writer's time goes (encoding and
spooling; upload; read-back). Stage 1 writes at the teacher's pace, so what matters is that the remote writer stays
far above it (vLLM on one GPU scores ~10^4-10^5 positions/s); the writer runs on its own thread beside the engine.
Usage::

    python experiments/remote_write.py [--positions 500000] [--shard-mb 4] [--rounds 3] [--json out.json]
    python experiments/remote_write.py --smoke        # seconds

The server is pure Python on the same machine: a pessimistic stand-in for a real store on bandwidth and CPU, an
optimistic one on latency.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]  # bench/inspect_speed.py: the synthetic rows


def make_rows(positions: int) -> list:
    from inspect_speed import synthetic_rows

    return list(synthetic_rows(positions, 20, 49152, 512, seed=0))


META = {"teacher": {"name_or_path": "synthetic", "vocab_size": 49152},
        "tokenizer": {"sha256": "0" * 64, "vocab_size": 49152, "name_or_path": "synthetic"},
        "dataset": {"name": "synthetic"}, "config": {}}


class Timer:
    """Wall time spent inside a wrapped method (the writer calls it on one thread)."""

    def __init__(self, owner, name: str):
        self.owner, self.name, self.real, self.seconds = owner, name, getattr(owner, name), 0.0

    def __enter__(self):
        timer = self

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return timer.real(*a, **kw)
            finally:
                timer.seconds += time.perf_counter() - t0

        setattr(self.owner, self.name, timed)
        return self

    def __exit__(self, *exc):
        setattr(self.owner, self.name, self.real)


def write(where: str, rows: list, shard_mb: float) -> dict:
    from rlkd.cache import CacheWriter
    from rlkd.cache.storage import CacheLocation

    with Timer(CacheLocation, "upload") as up, Timer(CacheLocation, "sha256") as back:
        t0 = time.perf_counter()
        with CacheWriter(where, META, k=20, codec="q8", shard_max_bytes=int(shard_mb * 1e6)) as w:
            for row in rows:
                w.write(row)
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "bytes": w.manifest["bytes"], "positions": w.manifest["positions"],
            "shards": len(w.manifest["shards"]), "upload_s": up.seconds, "readback_s": back.seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--positions", type=int, default=500_000)
    ap.add_argument("--shard-mb", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--smoke", action="store_true", help="a tiny run, seconds")
    args = ap.parse_args()
    if args.smoke:
        args.positions, args.shard_mb, args.rounds = 20_000, 0.2, 1
    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(name, None)
    rows = make_rows(args.positions)
    work = Path(tempfile.mkdtemp(prefix="rlkd-bench-write-"))
    # The server runs in its own process: a pure-Python server sharing the writer's GIL would slow both.
    proc = subprocess.Popen([sys.executable, "-m", "tests.s3_server"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    endpoint = proc.stdout.readline().strip()
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    from tests.s3_server import Bucket

    runs: dict[str, list[dict]] = {"local": [], "remote": []}
    try:
        bucket = Bucket("rlkd-bench-write", SimpleNamespace(endpoint=endpoint))
        bucket.client().create_bucket(Bucket=bucket.name)
        for r in range(args.rounds):
            runs["local"].append(write(str(work / f"local-{r}"), rows, args.shard_mb))
            runs["remote"].append(write(bucket.url(f"remote-{r}"), rows, args.shard_mb))
            shutil.rmtree(work / f"local-{r}", ignore_errors=True)
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)
    best = {arm: min(rs, key=lambda x: x["seconds"]) for arm, rs in runs.items()}
    res = {"positions": best["local"]["positions"], "bytes": best["local"]["bytes"],
           "shards": best["local"]["shards"], "rounds": args.rounds, "shard_mb": args.shard_mb,
           "arms": {arm: {"seconds": b["seconds"], "positions_per_s": b["positions"] / b["seconds"],
                          "mb_per_s": b["bytes"] / 1e6 / b["seconds"], "upload_s": b["upload_s"],
                          "readback_s": b["readback_s"]} for arm, b in best.items()}}
    res["remote_over_local"] = res["arms"]["remote"]["positions_per_s"] / res["arms"]["local"]["positions_per_s"]
    a = res["arms"]
    print(f"cache: {res['positions']:,} positions, {res['bytes'] / 1e6:.1f} MB in {res['shards']} shards "
          f"({args.shard_mb:g} MB), best of {args.rounds} round(s)")
    print(f"{'arm':8} {'seconds':>8} {'positions/s':>12} {'MB/s':>7} {'upload s':>9} {'read-back s':>12}")
    for arm in ("local", "remote"):
        x = a[arm]
        print(f"{arm:8} {x['seconds']:8.2f} {x['positions_per_s']:12,.0f} {x['mb_per_s']:7.1f} {x['upload_s']:9.2f} "
              f"{x['readback_s']:12.2f}")
    print(f"remote ÷ local: {res['remote_over_local']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
