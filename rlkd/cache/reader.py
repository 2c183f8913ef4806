"""CacheReader: stream decoded rows from a cache in batches, shuffled per epoch, split over ranks, resumable.

Order of one epoch (every rank computes the same global order without talking to the others):

1. The row groups of all shards are the *units*. With ``shuffle``, they are permuted by
   ``default_rng([seed, epoch])``; otherwise they stay in manifest/file order.
2. Concatenating the units gives a global row order of ``N`` rows. Rank ``r`` of ``W`` takes the contiguous slice
   ``[r*N//W, (r+1)*N//W)`` of it: **the split is at row granularity**, so every row goes to exactly one rank, ranks
   differ by at most one row, and a rank reads only the row groups its slice touches (at most two are shared with a
   neighbour).
3. Within its slice, a rank shuffles with a bounded buffer of ``shuffle_buffer`` rows
   (``default_rng([seed, epoch, rank])``): fill the buffer, then repeatedly emit a random element and replace it with
   the next row.

The emitted order is a pure function of ``(seed, epoch, rank, world_size, shuffle_buffer, shard list)``, so it is
computed up front as a permutation of row indices (no data read). Resuming only needs the number of rows already
emitted: :meth:`CacheReader.state_dict` is ``{epoch, position, ...}``, and a resumed reader reads just the row groups
that still hold un-emitted rows. Memory stays bounded by the buffer plus one row group.

Where the cache lives does not change any of this: ``cache_dir`` is a path or a URL (``s3://``, ``gs://``, ...) and
:mod:`rlkd.cache.shard_io` fetches the row groups (ranged reads, or whole shards into an optional local disk cache),
``prefetch`` of them in flight at once; transient store failures are retried (:mod:`rlkd.cache.storage`).

Integrity: on construction every shard's size is checked against the manifest (one listing; catches truncation and
missing files); a shard's schema is checked when it is first opened; Parquet page CRCs are verified on every read
(catches flipped bytes in data). The full sha256 check is ``verify_cache`` / ``rlkd verify`` (or ``check_sha256=True``).
Errors are :class:`CacheCorruptError` naming the shard.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq

from rlkd.background import map_ahead
from rlkd.cache.codec import CODEC_COLUMNS, DecodedBlock, arrow_schema
from rlkd.cache.manifest import CacheCorruptError, read_manifest
from rlkd.cache.schema import CODECS, FORMAT_VERSION, TeacherRow
from rlkd.cache.shard_io import GB, LocalShardCache, ShardOpener
from rlkd.cache.storage import CacheLocation, RetryPolicy, StorageError

STATE_VERSION = 1


def check_manifest(manifest: dict, cache_dir) -> list[str]:
    """Problems that make a manifest unreadable for this version of rlkd."""
    problems = []
    if manifest.get("format_version") != FORMAT_VERSION:
        problems.append(f"{cache_dir}: format_version {manifest.get('format_version')!r}, this rlkd reads "
                        f"{FORMAT_VERSION}; use the rlkd version that wrote it")
    if manifest.get("codec") not in CODECS:
        problems.append(f"{cache_dir}: unknown codec {manifest.get('codec')!r} in the manifest")
    if not isinstance(manifest.get("k"), int) or manifest["k"] < 1:
        problems.append(f"{cache_dir}: manifest k={manifest.get('k')!r} is not a positive integer")
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        problems.append(f"{cache_dir}: manifest has no shard list")
    else:
        for i, s in enumerate(shards):
            missing = [key for key in ("file", "rows", "bytes", "sha256") if key not in s]
            if missing:
                problems.append(f"{cache_dir}: manifest shard entry {i} lacks {', '.join(missing)}")
    return problems


def shard_schema_problems(pf: pq.ParquetFile, codec: str, k: int, rel: str) -> list[str]:
    """Compare a shard's Arrow schema and rlkd metadata with what the manifest promises."""
    problems = []
    expected = arrow_schema(codec, k)
    got = pf.schema_arrow
    if not got.equals(expected, check_metadata=False):
        problems.append(f"shard {rel}: schema differs from the {codec} schema ({got.names} vs {expected.names})")
    meta = {key.decode(): v.decode() for key, v in (got.metadata or {}).items()}
    for key, want in expected.metadata.items():
        key, want = key.decode(), want.decode()
        if meta.get(key) != want:
            problems.append(f"shard {rel}: metadata {key}={meta.get(key)!r}, manifest says {want!r}")
    return problems


class _Shards:
    """Opens shards lazily and reads row groups, turning every failure into CacheCorruptError (or StorageError when
    the store cannot be reached). Safe to call from several threads: each read gets its own file handle."""

    def __init__(self, loc: CacheLocation, manifest: dict, check_sha256: bool,
                 local_cache: LocalShardCache | None = None, max_meta: int = 1024):
        self.loc = loc
        self.manifest = manifest
        self.codec = manifest["codec"]
        self.k = int(manifest["k"])
        self.entries = manifest["shards"]
        self.check_sha256 = check_sha256
        self.opener = ShardOpener(loc, local_cache)
        self.max_meta = max_meta
        self._meta: OrderedDict[int, pq.FileMetaData] = OrderedDict()
        self._lock = threading.Lock()
        self._opening: dict[int, threading.Lock] = {}
        sizes = loc.list_files() if self.entries else {}  # one listing, not one request per shard
        for e in self.entries:
            size = sizes.get(e["file"])
            if size is None:
                raise CacheCorruptError(f"shard {loc.name(e['file'])} is listed in {loc.name('manifest.json')} "
                                        f"but missing; restore it, or run `rlkd verify {loc}`")
            if size != e["bytes"]:
                raise CacheCorruptError(f"shard {loc.name(e['file'])} has {size} bytes, the manifest says "
                                        f"{e['bytes']}: it is truncated or was modified (`rlkd verify {loc}`)")

    def row_group_rows(self, i: int) -> list[int]:
        e = self.entries[i]
        if "row_group_rows" in e:
            return [int(n) for n in e["row_group_rows"]]
        md = self.metadata(i)
        return [md.row_group(j).num_rows for j in range(md.num_row_groups)]

    def metadata(self, i: int) -> pq.FileMetaData:
        """Shard ``i``'s footer, checked against the manifest the first time (kept for the next reads)."""
        with self._lock:
            if i in self._meta:
                self._meta.move_to_end(i)
                return self._meta[i]
            opening = self._opening.setdefault(i, threading.Lock())
        with opening:  # one thread opens a shard; the others wait for it, and other shards open in parallel
            with self._lock:
                if i in self._meta:
                    return self._meta[i]
            md = self._open(i)
            with self._lock:
                self._meta[i] = md
                while len(self._meta) > self.max_meta:
                    self._meta.popitem(last=False)
            return md

    def _open(self, i: int) -> pq.FileMetaData:
        e = self.entries[i]
        name = self.loc.name(e["file"])
        try:
            if self.check_sha256:
                path = self.opener.local_file(e["file"], e)
                from rlkd.fsutil import file_sha256

                digest = file_sha256(path) if path is not None else self.loc.sha256(e["file"])
                if digest != e["sha256"]:
                    raise CacheCorruptError(f"shard {name}: sha256 differs from the manifest (corrupted); run "
                                            "`rlkd verify` and regenerate it")
            pf = self.opener.open(e["file"], e)
        except (CacheCorruptError, StorageError):
            raise
        except Exception as err:  # noqa: BLE001 - a damaged footer raises anything (even UnicodeDecodeError)
            raise CacheCorruptError(f"shard {name} cannot be opened ({err}); it is corrupt or truncated: run "
                                    f"`rlkd verify {self.loc}`") from err
        problems = shard_schema_problems(pf, self.codec, self.k, e["file"])
        if pf.metadata.num_rows != e["rows"]:
            problems.append(f"shard {e['file']}: {pf.metadata.num_rows} rows, the manifest says {e['rows']}")
        if problems:
            raise CacheCorruptError("; ".join(problems))
        return pf.metadata

    def read(self, i: int, rg: int, columns: list[str] | None = None) -> DecodedBlock:
        e = self.entries[i]
        try:
            pf = self.opener.open(e["file"], e, metadata=self.metadata(i))
            table = pf.read_row_group(rg, columns=columns, use_threads=False)
            return DecodedBlock(table, self.codec)
        except (CacheCorruptError, StorageError):
            raise
        except Exception as err:  # noqa: BLE001 - damaged pages raise many exception types
            raise CacheCorruptError(f"shard {self.loc.name(e['file'])}, row group {rg}, cannot be read ({err}); "
                                    f"it is corrupt: run `rlkd verify {self.loc}` and regenerate it") from err


def buffer_shuffle_order(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """The order (n,) in which a shuffle buffer of ``buffer`` slots emits a stream of ``n`` items.

    Fill the buffer; for each next item emit a uniformly chosen slot and put the item there; then drain the rest
    in random order. Only indices are shuffled, so this costs O(n) integer work and reads no data.
    """
    if buffer <= 1 or n <= 1:
        return np.arange(n, dtype=np.int64)
    size = min(buffer, n)
    slots = list(range(size))
    picks = rng.integers(0, size, size=n - size).tolist()
    out = []
    append = out.append
    for item, j in zip(range(size, n), picks):
        append(slots[j])
        slots[j] = item
    tail = np.array(slots, dtype=np.int64)
    rng.shuffle(tail)
    return np.concatenate([np.array(out, dtype=np.int64), tail])


class CacheReader:
    """Iterate a cache in batches of rows; one pass of ``for rows in reader`` is one epoch of this rank.

    Each batch is a ``list[TeacherRow]`` of ``batch_size`` rows (the last one of an epoch may be shorter), unpadded
    and decoded (see :mod:`rlkd.cache.schema`). Turning rows into padded model inputs and flattened teacher targets
    is :func:`rlkd.core.targets.collate`'s job, after the consumer has chosen its rows. Without shuffling, a row's
    arrays are read-only views into its decoded row group: a row kept long after its batch keeps that group alive.

    Args:
        cache_dir: a cache written by :class:`CacheWriter`.
        batch_size: rows per batch; the last batch of an epoch may be smaller unless ``drop_last``.
        shuffle: permute row groups and use the shuffle buffer; False reads in file order.
        seed: base of every random choice; the same seed gives the same order on every machine.
        rank, world_size: this process's share (see the module docstring).
        shuffle_buffer: rows in the shuffle buffer (memory ~ this many decoded rows).
        epoch: the starting epoch; :meth:`set_epoch` changes it.
        drop_last: skip a final partial batch.
        check_sha256: hash each shard when first opened (a full extra read; ``rlkd verify`` does it offline).
        prefetch: row groups read and decoded ahead of the consumer by as many background threads (0: read in the
            caller's thread). Parquet decompression and Arrow's I/O release the GIL, so reading overlaps with the
            training step; from object storage the requests are in flight together, which hides their latency.
            With a local cache, the first row group of a shard downloads the whole shard, so up to ``prefetch``
            shards download at once.
        local_cache: a folder for whole-shard copies of a remote cache (ignored for a local cache), so later epochs
            read from local disk; a :class:`~rlkd.cache.shard_io.LocalShardCache` may be shared by readers.
        local_cache_gb: the local cache's size budget in GB (10^9 bytes), least recently used shards out first.
        retry: how transient read failures are retried (default :class:`~rlkd.cache.storage.RetryPolicy`).

    ``cache_dir`` may be a plain path or a URL (``s3://``, ``gs://``, ``file://``, ``hf://datasets/``; see
    :mod:`rlkd.cache.storage`). The order, the split over ranks and :meth:`state_dict` do not depend on where the
    cache lives or on prefetching: a local and a remote copy of one cache yield identical batches.

    ``set_epoch(e)`` with a new ``e`` restarts at the beginning of epoch ``e``; with the current epoch it changes
    nothing (so ``load_state_dict`` followed by ``set_epoch(state_epoch)`` still resumes). A finished pass leaves the
    reader at the end of its epoch; iterating again yields nothing until ``set_epoch`` (or :meth:`reset`).
    """

    def __init__(self, cache_dir, batch_size: int = 8, *, shuffle: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle_buffer: int = 1024, epoch: int = 0, drop_last: bool = False,
                 check_sha256: bool = False, prefetch: int = 2,
                 local_cache: str | os.PathLike | LocalShardCache | None = None, local_cache_gb: float = 100.0,
                 retry: RetryPolicy | None = None):
        problems = []
        if batch_size < 1:
            problems.append(f"batch_size={batch_size} must be >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            problems.append(f"rank={rank} must lie in [0, world_size={world_size})")
        if shuffle_buffer < 0:
            problems.append(f"shuffle_buffer={shuffle_buffer} must be >= 0")
        if prefetch < 0:
            problems.append(f"prefetch={prefetch} must be >= 0")
        if not local_cache_gb > 0:
            problems.append(f"local_cache_gb={local_cache_gb} must be > 0")
        if problems:
            raise ValueError("CacheReader: " + "; ".join(problems))
        self.location = CacheLocation.parse(cache_dir, retry=retry)
        """Where the cache lives (:class:`~rlkd.cache.storage.CacheLocation`); its ``stats`` count remote bytes."""
        self.cache_dir = self.location.url
        self.manifest = read_manifest(self.location)
        problems = check_manifest(self.manifest, self.cache_dir)
        if problems:
            raise CacheCorruptError("; ".join(problems))
        self.k = int(self.manifest["k"])
        self.codec = self.manifest["codec"]
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.shuffle_buffer = int(shuffle_buffer)
        self.drop_last = bool(drop_last)
        self.prefetch = int(prefetch)
        if isinstance(local_cache, (str, os.PathLike)):
            local_cache = LocalShardCache(local_cache, int(local_cache_gb * GB))
        self.local_cache = local_cache if not self.location.is_local else None
        self._shards = _Shards(self.location, self.manifest, check_sha256, self.local_cache)
        # Units: (shard index, row group index, rows), in file order.
        units = []
        for i in range(len(self._shards.entries)):
            for j, n in enumerate(self._shards.row_group_rows(i)):
                units.append((i, j, n))
        self._units = np.array(units, dtype=np.int64).reshape(-1, 3)
        self.total_rows = int(self._units[:, 2].sum()) if len(units) else 0
        N, W = self.total_rows, self.world_size
        self._lo, self._hi = self.rank * N // W, (self.rank + 1) * N // W
        self.num_rows = self._hi - self._lo
        """Rows this rank yields per epoch (``total_rows`` for the whole cache)."""
        self.epoch = int(epoch)
        self.position = 0
        """Rows already yielded in the current epoch."""
        self._plan_epoch: int | None = None

    # ---- sizes ---------------------------------------------------------------------------------------------------

    def _batches(self, rows: int) -> int:
        return rows // self.batch_size if self.drop_last else math.ceil(rows / self.batch_size)

    @property
    def num_batches(self) -> int:
        """Batches this rank yields per epoch."""
        return self._batches(self.num_rows)

    @property
    def min_num_batches(self) -> int:
        """The fewest batches any rank yields per epoch (the same on every rank): DDP stops there."""
        return self._batches(self.total_rows // self.world_size)

    def __len__(self) -> int:
        return self.num_batches

    # ---- order ---------------------------------------------------------------------------------------------------

    def _plan(self) -> None:
        """Compute this epoch's emission order: ``_order[s]`` = index in this rank's row stream emitted s-th."""
        if self._plan_epoch == self.epoch:
            return
        units = self._units
        if self.shuffle and len(units):
            perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(units))
            units = units[perm]
        ends = np.cumsum(units[:, 2]) if len(units) else np.zeros(0, np.int64)
        starts = ends - units[:, 2] if len(units) else ends
        # This rank's contiguous slice [lo, hi) of the global order, as pieces of units.
        lo, hi = self._lo, self._hi
        sel = np.nonzero((ends > lo) & (starts < hi))[0]
        pieces = []  # (shard, row group, first row in group, row count)
        for u in sel:
            a, b = max(lo, starts[u]), min(hi, ends[u])
            pieces.append((units[u, 0], units[u, 1], a - starts[u], b - a))
        self._pieces = np.array(pieces, dtype=np.int64).reshape(-1, 4)
        counts = self._pieces[:, 3]
        self._piece_of = np.repeat(np.arange(len(pieces)), counts)  # (num_rows,) stream index -> piece
        piece_start = np.cumsum(counts) - counts
        self._piece_start = piece_start
        if self.shuffle and self.shuffle_buffer > 1:
            rng = np.random.default_rng([self.seed, self.epoch, self.rank])
            self._order = buffer_shuffle_order(self.num_rows, self.shuffle_buffer, rng)
        else:
            self._order = np.arange(self.num_rows, dtype=np.int64)
        self._emit_pos = np.empty(self.num_rows, dtype=np.int64)
        self._emit_pos[self._order] = np.arange(self.num_rows)
        self._plan_epoch = self.epoch

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self.epoch = int(epoch)
            self.position = 0

    def reset(self) -> None:
        """Restart the current epoch from its beginning."""
        self.position = 0

    # ---- iteration -----------------------------------------------------------------------------------------------

    def _rows(self) -> Iterator[TeacherRow]:
        """This rank's rows for the current epoch, from ``self.position`` on, in emission order."""
        self._plan()
        start = self.position
        if start >= self.num_rows:
            return
        order = self._order[start:]
        # Row groups in the order they are first needed: fixed by the plan, so a thread can read them ahead.
        needed = self._piece_of[order]
        _, first = np.unique(needed, return_index=True)
        load_seq = needed[np.sort(first)]
        blocks = self._blocks(load_seq)
        pending: dict[int, TeacherRow] = {}
        copy = self.shuffle and self.shuffle_buffer > 1  # rows may outlive their block: don't pin it
        try:
            for s, idx in enumerate(order.tolist(), start):
                if idx not in pending:
                    p, block = next(blocks)
                    if p != self._piece_of[idx]:
                        raise AssertionError("row group read out of plan")  # guards the invariant
                    first_row, count = int(self._pieces[p, 2]), int(self._pieces[p, 3])
                    base = int(self._piece_start[p])
                    emit = self._emit_pos[base:base + count]
                    for j in np.nonzero(emit >= s)[0].tolist():  # skip rows emitted before a resume point
                        pending[base + j] = block.row(first_row + j, copy=copy)
                    del block
                yield pending.pop(idx)
        finally:
            blocks.close()

    def _blocks(self, load_seq: np.ndarray) -> Iterator[tuple[int, DecodedBlock]]:
        """Decoded row groups of ``load_seq`` (piece indices), read ahead by a thread pool when ``prefetch > 0``."""
        def read(p):
            shard, rg = int(self._pieces[p, 0]), int(self._pieces[p, 1])
            return self._shards.read(shard, rg)

        # ``prefetch`` reads in flight, handed out in plan order: memory stays at ``prefetch`` decoded row groups.
        pieces = load_seq.tolist()
        yield from zip(pieces, map_ahead(read, pieces, self.prefetch, name="rlkd-cache-prefetch"))

    def __iter__(self) -> Iterator[list[TeacherRow]]:
        batch: list[TeacherRow] = []
        for row in self._rows():
            batch.append(row)
            if len(batch) == self.batch_size:
                # Advance before yielding: state_dict() taken while the consumer holds this batch resumes after it.
                self.position += len(batch)
                yield batch
                batch = []
        if batch:
            self.position += len(batch)
            if not self.drop_last:
                yield batch

    def iter_blocks(self, columns=None, *, part: tuple[int, int] = (0, 1)) -> Iterator[DecodedBlock]:
        """Every row group of the cache (all ranks), decoded, in file order: flat columns for whole-cache tools
        (``rlkd inspect``) that would otherwise pay a Python object per row.

        ``columns``: read only these columns (names of :class:`TeacherRow` fields; Parquet skips the others'
        pages) besides the ones decoding needs (``loss_mask``, ``topk_count``, the codec's log-prob columns); the
        block's attributes of the others are None. Default: every column.
        ``part=(i, n)``: only row groups ``i, i + n, i + 2n, ...`` of the file-order list, so that ``n`` readers
        (threads, each with its own CacheReader) can split a pass.
        """
        wanted = None
        if columns is not None:
            names = arrow_schema(self.codec, self.k).names
            base = ["loss_mask", "topk_count"] + [n for n in names if n in CODEC_COLUMNS[self.codec]]
            unknown = sorted(set(columns) - set(names) - {"topk_logprobs"})
            if unknown:
                raise ValueError(f"iter_blocks(columns=...): unknown column(s) {unknown}; the cache has {names}")
            wanted = [n for n in names if n in base or n in columns]
        first, step = part
        if not 0 <= first < step:
            raise ValueError(f"iter_blocks(part=({first}, {step})): need 0 <= i < n")
        units = [(i, j) for u, (i, j, _) in enumerate(self._units.tolist()) if u % step == first]
        yield from map_ahead(lambda unit: self._shards.read(*unit, wanted), units, self.prefetch,
                             name="rlkd-cache-prefetch")

    def iter_rows(self) -> Iterator[TeacherRow]:
        """Every row of the cache (all ranks), decoded and unpadded, in file order, without shuffling."""
        for block in self.iter_blocks():
            for r in range(block.num_rows):
                yield block.row(r)

    # ---- resume --------------------------------------------------------------------------------------------------

    def _fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha256()
        for e in self._shards.entries:
            h.update(f"{e['file']}:{e['rows']}:{e['sha256']};".encode())
        return h.hexdigest()[:16]

    def state_dict(self) -> dict:
        """JSON-safe resume state: where this rank stands in which epoch, and what the order depends on."""
        return {
            "version": STATE_VERSION, "epoch": self.epoch, "position": self.position, "seed": self.seed,
            "rank": self.rank, "world_size": self.world_size, "shuffle": self.shuffle,
            "shuffle_buffer": self.shuffle_buffer, "total_rows": self.total_rows, "shards": self._fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` was taken. Everything the order depends on must match."""
        problems = []
        for key in ("seed", "rank", "world_size", "shuffle", "shuffle_buffer", "total_rows"):
            if state.get(key) != getattr(self, key):
                problems.append(f"{key}: {state.get(key)!r} in the state, {getattr(self, key)!r} in this reader")
        if state.get("shards") != self._fingerprint():
            problems.append("the cache's shard list changed since the state was saved")
        if state.get("version") != STATE_VERSION:
            problems.append(f"state version {state.get('version')!r}, expected {STATE_VERSION}")
        if problems:
            raise ValueError("cannot resume the CacheReader exactly:\n" + "\n".join(f"  - {p}" for p in problems)
                             + "\nCreate the reader with the saved settings (the order depends on all of them).")
        position = int(state["position"])
        if not 0 <= position <= self.num_rows:
            raise ValueError(f"state position {position} is outside [0, {self.num_rows}]")
        self.epoch = int(state["epoch"])
        self.position = position
