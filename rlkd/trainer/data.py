"""Batches for the trainer: cache reader rows -> model inputs + the flattened teacher targets of trained positions.

The cache reader (:class:`rlkd.cache.CacheReader`) yields padded batches whose position ``t`` predicts token ``t+1``
(see :mod:`rlkd.cache.schema`). This module adds what training needs on top of it:

* the **eval split**: with ``eval_fraction > 0`` a row is held out iff a hash of its ``row_id`` falls below the
  fraction. The decision depends on the row alone, so it is the same in every run, on every rank, and whatever the
  shuffle; held-out rows are dropped from every training batch and are the only rows the evaluation sees (rows
  without any trained position are dropped from training too);
* **group by length** (optional): rows from ``length_group`` consecutive reader batches are pooled, sorted by length
  and re-cut into batches (less padding); the order of the re-cut batches is shuffled with a seeded RNG;
* **exact resume**: :class:`TrainStream` records the reader's state at the start of the current pool and how many
  batches of the pool were consumed, so a resumed run sees exactly the batches an uninterrupted one would have.

Row tensors are right-padded like the reader's: ``input_ids`` 0, masks False, ``topk_logprobs`` -inf.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from rlkd.trainer.losses import TeacherTargets

PER_POSITION_KEYS = ("input_ids", "attention_mask", "loss_mask", "topk_ids", "topk_logprobs", "topk_valid",
                     "tail_logmass", "target_logprob", "target_rank")
"""Batch tensors with a (B, T, ...) layout; everything the trainer uses from a reader batch."""

PAD_VALUES = {"topk_logprobs": float("-inf")}
"""Padding per key when re-collating rows (0 / False otherwise), as the reader pads."""


# ---- eval split -------------------------------------------------------------------------------------------------

def eval_score(row_id: str) -> float:
    """A uniform number in [0, 1) fixed by ``row_id``: rows with ``eval_score < eval_fraction`` are held out."""
    digest = hashlib.sha256(b"rlkd-eval-split\0" + row_id.encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64


def is_eval_row(row_id: str, eval_fraction: float) -> bool:
    return eval_fraction > 0 and eval_score(row_id) < eval_fraction


# ---- rows <-> batches -------------------------------------------------------------------------------------------

def split_batch(batch: dict) -> list[dict]:
    """One dict per row with its padding trimmed: tensors (T_i, ...) plus ``row_id`` and ``source_index``."""
    lengths = batch["attention_mask"].sum(dim=1).tolist()  # (B,)
    rows = []
    for b, length in enumerate(lengths):
        row = {key: batch[key][b, :length] for key in PER_POSITION_KEYS}
        row["row_id"] = batch["row_id"][b]
        row["source_index"] = batch["source_index"][b]
        rows.append(row)
    return rows


def collate(rows: list[dict]) -> dict:
    """Pad rows from :func:`split_batch` back into a batch with the reader's layout."""
    longest = max(int(r["input_ids"].shape[0]) for r in rows)
    batch = {}
    for key in PER_POSITION_KEYS:
        first = rows[0][key]
        out = torch.full((len(rows), longest, *first.shape[1:]), PAD_VALUES.get(key, 0), dtype=first.dtype)
        for b, r in enumerate(rows):
            out[b, : r[key].shape[0]] = r[key]
        batch[key] = out
    batch["row_id"] = [r["row_id"] for r in rows]
    batch["source_index"] = torch.stack([torch.as_tensor(r["source_index"]) for r in rows])
    return batch


def batch_tokens(batch: dict) -> int:
    """Real (non-padding) input tokens in a batch."""
    return int(batch["attention_mask"].sum())


def batch_positions(batch: dict) -> int:
    """Trained positions in a batch: the number of rows its :class:`TeacherTargets` will have."""
    return int(batch["loss_mask"].sum())


@dataclass
class ModelBatch:
    """What one micro-batch feeds the model and the loss, on the training device."""

    input_ids: torch.Tensor
    """(B, T) int64."""
    attention_mask: torch.Tensor
    """(B, T) int64 (transformers wants integers)."""
    loss_mask: torch.Tensor
    """(B, T) bool: the trained positions; ``hidden[loss_mask]`` lines up with ``targets``."""
    targets: TeacherTargets
    """The teacher at the N trained positions, row-major ``(b, t)`` order."""
    tokens: int
    """Real input tokens (for tokens/s)."""

    @property
    def positions(self) -> int:
        return len(self.targets)


def to_model_batch(batch: dict, device: torch.device | str) -> ModelBatch:
    """Move a reader batch to ``device`` and flatten its teacher targets to the trained positions."""
    loss_mask = batch["loss_mask"]  # (B, T) bool
    targets = TeacherTargets.from_batch(batch, loss_mask)  # N = loss_mask.sum() rows
    return ModelBatch(
        input_ids=batch["input_ids"].to(device, torch.long),
        attention_mask=batch["attention_mask"].to(device, torch.long),
        loss_mask=loss_mask.to(device),
        targets=targets.to(device),
        tokens=batch_tokens(batch),
    )


# ---- training stream with exact resume --------------------------------------------------------------------------

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

    def _make_pool(self, it: Iterator[dict]) -> list[dict] | None:
        """Pull up to ``pool_batches`` reader batches; return the training batches they make (None: epoch over)."""
        rows: list[dict] = []
        pulled = 0
        for batch in it:
            pulled += 1
            # Held-out rows never train; rows without a trained position would only cost a forward.
            rows += [r for r in split_batch(batch)
                     if not is_eval_row(r["row_id"], self.eval_fraction) and bool(r["loss_mask"].any())]
            if pulled == self.pool_batches:
                break
        if pulled == 0:
            return None
        if not self.group_by_length:
            # One reader batch in, at most one batch out (smaller when eval rows were dropped).
            return [collate(rows)] if rows else []
        rows.sort(key=lambda r: int(r["input_ids"].shape[0]), reverse=True)  # stable: ties keep reader order
        batches = [collate(rows[i: i + self.batch_size]) for i in range(0, len(rows), self.batch_size)]
        random.Random(f"{self.seed}/{self.epoch}/{self._pool_index}").shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[dict]:
        while self.epochs is None or self.epoch < self.epochs:
            self.reader.set_epoch(self.epoch)
            if self._pool_start is not None:
                self.reader.load_state_dict(self._pool_start)
            it = iter(self.reader)
            while True:
                self._pool_start = self.reader.state_dict()
                pool = self._make_pool(it)
                if pool is None:
                    break
                skip, self._resume_skip = self._resume_skip, 0
                self._consumed = skip
                for batch in pool[skip:]:
                    self._consumed += 1
                    yield batch
                self._pool_index += 1
                self._consumed = 0
            self.epoch += 1
            self._pool_start = None
            self._pool_index = 0


# ---- eval batches -----------------------------------------------------------------------------------------------

def load_eval_batches(reader, *, batch_size: int, eval_fraction: float, max_rows: int) -> list[dict]:
    """The evaluation set as a list of batches, kept in memory between evaluations.

    ``reader`` is unshuffled. With ``eval_fraction > 0`` it reads the training cache and keeps only held-out rows
    (one pass over the cache, done once); with ``eval_fraction == 0`` it reads a separate eval cache and keeps
    every row. At most ``max_rows`` rows, in file order.
    """
    rows: list[dict] = []
    for batch in reader:
        for r in split_batch(batch):
            if eval_fraction == 0 or is_eval_row(r["row_id"], eval_fraction):
                rows.append(r)
        if len(rows) >= max_rows:
            break
    rows = rows[:max_rows]
    return [collate(rows[i: i + batch_size]) for i in range(0, len(rows), batch_size)]


# ---- cache checks -----------------------------------------------------------------------------------------------

def max_cached_id(cache_dir: str | Path, manifest: dict) -> int:
    """The largest teacher id in the cache: the manifest's ``max_token_id`` when it records one, else a scan of the
    shards' ``topk_ids`` and ``input_ids`` columns (reads only those two columns)."""
    for key in ("max_token_id", "max_id"):
        if isinstance(manifest.get(key), int):
            return int(manifest[key])
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from rlkd.cache.storage import CacheLocation

    loc = CacheLocation.parse(cache_dir)
    largest = -1
    for shard in manifest.get("shards", []):
        table = pq.read_table(loc.path(shard["file"]), filesystem=loc.fs, columns=["topk_ids", "input_ids"])
        for name in ("topk_ids", "input_ids"):
            values = pc.list_flatten(table.column(name))
            if len(values):
                largest = max(largest, int(pc.max(values).as_py()))
    return largest
