"""CacheWriter: append TeacherRows to a cache (a local folder or an object-store prefix) as zstd Parquet shards,
resumably.

Crash safety, step by step (where a store differs from a local folder, it says so):

1. The cache must be new, empty, or an rlkd cache: a folder (or prefix) holding files rlkd did not write is refused
   before anything is written into it (:func:`check_cache_dir`).
2. One writer at a time (:func:`rlkd.cache.lock.writer_lock`). Local: ``fcntl.flock`` on ``writer.lock``; the kernel
   drops it when the process dies, so a crash never leaves a stale lock. Store: the lease object ``writer.lease``,
   renewed while the writer lives (:mod:`rlkd.cache.lease`); a killed writer's lease expires after ``lease_seconds``.
3. Rows are buffered into row groups of ``row_group_rows`` rows and written to ``NAME.parquet.rlkd-tmp``: in the cache
   folder, or for a store in a private local spool folder (``$TMPDIR/rlkd-spool-PID-*``). Same bytes either way.
4. When the shard reaches ``shard_max_bytes`` (or on close) it is closed and hashed. Local: fsynced and renamed to
   ``NAME.parquet``. Store: uploaded whole under its final name ``NAME.parquet`` (multipart when large; the object
   appears only when the upload completes), then read back: the stored object's size and sha256 must be the
   spooled file's, or it is uploaded once more and then refused. Then the manifest is replaced as a whole with the new
   shard's rows/positions/bytes/sha256 (on a store: conditional on this writer still holding its lease).
5. On reopen, leftovers of a crashed writer are removed. Local: only files with rlkd's own temporary names
   (:func:`is_own_temporary`). Store: shard objects the manifest does not list (an upload finished just before a crash,
   or completed after an error): they are unfinished by definition, so their rows are scored again. Every listed shard
   is checked (size, and sha256 unless ``verify_shards=False``); a damaged or missing one stops the writer with the way
   out (``rlkd verify --repair``). Locally, a finished shard that is not in the manifest (a crash between the rename
   and the manifest update) is adopted after checking it. The ``row_id`` column of every finished shard is read back,
   so ``has()`` and ``write()`` never duplicate a row.
6. A manifest that lists no shard holds nothing: a writer with other settings starts afresh on it instead of
   refusing (a first run that failed before its first shard must not block the corrected retry).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rlkd.cache.codec import arrow_schema, parquet_write_options, rows_to_table, storage_summary
from rlkd.cache.lease import DEFAULT_LEASE_SECONDS, LEASE_NAME, MIN_LEASE_SECONDS, LeaseLostError
from rlkd.cache.lock import LOCK_NAME, writer_lock
from rlkd.cache.manifest import (
    MANIFEST_NAME,
    TMP_SUFFIX,
    CacheCorruptError,
    CacheDirError,
    CacheMismatchError,
    fsync_dir,
    identity_differences,
    manifest_path,
    parse_manifest,
    set_max_token_id,
    vocab_limit,
    write_manifest,
)
from rlkd.cache.schema import CODECS, FORMAT_VERSION, MAX_K, TeacherRow, row_problems
from rlkd.cache.storage import CacheLocation, StorageError
from rlkd.fsutil import file_sha256, pid_alive, utc_now

LOG_NAME = "cache-teacher.log"
"""Where ``rlkd cache-teacher`` keeps the output of its dependencies (vLLM, torch, datasets) for this cache."""
OWN_NAMES = frozenset({LOCK_NAME, LEASE_NAME, MANIFEST_NAME, LOG_NAME})
"""Files rlkd itself keeps in a cache folder besides shards and temporaries."""
SPOOL_PREFIX = "rlkd-spool-"
"""A writer to an object store builds each shard in ``$TMPDIR/rlkd-spool-PID-*/`` before uploading it."""
DAMAGED_SUFFIX = ".damaged"
"""``rlkd verify --repair`` renames a damaged shard to ``NAME.parquet.damaged`` (never deletes it)."""
_SHARD_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*-\d{5,}\.parquet"
_OWN_SHARD = re.compile(_SHARD_NAME)
_OWN_TMP = re.compile(_SHARD_NAME + re.escape(TMP_SUFFIX))
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


def _is_rlkd_shard(path: Path, loc: CacheLocation | None = None) -> bool:
    """True if ``path`` (a local file, or ``rel`` inside ``loc``) is a Parquet file with rlkd's metadata."""
    try:
        if loc is None:
            meta = pq.read_schema(path).metadata or {}
        else:
            meta = pq.read_schema(loc.path(str(path)), filesystem=loc.fs).metadata or {}
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


def _is_own_object(name: str) -> bool:
    """rlkd's own objects besides shards at a remote cache's root (a lease clock probe left by a killed writer)."""
    return name in OWN_NAMES or name.startswith(LEASE_NAME + ".")


def check_cache_dir(out_dir, what: str = "the cache folder") -> None:
    """Refuse, before anything is written, a cache location rlkd must not write into; see :class:`CacheDirError`.

    Fine: a path that does not exist yet (its nearest existing parent must be a writable folder), an empty folder, a
    folder holding only rlkd's own files (lock, log, temporaries), or an rlkd cache (it has a manifest). Refused: a
    file, a folder that cannot be written, and a folder holding anything else (a user's data is never mixed with a
    cache, and never cleaned up by one). The same for a prefix on an object store (one LIST request), where
    "cannot be written" shows at the first write instead, and ``hf://`` is refused as read-only. ``what`` names the
    folder in messages (e.g. ``--out out/``).
    """
    loc = CacheLocation.parse(out_dir)
    if not loc.is_local:
        _check_remote_dir(loc, what)
        return
    path = loc.local_path()
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
    _refuse_foreign(what, str(path), foreign, shards, "folder")


def _check_remote_dir(loc: CacheLocation, what: str) -> None:
    if loc.read_only:
        raise CacheDirError(f"{what} {loc}: hf:// locations are read-only in rlkd; write the cache to a local folder "
                            "or s3:// and upload it with `huggingface-cli upload`")
    listing = loc.list_files()
    if MANIFEST_NAME in listing:
        return
    if not listing and not loc.bucket_exists():
        bucket = loc.root.split("/", 1)[0]
        raise CacheDirError(f"{what} {loc}: the bucket {bucket} does not exist, or these credentials cannot see it: "
                            "create it first (rlkd does not create buckets), or check the credentials and endpoint "
                            "(AWS_ENDPOINT_URL, AWS_PROFILE, ...)")
    subfolders: dict[str, list[str]] = {}
    foreign = []
    for rel in listing:
        head, sep, rest = rel.partition("/")
        if sep:
            subfolders.setdefault(head, []).append(rest)
        elif not _is_own_object(head):
            foreign.append(head)
    for head, names in subfolders.items():  # a part of a --ray run: an rlkd cache, or only rlkd's own objects
        if MANIFEST_NAME not in names and not all(_is_own_object(name) for name in names):
            foreign.append(head + "/")
    if not foreign:
        return
    shards = [name for name in foreign if name.endswith(".parquet") and _is_rlkd_shard(Path(name), loc)][:4]
    _refuse_foreign(what, str(loc), sorted(foreign), shards, "prefix")


def _refuse_foreign(what: str, where: str, foreign: list[str], shards: list[str], kind: str) -> None:
    listing = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    if shards:
        raise CacheDirError(
            f"{what} {where} holds rlkd shards ({', '.join(shards[:3])}{', ...' if len(shards) > 3 else ''}) but no "
            f"{MANIFEST_NAME}, so nothing says which teacher, data and settings wrote them: restore its "
            f"{MANIFEST_NAME} to resume it, or write the cache into a new {kind}")
    raise CacheDirError(
        f"{what} {where} is not empty and is not an rlkd cache (no {MANIFEST_NAME}): it holds {listing}. rlkd writes "
        f"a cache only into a new or empty {kind} or into one of its own caches, so it never mixes with (or cleans "
        f"up) other files: give a new {kind}")


def make_cache_dir(out_dir, what: str = "the cache folder") -> CacheLocation:
    """:func:`check_cache_dir`, then create the folder (and its parents); a failure is a :class:`CacheDirError`
    naming the folder (a full disk stays an ``OSError`` with ``ENOSPC``, which callers report as such). A prefix on
    an object store needs no creating: it appears with its first object. Returns the location."""
    loc = CacheLocation.parse(out_dir)
    check_cache_dir(loc, what)
    if not loc.is_local:
        return loc
    path = loc.local_path()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise
        raise CacheDirError(f"{what} {path} cannot be created: {e.strerror or e}") from None
    return loc


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
        out_dir: the cache: a local folder (created if missing) or a URL (``s3://bucket/prefix``, ``gs://...``,
            ``file://...``); reopened and appended to if it holds a manifest.
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
        lease_seconds: on an object store, the duration of the writer's lease (:mod:`rlkd.cache.lease`): how long a
            killed writer blocks the prefix, and how long a writer may go without reaching the store.
        holder: who this writer is, for the lock file or lease (a refused second writer shows it).
    """

    def __init__(self, out_dir, meta: dict, *, k: int, codec: str = "q8", shard_max_bytes: int = 64 << 20,
                 row_group_rows: int = 256, name_prefix: str = "shard", row_group_bytes: int = 32 << 20,
                 compression_level: int | None = None, verify_shards: bool = True,
                 lease_seconds: float = DEFAULT_LEASE_SECONDS, holder: str = "CacheWriter"):
        problems = []
        if codec not in CODECS:
            problems.append(f"codec {codec!r} is not one of {', '.join(CODECS)}")
        if not (isinstance(k, (int, np.integer)) and 1 <= k <= MAX_K):
            problems.append(f"k={k!r} must be an integer in [1, {MAX_K}]")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name_prefix or ""):
            problems.append(f"name_prefix {name_prefix!r} must be a plain file-name prefix (letters, digits, _.-)")
        if row_group_rows < 1 or shard_max_bytes < 1:
            problems.append("row_group_rows and shard_max_bytes must be positive")
        if not lease_seconds >= MIN_LEASE_SECONDS:
            problems.append(f"lease_seconds must be >= {MIN_LEASE_SECONDS:g}, got {lease_seconds}")
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
        self.loc = CacheLocation.parse(out_dir)
        self.remote = not self.loc.is_local
        """Shards are uploaded to an object store (else renamed into a local folder)."""
        self.out_dir = self.loc.local_path()
        """The local cache folder (None on an object store)."""
        self.k = int(k)
        self.codec = codec
        self.shard_max_bytes = int(shard_max_bytes)
        self.row_group_rows = int(row_group_rows)
        self.row_group_bytes = int(row_group_bytes)
        self.name_prefix = name_prefix
        self._schema = arrow_schema(codec, self.k)
        self._pq_options = parquet_write_options(codec, compression_level)
        self._lock = writer_lock(self.loc, holder, lease_seconds=lease_seconds)
        self._pq_writer: pq.ParquetWriter | None = None
        self._sink = None
        self._spool: Path | None = None
        self._skip_name = 0
        self._buffer: list[TeacherRow] = []
        self._buffer_bytes = 0
        self._shard: dict | None = None
        self._closed = False
        self._session = {"rows": 0, "positions": 0, "bytes": 0, "shards": 0, "skipped_duplicates": 0}
        self.verify_shards = bool(verify_shards)
        make_cache_dir(self.loc)
        try:
            self._lock.acquire()
        except OSError as e:
            if e.errno == errno.ENOSPC or isinstance(e, StorageError):
                raise
            raise CacheDirError(f"cannot write the cache folder {self.loc}: {e.strerror or e}") from None
        try:
            self._open(dict(meta))
        except BaseException:
            self._lock.release()
            raise

    # ---- opening -------------------------------------------------------------------------------------------------

    def _open(self, meta: dict) -> None:
        if self.remote:
            self._listing = self.loc.list_files()  # one LIST: every object's size
            # A new holder of an expired lease skips one shard number: the expired holder may still be paused in
            # the middle of an upload under the next free name (see rlkd.cache.lease).
            self._skip_name = 1 if self._lock.took_over else 0
            _clean_stale_spools()
        else:
            # Leftovers of a crashed writer: never listed in the manifest, so dropping them loses nothing. Only
            # rlkd's own temporaries: other files in the folder are not ours to delete.
            for tmp in self.out_dir.iterdir():
                if is_own_temporary(tmp):
                    tmp.unlink()
        meta = {key: v for key, v in meta.items() if key not in ("k", "codec", "format_version")}
        new_identity = {"format_version": FORMAT_VERSION, "k": self.k, "codec": self.codec, **meta}
        data = self._lock.read(MANIFEST_NAME)
        existing = parse_manifest(data, self.loc.name(MANIFEST_NAME)) if data is not None else None
        if existing is not None and not existing.get("shards") and not self._unlisted_shards(set()):
            # Nothing was ever finished here (e.g. a first run stopped by a bad setting): not a cache to protect.
            existing = None
        if existing is not None:
            manifest = existing
            diffs = identity_differences(manifest, new_identity)
            if diffs:
                raise CacheMismatchError(
                    f"{self.loc} already holds a cache written with different settings; appending would mix "
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
                f"cannot resume {self.loc}: {len(damaged)} of its {len(manifest['shards'])} finished shard(s) "
                "are damaged or missing:\n" + "\n".join(f"  - {d}" for d in damaged)
                + f"\nRun `rlkd verify --repair {self.loc}`: it moves damaged shards aside (renamed to "
                f"*{DAMAGED_SUFFIX}, nothing is deleted) and drops them from the manifest. Then run this command "
                "again: it scores their rows again and keeps every other shard.")
        for name in self._unlisted_shards(listed):
            if self.remote:
                self._drop_unfinished(name)  # the manifest does not vouch for it: its rows are scored again
            else:
                self._adopt(self.out_dir / name)  # finished, but the crash came before the manifest update
        self._refresh_totals()
        self._write_manifest()

    def _unlisted_shards(self, listed: set[str]) -> list[str]:
        """Names of shards at the cache's root that the manifest does not list. Local: every ``*.parquet`` file
        (foreign ones are refused by :meth:`_adopt`). Store: objects named like rlkd's shards."""
        if self.remote:
            return [name for name in self._listing if "/" not in name and name not in listed
                    and _OWN_SHARD.fullmatch(name)]
        return [p.name for p in sorted(self.out_dir.glob("*.parquet")) if p.name not in listed and p.is_file()]

    def _drop_unfinished(self, name: str) -> None:
        """Delete an unlisted shard object: an upload the manifest never recorded. Only rlkd's: an object with a
        shard's name that is a Parquet file without rlkd's metadata is someone else's, and refused instead."""
        try:
            meta = pq.read_schema(self.loc.path(name), filesystem=self.loc.fs).metadata or {}
        except StorageError:
            raise
        except Exception:  # noqa: BLE001 - not readable as Parquet: an interrupted upload of ours
            meta = {b"rlkd.format_version": b"?"}
        if b"rlkd.format_version" not in meta:
            raise CacheCorruptError(f"{self.loc.name(name)} is not an rlkd shard (it has no rlkd metadata) and does "
                                    f"not belong in a cache: move it out of {self.loc}")
        self._lock.check()
        self.loc.remove(name)
        self._listing.pop(name, None)

    def _check_listed(self, entry: dict) -> str | None:
        """What is wrong with a listed shard (None when it is intact); reads its row_ids into ``self._ids``."""
        if self.remote:
            size = self._listing.get(entry["file"])
        else:
            path = self.out_dir / entry["file"]
            size = path.stat().st_size if path.is_file() else None
        if size is None:
            return "missing"
        if size != entry["bytes"]:
            return f"{size} bytes, the manifest says {entry['bytes']} (truncated or modified)"
        source, filesystem = (path, None) if not self.remote else (self.loc.path(entry["file"]), self.loc.fs)
        if self.verify_shards:
            if self.remote:  # one download serves both the hash and the row_ids
                data = self.loc.read_bytes(entry["file"])
                digest, source, filesystem = hashlib.sha256(data).hexdigest(), pa.BufferReader(data), None
            else:
                digest = file_sha256(path)
            if digest != entry["sha256"]:
                return "its sha256 differs from the manifest's (corrupted)"
        try:
            table = pq.read_table(source, columns=["row_id"], filesystem=filesystem)
            self._ids.update(table.column("row_id").to_pylist())
        except StorageError:
            raise
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
            raise RuntimeError(f"CacheWriter for {self.loc} is closed")
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
        names = (self.loc.list_files() if self.remote else [p.name for p in self.out_dir.iterdir()])
        used = [int(m.group(1)) for s in self.manifest["shards"] if (m := pattern.fullmatch(s["file"]))]
        used += [int(m.group(1)) for name in names if (m := pattern.fullmatch(name))]
        number, self._skip_name = max(used, default=-1) + 1 + self._skip_name, 0
        return f"{self.name_prefix}-{number:05d}.parquet"

    def _flush_row_group(self) -> None:
        if not self._buffer:
            return
        self._lock.check()  # a writer whose lease is gone stops before writing more
        table = rows_to_table(self._buffer, self.codec, self.k)
        if self._pq_writer is None:
            name = self._next_shard_name()
            tmp = (self._spool_dir() if self.remote else self.out_dir) / (name + TMP_SUFFIX)
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

    def _spool_dir(self) -> Path:
        """This writer's private local folder for the open shard of a remote cache (created on first use)."""
        if self._spool is None:
            self._spool = Path(tempfile.mkdtemp(prefix=f"{SPOOL_PREFIX}{os.getpid()}-"))
        return self._spool

    def _finish_shard(self) -> None:
        if self._pq_writer is None:
            return
        self._pq_writer.close()
        self._sink.close()
        self._pq_writer = self._sink = None
        s, self._shard = self._shard, None
        tmp: Path = s.pop("tmp")
        if not self.remote:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        entry = {"file": s["file"], "rows": s["rows"], "positions": s["positions"], "tokens": s["tokens"],
                 "bytes": tmp.stat().st_size, "sha256": file_sha256(tmp), "row_group_rows": s["row_group_rows"],
                 "max_token_id": s["max_token_id"]}
        if self.remote:
            self._upload(tmp, entry)
            tmp.unlink()
        else:
            os.replace(tmp, self.out_dir / s["file"])
            fsync_dir(self.out_dir)
        self.manifest["shards"].append(entry)
        self._refresh_totals()
        self._write_manifest()
        self._session["bytes"] += entry["bytes"]
        self._session["shards"] += 1

    def _upload(self, tmp: Path, entry: dict) -> None:
        """Upload a finished shard under its final name and check what the store holds: its size and sha256, read
        back, must be the spooled file's. A mismatch is uploaded once more, then refused (naming the object)."""
        name = entry["file"]
        for attempt in (1, 2):
            self.loc.upload(name, tmp, guard=self._lock.check)
            size = self.loc.size(name)
            if size == entry["bytes"]:
                if self.loc.sha256(name) == entry["sha256"]:
                    return
                problem = "its sha256 is not the uploaded file's"
            else:
                problem = f"it holds {size} bytes, {entry['bytes']} were uploaded"
        raise StorageError(f"{self.loc.name(name)}: read back after two uploads, {problem}: the store does not "
                           "keep what it is sent. Nothing was added to the manifest; run the command again to resume")

    def _write_manifest(self) -> None:
        write_manifest(self.loc, self.manifest, lock=self._lock)

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
            self._write_manifest()
        finally:
            self._closed = True
            self._drop_spool()
            self._lock.release()

    def _abort(self, exc: BaseException | None = None) -> None:
        """After an error: keep finished shards, try to save buffered rows, never raise from here. If the open shard
        cannot be finished (a full disk), its temporary is removed: its rows are not in the manifest, so a resume
        scores them again, and the space goes back to the disk. A writer that lost its lease writes nothing more."""
        if not isinstance(exc, LeaseLostError):
            try:
                self.close(complete=False)
                return
            except Exception:  # noqa: BLE001 - the original exception matters more
                pass
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
        self._drop_spool()
        self._lock.release()

    def _drop_spool(self) -> None:
        if self._spool is not None:
            shutil.rmtree(self._spool, ignore_errors=True)
            self._spool = None

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close(complete=True)
        else:
            self._abort(exc)

    def __del__(self):
        if getattr(self, "_lock", None) is not None:
            self._lock.release()
        if getattr(self, "_spool", None) is not None:
            self._drop_spool()


def _clean_stale_spools(max_age_s: float = 3600.0) -> None:
    """Remove spool folders of writers that were killed on this machine (their process is gone and the folder has
    not changed for an hour; the age guards against another container's process with the same id)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{SPOOL_PREFIX}*-*"):
        try:
            pid = int(folder.name[len(SPOOL_PREFIX):].split("-", 1)[0])
            newest = max([p.stat().st_mtime for p in folder.iterdir()] + [folder.stat().st_mtime])
        except (ValueError, OSError):
            continue
        if pid != os.getpid() and not pid_alive(pid) and time.time() - newest > max_age_s:
            shutil.rmtree(folder, ignore_errors=True)
