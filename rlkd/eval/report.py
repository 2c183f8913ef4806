"""The `rlkd eval` result: one object (``--json``, ``OUT/scores.json``) and its text and Markdown tables.

JSON (``schema: rlkd.eval/1``)::

    {"schema": "rlkd.eval/1", "out": str,
     "dataset": {"source", "split", "subset", "fingerprint", "rows_selected": int, "rows_evaluated": int,
                 "skipped": {reason: int}},
     "generation": {"engine", "dtype", "temperature", "top_p", "samples", "seed", "max_new_tokens",
                    "max_prompt_length"},
     "bootstrap": {"resamples": int, "seed": int, "level": 0.95, "unit": "row", "method": "percentile"},
     "compare": "first" | "all",
     "students": [{"name", "path", "generations": str,
                   "generation": {metric: {"value", "low", "high"}},      # rougeL, exact, contains, tokens, hit_limit
                   "agreement": null | {metric: {"value", "low", "high"}}}],  # with --cache
     "differences": [{"a": name, "b": name,                               # b minus a, on the same rows
                      "generation": {...}, "agreement": null | {...}}],
     "cache": null | {"path", "rows": int, "positions": int, "rows_from": str},
     "notes": [str]}

Rates are fractions (the tables show them in %), ``tokens`` is a mean count, ``kd`` is in nats. An interval is null
without a bootstrap, a value is null when no row gives it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rlkd.eval.scores import GENERATION_METRICS
from rlkd.eval.stats import Interval, intervals, paired_difference

LABELS = {"rougeL": "ROUGE-L %", "exact": "exact match %", "contains": "contains %", "tokens": "tokens (mean)",
          "hit_limit": "hit the limit %", "top1_agreement": "top-1 %", "kd": "sparse KL (nats)", "ce": "CE (nats)"}
"""Row labels of the tables; a peak metric ``name@k`` is labelled ``NAME@k %`` (:func:`label`)."""

_PERCENT = {"rougeL", "exact", "contains", "hit_limit", "top1_agreement"}


def label(metric: str) -> str:
    if metric in LABELS:
        return LABELS[metric]
    name, k = metric.split("@")
    return f"{name.upper() if name != 'set' else name}@{k} %"


def is_percent(metric: str) -> bool:
    return metric in _PERCENT or "@" in metric


def pairs(names: Sequence[str], compare: str) -> list[tuple[int, int]]:
    """(a, b) index pairs of the paired differences, b minus a: each later student minus the first, or every pair."""
    if compare == "all":
        return [(a, b) for a in range(len(names)) for b in range(a + 1, len(names))]
    return [(0, b) for b in range(1, len(names))]


def summarize(series: list[dict[str, tuple[np.ndarray, np.ndarray]]], metrics: Sequence[str], names: Sequence[str],
              *, compare: str, resamples: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Intervals per student and paired differences for one family of metrics.

    ``series[i][metric] = (num, den)``, each (R,) over the same R rows for every student. Returns
    (per student ``{metric: Interval}``, per pair ``{"a", "b", "metrics": {metric: Interval}}``).
    """
    cols = [(i, m) for i in range(len(series)) for m in metrics]
    num = np.stack([series[i][m][0] for i, m in cols], axis=1) if cols else np.zeros((0, 0))  # (R, S)
    den = np.stack([series[i][m][1] for i, m in cols], axis=1) if cols else np.zeros((0, 0))  # (R, S)
    ivs, draws = intervals(num, den, resamples=resamples, seed=seed)
    at = {c: s for s, c in enumerate(cols)}
    per_student = [{m: ivs[at[(i, m)]] for m in metrics} for i in range(len(series))]
    diffs = []
    for a, b in pairs(names, compare):
        d = {}
        for m in metrics:
            sa, sb = at[(a, m)], at[(b, m)]
            d[m] = paired_difference(ivs[sa].value, ivs[sb].value, None if draws is None else draws[:, sa],
                                     None if draws is None else draws[:, sb])
        diffs.append({"a": names[a], "b": names[b], "metrics": d})
    return per_student, diffs


# ---- rendering ------------------------------------------------------------------------------------------------------

def _num(metric: str, v: float | None) -> str:
    if v is None:
        return "n/a"
    if is_percent(metric):
        return f"{100 * v:.2f}"
    return f"{v:.4f}" if metric in ("kd", "ce") else f"{v:.1f}"


def cell(metric: str, iv: dict, *, signed: bool = False) -> str:
    """``24.12 [21.30, 27.00]``; a difference whose interval excludes 0 gets a ``*``."""
    v = iv["value"]
    text = _num(metric, v)
    if signed and v is not None and not text.startswith("-"):
        text = "+" + text
    if iv.get("low") is None:
        return text
    text += f" [{_num(metric, iv['low'])}, {_num(metric, iv['high'])}]"
    if signed and (iv["low"] > 0 or iv["high"] < 0):
        text += " *"
    return text


def _tables(report: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of each table, shared by the text and Markdown forms."""
    names = [s["name"] for s in report["students"]]
    out = []
    families = [("generation", GENERATION_METRICS)]
    if report.get("cache"):
        families.append(("agreement", report["cache"]["metrics"]))
    ds, gen = report["dataset"], report["generation"]
    decoding = ("greedy" if gen["temperature"] == 0 else
                f"sampled (temperature {gen['temperature']}, top-p {gen['top_p']}, {gen['samples']} per prompt)")
    for fam, metrics in families:
        if fam == "generation":
            title = (f"generations: {ds['rows_evaluated']} rows of {ds['source']}, {decoding}, "
                     f"<= {gen['max_new_tokens']} new tokens ({gen['engine']})")
        else:
            c = report["cache"]
            title = (f"peak agreement with the teacher cache {c['path']}: {c['rows']} rows, {c['positions']:,} "
                     f"response positions ({c['rows_from']})")
            if c.get("left_out"):
                title += (f"; left out {', '.join(c['left_out'])}: the cache keeps only the teacher's "
                          f"top-{c['k']}")
        rows = [[label(m)] + [cell(m, s[fam][m]) for s in report["students"]] for m in metrics]
        out.append((title, ["metric"] + names, rows))
        if report["differences"]:
            base = {d["a"] for d in report["differences"]}
            who = f"each student minus {names[0]}" if report["compare"] == "first" and len(base) == 1 else \
                "later minus earlier student"
            header = ["metric"] + [f"{d['b']} - {d['a']}" for d in report["differences"]]
            rows = [[label(m)] + [cell(m, d[fam][m], signed=True) for d in report["differences"]] for m in metrics]
            out.append((f"paired differences on the same rows ({who}; * the interval excludes 0)", header, rows))
    return out


def _preamble(report: dict) -> list[str]:
    b = report["bootstrap"]
    lines = []
    if b["resamples"]:
        lines.append(f"{int(b['level'] * 100)}% intervals: percentile bootstrap over rows, {b['resamples']} "
                     f"resamples (seed {b['seed']}), the same resampled rows for every student")
    skipped = report["dataset"]["skipped"]
    if skipped:
        lines.append("skipped rows: " + ", ".join(f"{r} {n}" for r, n in sorted(skipped.items())))
    lines += report["notes"]
    return lines


def render_text(report: dict) -> str:
    parts = []
    for title, header, rows in _tables(report):
        widths = [max(len(r[j]) for r in [header] + rows) for j in range(len(header))]
        lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n\n" + "\n".join(_preamble(report)) + "\n"


def render_markdown(report: dict) -> str:
    parts = []
    for title, header, rows in _tables(report):
        lines = [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n\n" + "\n".join(f"- {line}" for line in _preamble(report)) + "\n"


def as_json_metrics(per_metric: dict[str, Interval]) -> dict:
    return {m: iv.as_dict() for m, iv in per_metric.items()}
