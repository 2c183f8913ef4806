"""Does the RLKD ranking loss do what the paper says on a real teacher? Three arms, one student, one seed, one cache.

Same layer-pruned SmolLM2 student (``rlkd make-student``), same seed, same steps, same batches, on one cache of
databricks-dolly-15k ``train.jsonl`` rows (``rlkd cache-teacher``); arms differ only in the loss:

  (a) ``kl``       sparse forward KL only                       (--rank-weight 0)
  (b) ``rlkd``     KL + 2 x Rank, k_r = 5 (the paper's setting)  (--rank-weight 2 --rank-k 5)
  (c) ``dynamic``  (b) with the dynamic variant                  (--dynamic)

Each trained student (and the untrained one, as a floor) is measured on a cache of ``dev.jsonl`` rows with
``rlkd inspect --student --json`` (``rlkd.core.metrics``, as the trainer's evaluation: sparse KL, top-1 agreement,
CR@1/2/5, MOR@5/10, over response positions) and by ROUGE-L (``rouge-score``, F-measure, stemmed) of greedy generations for
the first ``--rouge-prompts`` dev prompts against the Dolly references.

The table goes to ``--out``/rlkd_vs_kl.json and into ``experiments/RESULTS.md`` (between markers, keeping the rest
of the file), beside the paper's Table 1 direction (Peng & Zhang 2024: CR@2 62.27 -> 69.08, MOR@10 75.19 -> 83.39).
Every step is skipped when its output exists, so an interrupted run continues.

Data: databricks-dolly-15k as ``--train``/``--dev`` jsonl files, or ``$RLKD_BENCH_DATA/{train,dev}.jsonl``.

    python experiments/rlkd_vs_kl.py --train-rows 1500 --dev-rows 300 --rouge-prompts 100 --steps 400  # ~30 min/arm
    python experiments/rlkd_vs_kl.py --train-rows 400 --dev-rows 100 --rouge-prompts 40 --steps 30      # reduced
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TEACHER = Path("~/.cache/rlkd/teachers/SmolLM2-135M-Instruct").expanduser()
DATA_ENV = "RLKD_BENCH_DATA"
"""Environment variable: a folder holding databricks-dolly-15k as train.jsonl and dev.jsonl."""
RESULTS = REPO / "experiments" / "RESULTS.md"
BEGIN, END = "<!-- rlkd_vs_kl:begin -->", "<!-- rlkd_vs_kl:end -->"

ARMS = {
    "kl": ("(a) sparse forward KL", ["--rank-weight", "0"]),
    "rlkd": ("(b) KL + 2·Rank, k_r=5", ["--rank-weight", "2", "--rank-k", "5"]),
    "dynamic": ("(c) dynamic KL + 2·Rank", ["--rank-weight", "2", "--rank-k", "5", "--dynamic"]),
}
COLUMNS = (("kd", "sparse KL ↓"), ("top1_agreement", "top-1 ↑"), ("cr@1", "CR@1 ↑"), ("cr@2", "CR@2 ↑"),
           ("cr@5", "CR@5 ↑"), ("mor@5", "MOR@5 ↑"), ("mor@10", "MOR@10 ↑"), ("rougeL", "ROUGE-L ↑"))


def rlkd(*args: str, capture: bool = False) -> str:
    print(f"$ rlkd {shlex.join(args)}", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "rlkd.cli", *args]
    if capture:
        return subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE).stdout
    subprocess.run(cmd, check=True)
    return ""


def head_jsonl(src: Path, n: int, dst: Path) -> Path:
    lines = [ln for ln in src.read_text().splitlines() if ln.strip()][:n]
    text = "\n".join(lines) + "\n"
    if not dst.exists() or dst.read_text() != text:
        dst.write_text(text)
    return dst


def cache_done(path: Path) -> bool:
    try:
        return bool(json.loads((path / "manifest.json").read_text()).get("complete"))
    except (OSError, ValueError):
        return False


def make_cache(args, data: Path, out: Path, engine: str) -> Path:
    if not cache_done(out):
        rlkd("cache-teacher", "--teacher", str(args.teacher), "--dataset", str(data), "--out", str(out),
             "--top-k", str(args.top_k), "--max-length", str(args.max_length), "--engine", engine,
             "--dtype", "float32", *(["--enforce-eager"] if engine == "vllm" else []))
    return out


def train_arm(args, arm: str, student0: Path, cache: Path) -> Path:
    out = args.out / f"arm-{arm}"
    final = out / "final"
    try:
        if json.loads((final / "rlkd_train.json").read_text())["step"] == args.steps:
            return final
    except (OSError, ValueError, KeyError):
        pass
    t0 = time.time()
    rlkd("train-student", "--student", str(student0), "--cache", str(cache), "--out", str(out),
         "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
         "--warmup-steps", str(max(1, args.steps // 10)), "--seed", str(args.seed), "--save-every",
         str(args.save_every), "--keep-last", "1", "--resume", "auto", *ARMS[arm][1])
    (out / "wall_seconds.txt").write_text(f"{time.time() - t0:.1f}\n")
    return final


def agreement(args, student: Path, dev_cache: Path, out_json: Path) -> dict:
    if not out_json.exists():
        extra = ["--sample", str(args.eval_positions)] if args.eval_positions else []
        out_json.write_text(rlkd("inspect", str(dev_cache), "--student", str(student), *extra, "--json",
                                 capture=True))
    return json.loads(out_json.read_text())["student"]


def dolly_prompt(row: dict) -> str:
    return row["instruction"] + (f"\n\n{row['context']}" if row.get("context") else "")


def rouge_l(args, student: Path, dev_rows: list[dict], out_json: Path) -> dict:
    """Greedy generations for the dev prompts, ROUGE-L F against the references (saved with the generations)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    if out_json.exists():  # reuse saved generations (a longer run's first N prompts are this run's N prompts)
        old = json.loads(out_json.read_text())
        if old["prompts"] >= args.rouge_prompts and old["max_new_tokens"] == args.max_new_tokens:
            gens = old["generations"][: args.rouge_prompts]
            scores = [scorer.score(g["reference"], g["generation"])["rougeL"].fmeasure for g in gens]
            return {**old, "rougeL": sum(scores) / max(len(scores), 1), "prompts": len(scores)}
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(student))
    tok.padding_side = "left"  # decoder-only batched generation
    model = AutoModelForCausalLM.from_pretrained(str(student), dtype=torch.float32).eval()
    gens, scores = [], []
    rows = dev_rows[: args.rouge_prompts]
    t0 = time.time()
    for i in range(0, len(rows), args.gen_batch):
        chunk = rows[i: i + args.gen_batch]
        texts = [tok.apply_chat_template([{"role": "user", "content": dolly_prompt(r)}], tokenize=False,
                                         add_generation_prompt=True) for r in chunk]
        enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=args.max_length,
                  add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        for r, ids in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
            text = tok.decode(ids, skip_special_tokens=True).strip()
            gens.append({"prompt": dolly_prompt(r), "reference": r["response"], "generation": text})
            scores.append(scorer.score(r["response"], text)["rougeL"].fmeasure)
        print(f"  ROUGE-L {student}: {len(gens)}/{len(rows)} prompts ({time.time() - t0:.0f} s)", file=sys.stderr,
              flush=True)
    res = {"rougeL": sum(scores) / max(len(scores), 1), "prompts": len(scores), "seconds": time.time() - t0,
           "max_new_tokens": args.max_new_tokens, "generations": gens}
    out_json.write_text(json.dumps(res, indent=1, ensure_ascii=False))
    return res


def fmt(v, key: str) -> str:
    if v is None:
        return "–"
    return f"{v:.3f}" if key == "kd" else f"{100 * v:.2f}"


def table(args, results: dict, meta: dict) -> str:
    lines = [
        "## RLKD vs KL on SmolLM2-135M-Instruct (experiments/rlkd_vs_kl.py)",
        "",
        f"Run {meta['finished']} on {meta['machine']}; this invocation took {meta['wall_min']:.1f} min (steps "
        "already done are reused). Student: teacher "
        f"layers `{args.layers}` ({meta['student_layers']} of {meta['teacher_layers']}), seed {args.seed}, "
        f"{args.steps} steps × {args.batch_size} rows, lr {args.lr} (cosine, {max(1, args.steps // 10)} warm-up), "
        f"max length {args.max_length}, cache k={args.top_k}. Train cache: first {args.train_rows} rows of "
        f"`train.jsonl` ({meta['train_rows_cached']} cached, {meta['train_positions']:,} positions); eval cache: "
        f"first {args.dev_rows} rows of `dev.jsonl` ({meta['dev_rows_cached']} cached); metrics over "
        f"{meta['eval_positions']:,} response positions ({'all' if not args.eval_positions else 'sampled rows'}); "
        f"ROUGE-L (rouge-score, F, stemmed) of greedy generations (≤ {args.max_new_tokens} new tokens) for the "
        f"first {args.rouge_prompts} dev prompts. Rates in %, KL in nats.",
        "",
        "| arm | " + " | ".join(c for _, c in COLUMNS) + " | train min (wall; load-dependent) |",
        "|---|" + "---:|" * (len(COLUMNS) + 1),
    ]
    for name, r in results.items():
        cells = [fmt(r.get(k), k) for k, _ in COLUMNS]
        wall = f"{r['train_seconds'] / 60:.1f}" if r.get("train_seconds") else "–"
        lines.append(f"| {r['label']} | " + " | ".join(cells) + f" | {wall} |")
    lines += [
        "| paper, Table 1 (KL → RLKD) | | | | 62.27 → 69.08 | | | 75.19 → 83.39 | | |",
        "",
    ]
    kl, rk = results.get("kl"), results.get("rlkd")
    if kl and rk:
        d2 = 100 * (rk["cr@2"] - kl["cr@2"])
        d10 = 100 * (rk["mor@10"] - kl["mor@10"])
        same = "the paper's direction" if d2 > 0 and d10 > 0 else (
            "against the paper's direction" if d2 < 0 and d10 < 0 else "mixed")
        lines.append(f"(b) − (a): CR@2 {d2:+.2f} points, MOR@10 {d10:+.2f} points ({same}; paper: +6.81, +8.20). "
                     f"{meta['caveat']}")
        lines.append("")
    return "\n".join(lines)


def write_results_section(text: str, path: Path = RESULTS) -> None:
    """Put ``text`` between the markers in RESULTS.md, keeping the rest of the file."""
    block = f"{BEGIN}\n{text}\n{END}\n"
    old = path.read_text() if path.exists() else "# rlkd experiments\n\n"
    if BEGIN in old and END in old:
        new = old[: old.index(BEGIN)] + block + old[old.index(END) + len(END):].lstrip("\n")
    else:
        new = old.rstrip("\n") + "\n\n" + block
    path.write_text(new)


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else the architecture."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def machine() -> str:
    import torch

    cpu = cpu_name()
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU {cpu} × {os.cpu_count()} cores"
    return f"{dev}, load {os.getloadavg()[0]:.1f} at start, torch {torch.__version__}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, default=DEFAULT_TEACHER, help="HF teacher folder [%(default)s]")
    ap.add_argument("--train", type=Path, default=None, help=f"Dolly train.jsonl [${DATA_ENV}/train.jsonl]")
    ap.add_argument("--dev", type=Path, default=None, help=f"Dolly dev.jsonl [${DATA_ENV}/dev.jsonl]")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "rlkd_vs_kl", help="work folder [%(default)s]")
    ap.add_argument("--train-rows", type=int, default=1500, help="first N train.jsonl rows cached [%(default)s]")
    ap.add_argument("--dev-rows", type=int, default=300, help="first N dev.jsonl rows cached [%(default)s]")
    ap.add_argument("--rouge-prompts", type=int, default=100, help="dev prompts generated for ROUGE-L [%(default)s]")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="greedy generation length [%(default)s]")
    ap.add_argument("--gen-batch", type=int, default=8, help="prompts per generate() call [%(default)s]")
    ap.add_argument("--eval-positions", type=int, default=None,
                    help="measure on whole random dev rows holding >= N positions [all]")
    ap.add_argument("--steps", type=int, default=400, help="optimizer steps per arm [%(default)s]")
    ap.add_argument("--batch-size", type=int, default=8, help="rows per step [%(default)s]")
    ap.add_argument("--lr", type=float, default=3e-4, help="peak learning rate [%(default)s]")
    ap.add_argument("--layers", default="0:10,-6:", help="teacher layers the student keeps [%(default)s]")
    ap.add_argument("--max-length", type=int, default=512, help="tokens per cached sequence [%(default)s]")
    ap.add_argument("--top-k", type=int, default=20, help="cache k [%(default)s]")
    ap.add_argument("--engine", default="vllm", choices=["vllm", "hf"], help="stage 1 engine [%(default)s]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-every", type=int, default=50, help="checkpoint interval, for resuming [%(default)s]")
    ap.add_argument("--arms", default="kl,rlkd,dynamic", help="comma-separated subset of " + ",".join(ARMS))
    ap.add_argument("--results", type=Path, default=RESULTS, help="Markdown file to write the table into")
    ap.add_argument("--caveat", default="", help="a sentence appended under the table (e.g. the run's size)")
    args = ap.parse_args(argv)
    for flag in ("train", "dev"):
        if getattr(args, flag) is None:
            if not os.environ.get(DATA_ENV):
                ap.error(f"--{flag} FILE.jsonl is required (databricks-dolly-15k), or set {DATA_ENV} to a folder "
                         "holding train.jsonl and dev.jsonl")
            setattr(args, flag, Path(os.environ[DATA_ENV]) / f"{flag}.jsonl")

    for var, value in (("VLLM_ENABLE_V1_MULTIPROCESSING", "0"), ("VLLM_CPU_KVCACHE_SPACE", "2"),
                       ("TOKENIZERS_PARALLELISM", "false"), ("HF_HUB_OFFLINE", "1"),
                       ("VLLM_CACHE_ROOT", str(Path("~/.cache/rlkd/vllm").expanduser()))):
        os.environ.setdefault(var, value)
    t_start = time.time()
    desc = machine()
    args.out.mkdir(parents=True, exist_ok=True)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        ap.error(f"--arms: unknown {unknown}; choose from {list(ARMS)}")
    for p in (args.teacher / "config.json", args.train, args.dev):
        if not p.exists():
            ap.error(f"{p} not found (teacher: `rlkd convert-teacher`; data: --train/--dev)")

    train_cache = make_cache(args, head_jsonl(args.train, args.train_rows, args.out / "train.jsonl"),
                             args.out / "cache-train", args.engine)
    dev_jsonl = head_jsonl(args.dev, args.dev_rows, args.out / "dev.jsonl")
    dev_cache = make_cache(args, dev_jsonl, args.out / "cache-dev", args.engine)
    student0 = args.out / "student-init"
    if not (student0 / "config.json").is_file():
        rlkd("make-student", "--from", str(args.teacher), "--layers", args.layers, "--out", str(student0))
    dev_rows = [json.loads(ln) for ln in dev_jsonl.read_text().splitlines() if ln.strip()]

    def manifest(p):
        return json.loads((p / "manifest.json").read_text())

    teacher_cfg = json.loads((args.teacher / "config.json").read_text())
    student_cfg = json.loads((student0 / "config.json").read_text())

    def publish(results: dict, done: bool) -> str:
        """Write the table so far (after every arm, so a cut-short run still leaves its figures)."""
        meta = {"machine": desc, "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "wall_min": (time.time() - t_start) / 60, "teacher_layers": teacher_cfg["num_hidden_layers"],
                "student_layers": student_cfg["num_hidden_layers"], "train_rows_cached": manifest(train_cache)["rows"],
                "train_positions": manifest(train_cache)["positions"], "dev_rows_cached": manifest(dev_cache)["rows"],
                "eval_positions": results["init"]["eval_positions"],
                "caveat": args.caveat + ("" if done else " (Partial: the run is still going or was cut short.)")}
        (args.out / "rlkd_vs_kl.json").write_text(json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()}, "meta": meta, "results": results, "complete": done},
            indent=1))
        text = table(args, results, meta)
        write_results_section(text, args.results)
        return text

    results: dict = {}
    todo = [("init", "untrained student", student0)] + [(a, ARMS[a][0], None) for a in arms]
    for i, (name, label, student) in enumerate(todo):
        if student is None:
            student = train_arm(args, name, student0, train_cache)
        r = {"label": label, "student": str(student)}
        ag = agreement(args, student, dev_cache, args.out / f"agreement-{name}.json")
        m = ag["metrics"].get("response") or ag["metrics"]["all"]
        r.update({k: m.get(k) for k, _ in COLUMNS if k != "rougeL"}, eval_positions=m["positions"])
        if args.rouge_prompts > 0:
            r["rougeL"] = rouge_l(args, student, dev_rows, args.out / f"rouge-{name}.json")["rougeL"]
        wall = args.out / f"arm-{name}" / "wall_seconds.txt"
        r["train_seconds"] = float(wall.read_text()) if wall.exists() else None
        results[name] = r
        print(json.dumps({k: v for k, v in r.items() if k != "student"}), file=sys.stderr, flush=True)
        text = publish(results, done=i == len(todo) - 1)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
