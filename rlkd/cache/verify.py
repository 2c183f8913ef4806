"""Offline integrity check of a cache: ``verify_cache`` (and ``rlkd verify CACHE [--deep]``).

Always: the manifest parses and has a readable version/codec/k; every listed shard exists, has the recorded size
and sha256, opens as Parquet with the codec's schema and rlkd metadata, and has the recorded rows, row groups,
positions and tokens; no row_id appears twice; no finished shard lies around unlisted; totals add up; the manifest
is marked complete.

``deep`` also decodes every row (page CRCs checked) and checks the invariants of :mod:`rlkd.cache.schema`:
counts in ``[1, k]``, ids in ``[0, vocab)`` (vocab from the manifest's tokenizer/teacher identity), log-probs
non-increasing along rank and ``<= 0``, top-k mass ``<= 1`` and top-k mass + tail mass ``== 1`` within the codec's
tolerance, and, where the actual next token is among the kept ids, that its cached log-prob matches
``target_logprob`` (which catches a one-position misalignment).

Every problem is collected; nothing stops at the first one. Per shard and invariant, the first few offending rows
are named and the rest counted.

``repair_cache`` (``rlkd verify --repair``) is the supported way out of a damaged cache: it moves every damaged
shard aside to ``NAME.parquet.damaged`` (a rename locally; a copy inside the store, then a delete, on an object store;
nothing is lost), drops it and every missing shard from the manifest and marks the cache incomplete, so re-running
stage 1 scores exactly their rows again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rlkd.cache.codec import DecodedBlock
from rlkd.cache.manifest import CacheCorruptError, read_manifest, set_max_token_id, vocab_limit, write_manifest
from rlkd.cache.reader import check_manifest, shard_schema_problems
from rlkd.cache.schema import TeacherRow
from rlkd.cache.storage import CacheLocation

MASS_TOLERANCE = {"fp32": 1e-3, "fp16": 1e-2, "q8": 0.05}
"""Allowed excess of decoded top-k mass over 1, and |top-k mass + tail mass - 1|, per codec. q8's 1/32-nat
rounding moves each non-top-1 probability by up to 3.2%."""
LOGPROB_TOLERANCE = {"fp32": 1e-5, "fp16": 2e-3, "q8": 0.04}
"""|cached log-prob of the next token - target_logprob| allowed, relative to max(1, |lp|) for fp16."""
MAX_EXAMPLES = 3


@dataclass
class VerifyOptions:
    """Options of ``rlkd verify``."""

    cache: str = field(metadata={"argument": True})
    """The cache to check (the folder holding manifest.json)."""
    deep: bool = False
    """Also decode every row and check ids, rank order, mass and alignment."""
    repair: bool = False
    """Make a damaged cache resumable: move each damaged shard aside to NAME.parquet.damaged (a rename; on an object
    store a copy inside the store, then a delete: nothing is lost), drop it and every missing shard from the manifest,
    and mark the cache incomplete; re-running ``rlkd cache-teacher`` then scores their rows again. With ``deep``, rows
    that break the invariants count as damage too. Takes the writer's lock (lease) like stage 1."""
    json: bool = False
    """Print the report as JSON."""


def _row_invariants(r: TeacherRow, k: int, vocab: int | None, codec: str) -> list[str]:
    """Deep checks of one decoded row; vectorised over its positions."""
    out = []
    P = r.num_positions
    counts = r.topk_count.astype(np.int64)
    if P < 1:
        return ["has fewer than 2 tokens"]
    if counts.min() < 1 or counts.max() > k:
        out.append(f"topk_count outside [1, {k}]")
        return out
    ids = r.topk_ids.astype(np.int64)
    if ids.min() < 0 or (vocab is not None and ids.max() >= vocab):
        out.append(f"topk_ids outside [0, {vocab}) (max {ids.max()})")
    lp = r.topk_logprobs.astype(np.float64)
    starts = np.cumsum(counts) - counts
    if np.isnan(lp).any() or (lp > 1e-6).any():
        out.append("topk_logprobs has NaN or values > 0")
    if lp.shape[0] > 1:
        step = np.diff(lp)
        step[(starts[1:] - 1)] = 0.0  # crossing into the next position may go up
        with np.errstate(invalid="ignore"):
            if (step > 1e-6).any():
                out.append("topk_logprobs increase along rank")
    p = np.exp(lp)
    mass = np.add.reduceat(p, starts) if lp.shape[0] else np.zeros(P)  # (P,)
    tol = MASS_TOLERANCE[codec]
    if (mass > 1 + tol).any():
        out.append(f"top-k probability mass exceeds 1 (max {mass.max():.4f})")
    tail = np.exp(r.tail_logmass.astype(np.float64))
    if np.isnan(tail).any() or (np.abs(mass + tail - 1) > tol).any():
        out.append(f"top-k mass + tail mass != 1 (worst {np.nanmax(np.abs(mass + tail - 1)):.4f})")
    if (r.target_rank < 1).any():
        out.append("target_rank < 1")
    # Alignment: where the next token input_ids[t+1] is among position t's ids, its log-prob is target_logprob.
    nxt = np.repeat(r.input_ids[1:].astype(np.int64), counts)  # (n,)
    hit = ids == nxt
    if hit.any():
        pos = np.repeat(np.arange(P), counts)[hit]
        got = lp[hit]
        want = r.target_logprob.astype(np.float64)[pos]
        ltol = LOGPROB_TOLERANCE[codec] * (np.maximum(1.0, np.abs(want)) if codec == "fp16" else 1.0)
        with np.errstate(invalid="ignore"):
            bad = ~(np.abs(got - want) <= ltol) & ~(np.isinf(got) & np.isinf(want))
        # q8 saturates entries far below their predecessor; those are excused (see rlkd.cache.codec).
        if codec == "q8":
            bad &= got - want <= 15.0
        if bad.any():
            out.append(f"target_logprob disagrees with the cached log-prob of the next token at {int(bad.sum())} "
                       "position(s): targets may be misaligned by a position")
    return out


def verify_report(cache_dir, deep: bool = False) -> dict:
    """Run every check and return ``{"problems": [...], "damaged": {shard: [its problems]}, "shards", "rows",
    "positions", "bytes", "deep"}``. ``damaged`` holds the listed shards that are missing or whose own content is
    wrong (what :func:`repair_cache` moves aside); problems of the manifest as a whole are only in ``problems``.

    ``cache_dir`` is a path or a URL; problems name shards by their full name (``s3://bucket/prefix/shard-...``).
    A remote shard is read once, whole, into memory: the hash and the Parquet checks share that read."""
    problems: list[str] = []
    damaged: dict[str, list[str]] = {}
    report = {"cache": str(cache_dir), "deep": deep, "problems": problems, "damaged": damaged, "shards": 0,
              "rows": 0, "positions": 0, "bytes": 0}
    try:
        loc = CacheLocation.parse(cache_dir)
        manifest = read_manifest(loc)
        listing = loc.list_files()
    except Exception as e:  # noqa: BLE001 - any unreadable manifest is a problem to report, not a crash
        problems.append(str(e))
        return report
    mproblems = check_manifest(manifest, cache_dir)
    if mproblems:
        return {**report, "problems": mproblems}
    codec, k = manifest["codec"], int(manifest["k"])
    vocab = vocab_limit(manifest)
    entries = manifest["shards"]
    if not manifest.get("complete"):
        if entries:
            problems.append("manifest is not marked complete: the writer did not finish (resume stage 1 to complete "
                            "it: re-run the `rlkd cache-teacher` command that wrote it)")
        else:
            problems.append("the cache is empty: stage 1 stopped before it finished a shard. Run `rlkd "
                            "cache-teacher` into it again (an empty cache takes the new run's settings)")
    tok = manifest.get("tokenizer")
    if not (isinstance(tok, dict) and tok.get("sha256")):
        problems.append("manifest has no tokenizer identity (tokenizer.sha256): `rlkd train-student` and `rlkd "
                        "inspect --student` refuse such a cache, since they cannot check that a student's tokenizer "
                        "gives the cached ids. Write the cache with `rlkd cache-teacher`, which records it")
    report["shards"] = len(entries)
    listed = set()
    seen_ids: dict[str, str] = {}
    totals = {"rows": 0, "positions": 0, "tokens": 0, "bytes": 0}
    def bad(rel: str, msg: str) -> None:
        damaged.setdefault(rel, []).append(msg)
        problems.append(f"shard {loc.name(rel)}: {msg}")

    for e in entries:
        rel = e["file"]
        name = loc.name(rel)
        if rel in listed:
            problems.append(f"shard {name} is listed twice in the manifest")
            continue
        listed.add(rel)
        for key in totals:
            totals[key] += int(e.get(key, 0))
        if rel not in listing:
            bad(rel, "missing")
            continue
        size = listing[rel]
        if size != e["bytes"]:
            bad(rel, f"{size} bytes, manifest says {e['bytes']} (truncated or modified)")
        try:
            digest, source = _hash_and_source(loc, rel)
        except OSError as err:  # StorageError: the store could not be read, retries spent
            problems.append(f"shard {name}: cannot be read ({err})")
            continue
        if digest != e["sha256"]:
            bad(rel, "sha256 differs from the manifest (corrupted)")
        try:
            pf = pq.ParquetFile(source, page_checksum_verification=True)
        except Exception as err:  # noqa: BLE001 - a damaged footer raises anything
            bad(rel, f"not a readable Parquet file ({err})")
            continue
        for msg in shard_schema_problems(pf, codec, k, name):
            bad(rel, msg.removeprefix(f"shard {name}: "))
        md = pf.metadata
        if md.num_rows != e["rows"]:
            bad(rel, f"{md.num_rows} rows, manifest says {e['rows']}")
        rg_rows = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        if "row_group_rows" in e and list(e["row_group_rows"]) != rg_rows:
            bad(rel, f"row groups hold {rg_rows} rows, manifest says {e['row_group_rows']}")
        row_problems: dict[str, list[str]] = {}
        positions = tokens = 0
        for rg in range(md.num_row_groups):
            try:
                if deep:
                    table = pf.read_row_group(rg, use_threads=False)
                else:
                    table = pf.read_row_group(rg, columns=["row_id", "input_ids"], use_threads=False)
            except Exception as err:  # noqa: BLE001
                bad(rel, f"row group {rg} cannot be read ({err})")
                continue
            lens = table.column("input_ids").combine_chunks().value_lengths().to_numpy()
            tokens += int(lens.sum())
            positions += int((lens - 1).sum())
            for j, rid in enumerate(table.column("row_id").to_pylist()):
                if rid in seen_ids:
                    problems.append(f"shard {name}: row_id {rid} (row group {rg}, row {j}) also in "
                                    f"{seen_ids[rid]}")
                else:
                    seen_ids[rid] = rel
            if deep:
                try:
                    block = DecodedBlock(table, codec)
                except Exception as err:  # noqa: BLE001
                    bad(rel, f"row group {rg} does not decode ({err})")
                    continue
                for j in range(block.num_rows):
                    r = block.row(j)
                    for msg in _row_invariants(r, k, vocab, codec):
                        row_problems.setdefault(msg, []).append(f"row group {rg} row {j} (row_id {r.row_id})")
        if "positions" in e and positions != e["positions"]:
            bad(rel, f"{positions} positions, manifest says {e['positions']}")
        if "tokens" in e and tokens != e["tokens"]:
            bad(rel, f"{tokens} tokens, manifest says {e['tokens']}")
        for msg, where in row_problems.items():
            more = f" and {len(where) - MAX_EXAMPLES} more rows" if len(where) > MAX_EXAMPLES else ""
            bad(rel, f"{msg}: {'; '.join(where[:MAX_EXAMPLES])}{more}")
        report["rows"] += md.num_rows
        report["positions"] += positions
        report["bytes"] += size
    for key, value in totals.items():
        if key in manifest and key in ("rows", "positions", "bytes") and manifest[key] != value:
            problems.append(f"manifest total {key}={manifest[key]} but its shards add up to {value}")
    for rel in listing:
        if rel.endswith(".parquet") and rel not in listed:
            problems.append(f"{loc.name(rel)} is not listed in the manifest (left by a crashed writer? reopening the "
                            "writer adopts it; otherwise delete it)")
    return report


def _hash_and_source(loc: CacheLocation, rel: str):
    """(sha256, what ``pq.ParquetFile`` opens): a local file is hashed and then opened by path; a remote object is
    read once into memory and both come from that copy."""
    path = loc.local_path(rel)
    if path is not None:
        from rlkd.fsutil import file_sha256

        return file_sha256(path), path
    data = loc.read_bytes(rel)
    return hashlib.sha256(data).hexdigest(), pa.BufferReader(data)


def verify_cache(cache_dir, deep: bool = False) -> list[str]:
    """All problems found in ``cache_dir`` (see the module docstring); an empty list when it is clean."""
    return verify_report(cache_dir, deep)["problems"]


def repair_cache(cache_dir, deep: bool = False, *, lease_seconds: float | None = None) -> dict:
    """Make a damaged cache resumable: move every damaged listed shard aside to ``NAME.damaged`` (never deleting it),
    drop it and every missing shard from the manifest, and mark the cache incomplete. Re-running stage 1 then scores
    exactly the dropped rows again. Returns ``{"moved": [(shard, new name)], "missing": [shard], "rows_dropped",
    "report"}`` (``report``: :func:`verify_report` before the repair). Holds the writer lock while it works.

    ``cache_dir`` is a path or a URL. Locally a shard is renamed; object stores have no rename, so it is copied to its
    new name inside the store (no download) and then deleted: the copy exists before the original goes. On a store
    the writer's lease is taken (``lease_seconds``, default :data:`rlkd.cache.lease.DEFAULT_LEASE_SECONDS`), so a
    running stage 1 refuses it and it refuses a running stage 1.

    Refuses (:class:`CacheCorruptError`) what it cannot repair: an unreadable manifest, and a cache merged from parts
    (repair each part, resume it, and merge again).
    """
    from rlkd.cache.lease import DEFAULT_LEASE_SECONDS
    from rlkd.cache.lock import writer_lock
    from rlkd.cache.manifest import MANIFEST_NAME, parse_manifest
    from rlkd.cache.writer import DAMAGED_SUFFIX
    from rlkd.fsutil import utc_now

    loc = CacheLocation.parse(cache_dir)
    if loc.read_only:
        raise CacheCorruptError(f"{loc}: hf:// caches are read-only; copy the cache to local disk or s3://, repair it "
                                "there, and resume stage 1 into that copy")
    manifest = read_manifest(loc)
    mproblems = check_manifest(manifest, cache_dir)
    if mproblems:
        raise CacheCorruptError("cannot repair: " + "; ".join(mproblems))
    if "merged_from" in (manifest.get("config") or {}):
        parts = ", ".join(p.get("dir", "?") for p in manifest["config"]["merged_from"])
        raise CacheCorruptError(
            f"{cache_dir} was merged from parts ({parts}): repair the damaged part(s) with `rlkd verify --repair "
            "PART`, resume them with their `rlkd cache-teacher --shard I/N` commands, then merge again (a --ray run "
            "re-merges by itself when re-run)")
    with writer_lock(loc, "rlkd verify --repair", lease_seconds=lease_seconds or DEFAULT_LEASE_SECONDS) as lock:
        # Under the lock: what a writer may have changed meanwhile.
        manifest = parse_manifest(lock.read(MANIFEST_NAME), loc.name(MANIFEST_NAME))
        report = verify_report(loc, deep=deep)
        damaged = report["damaged"]
        listing = loc.list_files()
        moved, missing = [], []
        for rel in damaged:
            if rel not in listing:
                missing.append(rel)
                continue
            target = rel + DAMAGED_SUFFIX
            n = 1
            while target in listing:
                target = f"{rel}{DAMAGED_SUFFIX}-{n}"
                n += 1
            lock.check()
            if loc.is_local:
                loc.local_path(rel).rename(loc.local_path(target))
            else:
                loc.copy(rel, target)
                loc.remove(rel)
            listing[target] = listing.pop(rel)
            moved.append((rel, target))
        kept, seen, rows_dropped = [], set(), 0
        for entry in manifest["shards"]:
            if entry["file"] in damaged:
                rows_dropped += int(entry.get("rows", 0))
            elif entry["file"] not in seen:  # an entry listed twice is kept once
                seen.add(entry["file"])
                kept.append(entry)
        if len(kept) != len(manifest["shards"]) or damaged:
            manifest["shards"] = kept
            manifest["complete"] = False
            manifest.setdefault("repaired", []).append(
                {"at": utc_now(), "moved": [m[1] for m in moved], "missing": missing, "rows_dropped": rows_dropped})
        for key in ("rows", "positions", "tokens", "bytes"):
            manifest[key] = int(sum(int(e.get(key, 0)) for e in kept))
        set_max_token_id(manifest)
        write_manifest(loc, manifest, lock=lock)
    return {"moved": moved, "missing": missing, "rows_dropped": rows_dropped, "report": report}
