"""Stage 1's input side: load the source dataset, and turn each row into token ids plus a loss mask.

``load_source`` -> ``iter_examples`` (row shapes and formats: :mod:`rlkd.pipeline.formatting`) -> teacher engine.

Which rows a run uses: the first ``limit`` rows of the source split (all when unset), then, with ``--shard I/N``,
those whose source index ``i`` has ``i % N == I``. So the N parts of a sharded run, each with the same ``limit``,
cover the unsharded run's rows exactly once.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from rlkd.pipeline.config import DEFAULT_MAX_LENGTH, CacheTeacherConfig
from rlkd.pipeline.formatting import (
    Encoded,
    FormatError,
    Formatter,
    RowSkip,
    TemplateError,
    detect_columns,
    prompt_format_identity,
    resolve_prompt_format,
    row_to_messages,
)

DOLLY_SAMPLE = Path(__file__).resolve().parent.parent / "data" / "dolly_sample.jsonl"
"""300 databricks-dolly-15k rows shipped for the demo (CC BY-SA 3.0: see rlkd/data/DOLLY_LICENSE.md)."""

BATCH_ROWS = 256
"""Rows formatted per tokenizer call."""

_SUFFIX_FORMATS = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".parquet": "parquet", ".csv": "csv",
                   ".arrow": "arrow"}


class DatasetError(FormatError):
    """The source dataset cannot be loaded or does not have the columns needed. The message says how to fix it."""


@dataclass
class Example:
    """One formatted training sequence, ready for the teacher."""

    source_index: int
    """Row index in the source split (before limit and sharding), so tools can show the original text."""
    input_ids: np.ndarray
    """(T,) int32 token ids, 2 <= T <= max_length."""
    loss_mask: np.ndarray
    """(T-1,) bool, aligned as in rlkd/cache/schema.py: position t (predicting input_ids[t+1]) is trained."""
    truncated: bool = False
    """The row was longer than max_length and was cut."""


@dataclass
class InputCounters:
    """What happened to the source rows of this run (this shard, after limit): rows kept, skipped and truncated."""

    rows: int = 0
    """Source rows considered by this run."""
    examples: int = 0
    """Examples yielded (kept, possibly truncated)."""
    skipped: Counter = field(default_factory=Counter)
    """reason -> rows dropped: empty_response, empty_text, no_assistant_turn, prompt_too_long, too_long (with
    overlong=skip), bad_value, template_* (the chat template failed on that row), no_response_tokens."""
    truncated: Counter = field(default_factory=Counter)
    """reason -> rows kept but cut to max_length (over_max_length)."""
    first_rows: dict = field(default_factory=dict)
    """reason -> the first few source indices, so a summary can point at real rows."""
    first_detail: dict = field(default_factory=dict)
    """reason -> the message of its first occurrence."""

    def _note(self, reason: str, source_index: int, detail: str) -> None:
        rows = self.first_rows.setdefault(reason, [])
        if len(rows) < 5:
            rows.append(int(source_index))
        if detail and reason not in self.first_detail:
            self.first_detail[reason] = detail

    def skip(self, reason: str, source_index: int, detail: str = "") -> None:
        self.skipped[reason] += 1
        self._note(reason, source_index, detail)

    def truncate(self, reason: str, source_index: int, detail: str = "") -> None:
        self.truncated[reason] += 1
        self._note(reason, source_index, detail)

    def as_dict(self) -> dict:
        """JSON-safe, for the manifest and the end-of-run summary."""
        return {"rows": self.rows, "examples": self.examples, "skipped": dict(self.skipped),
                "truncated": dict(self.truncated), "first_rows": dict(self.first_rows)}

    def summary(self) -> str:
        """One line, e.g. ``300 rows: 297 kept (4 truncated: over_max_length 4 (rows 3, 9, 40, 41)); 3 skipped:
        empty_response 3 (rows 12, 80, 95) [every assistant turn is empty]``: each reason with its first rows and, in
        brackets, what was wrong with the first of them."""
        def part(c: Counter) -> str:
            return ", ".join(
                f"{r} {n} (rows {', '.join(map(str, self.first_rows.get(r, [])))}{', ...' if n > 5 else ''})"
                + (f" [{self.first_detail[r]}]" if self.first_detail.get(r) else "")
                for r, n in sorted(c.items()))
        s = f"{self.rows} rows: {self.examples} kept"
        if self.truncated:
            s += f" ({sum(self.truncated.values())} truncated: {part(self.truncated)})"
        if self.skipped:
            s += f"; {sum(self.skipped.values())} skipped: {part(self.skipped)}"
        return s


# ---- loading ------------------------------------------------------------------------------------------------------

def _looks_like_path(src: str) -> bool:
    return (src.startswith(("/", "./", "../", "~", ".\\")) or src.count("/") > 1
            or any(src.endswith(s) for s in (*_SUFFIX_FORMATS, ".gz", ".zst")))


def check_text_file(path: Path, fmt: str) -> None:
    """Before handing a local, uncompressed text file (json/jsonl, csv) to the loader, check what its errors would
    hide: an empty file (the loader says "StopIteration") and bytes that are not UTF-8 (the loader accepts them and a
    later step fails far from the cause). Names the file and line. One streaming pass, at disk speed."""
    lines_before, start, carry, content = 0, 0, b"", False  # start: file offset of ``data``
    with open(path, "rb") as f:
        while True:
            block = f.read(1 << 22)
            data = carry + block
            try:
                data.decode("utf-8")
                carry = b""
            except UnicodeDecodeError as e:
                if block and e.reason == "unexpected end of data" and e.start >= len(data) - 3:
                    carry = data[e.start:]  # a character split between two reads: judge it with the next one
                    data = data[:e.start]
                else:
                    at = e.start
                    line = lines_before + data.count(b"\n", 0, at) + 1
                    column = at - (data.rfind(b"\n", 0, at) + 1) + 1
                    raise DatasetError(
                        f"dataset {path}: line {line} is not UTF-8 (byte 0x{data[at]:02x} at column {column}, byte "
                        f"{start + at} of the file). Save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 "
                        f"{path.name} > fixed-{path.name}`)") from None
            if not block:
                break
            content = content or bool(data.strip())
            lines_before += data.count(b"\n")
            start += len(data)
    if not content:
        raise DatasetError(f"dataset {path} is empty: it holds no {'rows' if fmt == 'json' else 'data'}")


def first_bad_json_line(path: Path) -> tuple[int, str] | None:
    """(line number, parse error) of the first line of a jsonl file that is not a JSON object, or None. Only called
    after the loader failed, to say where: a whole .json document (not one object per line) is not judged here."""
    lines_format = path.name.lower().endswith((".jsonl", ".ndjson"))
    seen_object = False
    with open(path, encoding="utf-8") as f:
        for i, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                problem = f"{e.msg} at column {e.colno}"
            else:
                if isinstance(value, dict):
                    seen_object = True
                    continue
                problem = f"a JSON {type(value).__name__}, not an object"
            # A .json file may be one document over many lines: only blame a line once the file reads as JSON lines.
            return (i, problem) if lines_format or seen_object else None
    return None


def load_source(cfg: CacheTeacherConfig):
    """Load ``cfg.dataset`` as a ``datasets.Dataset``.

    A local file (format from its suffix or ``dataset_format``; a single file is the ``train`` split), a folder of data
    files, a folder written by ``save_to_disk``, or a hub id loaded with ``split`` and ``subset``. Raises
    :class:`DatasetError` naming the path or id and the fix (for a local file: the line at fault).
    """
    import datasets

    src = str(cfg.dataset)
    path = Path(src).expanduser()
    try:
        if path.is_file():
            name = path.name.lower()
            packed = name.endswith((".gz", ".zst", ".bz2", ".xz"))
            for suffix in (".gz", ".zst", ".bz2", ".xz"):
                name = name.removesuffix(suffix)
            fmt = cfg.dataset_format or _SUFFIX_FORMATS.get(Path(name).suffix)
            if fmt is None:
                raise DatasetError(f"dataset {src}: cannot tell the file format from its name; give "
                                   "--dataset-format json|parquet|csv|arrow")
            if fmt in ("json", "csv") and not packed:
                check_text_file(path, fmt)
            try:
                ds = datasets.load_dataset(fmt, data_files={"train": str(path)}, split=cfg.split)
            except Exception as e:
                if isinstance(e, ValueError) and "split" in str(e).lower() and not cfg.split.startswith("train"):
                    raise DatasetError(f"dataset {src}: a single local file is the 'train' split (optionally sliced, "
                                       f"e.g. train[:1000]); got --split {cfg.split!r}") from e
                bad = first_bad_json_line(path) if fmt == "json" and not packed else None
                if bad is not None:
                    raise DatasetError(f"dataset {src}: line {bad[0]} is not a JSON object ({bad[1]}). A .jsonl file "
                                       "holds one JSON object per line: fix or remove that line") from e
                raise
        elif path.is_dir():
            if (path / "dataset_dict.json").exists() or (path / "state.json").exists():  # save_to_disk output
                loaded = datasets.load_from_disk(str(path))
                if isinstance(loaded, datasets.DatasetDict):
                    if cfg.split not in loaded:
                        raise DatasetError(f"dataset {src}: no split {cfg.split!r}; it has "
                                           f"{', '.join(loaded)} (give --split NAME)")
                    loaded = loaded[cfg.split]
                ds = loaded
            else:
                ds = datasets.load_dataset(str(path), split=cfg.split)  # a folder of data files
        elif _looks_like_path(src):
            raise DatasetError(f"dataset {src}: no such file or folder (check the path given to --dataset)")
        else:
            ds = datasets.load_dataset(src, cfg.subset, split=cfg.split)
    except DatasetError:
        raise
    except Exception as e:  # datasets raises many types; name the source and the options that select it
        local = path.exists()
        where = f"local {'folder' if path.is_dir() else 'file'}" if local else "hub dataset"
        hint = ("Check the file's format (--dataset-format) and --split" if local else
                "Check --dataset, --split and --subset; a hub id needs network access or a warm HF cache")
        raise DatasetError(
            f"could not load dataset {src!r} ({where}, split={cfg.split!r}, subset={cfg.subset!r}): "
            f"{type(e).__name__}: {str(e).strip() or 'no details'}. {hint}."
        ) from e
    if not isinstance(ds, datasets.Dataset):
        raise DatasetError(f"dataset {src}: expected one split, got {type(ds).__name__}; give --split NAME")
    if len(ds) == 0:
        raise DatasetError(f"dataset {src} (split {cfg.split!r}) has no rows")
    return ds


def _source_name(cfg: CacheTeacherConfig) -> str:
    """Hub id as given; for local data only the file/folder name, so the same file at another path (another machine
    of a sharded run) has the same identity. The content fingerprint is what really identifies it."""
    path = Path(str(cfg.dataset)).expanduser()
    return path.resolve().name if path.exists() else str(cfg.dataset)


def dataset_identity(cfg: CacheTeacherConfig, ds, tokenizer: Any = None) -> dict:
    """The manifest's ``dataset`` entry: what makes two runs' rows comparable.

    ``{"source", "split", "subset", "num_rows", "columns" (the mapping used), "fingerprint" (sha256 over the used
    columns of every source row, in order), "prompt_format" ({"name", "chat_template_sha256"} when ``tokenizer`` is
    given, else the option as set), "loss_on", "max_length", "overlong"}``. ``limit`` and ``shard`` are deliberately
    not in it (they belong to the run config): every shard of one run has the same identity, and a resumed run may
    raise ``limit``.
    """
    mapping = _mapping(cfg, ds)
    h = hashlib.sha256(b"rlkd-dataset-v1\0")
    # Hash the used columns only, batch by batch as JSON: content-based (not the loader's cache fingerprint, which
    # depends on paths and mtimes), so the same rows loaded on another machine give the same identity.
    cols = ds.select_columns(mapping.used_columns)
    for batch in cols.iter(batch_size=1024):
        h.update(json.dumps(batch, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8"))
    if tokenizer is not None:
        fmt = prompt_format_identity(resolve_prompt_format(cfg.prompt_format, tokenizer), tokenizer)
    else:
        fmt = {"name": cfg.prompt_format}
    if mapping.kind == "text":
        fmt = {"name": "text"}  # text rows are never templated
    return {
        "source": _source_name(cfg),
        "split": cfg.split,
        "subset": cfg.subset,
        "num_rows": len(ds),
        "columns": mapping.as_dict(),
        "fingerprint": h.hexdigest(),
        "prompt_format": fmt,
        "loss_on": "all" if mapping.kind == "text" else cfg.loss_on,
        "max_length": cfg.max_length or DEFAULT_MAX_LENGTH,
        "overlong": cfg.overlong,
    }


def _mapping(cfg: CacheTeacherConfig, ds):
    try:
        return detect_columns(ds.column_names, cfg, source=f"dataset {cfg.dataset}")
    except FormatError as e:
        raise DatasetError(str(e)) from None


def check_some_examples(cfg: CacheTeacherConfig, counters: InputCounters) -> None:
    """After a run's rows are all read: raise :class:`DatasetError` when rows were read but none could be used, with
    every reason and its cause (rather than writing an empty cache that stage 2 cannot train on)."""
    if counters.rows and not counters.examples:
        raise DatasetError(f"dataset {cfg.dataset}: none of its rows could be used ({counters.summary()}). Fix the "
                           "data or the options named above (column mapping, --max-length, --prompt-format)")


# ---- examples -----------------------------------------------------------------------------------------------------

def run_indices(cfg: CacheTeacherConfig, num_rows: int) -> range:
    """Source indices this run uses: the first ``limit`` rows, then ``i % N == I``."""
    i, n = cfg.shard_index
    end = num_rows if cfg.limit is None else min(cfg.limit, num_rows)
    return range(i, end, n)


def fit_length(enc: Encoded, max_length: int, overlong: str) -> tuple[Encoded, bool] | RowSkip:
    """Apply ``max_length``: keep, truncate (the prompt stays, the response is cut) or skip, with the reason."""
    T = int(enc.input_ids.shape[0])
    r = enc.is_response
    if T < 2:
        return RowSkip("too_short", f"{T} token(s): nothing to predict")
    if not r[1:].any():
        return RowSkip("no_response_tokens", "no response token follows the first token")
    if T <= max_length:
        return enc, False
    if not r[1:max_length].any():
        return RowSkip("prompt_too_long", f"the prompt alone is {enc.prompt_len} tokens, max_length is {max_length}")
    if overlong == "skip":
        return RowSkip("too_long", f"{T} tokens > max_length {max_length} (overlong=skip)")
    return Encoded(enc.input_ids[:max_length].copy(), r[:max_length].copy()), True


def iter_examples(cfg: CacheTeacherConfig, ds, tokenizer: Any,
                  counters: InputCounters | None = None) -> Iterator[Example]:
    """Format, tokenize and mask the rows of this run (see the module docstring), in source order.

    Skipped and truncated rows are counted in ``counters`` with their reasons. A template that cannot mark assistant
    tokens at all raises :class:`~rlkd.pipeline.formatting.TemplateError` before any row; if the first
    ``BATCH_ROWS`` rows give no example and some failed in the template, the first failure is raised rather than producing
    an empty cache.
    """
    counters = counters if counters is not None else InputCounters()
    mapping = _mapping(cfg, ds)
    loss_on = "all" if mapping.kind == "text" else cfg.loss_on
    formatter = Formatter(tokenizer, cfg.prompt_format if mapping.kind != "text" else "plain", loss_on)
    max_length = cfg.max_length or DEFAULT_MAX_LENGTH
    indices = run_indices(cfg, len(ds))
    if len(indices) == 0:
        return
    rows = ds.select_columns(mapping.used_columns).select(indices)
    pos = 0
    for batch in rows.iter(batch_size=BATCH_ROWS):
        n = len(next(iter(batch.values())))
        src = [indices[pos + j] for j in range(n)]
        pos += n
        convs: list[Any] = []
        for j in range(n):
            try:
                convs.append(row_to_messages({k: v[j] for k, v in batch.items()}, mapping))
            except RowSkip as s:
                convs.append(s)
        todo = [c for c in convs if not isinstance(c, RowSkip)]
        encoded = iter(formatter.encode_batch(todo))
        for si, c in zip(src, convs):
            counters.rows += 1
            result = c if isinstance(c, RowSkip) else next(encoded)
            if not isinstance(result, RowSkip):
                result = fit_length(result, max_length, cfg.overlong)
            if isinstance(result, RowSkip):
                counters.skip(result.reason, si, result.detail)
                continue
            enc, cut = result
            if cut:
                counters.truncate("over_max_length", si)
            counters.examples += 1
            yield Example(si, enc.input_ids, enc.is_response[1:].copy(), cut)
        if counters.examples == 0:
            failed = {r: n for r, n in counters.skipped.items() if r.startswith("template")}
            if failed:  # no row of a whole batch got through the template: stop before an empty cache
                first = next(iter(failed))
                raise TemplateError(
                    f"no example came out of the first {counters.rows} rows; the chat template failed on "
                    f"{sum(failed.values())} of them ({first}: "
                    f"{counters.first_detail.get(first, '')}; first rows {counters.first_rows.get(first)}). "
                    "Use --prompt-format plain, or fix the data's roles."
                )
