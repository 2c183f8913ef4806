"""A self-contained HTML report: the summary, the histograms as SVG plots, a token heatmap of chosen rows, and the
student's agreement. One file, inline CSS/JS/SVG, no network assets: it opens from disk or an e-mail attachment.

The heatmap colours each token by the teacher's distribution *that predicted it* (token ``t + 1`` shows position
``t``): entropy lower or upper bound, number of peaks, or (with a student) the student's sparse KL, a toggle.
Clicking a token draws that distribution: one bar per cached top-k entry, the actual token highlighted, and the tail
mass as its own bar; with a student, a thinner bar under each shows the student's probability of the same token
(and of everything else, under the tail bar).

The page's data is one JSON object in a ``<script type="application/json">`` tag; the histograms are SVG drawn here,
so they show even with JavaScript off.
"""

from __future__ import annotations

import html
import json

import numpy as np

from rlkd.inspect.stats import GROUPS

GROUP_COLORS = {"all": "#7f7f7f", "prompt": "#4c78a8", "response": "#f58518"}


def parse_rows(spec: str | None, total: int, default: int = 3) -> list[int]:
    """``"0,3,10-12"`` -> [0, 3, 10, 11, 12] (0-based, file order); None -> the first ``default`` rows."""
    if not spec:
        return list(range(min(default, total)))
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ValueError(f"--rows {spec!r}: expected row indices like 0,3,10-12") from None
    bad = [r for r in out if not 0 <= r < total]
    if bad:
        raise ValueError(f"--rows {spec!r}: rows {bad[:5]} out of range, the cache has {total} rows (0..{total - 1})")
    return sorted(set(out))


# --------------------------------------------------------------------------------------------------------------
# SVG charts (drawn here, so the histograms show even with JavaScript off)


def _e(s) -> str:
    return html.escape(str(s), quote=True)


def svg_bars(title: str, labels: list[str], series: list[tuple[str, str, list[float]]], *, width: int = 420,
             height: int = 200, ylabel: str = "share of positions") -> str:
    """Grouped vertical bar chart; ``series`` = [(name, colour, values per label)], values are shares in [0, 1]."""
    left, right, top, bottom = 44, 8, 24, 42
    w, h = width - left - right, height - top - bottom
    n = max(1, len(labels))
    ymax = max([v for _, _, vals in series for v in vals] + [1e-9])
    ymax = min(1.0, float(np.ceil(ymax * 10) / 10)) if ymax > 0.05 else ymax * 1.1
    slot = w / n
    bw = slot * 0.8 / max(1, len(series))
    parts = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}">',
             f'<text x="{left}" y="14" class="ctitle">{_e(title)}</text>']
    for i in range(5):
        v = ymax * i / 4
        y = top + h - h * i / 4
        parts.append(f'<line x1="{left}" x2="{left + w}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                     f'<text x="{left - 4}" y="{y + 3:.1f}" class="ytick">{100 * v:.0f}%</text>')
    for si, (name, color, vals) in enumerate(series):
        for li, v in enumerate(vals):
            bh = h * (v / ymax if ymax else 0)
            x = left + li * slot + slot * 0.1 + si * bw
            parts.append(f'<rect x="{x:.1f}" y="{top + h - bh:.1f}" width="{max(bw - 0.5, 0.5):.1f}" '
                         f'height="{bh:.1f}" fill="{color}"><title>{_e(name)} {_e(labels[li])}: '
                         f'{100 * v:.2f}%</title></rect>')
    step = max(1, int(np.ceil(n / 10)))
    for li in range(0, n, step):
        x = left + li * slot + slot / 2
        parts.append(f'<text x="{x:.1f}" y="{top + h + 14}" class="xtick">{_e(labels[li])}</text>')
    parts.append(f'<text x="{left + w / 2:.1f}" y="{height - 4}" class="xlabel">{_e(ylabel)}</text>')
    lx = left + w
    for si, (name, color, _) in enumerate(series):
        parts.append(f'<rect x="{lx - 80}" y="{top + 2 + 13 * si}" width="9" height="9" fill="{color}"/>'
                     f'<text x="{lx - 68}" y="{top + 10 + 13 * si}" class="legend">{_e(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _hist_chart(title: str, groups: dict, key: str, xlabel: str) -> str:
    present = [g for g in ("prompt", "response") if groups.get(g) and groups[g].get(key)]
    if not present and groups.get("all") and groups["all"].get(key):
        present = ["all"]
    if not present:
        return f'<div class="chart empty">{_e(title)}: no data</div>'
    edges = groups[present[0]][key]["hist"]["edges"]
    labels = [f"{edges[i]:.2g}" for i in range(len(edges) - 1)]
    series = []
    for g in present:
        c = np.asarray(groups[g][key]["hist"]["counts"], dtype=np.float64)
        series.append((g, GROUP_COLORS[g], list(c / max(1.0, c.sum()))))
    return svg_bars(title, labels, series, ylabel=xlabel)


def _count_chart(title: str, groups: dict, get, xlabel: str) -> str:
    present = [g for g in ("prompt", "response") if groups.get(g)] or (["all"] if groups.get("all") else [])
    if not present:
        return f'<div class="chart empty">{_e(title)}: no data</div>'
    labels = get(groups[present[0]])[0]
    series = []
    for g in present:
        lab, counts = get(groups[g])
        c = np.asarray(counts, dtype=np.float64)
        series.append((g, GROUP_COLORS[g], list(c / max(1.0, c.sum()))))
    return svg_bars(title, labels, series, ylabel=xlabel)


def charts(summary: dict) -> list[str]:
    g = summary["stats"]
    if not g.get("all"):
        return []
    maxp = max(int(c) for grp in g.values() if grp for c in grp["peaks"]["counts"])

    def peaks(x):
        return [str(i) for i in range(maxp + 1)], [x["peaks"]["counts"].get(str(i), 0) for i in range(maxp + 1)]

    return [
        _hist_chart("top-1 probability", g, "top1_prob", "p(argmax)"),
        _hist_chart("entropy lower bound", g, "entropy_lower", "nats"),
        _hist_chart("entropy upper bound", g, "entropy_upper", "nats"),
        _count_chart(f"number of peaks (p ≥ {summary['peak_threshold']})", g, peaks, "peaks per position"),
        _hist_chart("tail mass", g, "tail_mass", "probability outside the cached top-k"),
        _count_chart("rank of the actual next token", g,
                     lambda x: (x["target_rank"]["hist"]["labels"], x["target_rank"]["hist"]["counts"]),
                     "1-based rank over the vocabulary"),
    ]


# --------------------------------------------------------------------------------------------------------------
# Tables


def facts_table(summary: dict) -> str:
    m = summary["manifest"]
    tok = m.get("tokenizer") or {}
    rows = [
        ("cache", summary["cache"] + ("" if m["complete"] else "  (incomplete)")),
        ("teacher", json.dumps(m.get("teacher"), ensure_ascii=False)),
        ("tokenizer", f"{tok.get('name_or_path')} · vocab {tok.get('vocab_size')} · sha256 "
                      f"{str(tok.get('sha256'))[:16]}…"),
        ("k / codec", f"{m['k']} / {m['codec']}"),
        ("dataset", json.dumps(m.get("dataset"), ensure_ascii=False)),
        ("rows · tokens · positions", f"{m['rows']:,} · {m['tokens']:,} · {m['positions']:,}"),
        ("shards · bytes", f"{m['shards']} · {m['bytes']:,}"
                           + (f" ({m['bytes_per_token']:.2f} bytes/token)" if m["bytes_per_token"] else "")),
        ("statistics over", f"{summary['sample']['positions']:,} positions"
                            + (f" (sample, seed {summary['sample']['seed']})"
                               if summary["sample"]["positions"] < m["positions"] else "")
                            + f"; peak threshold {summary['peak_threshold']}; V = {summary['vocab_size']}"),
    ]
    return '<table class="facts">' + "".join(f"<tr><th>{_e(a)}</th><td>{_e(b)}</td></tr>" for a, b in rows) + \
        "</table>"


def stats_table(summary: dict) -> str:
    g = summary["stats"]
    present = [x for x in GROUPS if g.get(x)]
    head = "<tr><th>statistic</th>" + "".join(f"<th>{x} (n={g[x]['positions']:,})</th>" for x in present) + "</tr>"
    lines = []

    def dist(key, name, fmt="{:.3f}"):
        cells = []
        for x in present:
            d = g[x].get(key)
            cells.append("<td>n/a</td>" if not d else
                         f"<td>mean {fmt.format(d['mean'])} · median {fmt.format(d['p50'])} · "
                         f"p5–p95 {fmt.format(d['p05'])}–{fmt.format(d['p95'])}</td>")
        lines.append(f"<tr><th>{_e(name)}</th>{''.join(cells)}</tr>")

    dist("top1_prob", "top-1 probability")
    dist("entropy_lower", "entropy lower bound (nats)")
    dist("entropy_upper", "entropy upper bound (nats)")
    lines.append("<tr><th>peaks</th>" + "".join(
        f"<td>mean {g[x]['peaks']['mean']:.2f} · multi-peak {100 * g[x]['peaks']['multi_peak_share']:.1f}%"
        f" · none {100 * g[x]['peaks']['no_peak_share']:.1f}%</td>" for x in present) + "</tr>")
    dist("tail_mass", "tail mass")
    lines.append("<tr><th>actual next token</th>" + "".join(
        f"<td>rank 1: {100 * g[x]['target_rank']['top1_share']:.1f}% · in top-k "
        f"{100 * g[x]['target_rank']['in_topk_share']:.1f}% · median rank {g[x]['target_rank']['p50']:.0f}</td>"
        for x in present) + "</tr>")
    return f'<table class="stats">{head}{"".join(lines)}</table>'


def student_table(student: dict) -> str:
    from rlkd.core.metrics import left_out_note, metric_keys

    groups = [x for x in ("response", "all") if student["metrics"].get(x)]
    head = "<tr><th>metric</th>" + "".join(
        f"<th>{x} (n={student['metrics'][x]['positions']:,})</th>" for x in groups) + "</tr>"
    body = []
    for key in metric_keys(student["cache_k"]):
        cells = []
        for x in groups:
            v = student["metrics"][x].get(key)
            cells.append("<td>n/a</td>" if v is None else
                         (f"<td>{v:.4f}</td>" if key in ("kd", "ce") else f"<td>{100 * v:.2f}%</td>"))
        body.append(f"<tr><th>{_e(key)}</th>{''.join(cells)}</tr>")
    note = left_out_note(student["cache_k"])
    return (f'<p>student <code>{_e(student["student"])}</code> over {student["rows"]:,} rows; kd with the '
            f'{_e(student["tail"])} tail.</p>'
            f'<table class="stats" id="student-metrics">{head}{"".join(body)}</table>'
            + (f'<p class="note" id="left-out">{_e(note)}.</p>' if note else "")
            + '<p class="note">cr@k: the student\'s top-k equals the teacher\'s, in order. or@k (the paper\'s OR@k) is '
            'the overlap |top-k(S) ∩ top-k(T)| / k of one position, shown per token in the distribution panel; '
            'mor@k (the paper\'s MOR@k) is its mean over positions. set@k: the same top-k set, in any order '
            '(or@k = 1). kd: sparse forward KL (nats/position); ce: cross-entropy on the actual next token. Rates '
            'are over positions where the teacher kept at least k entries.</p>')


# --------------------------------------------------------------------------------------------------------------
# Row data for the heatmap


def _sig(x: np.ndarray, digits: int = 6) -> list:
    return [None if not np.isfinite(v) else float(f"{v:.{digits}g}") for v in np.asarray(x, dtype=np.float64)]


def heatmap_rows(rows: list[tuple[int, object]], text, *, vocab_size, threshold,
                 student_details: dict | None = None) -> tuple[list[dict], dict]:
    """(rows for the page, vocabulary {id: text} of every id they use); with ``student_details``
    (:meth:`~rlkd.inspect.student.StudentScorer.details` per row index) the student's side too."""
    from rlkd.inspect.stats import position_arrays

    vocab: dict[str, str] = {}
    out = []
    for index, row in rows:
        a = position_arrays(row.topk_count, row.topk_logprobs, row.tail_logmass, row.target_logprob,
                            row.target_rank, row.loss_mask, vocab_size=vocab_size, threshold=threshold)
        ids = np.asarray(row.input_ids)
        topk_ids = np.asarray(row.topk_ids)
        d = student_details.get(index) if student_details else None
        used = np.unique(np.concatenate([ids, topk_ids] + ([d["top1"]] if d else [])))
        for i, s in zip(used.tolist(), text(used)):
            vocab[str(i)] = s
        out.append({
            "index": index,
            "row_id": row.row_id,
            "source_index": int(row.source_index),
            "ids": ids.tolist(),  # (T,)
            "response": np.asarray(row.loss_mask, dtype=np.int8).tolist(),  # (P,)
            "hlo": _sig(a.entropy_lower, 4),
            "hhi": _sig(a.entropy_upper, 4),
            "peaks": a.peaks.tolist(),
            "tail": _sig(a.tail),
            "trank": np.asarray(row.target_rank).tolist(),
            "tprob": _sig(a.target_prob),
            "counts": np.asarray(row.topk_count).tolist(),  # (P,)
            "topk_ids": topk_ids.tolist(),  # (sum counts,)
            "topk_p": _sig(np.exp(np.asarray(row.topk_logprobs, dtype=np.float64))),
        })
        if d:
            out[-1].update({"s_p": _sig(d["probs"]), "s_tail": _sig(d["tail"]), "s_top1": d["top1"].tolist(),
                            "kd": _sig(d["kd"], 4)})
            if d.get("overlap") is not None:
                out[-1].update({"or_k": d["overlap_k"], "or": _sig(d["overlap"], 4)})
    return out, vocab


# --------------------------------------------------------------------------------------------------------------
# The page


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#263238;color:#fff;padding:10px 20px}header h1{margin:0;font-size:19px}
main{display:flex;gap:18px;padding:14px 20px;align-items:flex-start}
#left{flex:1 1 auto;min-width:0}#detail{flex:0 0 430px;position:sticky;top:10px;background:#fff;
border:1px solid #ddd;border-radius:6px;padding:10px;max-height:94vh;overflow:auto}
section{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px 14px;margin-bottom:14px}
h2{font-size:16px;margin:2px 0 8px}
table{border-collapse:collapse}th,td{text-align:left;padding:3px 8px;border-bottom:1px solid #eee;vertical-align:top}
table.facts th{color:#555;font-weight:600;white-space:nowrap}
.charts{display:flex;flex-wrap:wrap;gap:10px}.chart .ctitle{font-size:12px;font-weight:600}
.chart .grid{stroke:#e5e5e5}.chart .ytick{font-size:9px;text-anchor:end;fill:#666}
.chart .xtick{font-size:9px;text-anchor:middle;fill:#666}.chart .xlabel{font-size:10px;text-anchor:middle;fill:#444}
.chart .legend{font-size:10px}
.controls{margin-bottom:8px}.controls label{margin-right:12px}
.row{margin:10px 0 16px}.rowhead{font-size:12px;color:#555;margin-bottom:4px}
.tokens{font:13px/1.9 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;white-space:pre-wrap;
word-break:break-word;border:1px solid #eee;padding:6px;border-radius:4px}
.tok{cursor:pointer;border-bottom:2px solid transparent;border-radius:2px}
.tok.resp{border-bottom-color:#f58518}.tok.first{color:#999;cursor:default}
.tok.sel{outline:2px solid #000}.tok:hover{outline:1px solid #555}
.nl{color:#aaa}
#scale{display:inline-block;width:160px;height:10px;vertical-align:middle;margin:0 6px;border:1px solid #ccc}
.note{font-size:12px;color:#666}
#detail .bar rect.s{fill:#f58518}#detail text.sprob{fill:#b0600c}
#detail .bar rect.b{fill:#4c78a8}#detail .bar.next rect.b{fill:#e45756}#detail .bar.tail rect.b{fill:#bbb}
#detail text{font:11px ui-monospace,Menlo,Consolas,monospace}
#detail .meta td,#detail .meta th{padding:1px 6px;font-size:12px}
"""

JS = r"""
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("rlkd-data").textContent);
  var mode = "hlo";
  function tokText(id) { var s = D.vocab[String(id)]; return s === undefined ? "<" + id + ">" : s; }
  function esc(s) { return s.replace(/[&<>"]/g, function (c) {
    return {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]; }); }
  function show(s) { return JSON.stringify(s); }
  function value(row, t) {
    if (mode === "peaks") return row.peaks[t];
    var v = row[mode][t]; return v === null ? NaN : v;
  }
  function range() {
    var hi = 0;
    D.rows.forEach(function (r) { for (var t = 0; t < r.peaks.length; t++) { var v = value(r, t);
      if (isFinite(v) && v > hi) hi = v; } });
    return mode === "peaks" ? Math.max(hi, 2) : Math.max(hi, 1e-6);
  }
  function colour(v, hi) {
    if (!isFinite(v)) return "#eee";
    var x = Math.max(0, Math.min(1, v / hi));
    // white -> yellow -> red: confident tokens stay light, uncertain ones stand out
    var h = 60 - 60 * x, l = 97 - 47 * x;
    return "hsl(" + h.toFixed(0) + ",90%," + l.toFixed(0) + "%)";
  }
  function paint() {
    var hi = range();
    document.querySelectorAll(".tok[data-pos]").forEach(function (el) {
      var r = D.rows[+el.dataset.row], t = +el.dataset.pos;
      el.style.background = colour(value(r, t), hi);
    });
    document.getElementById("scale").style.background =
      "linear-gradient(to right," + colour(0, 1) + "," + colour(0.5, 1) + "," + colour(1, 1) + ")";
    document.getElementById("scale-lo").textContent = "0";
    document.getElementById("scale-hi").textContent = mode === "peaks" ? String(hi) : hi.toFixed(2) + " nats";
  }
  function buildRows() {
    var host = document.getElementById("heatmap");
    D.rows.forEach(function (r, ri) {
      var div = document.createElement("div"); div.className = "row";
      var head = document.createElement("div"); head.className = "rowhead";
      head.textContent = "row " + r.index + " · row_id " + r.row_id + " · source_index " + r.source_index +
        " · " + r.ids.length + " tokens";
      div.appendChild(head);
      var box = document.createElement("div"); box.className = "tokens";
      var html = [];
      for (var j = 0; j < r.ids.length; j++) {
        var s = tokText(r.ids[j]), vis = esc(s).replace(/\n/g, '<span class="nl">\u21b5</span>\n');
        if (j === 0) { html.push('<span class="tok first">' + vis + "</span>"); continue; }
        var t = j - 1;
        html.push('<span class="tok' + (r.response[t] ? " resp" : "") + '" data-row="' + ri + '" data-pos="' +
                  t + '" title="position ' + t + '">' + vis + "</span>");
      }
      box.innerHTML = html.join("");
      div.appendChild(box);
      host.appendChild(div);
    });
  }
  function overlap(r, t) {  // the paper's OR@k at this position: |top-k(S) ∩ top-k(T)| / k
    if (!r.or) return "";
    return " · or@" + r.or_k + " " + (r.or[t] === null ? "n/a (the teacher kept fewer entries)" : r.or[t]);
  }
  function detail(ri, t) {
    var r = D.rows[ri], start = 0;
    for (var i = 0; i < t; i++) start += r.counts[i];
    var n = r.counts[t], next = r.ids[t + 1], bars = [];
    for (var e = 0; e < n; e++) bars.push({id: r.topk_ids[start + e], p: r.topk_p[start + e]});
    var box = document.getElementById("detail");
    var meta = '<h2>row ' + r.index + ', position ' + t + '</h2><table class="meta">' +
      "<tr><th>context ends with</th><td>" + esc(show(tokText(r.ids[t]))) + "</td></tr>" +
      "<tr><th>actual next token</th><td>" + esc(show(tokText(next))) + " · p " + (+r.tprob[t]).toPrecision(4) +
      " · rank " + r.trank[t] + "</td></tr>" +
      "<tr><th>entropy</th><td>" + r.hlo[t] + " – " + (r.hhi[t] === null ? "?" : r.hhi[t]) + " nats</td></tr>" +
      "<tr><th>peaks (p ≥ " + D.threshold + ")</th><td>" + r.peaks[t] + "</td></tr>" +
      "<tr><th>part</th><td>" + (r.response[t] ? "response (trained)" : "prompt") + "</td></tr></table>";
    var S = D.student, rowH = S ? 26 : 17, labelW = 150, barW = 190;
    var W = labelW + barW + 70, H = rowH * (n + 1) + 8;
    var pmax = Math.max(r.tail[t] || 0, bars.length ? bars[0].p : 0, 1e-9);
    if (S) {
      pmax = Math.max(pmax, r.s_tail[t] || 0);
      for (var e2 = 0; e2 < n; e2++) pmax = Math.max(pmax, r.s_p[start + e2]);
    }
    var svg = ['<svg id="topk-chart" xmlns="http://www.w3.org/2000/svg" width="' + W + '" height="' + H + '">'];
    function bar(cls, label, p, sp, y, extra) {
      var w = Math.max(0.5, barW * p / pmax), h = S ? 10 : rowH - 4;
      var g = '<g class="bar ' + cls + '" ' + extra + ' data-prob="' + p + '"' +
        (S ? ' data-student-prob="' + sp + '"' : "") + ">" +
        '<text class="label" x="' + (labelW - 4) + '" y="' + (y + 12) + '" text-anchor="end">' + esc(label) +
        '</text><rect class="b" x="' + labelW + '" y="' + (y + 2) + '" width="' + w.toFixed(1) +
        '" height="' + h + '"></rect><text class="prob" x="' + (labelW + w + 4).toFixed(1) + '" y="' +
        (y + 11) + '">' + p.toFixed(4) + "</text>";
      if (S) {
        var ws = Math.max(0.5, barW * sp / pmax);
        g += '<rect class="s" x="' + labelW + '" y="' + (y + 13) + '" width="' + ws.toFixed(1) + '" height="8">' +
          '</rect><text class="sprob" x="' + (labelW + ws + 4).toFixed(1) + '" y="' + (y + 21) + '">' +
          sp.toFixed(4) + "</text>";
      }
      svg.push(g + "</g>");
    }
    bars.forEach(function (b, e) {
      var lab = show(tokText(b.id)); if (lab.length > 18) lab = lab.slice(0, 17) + "\u2026";
      bar(b.id === next ? "entry next" : "entry", (e + 1) + ". " + lab, b.p, S ? r.s_p[start + e] : 0, e * rowH,
          'data-id="' + b.id + '" data-rank="' + (e + 1) + '"');
    });
    bar("tail", "tail (" + (D.vocab_size ? (D.vocab_size - n) + " tokens" : "rest") + ")", r.tail[t] || 0,
        S ? (r.s_tail[t] || 0) : 0, n * rowH, "");
    svg.push("</svg>");
    var smeta = S ? "<tr><th>student</th><td>argmax " + esc(show(tokText(r.s_top1[t]))) +
      (r.s_top1[t] === r.topk_ids[start] ? " (agrees)" : " (teacher: " + esc(show(tokText(r.topk_ids[start]))) + ")") +
      " · sparse KL " + r.kd[t] + overlap(r, t) + "</td></tr>" : "";
    box.innerHTML = meta.replace("</table>", smeta + "</table>") + '<p class="note">Teacher top-' + n +
      ' (red: the actual next token) and the tail mass outside them as its own bar' +
      (S ? '; the thin orange bar under each is the student\'s probability of the same token' : "") + ".</p>" +
      svg.join("");
    document.querySelectorAll(".tok.sel").forEach(function (el) { el.classList.remove("sel"); });
    var el = document.querySelector('.tok[data-row="' + ri + '"][data-pos="' + t + '"]');
    if (el) el.classList.add("sel");
  }
  buildRows();
  document.getElementById("heatmap").addEventListener("click", function (ev) {
    var el = ev.target.closest(".tok[data-pos]");
    if (el) detail(+el.dataset.row, +el.dataset.pos);
  });
  document.querySelectorAll('input[name="mode"]').forEach(function (el) {
    el.addEventListener("change", function () { mode = el.value; paint(); });
  });
  paint();
  document.body.dataset.ready = "1";
})();
"""


NO_ROWS_JS = 'document.body.dataset.ready = "1";'


_SCRIPT_UNSAFE = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def script_json(data) -> str:
    """``data`` as JSON that is inert inside a ``<script>`` element: ``<``, ``>`` and ``&`` are written as ``\\u003c``
    etc. (the same strings to JSON.parse), so tokens like ``</script>``, ``<!--`` or ``<script>`` in a vocabulary
    cannot end the element or switch the HTML parser into its escaped-script states."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.translate({ord(c): r for c, r in _SCRIPT_UNSAFE.items()})


def render_html(summary: dict | None, rows: list[dict], vocab: dict, *, student: dict | None = None,
                threshold: float, vocab_size: int | None, title: str = "rlkd inspect") -> str:
    """The whole page as one string."""
    has_student = bool(rows) and "s_p" in rows[0]
    data = {"rows": rows, "vocab": vocab, "threshold": threshold, "vocab_size": vocab_size, "student": has_student}
    payload = script_json(data)
    sections = []
    if summary is not None:
        sections.append(f"<section><h2>Cache</h2>{facts_table(summary)}</section>")
        sections.append(f"<section><h2>Statistics</h2>{stats_table(summary)}"
                        '<p class="note">Entropy bounds: the lower bound packs the tail mass into as few tokens as '
                        "the ranking allows (each at most the last cached probability); the upper bound spreads it "
                        "uniformly over the V − k dropped tokens. Peaks: cached tokens with p ≥ the threshold.</p>"
                        "</section>")
        sections.append(f'<section><h2>Histograms</h2><div class="charts">{"".join(charts(summary))}</div>'
                        "</section>")
    if student is not None:
        sections.append(f"<section><h2>Student agreement</h2>{student_table(student)}</section>")
    if rows:
        kd_mode = '<label><input type="radio" name="mode" value="kd"> student KL</label>' if has_student else ""
        student_note = " and the student's probabilities of the same tokens" if has_student else ""
        sections.append(
            '<section><h2>Tokens</h2><div class="controls">colour by '
            '<label><input type="radio" name="mode" value="hlo" checked> entropy (lower bound)</label>'
            '<label><input type="radio" name="mode" value="hhi"> entropy (upper bound)</label>'
            f'<label><input type="radio" name="mode" value="peaks"> number of peaks</label>{kd_mode}'
            '<span id="scale-lo"></span><span id="scale"></span><span id="scale-hi"></span></div>'
            '<p class="note">Each token is coloured by the teacher distribution that predicted it; response '
            f"(trained) tokens are underlined in orange. Click a token to see its top-k{student_note}.</p>"
            '<div id="heatmap"></div></section>')
    detail = ('<aside id="detail"><h2>Distribution</h2><p class="note">Click a token in the heatmap.</p></aside>'
              if rows else "")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{_e(title)}</h1></header><main><div id=\"left\">{''.join(sections)}</div>{detail}</main>"
        f'<script type="application/json" id="rlkd-data">{payload}</script>'
        f"<script>{JS if rows else NO_ROWS_JS}</script></body></html>\n"
    )


class ReportPathError(ValueError):
    """The ``--html`` path cannot be written."""


def html_path_problem(path: str) -> str | None:
    """Why the report cannot be written to ``path`` (None when it looks writable); checked before the long passes."""
    import os
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        return f"--html {path}: is a folder; give a file path such as {p / 'report.html'}"
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        return f"--html {path}: the folder {parent} does not exist; create it or give another path"
    if p.exists() and not os.access(p, os.W_OK):
        return f"--html {path}: the file is not writable; give another path"
    if not p.exists() and not os.access(parent, os.W_OK | os.X_OK):
        return f"--html {path}: cannot create a file in {parent} (permission denied); give a writable path"
    return None


def write_report(path, summary: dict | None, chosen_rows: list[tuple[int, object]], text, *, student=None,
                 student_details: dict | None = None, vocab_size, threshold: float, title: str) -> int:
    """Write the report to ``path``; returns its size in bytes."""
    rows, vocab = heatmap_rows(chosen_rows, text, vocab_size=vocab_size, threshold=threshold,
                               student_details=student_details)
    page = render_html(summary, rows, vocab, student=student, threshold=threshold, vocab_size=vocab_size,
                       title=title)
    data = page.encode("utf-8")
    from pathlib import Path

    try:
        Path(path).write_bytes(data)
    except OSError as e:
        raise ReportPathError(f"--html {path}: cannot write the report ({e.strerror or e}); give a writable file "
                              "path") from None
    return len(data)

