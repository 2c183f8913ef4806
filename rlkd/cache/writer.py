"""CacheWriter: append TeacherRows to a cache directory as zstd Parquet shards, resumably.

Crash safety, step by step:

1. The folder must be new, empty, or an rlkd cache: a folder holding files rlkd did not write is refused before
   anything is written into it (:func:`check_cache_dir`).
2. A lock (``fcntl.flock`` on ``writer.lock``) refuses a second concurrent writer. The kernel drops it when the
   process dies, so a crash never leaves a stale lock.
3. Rows are buffered into row groups of ``row_group_rows`` rows and written to ``NAME.parquet.rlkd-tmp``.
4. When the shard reaches ``shard_max_bytes`` (or on close) it is closed, fsynced, hashed and renamed to
   ``NAME.parquet``; then the manifest is rewritten atomically with the new shard's rows/positions/bytes/sha256.
5. On reopen, leftover temporaries (a crash in step 3) are removed: only files with rlkd's own temporary names
   (:func:`is_own_temporary`), whose rows were never in the manifest and which ``has()`` reports missing, so stage 1
   writes them again. Every listed shard is checked (size, and sha256 unless ``verify_shards=False``); a damaged or
   missing one stops the writer with the way out (``rlkd verify --repair``). A finished shard that is not in the
   manifest (a crash between the rename and the manifest update) is adopted after checking it. The ``row_id``
   column of every finished shard is read back, so ``has()`` and ``write()`` never duplicate a row.
6. A manifest that lists no shard holds nothing: a writer with other settings starts afresh on it instead of
   refusing (a first run that failed before its first shard must not block the corrected retry).
"""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rlkd.cache.codec import arrow_schema, parquet_write_options, rows_to_table, storage_summary
from rlkd.cache.lock import LOCK_NAME, DirLock
from rlkd.cache.manifest import (
    MANIFEST_NAME,
    TMP_SUFFIX,
    CacheCorruptError,
    CacheDirError,
    CacheMismatchError,
    fsync_dir,
    identity_differences,
    manifest_path,
    read_manifest,
    set_max_token_id,
    vocab_limit,
    write_manifest,
)
from rlkd.cache.schema import CODECS, FORMAT_VERSION, MAX_K, TeacherRow, row_problems
from rlkd.fsutil import file_sha256, utc_now

LOG_NAME = "cache-teacher.log"
"""Where ``rlkd cache-teacher`` keeps the output of its dependencies (vLLM, torch, datasets) for this cache."""
OWN_NAMES = frozenset({LOCK_NAME, MANIFEST_NAME, LOG_NAME})
"""Files rlkd itself keeps in a cache folder besides shards and temporaries."""
DAMAGED_SUFFIX = ".damaged"
"""``rlkd verify --repair`` renames a damaged shard to ``NAME.parquet.damaged`` (never deletes it)."""
_OWN_TMP = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*-\d{5,}\.parquet" + re.escape(TMP_SUFFIX))
_PARQUET_MAGIC = b"PAR1"
_RESERVED = ("format_version", "complete", "k", "codec", "rows", "positions", "tokens", "bytes", "shards",
             "created", "updated", "storage", "max_token_id")


def is_own_temporary(path: Path) -> bool:
    """True for a temporary this module wrote: a shard ``PREFIX-NNNNN.parquet.rlkd-tmp`` that is empty or starts like
    a Parquet file, or the manifest's ``manifest.json.rlkd-tmp``. Anything else is left alone, whatever its name."""
    if not path.is_file() or path.is_symlink():
        return False
    if path.name == MANIFEST_NAME + TMP_SUFFIX:
        return True
    if not _OWN_TMP.fullmatch(path.name):
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(len(_PARQUET_MAGIC))
    except OSError:
        return False
    return head in (b"", _PARQUET_MAGIC)  # empty: the crash came before the writer's first bytes


def _is_rlkd_shard(path: Path) -> bool:
    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception:  # noqa: BLE001 - anything unreadable is not one of ours
        return False
    return b"rlkd.format_version" in meta


def _is_own_subfolder(path: Path) -> bool:
    """A part of a sharded or Ray run (``OUT/part-0/``): an rlkd cache itself, or holding only rlkd's own files."""
    if not path.is_dir() or path.is_symlink():
        return False
    if manifest_path(path).exists():
        return True
    return all(p.name in OWN_NAMES or is_own_temporary(p) for p in path.iterdir())


def check_cache_dir(out_dir: str | os.PathLike, what: str = "the cache folder") -> None:
    """Refuse, before anything is written, a cache folder rlkd must not write into; see :class:`CacheDirError`.

    Fine: a path that does not exist yet (its nearest existing parent must be a writable folder), an empty folder, a
    folder holding only rlkd's own files (lock, log, temporaries), or an rlkd cache (it has a manifest). Refused: a
    file, a folder that cannot be written, and a folder holding anything else (a user's data is never mixed with a
    cache, and never cleaned up by one). ``what`` names the folder in messages (e.g. ``--out out/``).
    """
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise CacheDirError(f"{what} {path} is a file, not a folder: give a new folder (or an existing rlkd cache)")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing != path and not existing.is_dir():
        raise CacheDirError(f"{what} {path} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CacheDirError(f"{what} {path} is not writable ({existing} does not allow writing for this user): "
                            "give a folder you can write to")
    if existing != path or manifest_path(path).exists():
        return
    foreign = sorted(p.name for p in path.iterdir() if p.name not in OWN_NAMES and not is_own_temporary(p)
                     and not _is_own_subfolder(p))
    if not foreign:
        return
    shards = [name for name in foreign if name.endswith(".parquet") and _is_rlkd_shard(path / name)]
    listing = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    if shards:
        raise CacheDirError(
            f"{what} {path} holds rlkd shards ({', '.join(shards[:3])}{', ...' if len(shards) > 3 else ''}) but no "
            f"{MANIFEST_NAME}, so nothing says which teacher, data and settings wrote them: restore its "
            f"{MANIFEST_NAME} to resume it, or write the cache into a new folder")
    raise CacheDirError(
        f"{what} {path} is not empty and is not an rlkd cache (no {MANIFEST_NAME}): it holds {listing}. rlkd writes "
        "a cache only into a new or empty folder or into one of its own caches, so it never mixes with (or cleans "
        "up) other files: give a new folder")


def make_cache_dir(out_dir: str | os.PathLike, what: str = "the cache folder") -> Path:
    """:func:`check_cache_dir`, then create the folder (and its parents); a failure is a :class:`CacheDirError`
    naming the folder (a full disk stays an ``OSError`` with ``ENOSPC``, which callers report as such)."""
    path = Path(out_dir)
    check_cache_dir(path, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise
        raise CacheDirError(f"{what} {path} cannot be created: {e.strerror or e}") from None
    return path


def shard_summary(path: Path, rel: str) -> dict:
    """A manifest entry for a finished shard, computed from the file itself (used to adopt orphans)."""
    pf = pq.ParquetFile(path)
    md = pf.metadata
    rg_rows = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
    table = pf.read(columns=["input_ids", "topk_ids"])
    lens = table.column("input_ids").combine_chunks().value_lengths().to_numpy()
    largest = [pc.max(pc.list_flatten(table.column(c))).as_py() for c in ("input_ids", "topk_ids")]
    return {
        "file": rel, "rows": int(md.num_rows), "positions": int((lens - 1).sum()), "tokens": int(lens.sum()),
        "bytes": path.stat().st_size, "sha256": file_sha256(path), "row_group_rows": rg_rows,
        "max_token_id": max((int(x) for x in largest if x is not None), default=-1),
    }


class CacheWriter:
    """Write TeacherRows into ``out_dir`` (see the module docstring). Use as a context manager::

        with CacheWriter(out_dir, meta, k=64) as w:
            for row in rows:
                if not w.has(row.row_id):
                    w.write(row)

    Args:
        out_dir: the cache directory (created if missing; reopened and appended to if it holds a manifest).
        meta: identity of the run: ``teacher``, ``tokenizer`` (:func:`tokenizer_identity`), ``dataset``, ``config``,
            ``logprobs_mode``, ``temperature``, ``engine``. ``k``, ``codec`` and the format version are added here.
        k: the top-k every position holds at most (rows may keep fewer per position: adaptive k).
        codec: log-probability codec, one of ``q8`` (default), ``fp16``, ``fp32``.
        shard_max_bytes: start a new shard once the current one reaches this size on disk.
        row_group_rows: rows per Parquet row group, the unit a reader reads and shuffles.
        name_prefix: shard file prefix (``PREFIX-00000.parquet``); give each worker its own when several write into
            sibling folders that are merged later.
        row_group_bytes: also close a row group once its rows hold about this many raw bytes (long sequences).
        compression_level: one zstd level for every column (default: per column, see
            :func:`rlkd.cache.codec.parquet_write_options`).
        verify_shards: on reopen, check every listed shard's sha256 (reads the whole cache once); ``False`` checks
            sizes only, which is faster on a large cache but misses a flipped byte.
    """

    def __init__(self, out_dir, meta: dict, *, k: int, codec: str = "q8", shard_max_bytes: int = 64 << 20,
                 row_group_rows: int = 256, name_prefix: str = "shard", row_group_bytes: int = 32 << 20,
                 compression_level: int | None = None, verify_shards: bool = True):
        problems = []
        if codec not in CODECS:
            problems.append(f"codec {codec!r} is not one of {', '.join(CODECS)}")
        if not (isinstance(k, (int, np.integer)) and 1 <= k <= MAX_K):
            problems.append(f"k={k!r} must be an integer in [1, {MAX_K}]")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name_prefix or ""):
            problems.append(f"name_prefix {name_prefix!r} must be a plain file-name prefix (letters, digits, _.-)")
        if row_group_rows < 1 or shard_max_bytes < 1:
            problems.append("row_group_rows and shard_max_bytes must be positive")
        if not isinstance(meta, dict):
            problems.append(f"meta must be a dict, got {type(meta).__name__}")
        else:
            for key in _RESERVED:
                if key in meta and not (key in ("k", "codec", "format_version")
                                        and meta[key] == {"k": k, "codec": codec,
                                                          "format_version": FORMAT_VERSION}[key]):
                    problems.append(f"meta[{key!r}] is set by the writer; remove it from meta")
            try:
                json.dumps(meta, allow_nan=False)
            except (TypeError, ValueError) as e:
                problems.append(f"meta must be JSON-serialisable ({e})")
        if problems:
            raise ValueError("CacheWriter: " + "; ".join(problems))
        self.out_dir = Path(out_dir)
        self.k = int(k)
        self.codec = codec
        self.shard_max_bytes = int(shard_max_bytes)
        self.row_group_rows = int(row_group_rows)
        self.row_group_bytes = int(row_group_bytes)
        self.name_prefix = name_prefix
        self._schema = arrow_schema(codec, self.k)
        self._pq_options = parquet_write_options(codec, compression_level)
        self._lock = DirLock(self.out_dir, "CacheWriter")
        self._pq_writer: pq.ParquetWriter | None = None
        self._sink = None
        self._buffer: list[TeacherRow] = []
        self._buffer_bytes = 0
        self._shard: dict | None = None
        self._closed = False
        self._session = {"rows": 0, "positions": 0, "bytes": 0, "shards": 0, "skipped_duplicates": 0}
        self.verify_shards = bool(verify_shards)
        make_cache_dir(self.out_dir)
        try:
            self._lock.acquire()
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise
            raise CacheDirError(f"cannot write the cache folder {self.out_dir}: {e.strerror or e}") from None
        try:
            self._open(dict(meta))
        except BaseException:
            self._lock.release()
            raise

    # ---- opening -------------------------------------------------------------------------------------------------

    def _open(self, meta: dict) -> None:
        # Leftovers of a crashed writer: never listed in the manifest, so dropping them loses nothing. Only rlkd's
        # own temporaries: other files in the folder are not ours to delete.
        for tmp in self.out_dir.iterdir():
            if is_own_temporary(tmp):
                tmp.unlink()
        meta = {key: v for key, v in meta.items() if key not in ("k", "codec", "format_version")}
        new_identity = {"format_version": FORMAT_VERSION, "k": self.k, "codec": self.codec, **meta}
        existing = read_manifest(self.out_dir) if manifest_path(self.out_dir).exists() else None
        if existing is not None and not existing.get("shards") and not self._unlisted_shards(set()):
            # Nothing was ever finished here (e.g. a first run stopped by a bad setting): not a cache to protect.
            existing = None
        if existing is not None:
            manifest = existing
            diffs = identity_differences(manifest, new_identity)
            if diffs:
                raise CacheMismatchError(
                    f"{self.out_dir} already holds a cache written with different settings; appending would mix "
                    f"incompatible rows. {len(diffs)} difference(s):\n" + "\n".join(f"  - {d}" for d in diffs)
                    + "\nUse a new output directory, or rerun with the cache's original settings.")
            manifest.update({key: v for key, v in meta.items() if key in ("config", "engine")})
            manifest.setdefault("resumed", []).append(utc_now())
        else:
            manifest = {**new_identity, "complete": False, "rows": 0, "positions": 0, "tokens": 0, "bytes": 0,
                        "shards": [], "created": utc_now()}
        manifest["complete"] = False
        # How this session stores shards (zstd levels, encodings). Informational: any Parquet reader reads any of
        # these, so a resumed cache may mix levels; this records the latest writer's.
        manifest["storage"] = storage_summary(self._pq_options)
        self.manifest = manifest
        self._vocab = vocab_limit(manifest)
        self._ids: set[str] = set()
        listed = {s["file"] for s in manifest["shards"]}
        damaged = []
        for entry in manifest["shards"]:
            problem = self._check_listed(entry)
            if problem:
                damaged.append(f"shard {entry['file']} ({entry.get('rows', '?')} rows): {problem}")
        if damaged:
            raise CacheCorruptError(
                f"cannot resume {self.out_dir}: {len(damaged)} of its {len(manifest['shards'])} finished shard(s) "
                "are damaged or missing:\n" + "\n".join(f"  - {d}" for d in damaged)
                + f"\nRun `rlkd verify --repair {self.out_dir}`: it moves damaged shards aside (renamed to "
                f"*{DAMAGED_SUFFIX}, nothing is deleted) and drops them from the manifest. Then run this command "
                "again: it scores their rows again and keeps every other shard.")
        for path in self._unlisted_shards(listed):
            self._adopt(path)  # finished, but the crash came before the manifest update
        self._refresh_totals()
        write_manifest(self.out_dir, self.manifest)

    def _unlisted_shards(self, listed: set[str]) -> list[Path]:
        return [p for p in sorted(self.out_dir.glob("*.parquet")) if p.name not in listed and p.is_file()]

    def _check_listed(self, entry: dict) -> str | None:
        """What is wrong with a listed shard (None when it is intact); reads its row_ids into ``self._ids``."""
        path = self.out_dir / entry["file"]
        if not path.is_file():
            return "missing"
        size = path.stat().st_size
        if size != entry["bytes"]:
            return f"{size} bytes, the manifest says {entry['bytes']} (truncated or modified)"
        if self.verify_shards and file_sha256(path) != entry["sha256"]:
            return "its sha256 differs from the manifest's (corrupted)"
        try:
            self._ids.update(pq.read_table(path, columns=["row_id"]).column("row_id").to_pylist())
        except Exception as e:  # noqa: BLE001 - a damaged footer raises anything
            return f"cannot be read ({e})"
        return None

    def _adopt(self, path: Path) -> None:
        move = f"move it out of {self.out_dir} (its rows are then scored again)"
        try:
            schema = pq.read_schema(path)
            meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
        except Exception as e:  # noqa: BLE001 - a damaged footer raises anything
            raise CacheCorruptError(f"{path} is not in the manifest and cannot be read as Parquet ({e}): {move}") from e
        if "rlkd.format_version" not in meta:
            raise CacheCorruptError(f"{path} is not an rlkd shard (it has no rlkd metadata) and does not belong in a "
                                    f"cache folder: move it out of {self.out_dir}")
        if not (meta.get("rlkd.codec") == self.codec and meta.get("rlkd.k") == str(self.k)
                and meta.get("rlkd.format_version") == str(FORMAT_VERSION)):
            raise CacheCorruptError(f"{path} is not in the manifest and was written with another codec/k/format "
                                    f"(codec {meta.get('rlkd.codec')}, k {meta.get('rlkd.k')}): {move}")
        try:
            entry = shard_summary(path, path.name)
            ids = pq.read_table(path, columns=["row_id"]).column("row_id").to_pylist()
        except Exception as e:  # noqa: BLE001
            raise CacheCorruptError(f"{path} is not in the manifest and cannot be read ({e}): {move}") from e
        if self._ids.intersection(ids):
            raise CacheCorruptError(f"{path} is not in the manifest and repeats rows of listed shards: {move}")
        self._ids.update(ids)
        self.manifest["shards"].append(entry)

    def _refresh_totals(self) -> None:
        shards = self.manifest["shards"]
        for key in ("rows", "positions", "tokens", "bytes"):
            self.manifest[key] = int(sum(s.get(key, 0) for s in shards))
        set_max_token_id(self.manifest)
        self.manifest["updated"] = utc_now()

    # ---- writing -------------------------------------------------------------------------------------------------

    def has(self, row_id: str) -> bool:
        """True if ``row_id`` is in a finished shard or was written in this session."""
        return row_id in self._ids

    def write(self, row: TeacherRow) -> bool:
        """Validate and append one row. Returns False (and writes nothing) when its row_id is already present."""
        if self._closed:
            raise RuntimeError(f"CacheWriter for {self.out_dir} is closed")
        if not all(isinstance(v, np.ndarray) for v in row.__dict__.values() if not isinstance(v, (str, int))):
            row = TeacherRow(**{k: (v if isinstance(v, (str, int, np.integer)) else np.asarray(v))
                                for k, v in row.__dict__.items()})
        problems = row_problems(row, self.k, vocab_size=self._vocab)
        if problems:
            raise ValueError(f"row {getattr(row, 'row_id', '?')!r} (source_index {getattr(row, 'source_index', '?')}) "
                             "breaks the cache contract:\n" + "\n".join(f"  - {p}" for p in problems))
        if row.row_id in self._ids:
            self._session["skipped_duplicates"] += 1
            return False
        self._ids.add(row.row_id)
        self._buffer.append(row)
        P, n = row.num_positions, int(row.topk_ids.shape[0])
        self._session["rows"] += 1
        self._session["positions"] += P
        self._buffer_bytes += 4 * (P + 1) + 14 * P + 8 * n
        if len(self._buffer) >= self.row_group_rows or self._buffer_bytes >= self.row_group_bytes:
            self._flush_row_group()
        return True

    def _next_shard_name(self) -> str:
        pattern = re.compile(re.escape(self.name_prefix) + r"-(\d+)\.parquet$")
        used = [int(m.group(1)) for s in self.manifest["shards"] if (m := pattern.fullmatch(s["file"]))]
        used += [int(m.group(1)) for p in self.out_dir.iterdir() if (m := pattern.fullmatch(p.name))]
        return f"{self.name_prefix}-{max(used, default=-1) + 1:05d}.parquet"

    def _flush_row_group(self) -> None:
        if not self._buffer:
            return
        table = rows_to_table(self._buffer, self.codec, self.k)
        if self._pq_writer is None:
            name = self._next_shard_name()
            tmp = self.out_dir / (name + TMP_SUFFIX)
            self._sink = pa.OSFile(str(tmp), "wb")
            self._pq_writer = pq.ParquetWriter(self._sink, self._schema, **self._pq_options)
            self._shard = {"file": name, "tmp": tmp, "rows": 0, "positions": 0, "tokens": 0, "row_group_rows": [],
                           "max_token_id": -1}
        self._pq_writer.write_table(table, row_group_size=table.num_rows)  # exactly one row group
        s = self._shard
        s["rows"] += table.num_rows
        tokens = int(sum(r.input_ids.shape[0] for r in self._buffer))
        s["tokens"] += tokens
        s["positions"] += tokens - table.num_rows
        s["row_group_rows"].append(table.num_rows)
        # Recorded so stage 2 can check the student's vocabulary without scanning the shards.
        s["max_token_id"] = max([s["max_token_id"]] + [int(max(r.input_ids.max(initial=-1), r.topk_ids.max(initial=-1)))
                                                       for r in self._buffer])
        self._buffer = []
        self._buffer_bytes = 0
        if self._sink.tell() >= self.shard_max_bytes:
            self._finish_shard()

    def _finish_shard(self) -> None:
        if self._pq_writer is None:
            return
        self._pq_writer.close()
        self._sink.close()
        self._pq_writer = self._sink = None
        s, self._shard = self._shard, None
        tmp: Path = s.pop("tmp")
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        entry = {"file": s["file"], "rows": s["rows"], "positions": s["positions"], "tokens": s["tokens"],
                 "bytes": tmp.stat().st_size, "sha256": file_sha256(tmp), "row_group_rows": s["row_group_rows"],
                 "max_token_id": s["max_token_id"]}
        os.replace(tmp, self.out_dir / s["file"])
        fsync_dir(self.out_dir)
        self.manifest["shards"].append(entry)
        self._refresh_totals()
        write_manifest(self.out_dir, self.manifest)
        self._session["bytes"] += entry["bytes"]
        self._session["shards"] += 1

    def flush(self) -> None:
        """Write buffered rows and finish the current shard, so everything written so far survives a crash."""
        self._flush_row_group()
        self._finish_shard()

    @property
    def stats(self) -> dict:
        """This session's rows/positions/bytes (bytes: finished shards plus the open one), and cache totals."""
        out = dict(self._session)
        if self._sink is not None:
            out["bytes"] += self._sink.tell()
        out["total_rows"] = self.manifest["rows"] + (self._shard["rows"] if self._shard else 0) + len(self._buffer)
        return out

    # ---- closing -------------------------------------------------------------------------------------------------

    def close(self, complete: bool = True) -> None:
        """Finish the open shard, mark the manifest ``complete`` (if asked) and release the lock."""
        if self._closed:
            return
        try:
            self.flush()
            self.manifest["complete"] = bool(complete)
            self._refresh_totals()
            write_manifest(self.out_dir, self.manifest)
        finally:
            self._closed = True
            self._lock.release()

    def _abort(self) -> None:
        """After an error: keep finished shards, try to save buffered rows, never raise from here. If the open shard
        cannot be finished (a full disk), its temporary is removed: its rows are not in the manifest, so a resume
        scores them again, and the space goes back to the disk."""
        try:
            self.close(complete=False)
        except Exception:  # noqa: BLE001 - the original exception matters more
            for obj in (self._pq_writer, self._sink):
                try:
                    if obj is not None:
                        obj.close()
                except Exception:  # noqa: BLE001
                    pass
            self._pq_writer = self._sink = None
            tmp = (self._shard or {}).get("tmp")
            try:
                if tmp is not None:
                    tmp.unlink(missing_ok=True)
            except OSError:
                pass
            self._closed = True
            self._lock.release()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close(complete=True)
        else:
            self._abort()

    def __del__(self):
        if getattr(self, "_lock", None) is not None:
            self._lock.release()
