"""Join the caches written by ``rlkd cache-teacher --shard I/N`` runs into one cache, without copying shard data.

The merged ``manifest.json`` lists every part's shards by a path relative to the merged folder
(``part-0/shard-00000.parquet``, or ``../elsewhere/...`` when a part lives outside it), so the parts must stay where
they are. Typical layout::

    rlkd cache-teacher ... --shard 0/2 --out cache/part-0      # machine 0
    rlkd cache-teacher ... --shard 1/2 --out cache/part-1      # machine 1
    rlkd cache-merge cache cache/part-0 cache/part-1
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from rlkd.cache.manifest import (
    IDENTITY_KEYS,
    identity_differences,
    manifest_path,
    read_manifest,
    set_max_token_id,
    write_manifest,
)
from rlkd.errors import UserError


class MergeError(UserError, ValueError):
    """The parts cannot be merged; the message lists every reason."""


@dataclass
class MergeOptions:
    """Options of ``rlkd cache-merge``."""

    out: str = field(metadata={"argument": True})
    """The merged cache folder to write (it gets only a manifest.json)."""
    parts: list[str] = field(metadata={"argument": True})
    """The part folders written by ``cache-teacher --shard I/N``."""
    allow_incomplete: bool = False
    """Merge parts whose run has not finished (not recommended)."""


def merge_caches(out: str | os.PathLike, parts: list[str | os.PathLike], *, allow_incomplete: bool = False) -> dict:
    """Write ``out/manifest.json`` listing the shards of every cache in ``parts``; return the merged manifest.

    Refuses (with every problem listed): an ``out`` that already holds a cache, a part given twice, a part that is
    not complete (unless ``allow_incomplete``), parts whose identity (teacher, tokenizer, dataset, k, codec, ...)
    differs, missing or resized shard files, and any ``row_id`` present in more than one part.
    """
    out = Path(out)
    if not parts:
        raise MergeError("cache-merge: give at least one part folder to merge")
    if manifest_path(out).exists():
        raise MergeError(f"{manifest_path(out)} already exists: merge into a new folder (or delete that manifest)")
    problems: list[str] = []
    seen_dirs: dict[Path, str] = {}
    manifests: list[tuple[Path, dict]] = []
    for part in parts:
        p = Path(part)
        key = p.resolve()
        if key in seen_dirs:
            problems.append(f"part {part} is given twice (also as {seen_dirs[key]})")
            continue
        if key == out.resolve():
            problems.append(f"part {part} is the output folder itself")
            continue
        seen_dirs[key] = str(part)
        try:
            m = read_manifest(p)
        except Exception as e:  # noqa: BLE001 - report every unreadable part together
            problems.append(f"part {part}: {e}")
            continue
        if not m.get("complete") and not allow_incomplete:
            problems.append(f"part {part} is not complete (its run stopped early): re-run its `rlkd cache-teacher` "
                            "command to finish it, then merge")
        manifests.append((p, m))
    if manifests:
        ref_dir, ref = manifests[0]
        for p, m in manifests[1:]:
            diffs = identity_differences(ref, m)
            if diffs:
                problems.append(f"part {p} was written with other settings than {ref_dir}:\n"
                                + "\n".join(f"      {d}" for d in diffs))
    shards: list[dict] = []
    owner: dict[str, str] = {}
    duplicates: dict[tuple[str, str], int] = {}
    for p, m in manifests:
        for entry in m.get("shards", []):
            path = p / entry["file"]
            if not path.is_file():
                problems.append(f"part {p}: shard {entry['file']} is missing")
                continue
            if path.stat().st_size != entry["bytes"]:
                problems.append(f"part {p}: shard {entry['file']} has {path.stat().st_size} bytes, its manifest says "
                                f"{entry['bytes']}")
                continue
            rel = Path(os.path.relpath(path.resolve(), out.resolve())).as_posix()
            # Only the row_id column is read: cheap, and it is what makes a duplicate.
            try:
                row_ids = pq.read_table(path, columns=["row_id"]).column("row_id").to_pylist()
            except Exception as e:  # noqa: BLE001 - a damaged footer raises anything
                problems.append(f"part {p}: shard {entry['file']} cannot be read ({e}); run `rlkd verify --repair "
                                f"{p}` and resume that part")
                continue
            for rid in row_ids:
                if rid in owner:
                    pair = (owner[rid], rel)
                    duplicates[pair] = duplicates.get(pair, 0) + 1
                else:
                    owner[rid] = rel
            shards.append({**entry, "file": rel})
    for (a, b), n in duplicates.items():
        problems.append(f"{n} row(s) appear both in {a} and in {b}: parts overlap (same --shard twice, or a part "
                        "of an unsharded run); merge only the parts of one --shard I/N split")
    if problems:
        raise MergeError(f"cache-merge refused, {len(problems)} problem(s):\n"
                         + "\n".join(f"  - {x}" for x in problems))
    _, ref = manifests[0]
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    merged = {key: ref[key] for key in IDENTITY_KEYS if key in ref}
    merged.update({
        "complete": all(bool(m.get("complete")) for _, m in manifests),
        "engine": ref.get("engine"),
        "config": {"merged_from": [
            {"dir": Path(os.path.relpath(p.resolve(), out.resolve())).as_posix(), "config": m.get("config"),
             "rows": m.get("rows", 0)} for p, m in manifests
        ]},
        "rows": sum(int(s.get("rows", 0)) for s in shards),
        "positions": sum(int(s.get("positions", 0)) for s in shards),
        "tokens": sum(int(s.get("tokens", 0)) for s in shards),
        "bytes": sum(int(s.get("bytes", 0)) for s in shards),
        "shards": shards,
        "created": now,
        "updated": now,
    })
    set_max_token_id(merged)
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out, merged)
    return merged
