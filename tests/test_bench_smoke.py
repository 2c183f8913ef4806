"""Every benchmark's ``--smoke`` run on the tiny test models, and its JSON read back through bench/run_all.py's
figures: a bench that breaks (an import, a changed internal API, a renamed key that run_all reads) fails here rather
than in the next `make bench`. Also the 95% interval of a timed ratio against a hand computation, and the verdict
rules (a goal is met only when the whole interval meets it).
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def load():
    """Import a bench script as a module (bench/ is a folder of scripts, each with ``main(argv)``)."""
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(str(BENCH))


def bench_entry(load, name: str):
    run_all = load("run_all")
    return run_all, {b.name: b for b in run_all.BENCHES}[name]


def check_figures(run_all, b, result: dict) -> list[dict]:
    """Every figure run_all shows for this bench is found in the JSON; a timed one carries an interval."""
    rows = run_all.figures_of(b, {"result": result})
    assert len(rows) == len(b.figures)
    for row in rows:
        assert not row["status"].startswith("not measured"), row
        assert row["status"] in ("pass", "FAIL", "unresolved", "–"), row
        if "lo" in row:
            assert row["lo"] <= row["value"] <= row["hi"] and row["rounds"] >= 2, row
    return rows


def test_every_bench_script_has_a_smoke_run():
    """A new script in bench/ must be listed in run_all.BENCHES (and so get a smoke run below)."""
    sys.path.insert(0, str(BENCH))
    try:
        run_all = importlib.import_module("run_all")
    finally:
        sys.path.remove(str(BENCH))
    scripts = {p.name for p in BENCH.glob("*.py") if not p.name.startswith("_") and p.name != "run_all.py"}
    assert {b.script for b in run_all.BENCHES} == scripts


@pytest.mark.parametrize("name", ["cache", "stage2", "loss_memory", "remote_read", "inspect"])
def test_bench_smoke(load, tmp_path, name):
    run_all, b = bench_entry(load, name)
    out = tmp_path / f"{name}.json"
    load(b.script.removesuffix(".py")).main(["--smoke", *b.smoke_args(tmp_path), "--json", str(out)])
    rows = check_figures(run_all, b, json.loads(out.read_text()))
    if name in ("stage2", "remote_read", "inspect"):  # timed ratios: judged on intervals
        assert any("lo" in r for r in rows)


def test_stage1_smoke_on_the_shared_engine(load, tmp_path, tiny_teacher_dir, vllm_llm):
    run_all, b = bench_entry(load, "stage1")
    out = tmp_path / "stage1.json"
    res = load("stage1").main(["--smoke", "--teacher", str(tiny_teacher_dir), "--json", str(out)], llm=vllm_llm)
    assert res["rows"] >= 2 and res["c_over_b"]["rounds"] == 2
    check_figures(run_all, b, json.loads(out.read_text()))


def test_intervals_by_hand(load):
    """Per-round ratios e^0, e^0.2, e^0.4: log mean 0.2, sd 0.2; t(0.975, 2 df) = 4.303 from a printed table."""
    ratio_interval = load("_common").ratio_interval
    num = [1.0, 2 * math.exp(0.2), 3 * math.exp(0.4)]
    den = [1.0, 2.0, 3.0]
    r = ratio_interval(num, den)
    half = 4.303 * 0.2 / math.sqrt(3)
    assert r["value"] == pytest.approx(math.exp(0.2))
    assert r["lo"] == pytest.approx(math.exp(0.2 - half), rel=1e-4)
    assert r["hi"] == pytest.approx(math.exp(0.2 + half), rel=1e-4)
    over = ratio_interval(num, den, offset=1.0)  # an overhead: the same interval shifted by one
    assert over["lo"] == pytest.approx(r["lo"] - 1) and over["value"] == pytest.approx(r["value"] - 1)
    scaled = ratio_interval(num, den, scale=0.5)
    assert scaled["hi"] == pytest.approx(r["hi"] / 2)
    one = ratio_interval([2.0], [1.0])
    assert one["value"] == pytest.approx(2.0) and one["lo"] == -math.inf and one["hi"] == math.inf
    # Differences (can be negative): a plain t-interval of the mean. 0.01, 0.02, 0.03: mean 0.02, sd 0.01.
    m = load("_common").mean_interval([0.01, 0.02, 0.03])
    assert m["value"] == pytest.approx(0.02)
    half = 4.303 * 0.01 / math.sqrt(3)
    assert (m["lo"], m["hi"]) == pytest.approx((0.02 - half, 0.02 + half), abs=1e-5)  # the table's t has 4 digits


def test_a_goal_is_met_only_by_the_whole_interval(load):
    run_all = load("run_all")
    assert run_all.judge(0.98, 1.04, run_all.le(1.05)) == "pass"
    assert run_all.judge(0.98, 1.06, run_all.le(1.05)) == "unresolved"
    assert run_all.judge(1.06, 1.10, run_all.le(1.05)) == "FAIL"
    assert run_all.judge(0.96, 1.2, run_all.ge(0.95)) == "pass"
    assert run_all.judge(0.90, 1.2, run_all.ge(0.95)) == "unresolved"
    assert run_all.judge(-math.inf, math.inf, run_all.ge(0.95)) == "unresolved"
    b = run_all.Bench("x", "x.py", lambda a, w: [], [run_all.Figure("f", lambda r: r["f"], "≤ 3%", run_all.le(0.03),
                                                                    fmt="{:+.1%}")])
    row = run_all.figures_of(b, {"result": {"f": {"value": 0.01, "lo": -0.017, "hi": 0.047, "rounds": 8}}})[0]
    assert row["status"] == "unresolved" and row["shown"] == "+1.0% [-1.7%, +4.7%] (n=8)"


def test_run_all_names_missing_inputs(load, tmp_path, monkeypatch, capsys):
    """No data folder and no teacher: one usage error naming both, and how to fix each."""
    monkeypatch.delenv("RLKD_BENCH_DATA", raising=False)
    with pytest.raises(SystemExit) as e:
        load("run_all").main(["--teacher", str(tmp_path / "none"), "--work", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "--data DIR is required" in err and "RLKD_BENCH_DATA" in err and "rlkd convert-teacher" in err
