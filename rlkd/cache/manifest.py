"""The cache manifest (``manifest.json``): what wrote the cache, and the list of finished shards with their hashes.

Layout::

    {
      "format_version": 1, "complete": true, "k": 64, "codec": "q8",
      "teacher": {...}, "tokenizer": {"sha256", "vocab_size", "name_or_path"}, "dataset": {...}, "config": {...},
      "logprobs_mode": "raw_logprobs", "temperature": 1.0, "engine": "...",
      "rows": 1200, "positions": 301234, "tokens": 302434, "bytes": 31415926,
      "shards": [{"file": "shard-00000.parquet", "rows": 600, "positions": 150000, "tokens": 150600,
                  "bytes": 15000000, "sha256": "...", "row_group_rows": [256, 256, 88]}, ...],
      "created": "...", "updated": "..."
    }

``file`` is relative to the cache directory and may contain sub-folders (``part-0/shard-00000.parquet``), so caches
written by several workers into sibling folders can be merged by listing their shards in one manifest.
The manifest is always replaced as a whole (locally: write ``manifest.json.rlkd-tmp``, fsync, rename; on an object
store: one upload, conditional on the writer's lease): a reader sees either the old or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rlkd.errors import UserError

MANIFEST_NAME = "manifest.json"

TMP_SUFFIX = ".rlkd-tmp"
"""Suffix of every temporary file rlkd writes in a cache folder (``NAME.rlkd-tmp``, renamed to ``NAME`` when done).
A name no other tool uses, so a writer that cleans up after a crash removes only its own temporaries."""

IDENTITY_KEYS = ("format_version", "k", "codec", "teacher", "tokenizer", "dataset", "logprobs_mode", "temperature")
"""Keys that must agree for a writer to append to an existing cache: anything that changes what a row means.
The run ``config`` and ``engine`` may differ on resume (e.g. another batch size)."""


class CacheMismatchError(UserError, ValueError):
    """A writer was reopened on a cache written with a different teacher/tokenizer/dataset/k/codec."""


class CacheCorruptError(UserError, RuntimeError):
    """A shard or the manifest is missing, truncated, or does not match its recorded hash/schema."""


class CacheNotFoundError(UserError, FileNotFoundError):
    """The cache folder or its manifest does not exist."""


class CacheLockedError(UserError, RuntimeError):
    """Another writer holds the cache directory."""


class CacheDirError(UserError, ValueError):
    """The cache folder cannot be used: it is a file, cannot be written, or holds files rlkd did not write."""


def manifest_path(cache_dir: str | Path) -> Path:
    return Path(cache_dir) / MANIFEST_NAME


def read_manifest(cache_dir) -> dict:
    """Load ``manifest.json`` from ``cache_dir`` (a path, a URL or a :class:`~rlkd.cache.storage.CacheLocation`),
    with errors that say what is wrong and what to do."""
    from rlkd.cache.storage import CacheLocation

    loc = CacheLocation.parse(cache_dir)
    path = loc.name(MANIFEST_NAME)
    if loc.is_local and not loc.local_path().is_dir():
        raise CacheNotFoundError(f"cache directory {loc} does not exist")
    try:
        data = loc.read_bytes(MANIFEST_NAME)
    except (FileNotFoundError, IsADirectoryError):
        if not loc.is_local and not loc.is_dir():
            raise CacheNotFoundError(f"{loc}: no cache there (no object under that prefix, or no such bucket)") \
                from None
        raise CacheNotFoundError(
            f"{path} not found: {loc} is not an rlkd cache, or stage 1 (`rlkd cache-teacher`) has not "
            "opened it yet") from None
    return parse_manifest(data, path)


def parse_manifest(data: bytes, name: str) -> dict:
    """The manifest held in ``data`` (read from ``name``, for messages)."""
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheCorruptError(
            f"{name} is not valid JSON ({e}). rlkd replaces it atomically, so something else modified it, and the "
            "record of which shards are finished is lost: restore manifest.json from a backup, or write the cache "
            "again into a new folder") from e
    if not isinstance(manifest, dict):
        raise CacheCorruptError(f"{name} must hold a JSON object, got {type(manifest).__name__}")
    return manifest


def shard_files(cache_dir) -> list[str]:
    """The full name (path or URL) of every shard the manifest lists, in manifest order: the ``data_files`` for
    ``datasets.load_dataset("parquet", data_files=...)``. (A ``*.parquet`` glob could also pick up a shard that a
    crashed writer left unlisted, whose rows the manifest does not vouch for.)"""
    from rlkd.cache.storage import CacheLocation

    loc = CacheLocation.parse(cache_dir)
    return [loc.name(s["file"]) for s in read_manifest(loc).get("shards", [])]


def manifest_bytes(manifest: dict) -> bytes:
    """The manifest as stored: indented JSON and a final newline (the same bytes locally and on a store)."""
    return (json.dumps(manifest, indent=1, sort_keys=False, allow_nan=False) + "\n").encode()


def write_manifest(cache_dir, manifest: dict, lock=None) -> None:
    """Replace the manifest as a whole: a reader sees the old one or the new one, never half of one.

    ``lock``: the writer lock held on the cache (:func:`rlkd.cache.lock.writer_lock`); the manifest is then written
    through it, which on an object store makes the write conditional on this writer still holding its lease (see
    :mod:`rlkd.cache.lease`). Without one: a local folder gets a temporary file, fsync, rename and fsync of the
    folder; an object store one whole-object upload."""
    data = manifest_bytes(manifest)
    if lock is not None:
        lock.put(MANIFEST_NAME, data)
        return
    from rlkd.cache.storage import CacheLocation

    loc = CacheLocation.parse(cache_dir)
    if loc.is_local:
        atomic_write(loc.local_path(MANIFEST_NAME), data)
    else:
        loc.write_bytes(MANIFEST_NAME, data)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace the local file ``path`` atomically: ``NAME.rlkd-tmp``, fsync, rename, fsync of the folder."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: str | Path) -> None:
    """Make a rename durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


INFORMATIONAL_KEYS = frozenset({"name_or_path"})
"""Sub-keys that describe where something was loaded from, not what it is: a resume from another path or a merge of
parts written on other machines must not be refused over them (the sha256 next to them decides)."""


def _diff(a: Any, b: Any, path: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted((set(a) | set(b)) - INFORMATIONAL_KEYS, key=str):
            sub = f"{path}.{key}"
            if key not in a:
                out.append(f"{sub}: absent in the cache, {b[key]!r} now")
            elif key not in b:
                out.append(f"{sub}: {a[key]!r} in the cache, absent now")
            else:
                _diff(a[key], b[key], sub, out)
    elif a != b:
        out.append(f"{path}: {a!r} in the cache, {b!r} now")


def identity_differences(existing: dict, new: dict, keys: tuple[str, ...] = IDENTITY_KEYS) -> list[str]:
    """Every differing identity key between a stored manifest and a new run's meta, as ``key.sub: old vs new``."""
    out: list[str] = []
    for key in keys:
        if key not in existing and key not in new:
            continue
        if key not in existing:
            out.append(f"{key}: absent in the cache, {new[key]!r} now")
        elif key not in new:
            out.append(f"{key}: {existing[key]!r} in the cache, absent now")
        else:
            _diff(existing[key], new[key], key, out)
    return out


def vocab_limit(manifest: dict) -> int | None:
    """Upper bound (exclusive) for cached ids: the larger of the tokenizer's and the teacher's vocab size.

    A model's embedding may be padded past the tokenizer's vocab, and such ids can in principle appear in a top-k.
    """
    sizes = [
        (manifest.get("tokenizer") or {}).get("vocab_size"),
        (manifest.get("teacher") or {}).get("vocab_size"),
    ]
    sizes = [int(s) for s in sizes if isinstance(s, (int, float)) and s > 0]
    return max(sizes) if sizes else None


def set_max_token_id(manifest: dict) -> None:
    """``max_token_id``: the largest id in any shard's ``input_ids`` or ``topk_ids``, when every shard entry records
    it (caches written before it was recorded leave it out, and readers scan instead)."""
    values = [s.get("max_token_id") for s in manifest.get("shards", [])]
    if values and all(isinstance(v, int) for v in values):
        manifest["max_token_id"] = max(values)
    else:
        manifest.pop("max_token_id", None)


def max_cached_id(cache_dir: str | Path, manifest: dict) -> int:
    """The largest teacher id in the cache (-1 when empty): the manifest's ``max_token_id`` when it records one,
    else a scan of the shards' ``topk_ids`` and ``input_ids`` columns (reads only those two columns)."""
    if isinstance(manifest.get("max_token_id"), int):
        return int(manifest["max_token_id"])
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
