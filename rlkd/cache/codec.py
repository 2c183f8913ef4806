"""How rows become Parquet columns and back: the log-probability codecs and the Arrow schema.

Columns (one Parquet row per sequence; every per-position column is a list over the row's ``P = T - 1`` positions,
every per-entry column a list over its ``sum(topk_count)`` entries; see :mod:`rlkd.cache.schema`):

==================  ====================  =====================================================================
column              Arrow type            holds
==================  ====================  =====================================================================
row_id              string                :func:`~rlkd.cache.schema.make_row_id`
source_index        int64                 index of the example in the source dataset
input_ids           list<int32>           (T,) tokens; BYTE_STREAM_SPLIT
loss_mask           list<bool>            (P,)
topk_count          list<uint16>          (P,) entries kept per position (adaptive k; == k otherwise); BSS
topk_ids            list<uint32>          (n,) teacher ids in rank order; BYTE_STREAM_SPLIT on the leaf
*codec columns*                           the log-probabilities, see below
tail_logmass        list<float32>         (P,) exact ``log(1 - sum p_topk)``; BYTE_STREAM_SPLIT
target_logprob      list<float32>         (P,) teacher log-prob of ``input_ids[t+1]``; BYTE_STREAM_SPLIT
target_rank         list<int32>           (P,) its 1-based rank over the whole vocabulary; BYTE_STREAM_SPLIT
==================  ====================  =====================================================================

Storage (zstd levels per column, page size, encodings: :func:`parquet_write_options`) is recorded in the manifest's
``storage`` entry; it is not part of the format: any Parquet reader (pyarrow >= 16) reads every choice, so caches
written with other levels or encodings read the same.

Codecs (the manifest records which one a cache uses):

``fp32``  ``topk_logprobs: list<float32>``: lossless.

``fp16``  ``topk_logprobs: list<float16>``: relative error <= 2^-11 (0.0049 nat at lp = -10). Values below
          -65504 become ``-inf`` (they are probability 0 in float32 anyway).

``q8``    (default) ``top1_logprob: list<float16>`` per position, plus ``logprob_gaps: binary`` per row holding one
          uint8 per non-top-1 entry. With ``t`` the fp16-rounded top-1 and ``g_r = round(16 * (t - lp_r))`` the
          gap of rank ``r`` on a 1/16-nat grid (non-decreasing along rank), the byte stored for rank ``r >= 2`` is
          the delta ``g_r - g_(r-1)``. Decoding is ``lp_r = t - cumsum(deltas) / 16``. Rules at the edges:

          * ``255`` is reserved for ``-inf`` (probability 0, e.g. masked vocabulary); it only occurs in a suffix,
            since log-probs are non-increasing.
          * A delta is at most ``254`` (15.875 nat). An entry more than that below its predecessor is *out of
            range*: it decodes to exactly 15.875 nat below the decoded predecessor, i.e. slightly too likely (its
            probability relative to the predecessor is < e^-15.875 = 1.3e-7). The encoder carries the saturation
            forward (``g'_r = min(g_r, g'_(r-1) + 254)``), so later entries come back into range as soon as the
            deltas allow and the error never accumulates.
          * In range, every non-top-1 entry is within 1/32 nat of the truth (plus float32 rounding), and the
            top-1 within its fp16 rounding (<= 2^-11 relative). Ties stay exact ties; order is preserved.

The rank order of the ids is exact whatever the codec: ids are never reordered.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from rlkd.cache.schema import CODECS, FORMAT_VERSION, TeacherRow

Q8_STEP = 1.0 / 16.0
"""Grid of the q8 gaps, in nats."""
Q8_MAX_DELTA = 254
"""Largest finite q8 delta; larger jumps saturate (see the module docstring)."""
Q8_NEG_INF = 255
"""q8 byte that means -inf."""

CODEC_COLUMNS = {
    "fp32": {"topk_logprobs": pa.list_(pa.float32())},
    "fp16": {"topk_logprobs": pa.list_(pa.float16())},
    "q8": {"top1_logprob": pa.list_(pa.float16()), "logprob_gaps": pa.binary()},
}
"""The columns each codec stores its log-probabilities in."""

def _check_codec(codec: str) -> None:
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}: choose one of {', '.join(CODECS)}")


def _starts(counts: np.ndarray) -> np.ndarray:
    """(P,) offset of each position's first entry in the flat per-entry arrays."""
    ends = np.cumsum(counts, dtype=np.int64)
    return ends - counts


def _segmented_accumulate(values: np.ndarray, counts: np.ndarray, op: str) -> np.ndarray:
    """Running max/min of int64 ``values`` restarting at each position, without a Python loop.

    Shifting each position by a huge per-position constant makes a global accumulate restart at every boundary.
    """
    big = np.int64(1) << np.int64(40)
    shift = np.repeat(np.arange(counts.shape[0], dtype=np.int64) * big, counts)
    if op == "max":
        return np.maximum.accumulate(values + shift) - shift
    return np.minimum.accumulate(values - shift) + shift


def encode_q8(logprobs: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Encode flat ``logprobs`` (n,) over positions of ``counts`` (P,) entries as (top1 fp16 (P,), codes uint8 (n-P,))."""
    counts = np.asarray(counts, dtype=np.int64)
    lp = np.asarray(logprobs, dtype=np.float64)
    n = lp.shape[0]
    P = counts.shape[0]
    if P and n == P * int(counts[0]) and (counts == counts[0]).all():
        return _encode_q8_grid(lp.reshape(P, int(counts[0])))
    starts = _starts(counts)
    top1 = lp[starts].astype(np.float16)  # (P,)
    t = np.repeat(top1.astype(np.float64), counts)  # (n,)
    rank = np.arange(n, dtype=np.int64) - np.repeat(starts, counts)  # 0-based rank within its position
    finite = np.isfinite(lp) & np.isfinite(t)
    with np.errstate(invalid="ignore"):
        g = np.where(finite, np.rint((t - lp) / Q8_STEP), 0.0)
    g = np.maximum(g, 0.0).astype(np.int64)  # an entry above the fp16-rounded top-1 sits on it
    g = _segmented_accumulate(g, counts, "max")  # non-decreasing along rank even for 1e-6 inversions
    if n > 1 and (np.diff(g) > Q8_MAX_DELTA).any():
        # Saturate: g'_r = min over j <= r of (g_j + 254 (r - j)) = 254 r + cummin(g_j - 254 j).
        g = Q8_MAX_DELTA * rank + _segmented_accumulate(g - Q8_MAX_DELTA * rank, counts, "min")
    delta = np.empty(n, dtype=np.int64)
    delta[0:1] = 0
    delta[1:] = g[1:] - g[:-1]
    codes = np.where(finite, delta, Q8_NEG_INF)
    keep = rank > 0  # top-1 entries live in the fp16 column
    return top1, codes[keep].astype(np.uint8)


def _encode_q8_grid(lp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`encode_q8` for a fixed-k (P, k) grid: the same rules along axis 1, no segment bookkeeping."""
    P, k = lp.shape
    top1 = lp[:, 0].astype(np.float16)  # (P,)
    t = top1.astype(np.float64)[:, None]  # (P, 1)
    finite = np.isfinite(lp) & np.isfinite(t)  # (P, k)
    with np.errstate(invalid="ignore"):
        g = np.where(finite, np.rint((t - lp) / Q8_STEP), 0.0)
    g = np.maximum.accumulate(np.maximum(g, 0.0).astype(np.int64), axis=1)
    delta = np.diff(g, axis=1)  # (P, k-1)
    if delta.size and delta.max() > Q8_MAX_DELTA:
        r = np.arange(k, dtype=np.int64) * Q8_MAX_DELTA
        g = r + np.minimum.accumulate(g - r, axis=1)
        delta = np.diff(g, axis=1)
    codes = np.where(finite[:, 1:], delta, Q8_NEG_INF).astype(np.uint8)
    return top1, codes.reshape(-1)


DECODE_SLAB = 32768
"""Positions per slab of the fixed-k q8 decode (a (slab, k) uint32 grid stays in L2/L3)."""


def decode_q8(top1: np.ndarray, codes: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Inverse of :func:`encode_q8`: flat float32 log-probs (n,). Vectorised over every position at once."""
    counts = np.asarray(counts)
    P = counts.shape[0]
    n = int(counts.sum(dtype=np.int64))
    if P == 0:
        return np.zeros(0, dtype=np.float32)
    k = int(counts[0])
    if n == P * k and (counts == k).all():
        # Fixed k (the common case): a (P, k) grid, cumsum along rank. Slabs of rows keep the temporaries in the
        # CPU cache: faster than one pass over a whole row group.
        out = np.empty((P, k), dtype=np.float32)
        grid = codes.reshape(P, k - 1)
        for s in range(0, P, DECODE_SLAB):
            e = min(P, s + DECODE_SLAB)
            c = np.zeros((e - s, k), dtype=np.uint32)
            c[:, 1:] = grid[s:e]
            o = out[s:e]
            g = np.cumsum(c, axis=1, dtype=np.uint32).astype(np.float32)  # (slab, k) gap sums
            o[...] = top1[s:e].astype(np.float32)[:, None] - g * np.float32(Q8_STEP)
            o[c == Q8_NEG_INF] = -np.inf
        return out.reshape(-1)
    starts = _starts(counts)
    c = np.zeros(n, dtype=np.uint32)
    first = np.zeros(n, dtype=bool)
    first[starts] = True
    c[~first] = codes
    # uint32 wraps around over a long row group; the per-position difference is still exact (< 2^32).
    cs = np.cumsum(c, dtype=np.uint32)
    g = cs - np.repeat(cs[starts], counts)
    out = np.repeat(top1.astype(np.float32), counts) - g.astype(np.float32) * np.float32(Q8_STEP)
    out[c == Q8_NEG_INF] = -np.inf
    return out


def encode_logprobs(codec: str, logprobs: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
    """Flat log-probs (n,) -> the codec's column values (flat, before splitting into rows)."""
    _check_codec(codec)
    if codec == "fp32":
        return {"topk_logprobs": np.asarray(logprobs, dtype=np.float32)}
    if codec == "fp16":
        with np.errstate(over="ignore"):
            return {"topk_logprobs": np.asarray(logprobs, dtype=np.float32).astype(np.float16)}
    with np.errstate(over="ignore"):
        top1, codes = encode_q8(logprobs, counts)
    return {"top1_logprob": top1, "logprob_gaps": codes}


def decode_logprobs(codec: str, columns: dict[str, np.ndarray], counts: np.ndarray) -> np.ndarray:
    """The codec's flat column values -> float32 log-probs (n,)."""
    _check_codec(codec)
    if codec == "q8":
        return decode_q8(columns["top1_logprob"], columns["logprob_gaps"], counts)
    return np.asarray(columns["topk_logprobs"], dtype=np.float32)


def roundtrip(codec: str, logprobs: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Encode then decode (what a reader will see), for tests and benchmarks."""
    return decode_logprobs(codec, encode_logprobs(codec, logprobs, counts), counts)


def adaptive_counts(logprobs: np.ndarray, min_prob: float, min_k: int = 1) -> np.ndarray:
    """(P,) entries to keep per position of a (P, k) rank-ordered grid: those with p >= min_prob, in [min_k, k].

    Stage 1 trims each position to its count and folds the dropped mass into ``tail_logmass``.
    """
    lp = np.asarray(logprobs)
    k = lp.shape[-1]
    keep = (lp >= np.log(min_prob)).sum(axis=-1)
    return np.clip(keep, min(min_k, k), k).astype(np.int32)


# --------------------------------------------------------------------------------------------------------------
# Arrow schema and row <-> table conversion

def arrow_schema(codec: str, k: int) -> pa.Schema:
    """The explicit schema of a shard (never inferred), with the format version, codec and k in its metadata."""
    _check_codec(codec)
    fields = [
        ("row_id", pa.string()),
        ("source_index", pa.int64()),
        ("input_ids", pa.list_(pa.int32())),
        ("loss_mask", pa.list_(pa.bool_())),
        ("topk_count", pa.list_(pa.uint16())),
        ("topk_ids", pa.list_(pa.uint32())),
        *CODEC_COLUMNS[codec].items(),
        ("tail_logmass", pa.list_(pa.float32())),
        ("target_logprob", pa.list_(pa.float32())),
        ("target_rank", pa.list_(pa.int32())),
    ]
    meta = {"rlkd.format_version": str(FORMAT_VERSION), "rlkd.codec": codec, "rlkd.k": str(int(k))}
    return pa.schema([pa.field(name, typ, nullable=False) for name, typ in fields], metadata=meta)


BYTE_STREAM_SPLIT_COLUMNS = ("topk_ids", "tail_logmass", "target_logprob", "topk_logprobs", "top1_logprob",
                             "target_rank", "input_ids", "topk_count")
"""List columns whose leaf gets BYTE_STREAM_SPLIT: ids, ranks, counts and floats, whose high bytes compress well once
split (measurements: docs/design.md, "Cache storage"). Readers need pyarrow >= 16 for BYTE_STREAM_SPLIT on integer
columns."""
DICTIONARY_COLUMNS: tuple[str, ...] = ()
"""Columns that get a dictionary: none. The last one, ``topk_count``, does better with BYTE_STREAM_SPLIT."""
ZSTD_LEVEL = 1
"""zstd level of the per-entry log-probability columns (q8 gap bytes, fp16/fp32 values): higher levels made the q8
gap bytes larger (docs/design.md, "Cache storage")."""
IDS_ZSTD_LEVEL = 3
"""zstd level of ``topk_ids``, the largest column: the best size for its speed (docs/design.md, "Cache storage")."""
SMALL_ZSTD_LEVEL = 15
"""zstd level of the per-row and per-position columns (input ids, masks, counts, tail, target log-prob and rank,
fp16 top-1): a few bytes per position, so a slow level costs little time and still saves about 1% of the cache."""
LOGPROB_COLUMNS = ("topk_logprobs", "logprob_gaps")
"""Per-entry log-probability columns, compressed at :data:`ZSTD_LEVEL`."""
DATA_PAGE_SIZE = 64 << 20
"""Target Parquet data page size. zstd compresses each page on its own, so pages as large as the column chunk (a row
group is at most ``row_group_bytes`` raw) give it the whole chunk as context. Readers read whole row groups anyway."""


def _leaf_paths(codec: str) -> dict[str, str]:
    """Column name -> the Parquet leaf path that encodings and levels must be given for."""
    names = arrow_schema(codec, 1).names
    flat = ("row_id", "source_index", "logprob_gaps")  # not list columns: the leaf is the column
    return {n: n if n in flat else f"{n}.list.element" for n in names}


def parquet_write_options(codec: str, compression_level: int | None = None) -> dict:
    """Keyword arguments for ``pq.ParquetWriter``. Encodings are set on the *leaf* path (``col.list.element``):
    pyarrow silently ignores them when given the top-level name of a list column.

    ``compression_level`` (one zstd level for every column) replaces the per-column defaults:
    :data:`IDS_ZSTD_LEVEL` for the ids, :data:`ZSTD_LEVEL` for log-probability values, :data:`SMALL_ZSTD_LEVEL` for
    the per-row and per-position columns.
    """
    leaf = _leaf_paths(codec)
    if compression_level is None:
        levels = {p: IDS_ZSTD_LEVEL if n == "topk_ids" else ZSTD_LEVEL if n in LOGPROB_COLUMNS else SMALL_ZSTD_LEVEL
                  for n, p in leaf.items()}
    else:
        levels = {p: int(compression_level) for p in leaf.values()}
    return {
        "compression": "zstd",
        "compression_level": levels,
        "use_dictionary": [leaf[n] for n in DICTIONARY_COLUMNS] or False,
        "column_encoding": {leaf[n]: "BYTE_STREAM_SPLIT" for n in BYTE_STREAM_SPLIT_COLUMNS if n in leaf},
        "data_page_size": DATA_PAGE_SIZE,
        # Statistics are useless here and are bytes no checksum covers; page CRCs let a reader catch flipped bytes.
        "write_statistics": False,
        "write_page_checksum": True,
        "store_schema": True,
    }


def storage_summary(options: dict) -> dict:
    """What the manifest records about how shards are stored (``options`` from :func:`parquet_write_options`).

    Any Parquet reader decodes any of these choices, so they are not part of the cache identity: a cache resumed
    with another zstd level stays one cache, and the manifest records the latest writer's choices.
    """
    level = options["compression_level"]
    return {"compression": options["compression"],
            "compression_level": dict(sorted(level.items())) if isinstance(level, dict) else int(level),
            "column_encoding": dict(sorted(options["column_encoding"].items())),
            "dictionary": sorted(options["use_dictionary"] or []),
            "data_page_size": int(options.get("data_page_size", 1 << 20)),
            "page_checksum": bool(options["write_page_checksum"])}


def _list_array(values: np.ndarray, lengths: np.ndarray, typ: pa.DataType) -> pa.Array:
    offsets = np.zeros(lengths.shape[0] + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, typ.value_type), type=typ)


def rows_to_table(rows: list[TeacherRow], codec: str, k: int) -> pa.Table:
    """Encode rows (already validated) into one Arrow table; the codec runs once over all their positions."""
    schema = arrow_schema(codec, k)
    T = np.array([r.input_ids.shape[0] for r in rows], dtype=np.int64)
    P = T - 1
    counts = np.concatenate([np.asarray(r.topk_count, dtype=np.int64) for r in rows])  # (sum P,)
    n = np.array([int(np.sum(r.topk_count)) for r in rows], dtype=np.int64)
    lp = np.concatenate([np.asarray(r.topk_logprobs, dtype=np.float32) for r in rows])
    enc = encode_logprobs(codec, lp, counts)

    def cat(name, dtype):
        return np.concatenate([np.asarray(getattr(r, name), dtype=dtype) for r in rows])

    cols = {
        "row_id": pa.array([r.row_id for r in rows], pa.string()),
        "source_index": pa.array([int(r.source_index) for r in rows], pa.int64()),
        "input_ids": _list_array(cat("input_ids", np.int32), T, schema.field("input_ids").type),
        "loss_mask": _list_array(cat("loss_mask", bool), P, schema.field("loss_mask").type),
        "topk_count": _list_array(counts.astype(np.uint16), P, schema.field("topk_count").type),
        "topk_ids": _list_array(cat("topk_ids", np.int64).astype(np.uint32), n, schema.field("topk_ids").type),
        "tail_logmass": _list_array(cat("tail_logmass", np.float32), P, schema.field("tail_logmass").type),
        "target_logprob": _list_array(cat("target_logprob", np.float32), P, schema.field("target_logprob").type),
        "target_rank": _list_array(cat("target_rank", np.int32), P, schema.field("target_rank").type),
    }
    if codec == "q8":
        cols["top1_logprob"] = _list_array(enc["top1_logprob"], P, schema.field("top1_logprob").type)
        gap_off = np.zeros(len(rows) + 1, dtype=np.int32)
        np.cumsum(n - P, out=gap_off[1:])
        data = np.ascontiguousarray(enc["logprob_gaps"], dtype=np.uint8)
        cols["logprob_gaps"] = pa.BinaryArray.from_buffers(
            pa.binary(), len(rows), [None, pa.py_buffer(gap_off), pa.py_buffer(data)])
    else:
        cols["topk_logprobs"] = _list_array(enc["topk_logprobs"], n, schema.field("topk_logprobs").type)
    return pa.Table.from_arrays([cols[f.name] for f in schema], schema=schema)


def _list_parts(col) -> tuple[np.ndarray, np.ndarray]:
    """(offsets (R+1,) int64 into values, values) of a list column, zero-copy where Arrow allows."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.values.to_numpy(zero_copy_only=False)
    return offsets, values


def _binary_parts(col) -> tuple[np.ndarray, np.ndarray]:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int32)[arr.offset: arr.offset + len(arr) + 1].astype(np.int64)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    return offsets, data


class DecodedBlock:
    """A decoded row group: flat per-column numpy arrays plus per-row offsets. Rows are cut out lazily.

    ``table`` may hold only some columns (``CacheReader.iter_blocks(columns=...)``): ``loss_mask``, ``topk_count``
    and the codec's log-prob columns are required; the attributes of absent columns are None (and :meth:`row`
    needs all of them).
    """

    def __init__(self, table: pa.Table, codec: str):
        names = set(table.column_names)

        def parts(name):
            return _list_parts(table.column(name)) if name in names else (None, None)

        self.num_rows = table.num_rows
        self.row_id = table.column("row_id").to_pylist() if "row_id" in names else None
        self.source_index = table.column("source_index").to_numpy() if "source_index" in names else None
        self.tok_off, self.input_ids = parts("input_ids")
        self.pos_off, self.loss_mask = _list_parts(table.column("loss_mask"))
        _, counts16 = _list_parts(table.column("topk_count"))
        self.counts = counts16.astype(np.int32)  # uint16 on disk; int32 like TeacherRow says
        self.ent_off, ids = parts("topk_ids")
        self.topk_ids = ids.view(np.int32) if ids is not None else None  # ids < 2^31: same bits
        _, self.tail = parts("tail_logmass")
        _, self.target_logprob = parts("target_logprob")
        _, self.target_rank = parts("target_rank")
        # Positions and entries of all rows are contiguous and in order, so the codec decodes them in one go.
        p0, p1 = self.pos_off[0], self.pos_off[-1]
        counts = self.counts[p0:p1]
        if codec == "q8":
            e0 = self.ent_off[0] if self.ent_off is not None else 0
            _, top1 = _list_parts(table.column("top1_logprob"))
            g_off, gaps = _binary_parts(table.column("logprob_gaps"))
            cols = {"top1_logprob": top1[p0:p1], "logprob_gaps": gaps[g_off[0]:g_off[-1]]}
        else:
            e_off, vals = _list_parts(table.column("topk_logprobs"))  # same offsets as topk_ids
            e0 = e_off[0]
            cols = {"topk_logprobs": vals[e0:e_off[-1]]}
        self.topk_logprobs = decode_logprobs(codec, cols, counts)  # indexed from e0
        self._e0 = e0

    @property
    def num_positions(self) -> int:
        return int(self.pos_off[-1] - self.pos_off[0])

    def position_columns(self) -> dict[str, np.ndarray]:
        """Per-position columns of all the block's rows, concatenated in row order (views, no copy):
        ``topk_count``, ``tail_logmass``, ``target_logprob``, ``target_rank``, ``loss_mask`` of shape (P,), and
        ``topk_logprobs`` of shape (sum(topk_count),)."""
        p0, p1 = self.pos_off[0], self.pos_off[-1]
        return {
            "topk_count": self.counts[p0:p1], "topk_logprobs": self.topk_logprobs, "tail_logmass": self.tail[p0:p1],
            "target_logprob": self.target_logprob[p0:p1], "target_rank": self.target_rank[p0:p1],
            "loss_mask": self.loss_mask[p0:p1],
        }

    def row(self, i: int, copy: bool = False) -> TeacherRow:
        """Row ``i`` as a TeacherRow of views (or copies, so the block can be freed while the row lives on)."""
        c = np.copy if copy else (lambda a: a)
        t0, t1 = self.tok_off[i], self.tok_off[i + 1]
        p0, p1 = self.pos_off[i], self.pos_off[i + 1]
        e0, e1 = self.ent_off[i], self.ent_off[i + 1]
        return TeacherRow(
            row_id=self.row_id[i],
            source_index=int(self.source_index[i]),
            input_ids=c(self.input_ids[t0:t1]),
            loss_mask=c(self.loss_mask[p0:p1]),
            topk_count=c(self.counts[p0:p1]),
            topk_ids=c(self.topk_ids[e0:e1]),
            topk_logprobs=c(self.topk_logprobs[e0 - self._e0:e1 - self._e0]),
            tail_logmass=c(self.tail[p0:p1]),
            target_logprob=c(self.target_logprob[p0:p1]),
            target_rank=c(self.target_rank[p0:p1]),
        )

