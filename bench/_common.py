"""What the benchmarks share: where their inputs come from, the tiny inputs of ``--smoke``, and the 95% interval of a
timed ratio. Not a benchmark itself (``bench/run_all.py`` runs the others).

Inputs. The real runs read the SmolLM2-135M-Instruct teacher (``rlkd convert-teacher``; ``--teacher``) and
databricks-dolly-15k as ``train.jsonl`` / ``dev.jsonl`` (``--data FILE``, or the folder named by the environment
variable ``RLKD_BENCH_DATA``). Nothing is read from a fixed path outside the repository.

Smoke mode. ``--smoke`` runs a bench end to end in seconds on the test suite's tiny models (``tests/tiny.py``: a
512-token byte-level tokenizer, a 2-layer hidden-128 Llama) and the Dolly sample shipped in the package, so
``tests/test_bench_smoke.py`` can run every bench in ``make test``. Its figures mean nothing.

Intervals. A timed figure is a ratio of two variants timed side by side in each of n rounds. Pairing in the round
cancels what changes between rounds (the batch, slow drifts of the machine's load); what is left is the round-to-round
spread of the per-round ratio. :func:`ratio_interval` reports the geometric mean of the per-round ratios and the 95%
t-interval of their mean log (the log makes a ratio and its inverse symmetric, and per-round timing noise is
multiplicative). A goal is met only when the whole interval is inside it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the benches measure this checkout's rlkd (and smoke runs use its tests/tiny.py)
    sys.path.insert(0, str(REPO))
DATA_ENV = "RLKD_BENCH_DATA"
"""Environment variable: a folder holding databricks-dolly-15k as ``train.jsonl`` and ``dev.jsonl``."""


def default_teacher() -> Path:
    """Where ``rlkd convert-teacher`` puts SmolLM2-135M-Instruct (``$RLKD_HOME/teachers/...``)."""
    from rlkd.models import default_teacher_dir

    return default_teacher_dir()


def data_file(given: Path | None, name: str, parser: argparse.ArgumentParser, flag: str = "--data") -> Path:
    """The Dolly jsonl a bench reads: ``given`` if set, else ``$RLKD_BENCH_DATA/name``; a usage error (exit 2)
    naming both ways when neither is there."""
    if given is None:
        folder = os.environ.get(DATA_ENV)
        if not folder:
            parser.error(f"{flag} FILE.jsonl is required (databricks-dolly-15k {name}), or set {DATA_ENV} to a "
                         "folder holding train.jsonl and dev.jsonl")
        given = Path(folder) / name
    if not given.is_file():
        parser.error(f"{flag}: {given} is not a file (databricks-dolly-15k {name} is expected)")
    return given


def dolly_sample() -> Path:
    """The 300-row Dolly sample shipped with rlkd (the demo's data): the smoke runs' data."""
    return REPO / "rlkd" / "data" / "dolly_sample.jsonl"


def smoke_teacher(work: Path) -> Path:
    """The tests' tiny teacher (2 layers, hidden 128, head_dim 32 as vLLM's CPU backend needs), made once under
    ``work``."""
    from tests import tiny

    tok, teacher = work / "tiny-tokenizer", work / "tiny-teacher"
    if not (teacher / "config.json").is_file():
        tiny.make_tokenizer(tok)
        tiny.make_llama(teacher, tok, hidden_size=128, num_layers=2, num_heads=4, seed=0)
    return teacher


def ratio_interval(num: list[float], den: list[float], *, scale: float = 1.0, offset: float = 0.0,
                   level: float = 0.95) -> dict:
    """``scale x num[i] / den[i]`` over paired rounds i: the geometric mean and its ``level`` t-interval, each minus
    ``offset`` (1 for an overhead such as "KD+rank ÷ KD − 1"). With fewer than two rounds the interval is unbounded.

    Returns ``{"value", "lo", "hi", "rounds", "per_round"}``.
    """
    if len(num) != len(den) or not num:
        raise ValueError(f"ratio_interval: need equal, non-empty lists of paired times, got {len(num)} and {len(den)}")
    logs = [math.log(scale * a / b) for a, b in zip(num, den)]
    n = len(logs)
    mean = sum(logs) / n
    if n > 1:
        from scipy.stats import t

        sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / (n - 1))
        half = float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
        lo, hi = math.exp(mean - half) - offset, math.exp(mean + half) - offset
    else:
        lo, hi = -math.inf, math.inf
    return {"value": math.exp(mean) - offset, "lo": lo, "hi": hi, "rounds": n,
            "per_round": [math.exp(x) - offset for x in logs]}


def format_interval(r: dict, fmt: str = "{:.3f}") -> str:
    """``1.008 [0.981, 1.036]`` (95% interval, n rounds)."""
    return f"{fmt.format(r['value'])} [{fmt.format(r['lo'])}, {fmt.format(r['hi'])}] ({r['rounds']} rounds)"


def mean_interval(values: list[float], *, level: float = 0.95) -> dict:
    """The mean of per-round values and its ``level`` t-interval: for a per-round figure that can be negative or
    zero (a difference), where :func:`ratio_interval`'s logs do not apply. Same keys as :func:`ratio_interval`."""
    if not values:
        raise ValueError("mean_interval: no values")
    n = len(values)
    mean = sum(values) / n
    if n > 1:
        from scipy.stats import t

        sd = math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1))
        half = float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
        lo, hi = mean - half, mean + half
    else:
        lo, hi = -math.inf, math.inf
    return {"value": mean, "lo": lo, "hi": hi, "rounds": n, "per_round": list(values)}

