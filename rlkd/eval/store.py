"""One student's generations on disk: ``OUT/NAME/generations.jsonl`` plus ``OUT/NAME/settings.json``, resumable.

``generations.jsonl`` holds one JSON object per generation, rows in source order and a row's samples together::

    {"row": 12, "sample": 0, "prompt": [{"role": "user", "content": "..."}], "reference": "...",
     "completion": "...", "tokens": 41, "prompt_tokens": 57, "hit_limit": false}

- ``row``: the source index; ``sample``: 0..samples-1;
- ``prompt``: the conversation before the reference (stage 1 formats it again from these messages);
- ``completion``: the generated text (special tokens dropped), ``tokens`` its length in the student's tokens without
  the stop token, ``hit_limit`` whether it reached ``max_new_tokens`` without stopping.

The ``prompt`` and ``completion`` columns make the file a ``rlkd cache-teacher --dataset`` input as it is: the teacher
then scores the student's own answers (one training row per generation).

A row's lines are written by one ``write`` and flushed to disk after each batch. A run killed mid-write leaves at
most one incomplete row at the end, which the next run cuts off before resuming; ``settings.json`` (written first)
must match the new run's, or the folder is refused rather than mixed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from rlkd.errors import UserError

GENERATIONS = "generations.jsonl"
SETTINGS = "settings.json"


class StoreError(UserError, ValueError):
    """A generations folder cannot be resumed with these settings, or is damaged; the message says what to do."""


class GenerationStore:
    """Appends rows of generations for one student and knows which rows are done."""

    def __init__(self, folder: str | Path, settings: dict, samples: int):
        self.folder = Path(folder)
        self.path = self.folder / GENERATIONS
        self.samples = int(samples)
        self.settings = dict(settings)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._check_settings(settings)
        self.rows: dict[int, list[dict]] = self._load()

    # ---- opening ------------------------------------------------------------------------------------------------

    def _check_settings(self, settings: dict) -> None:
        spath = self.folder / SETTINGS
        if spath.is_file():
            old = json.loads(spath.read_text())
            diff = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
            if diff:
                lines = "; ".join(f"{k}: was {json.dumps(old.get(k))}, now {json.dumps(settings.get(k))}"
                                  for k in diff)
                raise StoreError(
                    f"{self.folder} holds generations made with other settings ({lines}). Re-run with the old "
                    f"settings to resume, or give another --out (or delete {self.folder}) to start afresh.")
            return
        tmp = spath.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, spath)

    def _load(self) -> dict[int, list[dict]]:
        """Rows already complete. A torn or incomplete last row (a kill mid-write) is cut off the file."""
        rows: dict[int, list[dict]] = {}
        if not self.path.exists():
            return rows
        data = self.path.read_bytes()
        good_end = 0  # byte offset after the last complete row
        current: list[dict] = []
        offset = 0
        for lineno, raw in enumerate(data.splitlines(keepends=True), start=1):
            offset += len(raw)
            if not raw.endswith(b"\n"):
                break  # torn final line
            try:
                obj = json.loads(raw)
                row, sample = int(obj["row"]), int(obj["sample"])
            except (ValueError, KeyError, TypeError):
                if offset == len(data):
                    break  # a damaged last line: the row it belongs to is regenerated
                raise StoreError(f"{self.path}:{lineno} is not a generation line; the file was edited or damaged. "
                                 f"Delete {self.folder} to start afresh.") from None
            if sample != len(current) or (current and row != current[0]["row"]) or row in rows:
                raise StoreError(f"{self.path}:{lineno}: row {row} sample {sample} is out of order; the file was "
                                 f"edited or damaged. Delete {self.folder} to start afresh.")
            current.append(obj)
            if len(current) == self.samples:
                rows[row] = current
                current = []
                good_end = offset
        if good_end < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good_end)
                f.flush()
                os.fsync(f.fileno())
        return rows

    # ---- writing --------------------------------------------------------------------------------------------------

    def append(self, rows: Iterable[list[dict]]) -> None:
        """Append whole rows (each a list of ``samples`` line objects) and make them durable."""
        rows = list(rows)
        text = "".join(json.dumps(obj, ensure_ascii=False) + "\n" for row in rows for obj in row)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        for row in rows:
            self.rows[int(row[0]["row"])] = row
