"""`make bench`: run every benchmark on the real teacher and write bench/RESULTS.md.

Each benchmark is one of the scripts beside this one, run as a subprocess with its real-teacher arguments
(SmolLM2-135M-Instruct from `rlkd convert-teacher`, databricks-dolly-15k from `--data DIR` or `$RLKD_BENCH_DATA`: a
folder holding train.jsonl and dev.jsonl). Each script writes its results to a JSON file (`--json`), which this one
reads. Each figure is a ratio its script measured side by side in one run (same machine, same data, same moment). A
timed ratio comes with its 95% interval over the script's rounds, and its goal is met only when the whole interval is
inside the goal ("unresolved" when the interval straddles it). A benchmark that fails or times out gets a row saying
so; the others still run.

    python bench/run_all.py --data DIR          # full sizes (an hour or more on 2 CPU cores)
    python bench/run_all.py --data DIR --quick  # small sizes, minutes; figures are noisy
    python bench/run_all.py --data DIR --only stage2,loss_memory   # re-run two; keep the others' figures
    python bench/run_all.py --smoke             # every bench's --smoke run: tiny models, no data; checks only

The RLKD-vs-KL experiment is not a benchmark: experiments/rlkd_vs_kl.py writes experiments/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
sys.path.insert(0, str(BENCH))

from _common import DATA_ENV, default_teacher  # noqa: E402


@dataclass
class Figure:
    """One row of the table: a ratio pulled out of a benchmark's JSON, and its goal."""

    name: str
    get: Callable[[dict], float | dict]
    """The figure from the bench's JSON: a number, or a timed ratio ``{"value", "lo", "hi", "rounds"}`` (see
    ``bench/_common.py``)."""
    goal: str
    """Shown as is, e.g. "≤ 1.10"."""
    bound: tuple[str, float] | None = None
    """("<=", x) or (">=", x): the goal; None: reported without pass/fail."""
    fmt: str = "{:.3f}"


@dataclass
class Bench:
    name: str
    script: str
    args: Callable[[argparse.Namespace, Path], list[str]]
    """Command-line arguments of a full (or ``--quick``) run, given the options and this bench's work folder;
    ``--json`` (and ``--smoke``) are added by :func:`run_bench`."""
    figures: list[Figure]
    smoke_args: Callable[[Path], list[str]] = lambda work: []
    """Extra arguments of a ``--smoke`` run (work folders)."""
    timeout_s: int = 3600


def le(x: float) -> tuple[str, float]:
    return ("<=", x)


def ge(x: float) -> tuple[str, float]:
    return (">=", x)


def judge(lo: float, hi: float, bound: tuple[str, float]) -> str:
    """pass when the whole interval [lo, hi] meets the goal, FAIL when none of it does, else unresolved."""
    op, x = bound
    if op == "<=":
        return "pass" if hi <= x else ("FAIL" if lo > x else "unresolved")
    return "pass" if lo >= x else ("FAIL" if hi < x else "unresolved")


def _codec(res: dict, k: int, codec: str = "q8") -> dict:
    return next(r for r in res["fixed"] if r["k"] == k and r["codec"] == codec)


def _adaptive(res: dict, min_prob: float) -> dict:
    return next(r for r in res["adaptive"] if abs(r["min_prob"] - min_prob) < 1e-12)


def _mem(res: dict, run: str, key: str) -> float:
    """A live-tensor-bytes ratio of one memory configuration of bench/stage2.py."""
    return res["memory"]["runs"][run][f"tensors_{key}"]


def _data(a: argparse.Namespace, name: str) -> str:
    return str(a.data / name)


def _trainer_rate(stage2_work: Path) -> list[str]:
    """``--trainer-positions-per-s`` from this run's stage2 result, when there is one (the remote read bench compares
    the reader with what the trainer consumes)."""
    try:
        rate = json.loads((stage2_work / "stage2.json").read_text())["steps"]["trainer_positions_per_s"]
    except (OSError, KeyError, ValueError):
        return []
    return ["--trainer-positions-per-s", str(rate)]


BENCHES = [
    Bench("cache", "cache_codec.py",
          lambda a, w: ["--teacher", str(a.teacher), "--dolly", _data(a, "dev.jsonl"),
                        "--rows", "30" if a.quick else "200", "--ks", "20,64"],
          [Figure("bytes/token ÷ order-0 entropy floor, k=20 (q8)", lambda r: _codec(r, 20)["ratio"], "≤ 1.05",
                  le(1.05)),
           Figure("bytes/token ÷ order-0 entropy floor, k=64 (q8)", lambda r: _codec(r, 64)["ratio"], "≤ 1.05",
                  le(1.05)),
           Figure("adaptive k=128, min_prob=1e-4: bytes/position", lambda r: _adaptive(r, 1e-4)["B_per_pos"],
                  "≤ 122", le(122), fmt="{:.1f}"),
           Figure("adaptive k=128, min_prob=1e-4: its own order-0 floor, bytes/position",
                  lambda r: _adaptive(r, 1e-4)["floor_B_per_pos"], "(info)", fmt="{:.1f}"),
           Figure("adaptive k=128, min_prob=1e-4: KL error (nats)", lambda r: _adaptive(r, 1e-4)["kl"], "(info)",
                  fmt="{:.2e}"),
           Figure("bytes/position, k=20 (q8)", lambda r: _codec(r, 20)["B_per_pos"], "(info)", fmt="{:.1f}"),
           Figure("codec KL error, k=20 (q8 vs exact, nats)", lambda r: _codec(r, 20)["kl"], "(info)", fmt="{:.2e}"),
           Figure("codec KL error, k=64 (q8 vs exact, nats)", lambda r: _codec(r, 64)["kl"], "(info)",
                  fmt="{:.2e}")]),
    Bench("stage1", "stage1.py",
          lambda a, w: ["--teacher", str(a.teacher), "--data", _data(a, "dev.jsonl"),
                        "--rows", "24" if a.quick else "200"] + (["--skip-hf", "--repeats", "3"] if a.quick
                                                                 else ["--hf-rows", "40"]),
          [Figure("rlkd cache-teacher ÷ vLLM stock prompt_logprobs", lambda r: r["c_over_b"], "≥ 0.95", ge(0.95)),
           Figure("rlkd cache-teacher ÷ FLOP ceiling (prefill-only × F_last/F_all)",
                  lambda r: r["c_over_ceiling"], "≥ 0.90", ge(0.90)),
           Figure("rlkd cache-teacher tokens/s (info)", lambda r: r["c_cache_teacher_tok_s"], "(info)",
                  fmt="{:,.0f}")]),
    Bench("stage2", "stage2.py",
          lambda a, w: ["--teacher", str(a.teacher), "--data", _data(a, "train.jsonl"), "--out", str(w)]
          + (["--rows", "8", "--steps", "6", "--mem-seq-len", "2048"] if a.quick else []),
          [Figure("offline KD+rank step ÷ CE-only step (chunked)", lambda r: r["steps"]["kd_rank_over_ce_chunked"],
                  "≤ 1.05", le(1.05)),
           Figure("offline KD+rank step ÷ CE step (HF full logits)", lambda r: r["steps"]["kd_rank_over_ce_hf"],
                  "≤ 1.05", le(1.05)),
           Figure("offline KD+rank step ÷ online-KD step", lambda r: r["steps"]["kd_rank_over_online_kd"], "≤ 0.55",
                  le(0.55)),
           Figure("ranking-loss overhead (KD+rank ÷ KD − 1)", lambda r: r["steps"]["rank_overhead"], "≤ 3%",
                  le(0.03), fmt="{:+.1%}"),
           Figure("chunked ÷ naive peak memory, one step, T=4096 (gradient checkpointing in both arms)",
                  lambda r: _mem(r, "gradient_checkpointing", "chunked_over_naive"), "≤ 0.5", le(0.5)),
           Figure("chunked ÷ naive peak memory, one step, T=4096 (no checkpointing: layer activations dominate)",
                  lambda r: _mem(r, "no_checkpointing", "chunked_over_naive"), "(info)"),
           Figure("chunked KD+rank ÷ chunked CE-only peak memory (worse of the two)",
                  lambda r: r["memory"]["chunked_over_chunked_ce"], "≤ 1.2", le(1.2)),
           Figure("cache reader ÷ trainer rate (positions/s)", lambda r: r["steps"]["reader_over_trainer"], "≥ 20×",
                  ge(20), fmt="{:,.0f}×")],
          smoke_args=lambda w: ["--out", str(w)]),
    Bench("loss_memory", "loss_memory.py",
          lambda a, w: ["--positions", "2048" if a.quick else "4096"],
          [Figure("chunked ÷ naive KD+rank loss peak memory (LM head + loss only)",
                  lambda r: r["chunked_kd_rank / naive_kd_rank"], "≤ 0.5", le(0.5)),
           Figure("chunked KD+rank ÷ chunked CE peak memory (LM head + loss only)",
                  lambda r: r["chunked_kd_rank / chunked_ce"], "≤ 1.2", le(1.2))]),
    Bench("remote_read", "remote_read.py",
          lambda a, w: ["--dolly", "60" if a.quick else "800", "--teacher", str(a.teacher), "--data",
                        _data(a, "train.jsonl"), "--shard-mb", "2", "--row-group-rows", "32",
                        "--rounds", "2" if a.quick else "5", "--dir", str(w)] + _trainer_rate(w.parent / "stage2"),
          [Figure("remote (local S3 server) ÷ local reader positions/s, prefetch 4",
                  lambda r: r["remote_over_local"], "≥ 0.8", ge(0.8)),
           Figure("remote reader ÷ trainer rate (positions/s)", lambda r: r["remote_over_trainer"], "≥ 20×",
                  ge(20), fmt="{:,.0f}×"),
           Figure("bytes downloaded in epoch 1 ÷ cache size (ranged reads)",
                  lambda r: r["epoch1_bytes_over_cache"], "≈ 1 (≤ 1.1)", le(1.1)),
           Figure("bytes downloaded in epoch 2 with --local-cache ÷ cache size",
                  lambda r: r["epoch2_cached_bytes_over_cache"], "≈ 0 (≤ 0.01)", le(0.01))],
          # a nominal trainer rate: the smoke run checks the plumbing of every figure, not its value
          smoke_args=lambda w: ["--dir", str(w), "--trainer-positions-per-s", "1000"]),
    Bench("inspect", "inspect_speed.py",
          lambda a, w: ["--positions", "100000" if a.quick else "1000000", "--dir", str(w)],
          [Figure("inspect summary time ÷ cache read time (1M positions)", lambda r: r["summary_over_read_time"],
                  "≤ 1.0", le(1.0)),
           Figure("inspect statistics ÷ cache read rate", lambda r: r["stats_positions_per_s"]
                  / r["read_positions_per_s"], "(info)", fmt="{:.1f}×")],
          smoke_args=lambda w: ["--dir", str(w)]),
]


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def machine() -> dict:
    cpu = cpu_name()
    mem = None
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f"{kb / 2**20:.0f} GiB"
    except (OSError, AttributeError):
        pass
    versions = {}
    for mod in ("torch", "vllm", "transformers", "pyarrow"):
        try:
            out = subprocess.run([sys.executable, "-c", f"import {mod}; print({mod}.__version__)"],
                                 capture_output=True, text=True, timeout=120)
            versions[mod] = out.stdout.strip() or "not importable"
        except (OSError, subprocess.TimeoutExpired):
            versions[mod] = "?"
    gpu = None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        gpu = out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory": mem, "gpu": gpu, "python": platform.python_version(),
            "versions": versions, "load_at_start": os.getloadavg(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def run_bench(b: Bench, a: argparse.Namespace, root: Path) -> dict:
    work = root / b.name
    work.mkdir(parents=True, exist_ok=True)
    results = work / f"{b.name}.json"
    args = (["--smoke", *b.smoke_args(work)] if a.smoke else b.args(a, work)) + ["--json", str(results)]
    cmd = [sys.executable, str(BENCH / b.script), *args]
    command = shlex.join(["python", "bench/" + b.script, *args])
    log = root / f"{b.name}.log"
    print(f"\n== {b.name}: {command}", flush=True)
    t0 = time.time()
    rec: dict = {"name": b.name, "command": command, "log": str(log)}
    if a.rerender:  # read the outputs of the last run again, run nothing
        try:
            rec["seconds"] = None
            rec["result"] = json.loads(results.read_text())
        except Exception as e:  # noqa: BLE001
            rec["error"] = f"results unreadable: {type(e).__name__}: {e}"[:240]
        return rec
    results.unlink(missing_ok=True)  # a failed run must not leave the last run's figures behind
    try:
        proc = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True, timeout=a.timeout or b.timeout_s)
        log.write_text(f"$ {command}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
        rec["seconds"] = time.time() - t0
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
            rec["error"] = f"exit {proc.returncode}: {tail[0][:200]}"
            return rec
        rec["result"] = json.loads(results.read_text())
    except subprocess.TimeoutExpired as e:
        log.write_text(f"$ {command}\n--- timed out after {e.timeout} s\n{e.stdout or ''}\n{e.stderr or ''}")
        rec.update(seconds=time.time() - t0, error=f"timed out after {e.timeout:.0f} s")
        return rec
    except Exception as e:  # a missing/malformed results file: say so in the table, run the next bench
        rec.update(seconds=time.time() - t0, error=f"results unreadable: {type(e).__name__}: {e}"[:240])
        return rec
    print(f"   done in {rec['seconds']:.0f} s", flush=True)
    return rec


def figure_row(b: Bench, f: Figure, result: dict) -> dict:
    """One table row: the value (with its 95% interval for a timed ratio) and the verdict."""
    row = {"bench": b.name, "figure": f.name, "goal": f.goal}
    try:
        v = f.get(result)
        if isinstance(v, dict):  # a timed ratio: judged on its interval
            row.update(value=v["value"], lo=v["lo"], hi=v["hi"], rounds=v["rounds"])
            lo, hi = v["lo"], v["hi"]
            bounds = "[" + ", ".join("∞" if math.isinf(x) else f.fmt.format(x) for x in (lo, hi)) + "]"
            row["shown"] = f"{f.fmt.format(v['value'])} {bounds} (n={v['rounds']})"
        else:
            row["value"] = lo = hi = v
            row["shown"] = f.fmt.format(v)
        row["status"] = judge(lo, hi, f.bound) if f.bound else "–"
    except Exception as e:  # noqa: BLE001 - a figure missing from the JSON is a row, not a crash
        row.update(value=None, status=f"not measured: {type(e).__name__}: {e}"[:160])
    return row


def figures_of(b: Bench, rec: dict) -> list[dict]:
    if "error" in rec:  # one row for the whole bench
        return [{"bench": b.name, "figure": f"{len(b.figures)} figures: " + "; ".join(f.name for f in b.figures),
                 "goal": ", ".join(f.goal for f in b.figures if f.bound), "value": None,
                 "status": f"not measured: {rec['error']}", "missing": len([f for f in b.figures if f.bound])}]
    return [figure_row(b, f, rec["result"]) for f in b.figures]


def render(m: dict, runs: list[dict], rows: list[dict], a: argparse.Namespace, started: str, wall: float,
           kept_from: list[str] | None = None) -> str:
    v = m["versions"]
    load = ", ".join(f"{x:.1f}" for x in m["load_at_start"])
    flag = " --smoke" if a.smoke else (" --quick" if a.quick else "")
    note = {" --smoke": " **Smoke mode: tiny models, a check that every bench runs; the figures mean nothing.**",
            " --quick": " **Quick mode: small sizes, a smoke run; figures are noisy.**"}.get(flag, "")
    lines = [
        "# rlkd benchmark results",
        "",
        f"Written by `python bench/run_all.py{flag}` (`make bench`), started {started}, {wall / 60:.1f} min in all."
        + note,
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['memory']} RAM" + (f", GPU {m['gpu']}" if m["gpu"] else
                                                                              ", no GPU"),
        f"- Software: Python {m['python']}, torch {v.get('torch')}, vLLM {v.get('vllm')}, transformers "
        f"{v.get('transformers')}, pyarrow {v.get('pyarrow')}; OMP_NUM_THREADS={m['omp_num_threads']}",
        f"- Load average at start (1/5/15 min): {load}. The machine may be shared: each figure is a ratio of two "
        "measurements taken side by side in one run, which load affects alike; absolute rates are not comparable "
        "across runs.",
        "- A timed ratio is shown as the geometric mean of its per-round ratios, its 95% interval and its rounds "
        "(`bench/_common.py`); its goal is met only when the whole interval meets it, and is *unresolved* when the "
        "interval straddles the goal. Byte and memory ratios are exact and have no interval.",
        f"- Teacher: `{a.teacher}`; data: `{a.data}`." if not a.smoke else
        "- Teacher: the tests' tiny random Llama; data: the packaged Dolly sample.",
        *([f"- This run re-ran only `--only {a.only}`; the other benches' figures are kept from the run(s) started "
           f"{', '.join(kept_from)} (each command below says when it ran)."] if kept_from else []),
        "",
        "| bench | figure | value | goal | result |",
        "|---|---|---:|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['bench']} | {r['figure']} | {r.get('shown', '–')} | {r['goal']} | {r['status']} |")
    n_pass = sum(r["status"] == "pass" for r in rows)
    n_goal = sum(r.get("missing", r["goal"] != "(info)") for r in rows)
    verdict = "Smoke run: no goal is judged." if a.smoke else f"{n_pass} of {n_goal} goals met."
    lines += ["", verdict, "", "Commands (each bench's full output is in its log):", ""]
    for rec in runs:
        took = f"{rec['seconds']:.0f} s" if rec.get("seconds") is not None else "time in its log"
        when = f" — started {rec['started']}" if kept_from else ""
        lines.append(f"- `{rec['command']}` — {took}{when}" + (f" — **{rec['error']}**" if "error" in rec else ""))
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small sizes: a noisy run in minutes")
    mode.add_argument("--smoke", action="store_true",
                      help="every bench's --smoke run (tiny models, no data; results under --work, not --results)")
    ap.add_argument("--only", default=None,
                    help="comma-separated subset of: " + ",".join(b.name for b in BENCHES))
    ap.add_argument("--teacher", type=Path, default=None, help="HF teacher folder [rlkd convert-teacher's]")
    ap.add_argument("--data", type=Path, default=None,
                    help=f"folder with databricks-dolly-15k train.jsonl and dev.jsonl [${DATA_ENV}]")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench", help="logs and outputs [%(default)s]")
    ap.add_argument("--results", type=Path, default=None, help="[bench/RESULTS.md; --smoke: under --work]")
    ap.add_argument("--timeout", type=int, default=None, help="seconds per bench [default: 3600]")
    ap.add_argument("--rerender", action="store_true",
                    help="run nothing: rebuild RESULTS.md from the outputs of the last run (same flags)")
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])

    root = a.work / ("smoke" if a.smoke else "quick" if a.quick else "full")
    a.results = a.results or (root / "RESULTS.md" if a.smoke else BENCH / "RESULTS.md")
    if not a.smoke:
        problems = []
        a.teacher = a.teacher or default_teacher()
        if not (a.teacher / "config.json").is_file():
            problems.append(f"--teacher: no model at {a.teacher}; run `rlkd convert-teacher` or pass --teacher DIR")
        if a.data is None and os.environ.get(DATA_ENV):
            a.data = Path(os.environ[DATA_ENV])
        if a.data is None:
            problems.append(f"--data DIR is required (a folder with databricks-dolly-15k train.jsonl and dev.jsonl), "
                            f"or set {DATA_ENV}")
        elif not all((a.data / n).is_file() for n in ("train.jsonl", "dev.jsonl")):
            problems.append(f"--data: {a.data} must hold train.jsonl and dev.jsonl")
        if problems and not a.rerender:
            ap.error("; ".join(problems))
    chosen = BENCHES
    if a.only:
        want = {s.strip() for s in a.only.split(",")}
        unknown = want - {b.name for b in BENCHES}
        if unknown:
            ap.error(f"--only: unknown {sorted(unknown)}; choose from {','.join(b.name for b in BENCHES)}")
        chosen = [b for b in BENCHES if b.name in want]

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    t0 = time.time()
    prev = root / "results.json"
    if a.rerender and prev.is_file():  # the machine as it was when the run started
        old = json.loads(prev.read_text())
        m, started, wall0 = old["machine"], old.get("started", "?"), old.get("wall_s", 0.0)
        took = {r["name"]: r.get("seconds") for r in old.get("runs", [])}
    else:
        m, wall0, took = machine(), None, {}
    print(f"machine: {m['cpu']} x{m['cores']}, {m['memory']}, load {m['load_at_start'][0]:.1f}; {m['versions']}")
    root.mkdir(parents=True, exist_ok=True)
    runs, rows = [], []
    for b in chosen:
        rec = run_bench(b, a, root)
        if a.rerender:
            rec["seconds"] = took.get(b.name)
        runs.append(rec)
        rows += figures_of(b, rec)
        if a.smoke:  # tiny models: a figure is only checked to exist; a verdict on it would mislead
            for r in rows:
                if r["status"] in ("pass", "FAIL", "unresolved"):
                    r["status"] = "– (smoke)"
        if "error" in rec:
            print(f"   {b.name} failed: {rec['error']} (log: {rec['log']})", flush=True)
    wall = wall0 if wall0 is not None else time.time() - t0
    failed = [r["name"] for r in runs if "error" in r]
    for rec in runs:
        rec.setdefault("started", started)
    kept_from = None
    if a.only and not a.rerender and prev.is_file():
        # Keep the figures of the benches not re-run, from the last run's results, in the usual order.
        old = json.loads(prev.read_text())
        new_runs, new_rows = {r["name"]: r for r in runs}, rows
        old_runs = {r["name"]: {**r, "started": r.get("started", old.get("started", "?"))} for r in old["runs"]}
        runs, rows = [], []
        for b in BENCHES:
            if b.name in new_runs:
                runs.append(new_runs[b.name])
                rows += [r for r in new_rows if r["bench"] == b.name]
            elif b.name in old_runs:
                runs.append(old_runs[b.name])
                rows += [r for r in old["figures"] if r["bench"] == b.name]
        kept_from = sorted({r["started"] for r in runs if r["name"] not in new_runs})
    text = render(m, runs, rows, a, started, wall, kept_from)
    a.results.write_text(text)
    (root / "results.json").write_text(json.dumps({"machine": m, "started": started, "wall_s": wall,
                                                   "runs": [{k: v for k, v in r.items() if k != "result"}
                                                            for r in runs],
                                                   "figures": rows}, indent=1, default=str))
    print("\n" + text)
    if failed:
        print(f"failed: {', '.join(failed)} (see the logs under {root})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
