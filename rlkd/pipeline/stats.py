"""What a stage-1 run counts, its progress bar, and the summary it prints: one of each for both runners (a single
process, and each replica plus the driver of a Ray run).

:class:`RunStats` is updated by the row-writer thread and read by the main thread (the progress bar) and, on Ray, by
the driver through the actor: every access goes through one lock.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from rlkd.logs import console


@dataclass
class RunStats:
    """Counters of one stage-1 run (or one Ray replica). Update with :meth:`add`, read with :meth:`snapshot`."""

    rows: int = 0
    """Rows written this run."""
    tokens: int = 0
    """Tokens of the rows written."""
    positions: int = 0
    """Scored positions of the rows written."""
    scored_tokens: int = 0
    """Tokens scored by the engine so far (ahead of ``tokens`` while rows wait for the writer thread)."""
    already_cached: int = 0
    """Rows skipped because a finished shard already holds them (resume)."""
    engine_s: float = 0.0
    """Seconds inside the engine."""
    loop_s: float = 0.0
    """Seconds of the scoring loop, from the first batch to the last row written."""
    bytes: int = 0
    """Bytes of the shards written."""
    shards: int = 0
    """Shards finished."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: float) -> None:
        """Add to counters, atomically with respect to :meth:`snapshot`."""
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def set(self, **values: float) -> None:
        with self._lock:
            for name, value in values.items():
                setattr(self, name, value)

    def snapshot(self) -> dict:
        """A consistent copy of every counter (plain types: it crosses process boundaries on Ray)."""
        with self._lock:
            return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}

    @staticmethod
    def total(snapshots: Iterable[dict]) -> dict:
        """Counters summed over several snapshots (the replicas of a Ray run)."""
        out = RunStats().snapshot()
        for snap in snapshots:
            for key in out:
                out[key] += snap.get(key, 0)
        return out


def progress_bar(total: int, initial: int, enabled: bool, desc: str = "cache-teacher"):
    """A tqdm bar over source rows (None when disabled). Rows already cached count as done, so the ETA covers only
    what is left; it draws on the terminal even while dependency output goes to the log file."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="seq", desc=desc, dynamic_ncols=True, smoothing=0.1,
                file=console())


def summarize(*, out: str, stats: dict, rows_already_cached: int, rows_in_cache: int, seconds: float, counters,
              shard: str | None, **extra) -> dict:
    """The end-of-run summary (a plain dict: it is returned, printed by :func:`format_summary`, and tested)."""
    return {
        "out": str(out),
        "rows_written": stats["rows"],
        "rows_already_cached": rows_already_cached,
        "rows_in_cache": rows_in_cache,
        "tokens": stats["tokens"],
        "positions": stats["positions"],
        "bytes": stats["bytes"],
        "bytes_per_token": stats["bytes"] / stats["tokens"] if stats["tokens"] else 0.0,
        "seconds": seconds,
        "engine_seconds": stats["engine_s"],
        "loop_seconds": stats["loop_s"],
        "tokens_per_s": stats["tokens"] / seconds if seconds > 0 else 0.0,
        "input": counters.as_dict(),
        "input_summary": counters.summary(),
        "shard": shard,
        **extra,
    }


def format_summary(s: dict) -> str:
    """The end-of-run summary as text: rows, tokens, bytes/token, time, and skipped/truncated rows with reasons."""
    lines = [
        f"cache-teacher done: {s['out']}" + (f" (shard {s['shard']})" if s.get("shard") else ""),
        f"  rows written     {s['rows_written']:,}  (already cached, skipped: {s['rows_already_cached']:,}; "
        f"cache now holds {s['rows_in_cache']:,})",
        f"  tokens           {s['tokens']:,}  ({s['positions']:,} scored positions)",
        f"  bytes/token      {s['bytes_per_token']:.1f}  ({s['bytes']:,} bytes written)",
        f"  time             {s['seconds']:.1f} s  ({s['tokens_per_s']:,.0f} tok/s overall, engine "
        f"{s['engine_seconds']:.1f} s)",
    ]
    if s.get("replicas"):
        lines.append(f"  replicas         {s['replicas']}")
    inp = s.get("input_summary")
    if inp:
        lines += ["  input            " + line if i == 0 else "                   " + line
                  for i, line in enumerate(str(inp).splitlines())]
    return "\n".join(lines)
