"""The rows `rlkd eval` asks about: stage 1's dataset loading and formatting, cut at the last answer.

Each source row becomes, through stage 1's own code (:mod:`rlkd.pipeline.data`, :mod:`rlkd.pipeline.formatting`),
a conversation that ends with an assistant turn. The **reference** is that last turn's text; the **prompt** is the
conversation before it. Its token ids are what the row's stage-1 formatting holds before that turn's first trained
token: with a chat template, everything up to and including the assistant header (the generation prompt); in the
plain format, everything up to ``### Assistant:\\n``. So a student is asked exactly what stage 1 trains it to answer.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rlkd.pipeline.formatting import FormatError, Formatter, RowSkip, row_to_messages


class EvalDataError(FormatError):
    """The dataset cannot give prompts and references; the message says how to fix it."""


@dataclass
class EvalRow:
    """One source row as a question with a reference answer (the same for every student)."""

    source_index: int
    """Row index in the source split."""
    messages: list[dict]
    """The prompt: the conversation before the reference, as ``{role, content}`` dicts."""
    reference: str
    """The last assistant turn of the row, the answer the generations are scored against."""


@dataclass
class RowSelection:
    """The rows of a run: usable rows, and the rows skipped with their reasons (before tokenization)."""

    rows: list[EvalRow]
    """Rows with a prompt and a non-empty reference, in source order."""
    skipped: Counter = field(default_factory=Counter)
    """reason -> rows dropped (empty_reference, no_assistant_turn, bad_value, ...)."""
    first_skipped: dict = field(default_factory=dict)
    """reason -> the first few source indices."""
    source_rows: int = 0
    """Source rows considered (after ``limit``)."""


def load_rows(cfg) -> tuple[RowSelection, dict]:
    """Load ``cfg.dataset`` (an :class:`~rlkd.eval.config.EvalConfig`) with stage 1's loader; return the selected
    rows and the dataset's identity (stage 1's :func:`~rlkd.pipeline.data.dataset_identity`, whose ``fingerprint``
    a cache's manifest also holds)."""
    from rlkd.pipeline.data import dataset_identity, load_source, run_indices
    from rlkd.pipeline.formatting import detect_columns

    dcfg = cfg.data_config()
    ds = load_source(dcfg)
    try:
        mapping = detect_columns(ds.column_names, dcfg, source=f"dataset {cfg.dataset}")
    except FormatError as e:
        raise EvalDataError(str(e)) from None
    if mapping.kind == "text":
        raise EvalDataError(
            f"dataset {cfg.dataset}: only a text column ({mapping.columns['text']!r}) was found, so there are no "
            "prompts and reference answers to evaluate. Give rows with messages, prompt+completion or "
            "instruction+response (map other names with --prompt-column/--completion-column etc.)")
    identity = dataset_identity(dcfg, ds)
    indices = run_indices(dcfg, len(ds))
    sel = RowSelection(rows=[], source_rows=len(indices))
    if len(indices) == 0:
        return sel, identity
    table = ds.select_columns(mapping.used_columns).select(indices)
    pos = 0
    for batch in table.iter(batch_size=1024):
        n = len(next(iter(batch.values())))
        for j in range(n):
            si = indices[pos + j]
            try:
                msgs = row_to_messages({k: v[j] for k, v in batch.items()}, mapping)
                reference = msgs[-1]["content"]  # row_to_messages ends every conversation at an assistant turn
                if not reference.strip():
                    raise RowSkip("empty_reference", "the last assistant turn is empty")
            except RowSkip as s:
                sel.skipped[s.reason] += 1
                first = sel.first_skipped.setdefault(s.reason, [])
                if len(first) < 5:
                    first.append(si)
                continue
            sel.rows.append(EvalRow(si, msgs[:-1], reference))
        pos += n
    return sel, identity


def encode_prompts(rows: list[EvalRow], tokenizer: Any, prompt_format: str,
                   max_prompt_length: int) -> tuple[dict[int, np.ndarray], Counter]:
    """Prompt token ids per source index for one tokenizer, and the rows skipped (``prompt_too_long``, template
    failures) with their counts.

    The ids are the stage-1 encoding of the whole row cut before the reference's first trained token (see the module
    docstring). Raises :class:`~rlkd.pipeline.formatting.TemplateError` when the template cannot work at all.
    """
    formatter = Formatter(tokenizer, prompt_format, loss_on="response")
    out: dict[int, np.ndarray] = {}
    skipped: Counter = Counter()
    step = 256
    for a in range(0, len(rows), step):
        chunk = rows[a: a + step]
        convs = [r.messages + [{"role": "assistant", "content": r.reference}] for r in chunk]
        for r, enc in zip(chunk, formatter.encode_batch(convs)):
            if isinstance(enc, RowSkip):
                skipped[enc.reason] += 1
                continue
            start = _last_run_start(enc.is_response)
            if start is None:  # the reference produced no trained token (cannot happen for non-empty text)
                skipped["no_response_tokens"] += 1
                continue
            if start > max_prompt_length:
                skipped["prompt_too_long"] += 1
                continue
            out[r.source_index] = enc.input_ids[:start].copy()
    return out, skipped


def _last_run_start(mask: np.ndarray) -> int | None:
    """Index of the first token of the last run of True in a (T,) bool mask (None if none is True)."""
    hit = np.flatnonzero(mask)
    if hit.size == 0:
        return None
    gaps = np.flatnonzero(np.diff(hit) > 1)  # ends of earlier runs
    return int(hit[gaps[-1] + 1]) if gaps.size else int(hit[0])
