"""Terminal views: the summary with histograms, and one row position by position with the teacher's peaks.

Output is plain text when piped (``rlkd inspect ... | less`` or a test capturing it); in a terminal the row view is
coloured by entropy with ``rich`` (imported only then). Everything that comes from data (decoded text, tokens, row
ids, manifest fields) goes through :func:`printable` or :func:`show` first, so a dataset cannot send escape
sequences to the terminal.
"""

from __future__ import annotations

import re

import numpy as np

from rlkd.errors import UserError
from rlkd.inspect.stats import GROUPS

# --------------------------------------------------------------------------------------------------------------
# Tokenizer


class TokenizerNotFoundError(UserError, FileNotFoundError):
    """The teacher's tokenizer recorded in the manifest cannot be loaded here."""


def load_tokenizer(manifest: dict, cache_dir, override: str | None = None):
    """The teacher's tokenizer: ``override`` if given, else the first path the manifest records that loads and
    whose vocabulary hash matches the manifest's ``tokenizer.sha256``.

    A cache copied to another machine may point at a path that does not exist there, hence ``--tokenizer``.
    """
    from transformers import AutoTokenizer

    from rlkd.cache.identity import tokenizer_identity

    recorded = manifest.get("tokenizer") or {}
    if override:
        candidates = [("--tokenizer", override)]
    else:
        # The tokenizer's own name_or_path, then the teacher path stage 1 was given (config.teacher), then the
        # teacher's name (a hub id, found in the local HF cache).
        where = f"{cache_dir}/manifest.json"
        candidates = [(f"tokenizer.name_or_path in {where}", recorded.get("name_or_path")),
                      (f"config.teacher in {where}", (manifest.get("config") or {}).get("teacher")),
                      (f"teacher.name in {where}", (manifest.get("teacher") or {}).get("name"))]
        seen = set()
        candidates = [c for c in candidates if isinstance(c[1], str) and not (c[1] in seen or seen.add(c[1]))]
    tried = []
    for where, path in candidates:
        if not path:
            continue
        try:
            tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 - HF raises many types; all mean "not loadable here"
            tried.append(f"{path!r} ({where}): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        want = recorded.get("sha256")
        if want and tokenizer_identity(tok)["sha256"] != want:
            tried.append(f"{path!r} ({where}) loads, but is not the tokenizer the cache was written with "
                         f"(vocabulary sha256 differs from the manifest's {want[:12]}…): its ids would decode to "
                         "the wrong text")
            continue
        return tok
    detail = "\n".join(f"  - {t}" for t in tried) or "  - the manifest records no tokenizer path"
    raise TokenizerNotFoundError(
        f"cannot load the teacher's tokenizer for {cache_dir}:\n{detail}\n"
        "Pass --tokenizer PATH pointing at a local copy of the teacher's tokenizer (a folder with tokenizer.json).")


class TokenText:
    """Decodes single token ids to display strings, memoised (rows repeat ids a lot)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, ids) -> list[str]:
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        missing = sorted({i for i in ids if i not in self._cache})
        if missing:
            texts = self.tok.batch_decode([[i] for i in missing], skip_special_tokens=False,
                                          clean_up_tokenization_spaces=False)
            self._cache.update(zip(missing, texts))
        return [self._cache[i] for i in ids]

    def text(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def show(s: str) -> str:
    """A token as a quoted, one-line string: spaces stay visible by the quotes, control characters are escaped."""
    return repr(s)  # repr escapes every non-printable character, C0 and C1 controls included


_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f]")
"""C0 controls, DEL and C1 controls: ESC starts ANSI/OSC sequences, and a terminal may honour C1's CSI (U+009B)."""
_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def printable(s: str, *, multiline: bool = False) -> str:
    """``s`` safe to print on a terminal: every control character becomes a visible escape (``\\x1b``, ``\\n``),
    except newline and tab with ``multiline``. Text from a dataset or a cache never reaches the terminal raw."""
    def escape(m: re.Match) -> str:
        c = m.group()
        if multiline and c in "\n\t":
            return c
        return _NAMED.get(c, f"\\x{ord(c):02x}")

    return _CONTROLS.sub(escape, s)


# --------------------------------------------------------------------------------------------------------------
# One row, position by position


def row_stats(row, *, vocab_size: int | None, threshold: float):
    """:class:`~rlkd.inspect.stats.PositionArrays` of every position of one row."""
    from rlkd.inspect.stats import position_arrays

    a = position_arrays(row.topk_count, row.topk_logprobs, row.tail_logmass, row.target_logprob, row.target_rank,
                        row.loss_mask, vocab_size=vocab_size, threshold=threshold)
    return a


def find_row(reader, which: str | int):
    """(index, TeacherRow) for a 0-based row index in file order, or a row_id (or a unique prefix of one)."""
    s = str(which)
    if s.lstrip("-").isdigit():
        n = int(s)
        total = reader.total_rows
        if not 0 <= n < total:
            raise IndexError(f"--row {n} is out of range: the cache has {total} rows (0..{total - 1})")
        for i, row in enumerate(reader.iter_rows()):
            if i == n:
                return i, row
    matches = []
    for i, row in enumerate(reader.iter_rows()):
        if row.row_id.startswith(s):
            matches.append((i, row))
            if len(matches) > 1:
                raise KeyError(f"--row {s!r} matches several row_ids ({matches[0][1].row_id}, {row.row_id}, ...); "
                               "give more characters")
    if not matches:
        raise KeyError(f"--row {s!r} is neither a row index nor a row_id of this cache")
    return matches[0]


def parse_positions(spec: str | None, P: int, row: int | None = None) -> range:
    """``A:B`` (Python slice semantics, either side optional, negatives from the end) over the row's P positions;
    a range that selects no position is an error naming the row's range (``row``: its index, for the message)."""
    if not spec:
        return range(P)
    parts = spec.split(":")
    if len(parts) != 2:
        raise ValueError(f"--positions {spec!r}: expected A:B, e.g. 0:40 or 100: or :-10")
    try:
        a = int(parts[0]) if parts[0].strip() else None
        b = int(parts[1]) if parts[1].strip() else None
    except ValueError:
        raise ValueError(f"--positions {spec!r}: A and B must be integers") from None
    chosen = range(P)[slice(a, b)]
    if not chosen:
        which = f"row {row}" if row is not None else "the row"
        raise ValueError(f"--positions {spec!r} selects no position: {which} has {P} positions (0:{P}, i.e. "
                         f"0..{P - 1}); give A:B within that range")
    return chosen


def row_json(index: int, row, positions: range, text: TokenText | None, *, vocab_size: int | None,
             threshold: float, top: int) -> dict:
    """The ``row`` JSON object (schema in :mod:`rlkd.inspect`)."""
    a = row_stats(row, vocab_size=vocab_size, threshold=threshold)
    counts = np.asarray(row.topk_count, dtype=np.int64)
    starts = np.cumsum(counts) - counts
    ids = np.asarray(row.input_ids)
    out_positions = []
    for t in positions:
        s, n = int(starts[t]), int(counts[t])
        top_ids = np.asarray(row.topk_ids[s:s + n])
        top_lp = np.asarray(row.topk_logprobs[s:s + n], dtype=np.float64)
        shown = min(top, n)
        toks = text(top_ids[:shown]) if text else [None] * shown
        nxt = int(ids[t + 1])
        out_positions.append({
            "t": t,
            "token_id": int(ids[t]),
            "next_id": nxt,
            "next_token": text([nxt])[0] if text else None,
            "response": bool(row.loss_mask[t]),
            "entropy_lower": float(a.entropy_lower[t]),
            "entropy_upper": float(a.entropy_upper[t]) if np.isfinite(a.entropy_upper[t]) else None,
            "peaks": int(a.peaks[t]),
            "tail_mass": float(a.tail[t]),
            "target_prob": float(a.target_prob[t]),
            "target_rank": int(row.target_rank[t]),
            "top": [{"id": int(i), "token": tk, "prob": float(np.exp(lp)), "is_next": int(i) == nxt}
                    for i, tk, lp in zip(top_ids[:shown], toks, top_lp[:shown])],
        })
    return {
        "index": index,
        "row_id": row.row_id,
        "source_index": int(row.source_index),
        "tokens": int(ids.shape[0]),
        "positions_shown": [positions.start, positions.stop] if len(positions) else [0, 0],
        "text": text.text(ids) if text else None,
        "positions": out_positions,
    }


_ENTROPY_STYLES = ((0.5, "green"), (1.5, "yellow"), (3.0, "dark_orange"), (float("inf"), "red"))
"""Colour of a position by its entropy lower bound (nats): confident to uncertain."""


def _style(h: float) -> str:
    return next(s for lim, s in _ENTROPY_STYLES if h < lim)


def render_row(view: dict, *, color: bool, width: int | None = None) -> str:
    """The row view as text; with ``color`` as rich-rendered ANSI (entropy colours), else plain."""
    head = (f"row {view['index']}  row_id {printable(str(view['row_id']))}  source_index {view['source_index']}  "
            f"tokens {view['tokens']}  positions {view['positions_shown'][0]}:{view['positions_shown'][1]}")
    legend = ("pos = position t (predicts token t+1); P/R = prompt/response (loss_mask); H = entropy bounds (nats); "
              "* = the actual next token")
    lines_plain = []
    for p in view["positions"]:
        tops = "  ".join(f"{'*' if e['is_next'] else ''}{show(e['token'])} {e['prob']:.4f}" for e in p["top"])
        if not any(e["is_next"] for e in p["top"]):
            tops += f"  | next {show(p['next_token'])} {p['target_prob']:.4f} (rank {p['target_rank']})"
        hi = "   n/a" if p["entropy_upper"] is None else f"{p['entropy_upper']:6.3f}"
        lines_plain.append((p, f"{p['t']:5d}  {'R' if p['response'] else 'P'}  {show(p['next_token']):>14.14} "
                               f"{p['target_rank']:6d} {p['target_prob']:7.4f} {p['entropy_lower']:6.3f} {hi} "
                               f"{p['peaks']:3d} {p['tail_mass']:7.4f}  {tops}"))
    header = (f"{'pos':>5} {'P/R'} {'next token':>14} {'rank':>6} {'p(next)':>7} {'H>=':>6} {'H<=':>6} {'pk':>3} "
              f"{'tail':>7}  top peaks")
    if not color:
        out = [head, legend, "", "text:", printable(view["text"] or "", multiline=True), "", header]
        out += [line for _, line in lines_plain]
        return "\n".join(out) + "\n"

    import io

    from rich.console import Console
    from rich.text import Text

    buf = io.StringIO()
    # soft_wrap: lines go out whole and the terminal wraps them, as in the plain view.
    console = Console(file=buf, force_terminal=True, color_system="256", width=width or 200, highlight=False,
                      soft_wrap=True)
    console.print(Text(head, style="bold"))
    console.print(Text(legend, style="dim"))
    # The text, each token coloured by the entropy of the distribution that predicted it.
    txt = Text()
    by_next = {p["t"] + 1: p for p in view["positions"]}
    tokens_shown = [(p["t"] + 1, p["next_token"]) for p in view["positions"]]
    for tpos, tok in tokens_shown:
        p = by_next[tpos]
        txt.append(printable(tok or "", multiline=True),
                   style=_style(p["entropy_lower"]) + (" underline" if p["response"] else ""))
    console.print(Text("text (coloured by entropy, response underlined):", style="dim"))
    console.print(txt)
    console.print()
    console.print(Text(header, style="bold"))
    for p, line in lines_plain:
        console.print(Text(line, style=_style(p["entropy_lower"])))
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------------------
# The summary


_BLOCKS = " ▏▎▍▌▋▊▉█"


def _bar(frac: float, width: int) -> str:
    cells = max(0.0, min(1.0, frac)) * width
    full = int(cells)
    part = int(round((cells - full) * 8))
    if part == 8:
        full, part = full + 1, 0
    return ("█" * full + (_BLOCKS[part] if part and full < width else "")).ljust(width)


def _merge_hist(hist: dict, bins: int) -> tuple[list[float], list[int]]:
    edges, counts = hist["edges"], hist["counts"]
    step = max(1, len(counts) // bins)
    m_counts = [sum(counts[i:i + step]) for i in range(0, len(counts), step)]
    m_edges = edges[::step]
    if m_edges[-1] != edges[-1]:
        m_edges = m_edges + [edges[-1]]
    return m_edges, m_counts


def _bars(labels: list[str], per_group: dict[str, list[int]], width: int = 16) -> list[str]:
    """One line per label, one bar column per group; bars are scaled to each column's largest bin."""
    lw = max(len(x) for x in labels)
    lines = ["  " + " " * lw + "  " + "".join(f"{g:<{width + 8}}" for g in per_group)]
    shares = {}
    for g, c in per_group.items():
        tot = max(1, sum(c))
        shares[g] = [v / tot for v in c]
    for i, lab in enumerate(labels):
        cells = []
        for g in per_group:
            sh = shares[g][i] if i < len(shares[g]) else 0.0
            top = max(shares[g]) or 1.0
            cells.append(f"{_bar(sh / top, width)} {100 * sh:5.1f}% ")
        lines.append(f"  {lab:>{lw}}  " + "".join(cells).rstrip())
    return lines


def _hist_block(title: str, groups: dict, getter, fmt: str, bins: int = 10) -> list[str]:
    present = [g for g in GROUPS if groups.get(g) and getter(groups[g])]
    if not present:
        return [f"{title}: no data"]
    lines = [title]
    for g in present:
        d = getter(groups[g])
        lines.append(f"  {g:<9} mean {d['mean']:{fmt}}  p5 {d['p05']:{fmt}}  p50 {d['p50']:{fmt}}  "
                     f"p95 {d['p95']:{fmt}}  max {d['max']:{fmt}}")
    merged = {g: _merge_hist(getter(groups[g])["hist"], bins) for g in present}
    edges = merged[present[0]][0]
    labels = [f"[{edges[b]:{fmt}}, {edges[b + 1]:{fmt}}{']' if b == len(edges) - 2 else ')'}"
              for b in range(len(edges) - 1)]
    return lines + _bars(labels, {g: merged[g][1] for g in present})


def _count_block(groups: dict, labels_counts) -> list[str]:
    present = [g for g in GROUPS if groups.get(g)]
    per = {g: labels_counts(groups[g]) for g in present}
    return _bars(per[present[0]][0], {g: per[g][1] for g in present})


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def render_summary(s: dict) -> str:
    """The summary as plain text with block-character histograms (manifest fields escaped by :func:`printable`)."""
    return printable(_summary_text(s), multiline=True)


def _summary_text(s: dict) -> str:
    m = s["manifest"]
    tok = m.get("tokenizer") or {}
    teacher = m.get("teacher") or {}
    teacher_name = teacher.get("name") or teacher.get("path") or teacher.get("model") or teacher
    out = [
        f"cache       {s['cache']}{'' if m['complete'] else '   (INCOMPLETE: stage 1 did not finish)'}",
        f"teacher     {teacher_name}",
        f"tokenizer   {tok.get('name_or_path')}  vocab {tok.get('vocab_size')}  sha256 {str(tok.get('sha256'))[:16]}",
        f"k / codec   {m['k']} / {m['codec']}",
        f"dataset     {m.get('dataset')}",
        f"rows {m['rows']}  tokens {m['tokens']}  positions {m['positions']}  shards {m['shards']}  "
        f"bytes {_fmt_bytes(m['bytes'])}"
        + (f"  ({m['bytes_per_token']:.2f} bytes/token)" if m["bytes_per_token"] is not None else ""),
        f"statistics over {s['sample']['positions']} positions"
        + (f" (random sample, seed {s['sample']['seed']})" if s["sample"]["positions"] < m["positions"] else "")
        + f"; peak threshold p >= {s['peak_threshold']}; vocab V = {s['vocab_size']}"
        + f"; {s['timing']['positions_per_s']:.3g} positions/s",
    ]
    g = s["stats"]
    if not g["all"]:
        return "\n".join(out + ["", "no scored positions"]) + "\n"
    counts = "  ".join(f"{name} {g[name]['positions'] if g[name] else 0}" for name in GROUPS)
    out += [f"positions by group: {counts}", ""]
    out += _hist_block("top-1 probability", g, lambda x: x["top1_prob"], ".2f")
    out.append("")
    out += _hist_block("entropy lower bound (nats; tail as concentrated as its ranks allow)", g,
                       lambda x: x["entropy_lower"], ".2f")
    out.append("")
    if s["vocab_size"] is None:
        out.append("entropy upper bound: unknown, the manifest records no vocabulary size (pass --vocab-size V)")
    else:
        out += _hist_block("entropy upper bound (nats; tail spread uniformly over the V - k dropped tokens)", g,
                           lambda x: x["entropy_upper"], ".2f")
    out.append("")
    out.append(f"number of peaks (cached tokens with p >= {s['peak_threshold']})")
    for n in GROUPS:
        if g[n]:
            pk = g[n]["peaks"]
            out.append(f"  {n:<9} mean {pk['mean']:.2f}  multi-peak (>= 2) {100 * pk['multi_peak_share']:.1f}%  "
                       f"no peak {100 * pk['no_peak_share']:.1f}%"
                       + (f"  may undercount {100 * pk['undercount_share']:.1f}%" if pk["undercount_share"] else ""))

    def peak_counts(x):
        maxp = max(int(c) for grp in g.values() if grp for c in grp["peaks"]["counts"])
        return [str(i) for i in range(maxp + 1)], [x["peaks"]["counts"].get(str(i), 0) for i in range(maxp + 1)]

    out += _count_block(g, peak_counts)
    out.append("")
    out += _hist_block("tail mass (probability outside the cached top-k)", g, lambda x: x["tail_mass"], ".2f")
    out.append("")
    out.append("rank of the actual next token (1 = the teacher's argmax)")
    for n in GROUPS:
        if g[n]:
            tr = g[n]["target_rank"]
            out.append(f"  {n:<9} rank 1 {100 * tr['top1_share']:.1f}%  in cached top-k "
                       f"{100 * tr['in_topk_share']:.1f}%  median rank {tr['p50']:.0f}  mean rank {tr['mean']:.1f}")
    out += _count_block(g, lambda x: (x["target_rank"]["hist"]["labels"], x["target_rank"]["hist"]["counts"]))
    return "\n".join(out) + "\n"


METRIC_HELP = (
    "cr@k: the student's top-k is the teacher's, in the same order. mor@k: the mean over positions of or@k = "
    "|top-k(S) ∩ top-k(T)| / k,\n  the paper's OR@k (per position) and MOR@k. set@k: the same top-k set in any "
    "order (or@k = 1). top1_agreement: the same argmax.\n  kd: sparse forward KL (nats/position) with the tail "
    "mode shown; ce: the student's cross-entropy on the actual next token.\n  Rates are over positions where the "
    "teacher kept >= k entries.")
"""What each metric is, under the student table (text and HTML)."""


def render_student(st: dict) -> str:
    """The student agreement metrics as a small plain-text table, with the metrics the cache's k leaves out."""
    from rlkd.core.metrics import left_out_note, metric_keys

    lines = [f"student {st['student']} over {st['rows']} rows (positions: "
             + ", ".join(f"{g} {st['metrics'][g]['positions'] if st['metrics'].get(g) else 0}"
                         for g in ("all", "response")) + f"; kd tail: {st['tail']})"]
    groups = [g for g in ("response", "all") if st["metrics"].get(g)]
    lines.append(f"  {'metric':<16}" + "".join(f"{g:>12}" for g in groups))
    for key in metric_keys(st["cache_k"]):
        vals = []
        for g in groups:
            v = st["metrics"][g].get(key)
            vals.append(f"{'n/a':>12}" if v is None else
                        (f"{v:12.4f}" if key in ("kd", "ce") else f"{100 * v:11.2f}%"))
        lines.append(f"  {key:<16}" + "".join(vals))
    note = left_out_note(st["cache_k"])
    if note:
        lines.append(f"  {note}.")
    lines.append("  " + METRIC_HELP)
    return printable("\n".join(lines) + "\n", multiline=True)


def is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False

