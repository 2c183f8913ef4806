"""Peak memory and time of one loss step (LM head + loss, forward and backward): naive full logits vs chunked.

Each variant runs in its own subprocess. The figure is the peak of live tensor bytes during the step above the inputs
(hidden states, LM-head weight, teacher targets), counted by ``stage2.LiveTensorBytes`` (CPU's counterpart of
``torch.cuda.max_memory_allocated``); the growth of the process's peak RSS is reported beside it, but glibc keeps
freed heap, so it varies from run to run. CPU only, float32. Memory figures are exact: no rounds, no interval.

    python bench/loss_memory.py --positions 4096 --vocab 49152 --hidden 576 --chunk-size 256 [--json out.json]
    python bench/loss_memory.py --smoke      # tiny sizes, every variant in this process: a check, seconds
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

SMOKE = {"positions": 64, "vocab": 512, "hidden": 32, "k": 8, "chunk_size": 16}
"""--smoke sizes."""
VARIANTS = ("naive_ce", "chunked_ce", "chunked_ce_eager", "naive_kd_rank", "chunked_kd_rank", "chunked_kd_rank_eager")


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_one(variant: str, n: int, vocab: int, hid: int, k: int, chunk: int) -> dict:
    import torch
    import torch.nn.functional as F

    from rlkd.trainer.chunked import chunked_distill_loss
    from rlkd.core.targets import TeacherTargets
    from rlkd.trainer.config import LossConfig
    from rlkd.trainer.losses import DistillLoss
    from stage2 import LiveTensorBytes  # bench/ is this script's directory, first on sys.path

    torch.manual_seed(0)
    h = torch.randn(n, hid).requires_grad_()
    w = (torch.randn(vocab, hid) * 0.02).requires_grad_()
    a = torch.log_softmax(torch.randn(n, k) * 2, dim=-1) - 0.1  # top-k holds ~90% of the mass
    a = a.sort(dim=-1, descending=True).values
    tg = TeacherTargets(torch.randint(0, vocab, (n, k)), a, torch.ones(n, k, dtype=torch.bool),
                        torch.log1p(-a.exp().sum(-1)), torch.randint(0, vocab, (n,)))
    if "_ce" in variant:
        loss = DistillLoss(LossConfig(kd="none", rank_weight=0.0, ce_weight=1.0))
    else:
        loss = DistillLoss(LossConfig())  # forward KL with tail bucket + 2 * rank, k_r = 5
    meter = LiveTensorBytes()
    meter.track(h, w, *(v for v in vars(tg).values() if torch.is_tensor(v)))
    inputs = meter.current
    before = _maxrss_mb()
    t0 = time.perf_counter()
    with meter.mode:
        if variant == "naive_ce":
            F.cross_entropy(h @ w.t(), tg.target_ids, reduction="sum").backward()
        elif variant.startswith("naive"):
            loss(h @ w.t(), tg)["total"].sum().backward()
        else:
            eager = variant.endswith("_eager")  # gradient computed during forward, no recomputation
            chunked_distill_loss(h, w, tg, loss, chunk_size=chunk, grad_in_forward=eager)["total"].backward()
    seconds = time.perf_counter() - t0
    return {"variant": variant, "peak_growth_mb": round((meter.peak - inputs) / 2**20, 1),
            "peak_op": meter.peak_op, "rss_growth_mb": round(_maxrss_mb() - before, 1),
            "seconds": round(seconds, 2), "inputs_mb": round(inputs / 2**20, 1)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--positions", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--json", type=Path, default=None, help="also write the summary to this file")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes, every variant in this process (its RSS figures then mean nothing)")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    if args.variant:
        res = run_one(args.variant, args.positions, args.vocab, args.hidden, args.k, args.chunk_size)
        print(json.dumps(res))
        return res
    results = []
    for variant in VARIANTS:
        if args.smoke:
            results.append(run_one(variant, args.positions, args.vocab, args.hidden, args.k, args.chunk_size))
        else:  # one subprocess each: no variant inherits another's heap
            cmd = [sys.executable, __file__, "--variant", variant, "--positions", str(args.positions), "--vocab",
                   str(args.vocab), "--hidden", str(args.hidden), "--k", str(args.k), "--chunk-size",
                   str(args.chunk_size)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    by = {r["variant"]: r for r in results}
    summary = {
        "config": {k: v for k, v in vars(args).items() if k not in ("variant", "json")},
        "variants": by,
        "chunked_kd_rank / naive_kd_rank": round(by["chunked_kd_rank"]["peak_growth_mb"]
                                                 / by["naive_kd_rank"]["peak_growth_mb"], 3),
        "chunked_kd_rank / chunked_ce": round(by["chunked_kd_rank"]["peak_growth_mb"]
                                              / by["chunked_ce"]["peak_growth_mb"], 3),
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "variants"}))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main()
