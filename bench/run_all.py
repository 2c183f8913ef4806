"""`make bench`: run every benchmark on the real teacher and write bench/RESULTS.md.

Each benchmark is one of the scripts beside this one, run as a subprocess with its real-teacher arguments
(SmolLM2-135M-Instruct from `rlkd convert-teacher`, databricks-dolly-15k from ../shared/data/dolly). Each figure is a
ratio its script measured side by side in one run (same machine, same data, same moment), so machine load hits
both sides alike. A benchmark that fails or times out gets a row saying so; the others still run.

    python bench/run_all.py                 # full sizes (an hour or more on 2 CPU cores)
    python bench/run_all.py --quick         # smoke run: small sizes, minutes; figures are noisy
    python bench/run_all.py --only stage2,loss_memory   # re-run two; keep the others' figures from the last run

RESULTS.md keeps the section that bench/rlkd_vs_kl.py writes (between its markers); run that script separately.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
DEFAULT_TEACHER = Path("~/.cache/rlkd/teachers/SmolLM2-135M-Instruct").expanduser()
DOLLY = REPO.parent / "shared" / "data" / "dolly"
VS_BEGIN, VS_END = "<!-- rlkd_vs_kl:begin -->", "<!-- rlkd_vs_kl:end -->"


@dataclass
class Figure:
    """One row of the table: a ratio pulled out of a benchmark's JSON, and its goal."""

    name: str
    get: Callable[[dict], float | None]
    goal: str
    """Shown as is, e.g. "≤ 1.10"."""
    ok: Callable[[float], bool] | None = None
    """None: reported without pass/fail."""
    fmt: str = "{:.3f}"


@dataclass
class Bench:
    name: str
    script: str
    args: Callable[[argparse.Namespace, Path], list[str]]
    """Command-line arguments, given the options and this bench's work folder."""
    result: Callable[[Path, str], dict]
    """Parse the results (work folder, captured stdout)."""
    figures: list[Figure]
    timeout_s: int = 3600
    notes: list[str] = field(default_factory=list)


def _json_file(name: str) -> Callable[[Path, str], dict]:
    return lambda work, out: json.loads((work / name).read_text())


def _first_json_file(*names: str) -> Callable[[Path, str], dict]:
    def load(work: Path, out: str) -> dict:
        for name in names:
            if (work / name).is_file():
                return json.loads((work / name).read_text())
        raise FileNotFoundError(f"none of {', '.join(names)} in {work}")
    return load


def _last_json_line(work: Path, out: str) -> dict:
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in the output")


def _json_blob(work: Path, out: str) -> dict:
    return json.loads(out[out.index("{"): out.rindex("}") + 1])


def _codec(res: dict, k: int, codec: str = "q8") -> dict:
    return next(r for r in res["fixed"] if r["k"] == k and r["codec"] == codec)


def _adaptive(res: dict, min_prob: float) -> dict:
    return next(r for r in res["adaptive"] if abs(r["min_prob"] - min_prob) < 1e-12)


def _mem(res: dict, run: str, key: str) -> float:
    """A live-tensor-bytes ratio of one memory configuration of bench/stage2.py."""
    return res["memory"]["runs"][run][f"tensors_{key}"]


def _trainer_rate(stage2_work: Path) -> list[str]:
    """``--trainer-positions-per-s`` from this run's stage2 result, when there is one."""
    for name in ("stage2-all.json", "stage2.json"):
        try:
            rate = json.loads((stage2_work / name).read_text())["steps"]["trainer_positions_per_s"]
            return ["--trainer-positions-per-s", str(rate)]
        except (OSError, KeyError, ValueError):
            continue
    return []


def _le(x: float) -> Callable[[float], bool]:
    return lambda v: v <= x


def _ge(x: float) -> Callable[[float], bool]:
    return lambda v: v >= x


def benches(a: argparse.Namespace) -> list[Bench]:
    q = a.quick
    teacher = str(a.teacher)
    return [
        Bench("cache", "cache_codec.py",
              lambda a, w: ["--teacher", teacher, "--dolly", str(a.dolly / "dev.jsonl"),
                            "--rows", "30" if q else "200", "--ks", "20,64", "--json", str(w / "cache.json")],
              _json_file("cache.json"),
              [Figure("bytes/token ÷ order-0 entropy floor, k=20 (q8)", lambda r: _codec(r, 20)["ratio"], "≤ 1.05",
                      _le(1.05)),
               Figure("bytes/token ÷ order-0 entropy floor, k=64 (q8)", lambda r: _codec(r, 64)["ratio"], "≤ 1.05",
                      _le(1.05)),
               Figure("adaptive k=128, min_prob=1e-4: bytes/position", lambda r: _adaptive(r, 1e-4)["B_per_pos"],
                      "≤ 122", _le(122), fmt="{:.1f}"),
               Figure("adaptive k=128, min_prob=1e-4: its own order-0 floor, bytes/position",
                      lambda r: _adaptive(r, 1e-4)["floor_B_per_pos"], "(info)", fmt="{:.1f}"),
               Figure("adaptive k=128, min_prob=1e-4: KL error (nats)", lambda r: _adaptive(r, 1e-4)["kl"], "(info)",
                      fmt="{:.2e}"),
               Figure("bytes/position, k=20 (q8)", lambda r: _codec(r, 20)["B_per_pos"], "(info)", fmt="{:.1f}"),
               Figure("codec KL error, k=20 (q8 vs exact, nats)", lambda r: _codec(r, 20)["kl"], "(info)",
                      fmt="{:.2e}"),
               Figure("codec KL error, k=64 (q8 vs exact, nats)", lambda r: _codec(r, 64)["kl"], "(info)",
                      fmt="{:.2e}")]),
        Bench("stage1", "stage1.py",
              lambda a, w: ["--teacher", teacher, "--data", str(a.dolly / "dev.jsonl"),
                            "--rows", "24" if q else "200", "--json", str(w / "stage1.json")]
              + (["--skip-hf"] if q else ["--hf-rows", "40"]),
              _json_file("stage1.json"),
              [Figure("rlkd cache-teacher ÷ vLLM stock prompt_logprobs", lambda r: r["c_over_b"], "≥ 0.95", _ge(0.95)),
               Figure("rlkd cache-teacher ÷ FLOP ceiling (prefill-only × F_last/F_all)",
                      lambda r: r["c_over_ceiling"], "≥ 0.90", _ge(0.90)),
               Figure("rlkd cache-teacher tokens/s (info)", lambda r: r["c_cache_teacher_tok_s"], "(info)",
                      fmt="{:,.0f}")]),
        Bench("stage2", "stage2.py",
              lambda a, w: ["--teacher", teacher, "--data", str(a.dolly / "train.jsonl"), "--out", str(w)]
              + (["--rows", "8", "--steps", "2", "--mem-seq-len", "2048"] if q else []),
              _first_json_file("stage2-all.json", "stage2.json"),
              [Figure("offline KD+rank step ÷ CE-only step (chunked)",
                      lambda r: r["steps"]["kd_rank_over_ce_chunked"], "≤ 1.05", _le(1.05)),
               Figure("offline KD+rank step ÷ CE step (HF full logits)",
                      lambda r: r["steps"]["kd_rank_over_ce_hf"], "≤ 1.05", _le(1.05)),
               Figure("offline KD+rank step ÷ online-KD step",
                      lambda r: 1 / r["steps"]["online_kd_over_kd_rank"], "≤ 0.55", _le(0.55)),
               Figure("ranking-loss overhead (KD+rank ÷ KD − 1)", lambda r: r["steps"]["rank_overhead"], "≤ 3%",
                      _le(0.03), fmt="{:+.1%}"),
               Figure("chunked ÷ naive peak memory, one step, T=4096 (gradient checkpointing in both arms)",
                      lambda r: _mem(r, "gradient_checkpointing", "chunked_over_naive"), "≤ 0.5", _le(0.5)),
               Figure("chunked ÷ naive peak memory, one step, T=4096 (no checkpointing: layer activations dominate)",
                      lambda r: _mem(r, "no_checkpointing", "chunked_over_naive"), "(info)"),
               Figure("chunked KD+rank ÷ chunked CE-only peak memory (worse of the two)",
                      lambda r: r["memory"]["chunked_over_chunked_ce"], "≤ 1.2", _le(1.2)),
               Figure("cache reader ÷ trainer rate (positions/s)",
                      lambda r: r["reader"]["reader_over_trainer"], "≥ 20×", _ge(20), fmt="{:,.0f}×")]),
        Bench("loss_memory", "loss_memory.py",
              lambda a, w: ["--positions", "2048" if q else "4096"],
              _last_json_line,
              [Figure("chunked ÷ naive KD+rank loss peak memory (LM head + loss only)",
                      lambda r: r["chunked_kd_rank / naive_kd_rank"], "≤ 0.5", _le(0.5)),
               Figure("chunked KD+rank ÷ chunked CE peak memory (LM head + loss only)",
                      lambda r: r["chunked_kd_rank / chunked_ce"], "≤ 1.2", _le(1.2))]),
        Bench("remote_read", "remote_read.py",
              lambda a, w: ["--dolly", "60" if q else "800", "--teacher", teacher, "--data",
                            str(a.dolly / "train.jsonl"), "--shard-mb", "2", "--row-group-rows", "32",
                            "--rounds", "1" if q else "5", "--dir", str(w), "--json", str(w / "remote_read.json")]
              + _trainer_rate(w.parent / "stage2"),
              _json_file("remote_read.json"),
              [Figure("remote (local S3 server) ÷ local reader positions/s, prefetch 4",
                      lambda r: r["remote_over_local"], "≥ 0.8", _ge(0.8)),
               Figure("remote reader ÷ trainer rate (positions/s)", lambda r: r["remote_over_trainer"], "≥ 20×",
                      _ge(20), fmt="{:,.0f}×"),
               Figure("bytes downloaded in epoch 1 ÷ cache size (ranged reads)",
                      lambda r: r["epoch1_bytes_over_cache"], "≈ 1 (≤ 1.1)", _le(1.1)),
               Figure("bytes downloaded in epoch 2 with --local-cache ÷ cache size",
                      lambda r: r["epoch2_cached_bytes_over_cache"], "≈ 0 (≤ 0.01)", _le(0.01))]),
        Bench("inspect", "inspect_speed.py",
              lambda a, w: ["--positions", "100000" if q else "1000000", "--dir", str(w)],
              _json_blob,
              [Figure("inspect summary time ÷ cache read time (1M positions)", lambda r: r["summary_over_read_time"],
                      "≤ 1.0", _le(1.0)),
               Figure("inspect statistics ÷ cache read rate", lambda r: r["stats_positions_per_s"]
                      / r["read_positions_per_s"], "(info)", fmt="{:.1f}×")]),
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
    cmd = [sys.executable, str(BENCH / b.script), *b.args(a, work)]
    log = root / f"{b.name}.log"
    print(f"\n== {b.name}: {shlex.join(['python', 'bench/' + b.script, *cmd[2:]])}", flush=True)
    t0 = time.time()
    rec: dict = {"name": b.name, "command": shlex.join(["python", "bench/" + b.script, *cmd[2:]]), "log": str(log)}
    if a.rerender:  # parse the outputs of the last run again, run nothing
        try:
            text = log.read_text()
            if "--- timed out" in text or "--- stdout" not in text:
                raise ValueError(f"the last run left no results (see {log})")
            rec["seconds"] = None
            rec["result"] = b.result(work, text.split("--- stdout\n", 1)[1].split("\n--- stderr\n", 1)[0])
        except Exception as e:  # noqa: BLE001
            rec["error"] = f"results unreadable: {type(e).__name__}: {e}"[:240]
        return rec
    try:
        proc = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True, timeout=a.timeout or b.timeout_s)
        log.write_text(f"$ {rec['command']}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
        rec["seconds"] = time.time() - t0
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
            rec["error"] = f"exit {proc.returncode}: {tail[0][:200]}"
            return rec
        result = b.result(work, proc.stdout)
    except subprocess.TimeoutExpired as e:
        log.write_text(f"$ {rec['command']}\n--- timed out after {e.timeout} s\n{e.stdout or ''}\n{e.stderr or ''}")
        rec.update(seconds=time.time() - t0, error=f"timed out after {e.timeout:.0f} s")
        return rec
    except Exception as e:  # a missing/malformed results file: say so in the table, run the next bench
        rec.update(seconds=time.time() - t0, error=f"results unreadable: {type(e).__name__}: {e}"[:240])
        return rec
    rec["result"] = result
    print(f"   done in {rec['seconds']:.0f} s", flush=True)
    return rec


def figures_of(b: Bench, rec: dict) -> list[dict]:
    rows = []
    for f in b.figures:
        row = {"bench": b.name, "figure": f.name, "goal": f.goal}
        if "error" in rec:  # one row for the whole bench
            return [{"bench": b.name, "figure": f"{len(b.figures)} figures: " + "; ".join(f.name for f in b.figures),
                     "goal": ", ".join(f.goal for f in b.figures if f.ok), "value": None,
                     "status": f"not measured: {rec['error']}", "missing": len([f for f in b.figures if f.ok])}]
        else:
            try:
                v = f.get(rec["result"])
                row["value"] = v
                row["shown"] = f.fmt.format(v)
                row["status"] = ("pass" if f.ok(v) else "FAIL") if f.ok else "–"
            except Exception as e:  # noqa: BLE001 - a figure missing from the JSON is a row, not a crash
                row.update(value=None, status=f"not measured: {type(e).__name__}: {e}"[:160])
        rows.append(row)
    return rows


def render(m: dict, runs: list[dict], rows: list[dict], a: argparse.Namespace, started: str, wall: float,
           kept_from: list[str] | None = None) -> str:
    v = m["versions"]
    load = ", ".join(f"{x:.1f}" for x in m["load_at_start"])
    lines = [
        "# rlkd benchmark results",
        "",
        f"Written by `python bench/run_all.py{' --quick' if a.quick else ''}` (`make bench`), started {started}, "
        f"{wall / 60:.1f} min in all." + (" **Quick mode: small sizes, a smoke run; figures are noisy.**"
                                          if a.quick else ""),
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['memory']} RAM" + (f", GPU {m['gpu']}" if m["gpu"] else
                                                                              ", no GPU"),
        f"- Software: Python {m['python']}, torch {v.get('torch')}, vLLM {v.get('vllm')}, transformers "
        f"{v.get('transformers')}, pyarrow {v.get('pyarrow')}; OMP_NUM_THREADS={m['omp_num_threads']}",
        f"- Load average at start (1/5/15 min): {load}. The machine may be shared: each figure is a ratio of two "
        "measurements taken side by side in one run, which load affects alike; absolute rates are not comparable "
        "across runs.",
        f"- Teacher: `{a.teacher}` (SmolLM2-135M-Instruct); data: databricks-dolly-15k (`{a.dolly}`).",
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
    lines += ["", f"{n_pass} of {n_goal} goals met.", "", "Commands (each bench's full output is in its log):", ""]
    for rec in runs:
        took = f"{rec['seconds']:.0f} s" if rec.get("seconds") is not None else "time in its log"
        when = f" — started {rec['started']}" if kept_from else ""
        lines.append(f"- `{rec['command']}` — {took}{when}" + (f" — **{rec['error']}**" if "error" in rec else ""))
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run in minutes")
    ap.add_argument("--only", default=None,
                    help="comma-separated subset of: cache,stage1,stage2,loss_memory,remote_read,inspect")
    ap.add_argument("--teacher", type=Path, default=DEFAULT_TEACHER, help="[%(default)s]")
    ap.add_argument("--dolly", type=Path, default=DOLLY, help="folder with train.jsonl and dev.jsonl [%(default)s]")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench", help="logs and outputs [%(default)s]")
    ap.add_argument("--results", type=Path, default=BENCH / "RESULTS.md", help="[%(default)s]")
    ap.add_argument("--timeout", type=int, default=None, help="seconds per bench [default: 3600]")
    ap.add_argument("--rerender", action="store_true",
                    help="run nothing: rebuild RESULTS.md from the logs and outputs of the last run (same flags)")
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    t0 = time.time()
    root = a.work / ("quick" if a.quick else "full")
    prev = root / "results.json"
    if a.rerender and prev.is_file():  # the machine as it was when the run started
        old = json.loads(prev.read_text())
        m, started, wall0 = old["machine"], old.get("started", "?"), old.get("wall_s", 0.0)
        took = {r["name"]: r.get("seconds") for r in old.get("runs", [])}
    else:
        m, wall0, took = machine(), None, {}
    print(f"machine: {m['cpu']} x{m['cores']}, {m['memory']}, load {m['load_at_start'][0]:.1f}; {m['versions']}")
    chosen = every = benches(a)
    if a.only:
        want = {s.strip() for s in a.only.split(",")}
        unknown = want - {b.name for b in chosen}
        if unknown:
            ap.error(f"--only: unknown {sorted(unknown)}")
        chosen = [b for b in chosen if b.name in want]
    if not (a.teacher / "config.json").is_file():
        print(f"warning: no teacher at {a.teacher}; run `rlkd convert-teacher` (the benches will fail)",
              file=sys.stderr)
    root.mkdir(parents=True, exist_ok=True)
    runs, rows = [], []
    for b in chosen:
        rec = run_bench(b, a, root)
        if a.rerender:
            rec["seconds"] = took.get(b.name)
        runs.append(rec)
        rows += figures_of(b, rec)
        if "error" in rec:
            print(f"   {b.name} failed: {rec['error']} (log: {rec['log']})", flush=True)
    wall = wall0 if wall0 is not None else time.time() - t0
    for rec in runs:
        rec.setdefault("started", started)
    kept_from = None
    if a.only and not a.rerender and prev.is_file():
        # Keep the figures of the benches not re-run, from the last run's results, in the usual order.
        old = json.loads(prev.read_text())
        new_runs, new_rows = {r["name"]: r for r in runs}, rows
        old_runs = {r["name"]: {**r, "started": r.get("started", old.get("started", "?"))} for r in old["runs"]}
        runs, rows = [], []
        for b in every:
            if b.name in new_runs:
                runs.append(new_runs[b.name])
                rows += [r for r in new_rows if r["bench"] == b.name]
            elif b.name in old_runs:
                runs.append(old_runs[b.name])
                rows += [r for r in old["figures"] if r["bench"] == b.name]
        kept_from = sorted({r["started"] for r in runs if r["name"] not in new_runs})
    text = render(m, runs, rows, a, started, wall, kept_from)
    old = a.results.read_text() if a.results.exists() else ""
    if VS_BEGIN in old and VS_END in old:  # keep bench/rlkd_vs_kl.py's section
        text += "\n" + old[old.index(VS_BEGIN): old.index(VS_END) + len(VS_END)] + "\n"
    a.results.write_text(text)
    (root / "results.json").write_text(json.dumps({"machine": m, "started": started, "wall_s": wall, "runs": runs,
                                                   "figures": rows}, indent=1, default=str))
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
