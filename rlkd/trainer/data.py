"""Batches for the trainer: which cache rows train, in which batches; :func:`rlkd.core.targets.collate` pads them.

The cache reader (:class:`rlkd.cache.CacheReader`) yields batches of unpadded rows. This module chooses the rows
and cuts the batches, then collates each once into a :class:`~rlkd.core.targets.ModelBatch` (padded model inputs
plus the teacher targets of the trained positions, flattened to ``(N, k)``):

* the **eval split**: with ``eval_fraction > 0`` a row is held out iff a hash of its ``row_id`` falls below the
  fraction. The decision depends on the row alone, so it is the same in every run, on every rank, and whatever the
  shuffle; held-out rows are dropped from every training batch and are the only rows the evaluation sees (rows
  without any trained position are dropped from training too);
* **group by length** (optional): rows from ``length_group`` consecutive reader batches are pooled, sorted by length
  and re-cut into batches (less padding); the order of the re-cut batches is shuffled with a seeded RNG;
* **exact resume**: :class:`TrainStream` records the reader's state at the start of the current pool and how many
  batches of the pool were consumed, so a resumed run sees exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from pathlib import Path

from rlkd.cache.schema import TeacherRow
from rlkd.core.targets import ModelBatch, collate
from rlkd.errors import UserError

# ---- eval split -------------------------------------------------------------------------------------------------

def eval_score(row_id: str) -> float:
    """A uniform number in [0, 1) fixed by ``row_id``: rows with ``eval_score < eval_fraction`` are held out."""
    digest = hashlib.sha256(b"rlkd-eval-split\0" + row_id.encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64


def is_eval_row(row_id: str, eval_fraction: float) -> bool:
    return eval_fraction > 0 and eval_score(row_id) < eval_fraction


# ---- training stream with exact resume --------------------------------------------------------------------------

class NothingToTrainError(UserError, ValueError):
    """No row of the cache can be trained on (empty, all held out for eval, or no trained position)."""


class TrainStream:
    """Training micro-batches over epochs, eval rows removed, optionally grouped by length; resumable exactly.

    ``state_dict()`` after the n-th yielded batch describes "continue with batch n+1": the reader's state at the
    start of the current pool, how many of the pool's batches were already yielded, and the epoch.
    """

    def __init__(self, reader, *, batch_size: int, eval_fraction: float = 0.0, group_by_length: bool = False,
                 length_group: int = 16, seed: int = 0, epochs: int | None = None):
        self.reader = reader
        self.batch_size = batch_size
        self.eval_fraction = eval_fraction
        self.group_by_length = group_by_length
        self.pool_batches = length_group if group_by_length else 1
        self.seed = seed
        self.epochs = epochs
        self.epoch = 0
        self._pool_start: dict | None = None  # reader state at the start of the current pool
        self._pool_index = 0  # pools completed in this epoch (seeds the batch order shuffle)
        self._consumed = 0  # batches of the current pool already yielded
        self._resume_skip = 0  # batches to skip when rebuilding the pool after load_state_dict

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pool_start": self._pool_start, "pool_index": self._pool_index,
                "consumed": self._consumed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self._pool_start = state["pool_start"]
        self._pool_index = int(state["pool_index"])
        self._resume_skip = int(state["consumed"])

    def _make_pool(self, it: Iterator[list[TeacherRow]]) -> list[ModelBatch] | None:
        """Pull up to ``pool_batches`` reader batches; return the training batches they make (None: epoch over)."""
        rows: list[TeacherRow] = []
        pulled = 0
        for batch in it:
            pulled += 1
            # Held-out rows never train; rows without a trained position would only cost a forward.
            rows += [r for r in batch if not is_eval_row(r.row_id, self.eval_fraction) and bool(r.loss_mask.any())]
            if pulled == self.pool_batches:
                break
        if pulled == 0:
            return None
        k = self.reader.k
        if not self.group_by_length:
            # One reader batch in, at most one batch out (smaller when eval rows were dropped).
            return [collate(rows, k)] if rows else []
        rows.sort(key=lambda r: int(r.input_ids.shape[0]), reverse=True)  # stable: ties keep reader order
        batches = [collate(rows[i: i + self.batch_size], k) for i in range(0, len(rows), self.batch_size)]
        random.Random(f"{self.seed}/{self.epoch}/{self._pool_index}").shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[ModelBatch]:
        while self.epochs is None or self.epoch < self.epochs:
            self.reader.set_epoch(self.epoch)
            whole_epoch = self._pool_start is None  # not resumed part-way: an empty pass means an empty stream
            if self._pool_start is not None:
                self.reader.load_state_dict(self._pool_start)
            it = iter(self.reader)
            yielded = 0
            while True:
                self._pool_start = self.reader.state_dict()
                pool = self._make_pool(it)
                if pool is None:
                    break
                skip, self._resume_skip = self._resume_skip, 0
                self._consumed = skip
                for batch in pool[skip:]:
                    self._consumed += 1
                    yielded += 1
                    yield batch
                self._pool_index += 1
                self._consumed = 0
            if whole_epoch and not yielded:  # every later epoch would be empty too: never loop over them
                raise NothingToTrainError(
                    f"nothing to train: a whole pass over {getattr(self.reader, 'cache_dir', 'the cache')} "
                    f"({getattr(self.reader, 'num_rows', '?')} rows) gave no training batch; every row is held out "
                    f"by eval_fraction={self.eval_fraction} or has no trained position")
            self.epoch += 1
            self._pool_start = None
            self._pool_index = 0


# ---- eval batches -----------------------------------------------------------------------------------------------

def load_eval_batches(reader, *, batch_size: int, eval_fraction: float, max_rows: int) -> list[ModelBatch]:
    """The evaluation set as a list of collated batches, kept in memory between evaluations.

    ``reader`` is unshuffled. With ``eval_fraction > 0`` it reads the training cache and keeps only held-out rows
    (one pass over the cache, done once); with ``eval_fraction == 0`` it reads a separate eval cache and keeps
    every row. At most ``max_rows`` rows, in file order, cut into batches of ``batch_size``.
    """
    batches: list[ModelBatch] = []
    pending: list[TeacherRow] = []  # collated as soon as a batch is full: kept rows would pin their row groups
    kept = 0
    for batch in reader:
        for r in batch:
            if kept < max_rows and (eval_fraction == 0 or is_eval_row(r.row_id, eval_fraction)):
                pending.append(r)
                kept += 1
                if len(pending) == batch_size:
                    batches.append(collate(pending, reader.k))
                    pending = []
        if kept >= max_rows:
            break
    if pending:
        batches.append(collate(pending, reader.k))
    return batches


# ---- cache checks -----------------------------------------------------------------------------------------------

def count_trainable_rows(cache_dir: str | Path, manifest: dict, eval_fraction: float, *,
                         stop_after: int | None = 1) -> dict[str, int]:
    """Count the cache's rows by what training does with them: ``held_out`` (eval split), ``no_positions`` (no
    trained position), ``trainable``; ``rows`` is how many were looked at.

    Reads only the ``row_id`` and ``loss_mask`` columns, and stops after the row group where ``trainable`` reaches
    ``stop_after`` (None: count everything), so checking that there is something to train is cheap when there is.
    """
    import numpy as np
    import pyarrow.parquet as pq

    from rlkd.cache.storage import CacheLocation

    loc = CacheLocation.parse(cache_dir)
    counts = {"rows": 0, "held_out": 0, "no_positions": 0, "trainable": 0}
    for shard in manifest.get("shards", []):
        pf = pq.ParquetFile(loc.path(shard["file"]), filesystem=loc.fs)
        for rg in range(pf.metadata.num_row_groups):
            table = pf.read_row_group(rg, columns=["row_id", "loss_mask"])
            mask = table.column("loss_mask").combine_chunks()  # list<bool>, one (P,) list per row
            trained = np.concatenate([[0], np.cumsum(mask.values.to_numpy(zero_copy_only=False))])
            offsets = mask.offsets.to_numpy()
            per_row = trained[offsets[1:]] - trained[offsets[:-1]]  # (rows,) trained positions
            for row_id, n in zip(table.column("row_id").to_pylist(), per_row.tolist()):
                counts["rows"] += 1
                if is_eval_row(row_id, eval_fraction):
                    counts["held_out"] += 1
                elif n == 0:
                    counts["no_positions"] += 1
                else:
                    counts["trainable"] += 1
            if stop_after is not None and counts["trainable"] >= stop_after:
                return counts
    return counts
