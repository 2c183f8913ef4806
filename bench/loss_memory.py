"""Peak memory and time of one loss step (LM head + loss, forward and backward): naive full logits vs chunked.

Each variant runs in its own subprocess. The figure is the peak of live tensor bytes during the step above the inputs
(hidden states, LM-head weight, teacher targets), counted by ``stage2.LiveTensorBytes`` (CPU's counterpart of
``torch.cuda.max_memory_allocated``); the growth of the process's peak RSS is reported beside it, but glibc keeps
freed heap, so it varies from run to run. CPU only, float32.

    python bench/loss_memory.py --positions 4096 --vocab 49152 --hidden 576 --chunk-size 256
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--positions", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_one(args.variant, args.positions, args.vocab, args.hidden, args.k, args.chunk_size)))
        return
    results = []
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant, "--positions", str(args.positions), "--vocab",
               str(args.vocab), "--hidden", str(args.hidden), "--k", str(args.k), "--chunk-size", str(args.chunk_size)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    by = {r["variant"]: r for r in results}
    print(json.dumps({
        "config": vars(args) | {"variant": None},
        "chunked_kd_rank / naive_kd_rank": round(by["chunked_kd_rank"]["peak_growth_mb"]
                                                 / by["naive_kd_rank"]["peak_growth_mb"], 3),
        "chunked_kd_rank / chunked_ce": round(by["chunked_kd_rank"]["peak_growth_mb"]
                                              / by["chunked_ce"]["peak_growth_mb"], 3),
        "chunked_kd_rank / naive_ce (time)": round(by["chunked_kd_rank"]["seconds"] / by["naive_ce"]["seconds"], 3),
    }))


if __name__ == "__main__":
    main()
