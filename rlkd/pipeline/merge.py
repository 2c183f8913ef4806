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
import posixpath
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from rlkd.cache.manifest import (
    IDENTITY_KEYS,
    MANIFEST_NAME,
    identity_differences,
    read_manifest,
    set_max_token_id,
    write_manifest,
)
from rlkd.cache.storage import CacheLocation
from rlkd.errors import UserError


class MergeError(UserError, ValueError):
    """The parts cannot be merged; the message lists every reason."""


@dataclass
class MergeOptions:
    """Options of ``rlkd cache-merge``."""

    out: str = field(metadata={"argument": True})
    """The merged cache folder (or URL) to write (it gets only a manifest.json)."""
    parts: list[str] = field(metadata={"argument": True})
    """The part folders written by ``cache-teacher --shard I/N`` (on an object store: prefixes under OUT)."""
    allow_incomplete: bool = False
    """Merge parts whose run has not finished (not recommended)."""


def merge_caches(out, parts: list, *, allow_incomplete: bool = False) -> dict:
    """Write ``out/manifest.json`` listing the shards of every cache in ``parts``; return the merged manifest.

    ``out`` and ``parts`` are paths or URLs. Refuses (with every problem listed): an ``out`` that already holds a
    cache, a part given twice, a part that is not complete (unless ``allow_incomplete``), parts whose identity
    (teacher, tokenizer, dataset, k, codec, ...) differs, missing or resized shard files, any ``row_id`` present in
    more than one part, and on an object store a part that does not lie under ``out`` (a manifest names its shards
    relative to its own prefix).
    """
    out_loc = CacheLocation.parse(out)
    if out_loc.exists(MANIFEST_NAME):
        raise MergeError(f"{out_loc.name(MANIFEST_NAME)} already exists: merge into a new folder (or delete that "
                         "manifest)")
    merged = build_merged(out_loc, parts, allow_incomplete=allow_incomplete)
    if out_loc.is_local:
        out_loc.local_path().mkdir(parents=True, exist_ok=True)
    write_manifest(out_loc, merged)
    return merged


def build_merged(out, parts: list, *, allow_incomplete: bool = False) -> dict:
    """The merged manifest of ``parts`` for the cache at ``out`` (see :func:`merge_caches`), not written."""
    out = CacheLocation.parse(out)
    if not parts:
        raise MergeError("cache-merge: give at least one part folder to merge")
    problems: list[str] = []
    seen: dict[str, str] = {}
    manifests: list[tuple[CacheLocation, str, dict]] = []  # (part, its path relative to out, manifest)
    for part in parts:
        try:
            p = CacheLocation.parse(part)
        except Exception as e:  # noqa: BLE001 - a bad URL is one more problem to report
            problems.append(f"part {part}: {e}")
            continue
        key = str(p.local_path().resolve()) if p.is_local else p.url
        if key in seen:
            problems.append(f"part {part} is given twice (also as {seen[key]})")
            continue
        if key == (str(out.local_path().resolve()) if out.is_local else out.url):
            problems.append(f"part {part} is the output folder itself")
            continue
        seen[key] = str(part)
        rel = _relative(out, p)
        if rel is None:
            problems.append(f"part {part} does not lie under {out}: on an object store a merged manifest names "
                            f"shards by their path under its own prefix, so write the parts to {out}/part-I")
            continue
        try:
            m = read_manifest(p)
        except Exception as e:  # noqa: BLE001 - report every unreadable part together
            problems.append(f"part {part}: {e}")
            continue
        if not m.get("complete") and not allow_incomplete:
            problems.append(f"part {part} is not complete (its run stopped early): re-run its `rlkd cache-teacher` "
                            "command to finish it, then merge")
        manifests.append((p, rel, m))
    if manifests:
        ref_dir, _, ref = manifests[0]
        for p, _, m in manifests[1:]:
            diffs = identity_differences(ref, m)
            if diffs:
                problems.append(f"part {p} was written with other settings than {ref_dir}:\n"
                                + "\n".join(f"      {d}" for d in diffs))
    shards: list[dict] = []
    owner: dict[str, str] = {}
    duplicates: dict[tuple[str, str], int] = {}
    for p, prel, m in manifests:
        sizes = p.list_files()  # one LIST per part: every shard's size
        for entry in m.get("shards", []):
            size = sizes.get(entry["file"])
            if size is None:
                problems.append(f"part {p}: shard {entry['file']} is missing")
                continue
            if size != entry["bytes"]:
                problems.append(f"part {p}: shard {entry['file']} has {size} bytes, its manifest says "
                                f"{entry['bytes']}")
                continue
            rel = posixpath.normpath(f"{prel}/{entry['file']}")
            # Only the row_id column is read: cheap, and it is what makes a duplicate.
            try:
                row_ids = pq.read_table(p.path(entry["file"]), filesystem=p.fs,
                                        columns=["row_id"]).column("row_id").to_pylist()
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
    _, _, ref = manifests[0]
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    merged = {key: ref[key] for key in IDENTITY_KEYS if key in ref}
    merged.update({
        "complete": all(bool(m.get("complete")) for _, _, m in manifests),
        "engine": ref.get("engine"),
        "config": {"merged_from": [{"dir": rel, "config": m.get("config"), "rows": m.get("rows", 0)}
                                   for _, rel, m in manifests]},
        "rows": sum(int(s.get("rows", 0)) for s in shards),
        "positions": sum(int(s.get("positions", 0)) for s in shards),
        "tokens": sum(int(s.get("tokens", 0)) for s in shards),
        "bytes": sum(int(s.get("bytes", 0)) for s in shards),
        "shards": shards,
        "created": now,
        "updated": now,
    })
    set_max_token_id(merged)
    return merged


def _relative(out: CacheLocation, part: CacheLocation) -> str | None:
    """``part``'s path relative to ``out`` (``part-0``, or ``../elsewhere`` for local folders); None when a store's
    part does not lie under ``out`` (or lies on another store)."""
    if out.is_local and part.is_local:
        return Path(os.path.relpath(part.local_path().resolve(), out.local_path().resolve())).as_posix()
    if out.scheme == part.scheme and part.root.startswith(out.root + "/"):
        return part.root[len(out.root) + 1:]
    return None
