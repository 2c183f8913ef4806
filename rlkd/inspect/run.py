"""What ``rlkd inspect`` does, form by form: summary, one row, HTML report, student agreement.

:func:`run` returns the ``--json`` object (schema in :mod:`rlkd.inspect`) and the human-readable text; the CLI only
prints one of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rlkd.core.metrics import TAILS


@dataclass
class InspectOptions:
    """Options of ``rlkd inspect`` (one field per flag)."""

    cache: str = field(metadata={"argument": True})
    """The cache directory (holds manifest.json), or its URL (``s3://bucket/prefix``, ...)."""
    sample: int | None = field(default=None, metadata={"metavar": "N"})
    """Summary over this many randomly chosen positions instead of all; with --student, score whole random rows
    until they hold at least this many positions."""
    seed: int = 0
    """Seed of --sample."""
    peak_threshold: float = 0.1
    """A peak is a cached token with probability >= this."""
    vocab_size: int | None = None
    """Vocabulary size V for the entropy upper bound; default the manifest's (larger of tokenizer and teacher)."""
    row: str | None = field(default=None, metadata={"metavar": "N"})
    """Show this row (0-based index in file order, or a row_id prefix) position by position."""
    positions: str | None = field(default=None, metadata={"metavar": "A:B"})
    """With --row: the positions A:B to show (Python slice, e.g. 0:40, 100:, :-10)."""
    top: int = 5
    """With --row: cached entries shown per position."""
    tokenizer: str | None = field(default=None, metadata={"metavar": "PATH"})
    """Tokenizer to decode tokens with; default the teacher's, from the manifest."""
    html: str | None = field(default=None, metadata={"metavar": "FILE"})
    """Write a self-contained HTML report to this file."""
    rows: str | None = field(default=None, metadata={"metavar": "SPEC"})
    """With --html: rows in the token heatmap, e.g. 0,3,10-12 (default the first 3)."""
    student: str | None = field(default=None, metadata={"metavar": "PATH"})
    """A student model folder to measure its peak agreement with the teacher (float32 on CPU)."""
    tail: Literal[TAILS] | None = None
    """With --student: the tail mode of its sparse KL, bucket (default) or renormalize, as in train-student, whose
    evaluation then reports the same numbers."""
    color: Literal["auto", "always", "never"] = "auto"
    """Colour in --row: auto (only in a terminal), always, never."""
    json: bool = False
    """Print one JSON object (schema above) instead of text."""

    def validate(self) -> list[str]:
        problems = []
        if self.sample is not None and self.sample < 1:
            problems.append(f"--sample must be a positive number of positions, got {self.sample}")
        if not 0.0 < self.peak_threshold <= 1.0:
            problems.append(f"--peak-threshold must lie in (0, 1], got {self.peak_threshold}")
        if self.vocab_size is not None and self.vocab_size < 1:
            problems.append(f"--vocab-size must be positive, got {self.vocab_size}")
        if self.top < 1:
            problems.append(f"--top must be >= 1, got {self.top}")
        if self.positions is not None and self.row is None:
            problems.append("--positions selects positions of --row: give --row too")
        if self.rows is not None and self.html is None:
            problems.append("--rows selects the rows of the --html heatmap: give --html too (or use --row N)")
        if self.row is not None and (self.html is not None or self.student is not None):
            problems.append("--row shows one row in the terminal; it does not combine with --html/--student "
                            "(use --html with --rows to put rows in the report)")
        if self.tail is not None and self.student is None:
            problems.append("--tail sets the tail mode of the student's sparse KL: give --student too")
        if self.html is not None:
            from rlkd.inspect.report import html_path_problem

            problem = html_path_problem(self.html)
            if problem:
                problems.append(problem)
        from rlkd.cache.storage import url_problem

        if url_problem(self.cache):
            problems.append(url_problem(self.cache))
        elif "://" not in self.cache and not (Path(self.cache) / "manifest.json").is_file():
            problems.append(f"{self.cache} is not an rlkd cache (no manifest.json there)")
        return problems


def run(opts: InspectOptions, *, color: bool = False, progress: bool = False) -> tuple[dict, str]:
    """Do what ``opts`` asks; return (the JSON object, the text for a human)."""
    from rlkd.cache import CacheReader, read_manifest
    from rlkd.cache.manifest import vocab_limit
    from rlkd.inspect import view

    manifest = read_manifest(opts.cache)
    V = opts.vocab_size if opts.vocab_size is not None else vocab_limit(manifest)
    out: dict = {"schema": "rlkd.inspect/1"}
    text: list[str] = []

    if opts.row is not None:
        reader = CacheReader(opts.cache, shuffle=False)
        tok = view.load_tokenizer(manifest, opts.cache, opts.tokenizer)
        index, row = view.find_row(reader, opts.row)
        positions = view.parse_positions(opts.positions, row.num_positions, row=index)
        out["row"] = view.row_json(index, row, positions, view.TokenText(tok), vocab_size=V,
                                   threshold=opts.peak_threshold, top=opts.top)
        text.append(view.render_row(out["row"], color=color))
        return out, "".join(text)

    text_of = wanted = None
    if opts.html is not None:  # fail fast, before the long passes: bad --rows, tokenizer not found
        from rlkd.inspect.report import parse_rows

        wanted = parse_rows(opts.rows, CacheReader(opts.cache, shuffle=False).total_rows)
        if wanted:
            text_of = view.TokenText(view.load_tokenizer(manifest, opts.cache, opts.tokenizer))

    summary = None
    if opts.student is None or opts.html is not None:
        from rlkd.inspect.stats import summary as make_summary

        summary, _ = make_summary(opts.cache, sample=opts.sample, seed=opts.seed, threshold=opts.peak_threshold,
                                  vocab_size=V)
        out["summary"] = summary
        text.append(view.render_summary(summary))

    student = scorer = None
    if opts.student is not None:
        from rlkd.inspect.student import StudentScorer

        scorer = StudentScorer(opts.student, opts.cache, tail=opts.tail or "bucket")
        student = scorer.agreement(sample=opts.sample, seed=opts.seed, progress=progress)
        out["student"] = student
        text.append(("\n" if text else "") + view.render_student(student))

    if opts.html is not None:
        from rlkd.inspect.report import write_report

        chosen = []
        if wanted:
            want = set(wanted)
            for i, row in enumerate(CacheReader(opts.cache, shuffle=False).iter_rows()):
                if i in want:
                    chosen.append((i, row))
                    if len(chosen) == len(want):
                        break
        details = {i: scorer.details(row) for i, row in chosen} if scorer is not None else None
        size = write_report(opts.html, summary, chosen, text_of, student=student, student_details=details,
                            vocab_size=V, threshold=opts.peak_threshold,
                            title=f"rlkd inspect · {Path(opts.cache).name}")
        out["html"] = {"path": str(opts.html), "bytes": size, "rows": wanted}
        text.append(f"\nwrote {opts.html} ({size:,} bytes; heatmap rows {wanted})\n")
    return out, "".join(text)
