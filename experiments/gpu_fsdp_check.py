"""bf16 FSDP2 on one GPU: does the sharded path train like the plain one, and what does it cost?

Builds a small local setup (no network): the tests' byte-level tokenizer, a 2-layer teacher whose top-k fills a
cache of --rows rows, and a 4-layer, hidden-512 student (head_dim 64). Then runs `rlkd train-student` twice on the
same cache and global batch, side by side:

  (1) one process, no torchrun: fp32 master weights, bf16 autocast;
  (2) `torchrun --nproc-per-node 1`: FSDP2 (fully_shard per block + root) with MixedPrecisionPolicy
      (bf16 parameters for compute, fp32 gradient reduction), fp32 sharded master weights.

and prints both loss curves, their largest relative difference (bf16 rounding differs between autocast and a bf16
parameter cast, so expect ~1e-2, not 1e-5), step times and peak GPU memory. With --device cpu it runs the same
comparison in fp32 on gloo (a check of the script itself; the two then agree to ~1e-5).

    python experiments/gpu_fsdp_check.py --out /tmp/rlkd-gpu-check      # ~2 min on one GPU
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build(work: Path, rows: int) -> tuple[Path, Path]:
    from tests import tiny
    from tests.cache_from_model import write_cache_from_model

    tok, teacher, student, cache = (work / n for n in ("tokenizer", "teacher", "student", "cache"))
    if not (cache / "manifest.json").is_file():
        tiny.make_tokenizer(tok)
        tiny.make_llama(teacher, tok, hidden_size=128, num_layers=2, num_heads=4, seed=0)
        tiny.make_llama(student, tok, hidden_size=512, num_layers=4, num_heads=8, intermediate_size=1536, seed=1,
                        init_std=0.02)
        write_cache_from_model(teacher, cache, n_rows=rows, k=20, min_len=64, max_len=256)
    return student, cache


def run(label: str, cmd: list[str], out: Path) -> list[dict]:
    if out.exists():
        shutil.rmtree(out)
    done = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{label} failed:\n{done.stdout[-2000:]}\n{done.stderr[-6000:]}")
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/rlkd-gpu-fsdp-check"))
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a dry run of the script)")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    student, cache = build(a.out, a.rows)
    flags = ["--student", str(student), "--cache", str(cache), "--max-steps", str(a.steps), "--batch-size",
             str(a.batch_size), "--global-batch", str(2 * a.batch_size), "--lr", "3e-4", "--save-every", "0",
             "--no-progress", "--device", a.device]
    plain = run("single process", [sys.executable, "-m", "rlkd.cli", "train-student", *flags,
                                   "--out", str(a.out / "plain")], a.out / "plain")
    fsdp = run("FSDP2", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                         "-m", "rlkd.cli", "train-student", *flags, "--strategy", "fsdp",
                         "--out", str(a.out / "fsdp")], a.out / "fsdp")
    worst = 0.0
    print(f"{'step':>4} {'plain total':>12} {'fsdp total':>12} {'rel diff':>9} {'plain s':>8} {'fsdp s':>8}")
    for p, f in zip(plain, fsdp):
        rel = abs(p["total"] - f["total"]) / max(abs(p["total"]), 1e-12)
        worst = max(worst, rel)
        print(f"{p['step']:>4} {p['total']:>12.5f} {f['total']:>12.5f} {rel:>9.2e} {p['step_time_s']:>8.3f} "
              f"{f['step_time_s']:>8.3f}")
    late = slice(len(plain) // 2, None)  # after warm-up

    def mean_time(rows):
        return sum(r["step_time_s"] for r in rows[late]) / len(rows[late])

    summary = {"device": a.device, "steps": a.steps, "max_rel_loss_diff": worst,
               "plain_step_s": mean_time(plain), "fsdp_step_s": mean_time(fsdp),
               "plain_peak_mem_gib": plain[-1].get("peak_mem_gib"), "fsdp_peak_mem_gib": fsdp[-1].get("peak_mem_gib"),
               "loss_first_last_plain": [plain[0]["total"], plain[-1]["total"]],
               "loss_first_last_fsdp": [fsdp[0]["total"], fsdp[-1]["total"]]}
    print(json.dumps(summary, indent=1))
    (a.out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
