"""Stage 1 throughput: where does `rlkd cache-teacher` stand against vLLM itself and against the FLOP ceiling?

One process, one model, one data set, one machine. Prints tokens/s for

  (a) vLLM prefill only (max_tokens=1, no prompt_logprobs): the LM head runs for the last position only;
  (b) vLLM's stock prompt_logprobs=k path, generate() alone;
  (c) rlkd cache-teacher end to end with the same engine: formatting, engine, row building, encoding, shards;
  (d) the HF engine (transformers forward, log_softmax, top-k, ranks);

(a), (b) and (c) are timed in ``--repeats`` rounds, each running all three once in an order rotated every round.
Then it prints the ratios c/b (our own overhead; goal >= 0.95) and c / (a * F_last/F_all) (the FLOP ceiling; goal
>= 0.90), where F_last/F_all is FLOPs per token with the LM head once per sequence over FLOPs with it at every
position, from the model config (rlkd.pipeline.engines.lm_head_flop_fraction). Each ratio is the geometric mean
of its per-round ratios (the sides of a ratio run seconds apart in the same round, so slow changes of the machine's
load cancel) with its 95% interval over the rounds (``bench/_common.py``); a goal is met only when the whole
interval is inside it.
Wall-clock time: vLLM's engine threads do the work, and the figure is what a user waits for.

    OMP_NUM_THREADS=2 python bench/stage1.py --data dev.jsonl     # SmolLM2-135M-Instruct, 200 Dolly dev rows
    python bench/stage1.py --teacher PATH --rows 50 --profile     # plus a cProfile of the stock path
    python bench/stage1.py --smoke                                # the tests' tiny teacher: a check, not a figure

The default teacher is made by `rlkd convert-teacher`; the data is databricks-dolly-15k dev.jsonl (``--data``, or
``$RLKD_BENCH_DATA/dev.jsonl``).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import tempfile
import time
from pathlib import Path

from _common import data_file, default_teacher, dolly_sample, format_interval, ratio_interval, smoke_teacher

SMOKE = {"rows": 6, "max_length": 256, "batch_size": 8, "repeats": 2, "hf_rows": 2, "enforce_eager": True}
"""--smoke sizes (the tiny teacher; vLLM without torch.compile)."""


def _env(tmp: str) -> None:
    # vLLM's CPU backend reads these at import time.
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    # A lasting cache root: vLLM's torch.compile artifacts are reused by the next run (minutes on a small CPU).
    os.environ.setdefault("VLLM_CACHE_ROOT", str(Path("~/.cache/rlkd/vllm-bench").expanduser()))


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv=None, llm=None) -> dict:
    """Run the benchmark; ``llm``: a ready ``vllm.LLM`` of the same teacher (the tests' shared engine), else one is
    started here."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default=None, help="HF model folder [rlkd convert-teacher's]")
    ap.add_argument("--data", type=Path, default=None, help="Dolly-shaped jsonl [$RLKD_BENCH_DATA/dev.jsonl]")
    ap.add_argument("--rows", type=int, default=200, help="source rows to use [%(default)s]")
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--dtype", default="float32",
                    help="teacher dtype for every path [%(default)s: CPUs without bf16 matmuls fall back to slow "
                         "kernels in bfloat16]")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=64, help="cache-teacher sequences per engine call")
    ap.add_argument("--codec", default="q8")
    ap.add_argument("--skip-hf", action="store_true", help="skip (d)")
    ap.add_argument("--hf-rows", type=int, default=None,
                    help="(d) on the first N sequences only (it is the slow reference) [all]")
    ap.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile (faster start)")
    ap.add_argument("--repeats", type=int, default=5,
                    help="rounds of (a), (b), (c); the ratios' intervals are over them [%(default)s]")
    ap.add_argument("--profile", action="store_true", help="cProfile the stock prompt_logprobs path (b) once more")
    ap.add_argument("--json", dest="json_out", help="also write the figures to this JSON file")
    ap.add_argument("--smoke", action="store_true",
                    help="the tests' tiny teacher and the packaged Dolly sample, a few rows: a check, seconds")
    args = ap.parse_args(argv)

    tmp = tempfile.mkdtemp(prefix="rlkd-bench-stage1-")
    _env(tmp)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
        teacher = Path(args.teacher) if args.teacher else smoke_teacher(Path(tmp))
        args.data = args.data or dolly_sample()
    else:
        teacher = Path(args.teacher).expanduser() if args.teacher else default_teacher()
        if not (teacher / "config.json").is_file():
            ap.error(f"--teacher: no model at {teacher}; run `rlkd convert-teacher` first, or pass --teacher PATH")
        args.data = data_file(args.data, "dev.jsonl", ap)

    from transformers import AutoConfig, AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from rlkd.config import build_config
    from rlkd.pipeline.config import CacheTeacherConfig
    from rlkd.pipeline.data import iter_examples, load_source
    from rlkd.pipeline.engines import HFEngine, VLLMEngine, lm_head_flop_fraction
    from rlkd.pipeline.run import cache_teacher
    from rlkd.pipeline.stats import format_summary

    def cfg_for(out: str) -> CacheTeacherConfig:
        return build_config(CacheTeacherConfig, {
            "teacher": str(teacher), "dataset": str(args.data), "out": out, "limit": args.rows, "top_k": args.top_k,
            "dtype": args.dtype, "max_length": args.max_length, "batch_size": args.batch_size, "codec": args.codec,
        })

    # The exact sequences (c) will score, so (a), (b) and (d) see the same tokens.
    cfg = cfg_for(os.path.join(tmp, "unused"))
    tokenizer = AutoTokenizer.from_pretrained(str(teacher))
    examples = list(iter_examples(cfg, load_source(cfg), tokenizer))
    seqs = [ex.input_ids for ex in examples]
    tokens = int(sum(len(s) for s in seqs))
    prompts = [TokensPrompt(prompt_token_ids=s.tolist()) for s in seqs]
    model_cfg = AutoConfig.from_pretrained(str(teacher))
    frac = lm_head_flop_fraction(model_cfg)
    print(f"teacher {teacher.name} ({args.dtype}), {len(seqs)} sequences, {tokens:,} tokens "
          f"(mean {tokens / len(seqs):.0f}), k={args.top_k}, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, "
          f"F_last/F_all={frac:.3f}", flush=True)

    if llm is None:
        from vllm import LLM

        # Built here rather than by VLLMEngine only to turn prefix caching off: (a) would otherwise skip the shared
        # chat prefix (and the warm-up's prompts) while prompt_logprobs requests must compute every position, which
        # would flatter the ceiling. Everything else is what VLLMEngine sets.
        llm, t_start = _timed(lambda: LLM(
            model=str(teacher), max_logprobs=args.top_k, logprobs_mode="raw_logprobs", skip_tokenizer_init=True,
            dtype=args.dtype, max_model_len=args.max_length, enforce_eager=args.enforce_eager,
            enable_prefix_caching=False, seed=0))
        print(f"vLLM engine start: {t_start:.1f} s", flush=True)
    engine = VLLMEngine(llm=llm, k=args.top_k)
    prefill = SamplingParams(max_tokens=1, detokenize=False)
    stock = SamplingParams(max_tokens=1, prompt_logprobs=args.top_k, detokenize=False, flat_logprobs=True)
    # Warm-up: compile / allocate for both paths on a few short prompts.
    llm.generate(prompts[:4], prefill, use_tqdm=False)
    llm.generate(prompts[:4], stock, use_tqdm=False)

    res: dict = {"teacher": str(teacher), "dtype": args.dtype, "rows": len(seqs), "tokens": tokens,
                 "top_k": args.top_k, "f_last_over_f_all": frac, "threads": os.environ["OMP_NUM_THREADS"]}
    samples: dict[str, list[float]] = {"a": [], "b": [], "c": []}
    summaries = []
    labels = {"a": "prefill only         ", "b": "stock prompt_logprobs", "c": "rlkd cache-teacher   "}

    def run_c(r: int) -> None:
        summaries.append(cache_teacher(cfg_for(os.path.join(tmp, f"cache-{r}")), engine=engine, progress=False))
        assert summaries[-1]["tokens"] == tokens, (summaries[-1]["tokens"], tokens)

    paths = {"a": lambda r: llm.generate(prompts, prefill, use_tqdm=False),
             "b": lambda r: llm.generate(prompts, stock, use_tqdm=False), "c": run_c}
    for r in range(args.repeats):
        for x in "abc"[r % 3:] + "abc"[:r % 3]:  # the order rotates every round
            _, t = _timed(lambda: paths[x](r))
            samples[x].append(t)
            print(f"[{r + 1}/{args.repeats}] ({x}) {labels[x]} {tokens / t:9,.0f} tok/s  ({t:.1f} s)", flush=True)
    t_a, t_b, t_c = (statistics.median(samples[x]) for x in "abc")
    summary = summaries[samples["c"].index(min(samples["c"]))]  # the quickest (c): its own breakdown
    res["samples_s"] = samples
    res["a_prefill_tok_s"] = tokens / t_a
    res["b_stock_tok_s"] = tokens / t_b
    res["c_cache_teacher_tok_s"] = tokens / t_c
    res["c_engine_s"] = summary["engine_seconds"]
    # The scoring loop alone (formatting, engine, rows, encoding, writing), without the one-time set-up (tokenizer
    # and dataset loading, identity hashing, opening the cache), which a real run amortises over many rows.
    res["c_loop_tok_s"] = tokens / summary["loop_seconds"]
    res["c_setup_s"] = min(samples["c"]) - summary["loop_seconds"]
    res["c_bytes_per_token"] = summary["bytes_per_token"]
    print(f"median of {args.repeats} rounds:", flush=True)
    print(f"(a) prefill only          {res['a_prefill_tok_s']:9,.0f} tok/s  ({t_a:.1f} s)", flush=True)
    print(f"(b) stock prompt_logprobs {res['b_stock_tok_s']:9,.0f} tok/s  ({t_b:.1f} s)", flush=True)
    print(f"(c) rlkd cache-teacher    {res['c_cache_teacher_tok_s']:9,.0f} tok/s  ({t_c:.1f} s; quickest round: "
          f"engine.score {summary['engine_seconds']:.1f} s, {summary['bytes_per_token']:.1f} bytes/token)",
          flush=True)
    print(f"(c') its scoring loop     {res['c_loop_tok_s']:9,.0f} tok/s  (quickest round, one-time set-up "
          f"{res['c_setup_s']:.1f} s excluded)", flush=True)
    if not args.skip_hf:
        hf = HFEngine(teacher, k=args.top_k, dtype=args.dtype, device="cpu")
        hf.score(seqs[:2])  # warm-up
        sub = seqs[: args.hf_rows] if args.hf_rows else seqs
        sub_tokens = int(sum(len(s) for s in sub))
        _, t_d = _timed(lambda: hf.score(sub))
        res["d_hf_tok_s"] = sub_tokens / t_d
        print(f"(d) HF engine             {res['d_hf_tok_s']:9,.0f} tok/s  ({t_d:.1f} s, {len(sub)} sequences, "
              f"{sub_tokens:,} tokens)", flush=True)
        del hf

    ceiling = res["a_prefill_tok_s"] * frac
    res["ceiling_tok_s"] = ceiling
    # Rates over rates of one round: c/b = t_b / t_c; c / (a x frac) = t_a / (t_c x frac).
    res["b_over_a"] = ratio_interval(samples["a"], samples["b"])
    res["c_over_b"] = ratio_interval(samples["b"], samples["c"])
    res["b_over_ceiling"] = ratio_interval(samples["a"], samples["b"], scale=1 / frac)
    res["c_over_ceiling"] = ratio_interval(samples["a"], samples["c"], scale=1 / frac)
    res["c_loop_over_b"] = res["c_loop_tok_s"] / res["b_stock_tok_s"]
    print(f"ratios, geometric mean of the per-round ratios [95% interval]:\n"
          f"  b/a       = {format_interval(res['b_over_a'])}\n"
          f"  c/b       = {format_interval(res['c_over_b'])}   (goal >= 0.95; loop only {res['c_loop_over_b']:.3f})\n"
          f"  b/ceiling = {format_interval(res['b_over_ceiling'])}\n"
          f"  c/ceiling = {format_interval(res['c_over_ceiling'])}   (goal >= 0.90; ceiling = a x {frac:.3f} = "
          f"{ceiling:,.0f} tok/s)", flush=True)
    print(format_summary(summary))

    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        llm.generate(prompts, stock, use_tqdm=False)
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
        print("---- cProfile of (b), by own time ----\n" + s.getvalue())
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
