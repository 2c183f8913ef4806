"""Stage 1 on a Ray cluster: N engine replicas (actors), each writing its own part of the cache; one manifest.

``cache_teacher_ray(cfg, replicas=N)`` is what ``rlkd cache-teacher --ray --replicas N`` calls. Top to bottom:

1. The driver resolves the teacher, tokenizer and dataset exactly as :func:`rlkd.pipeline.run.cache_teacher` does,
   and formats rows with the same :func:`rlkd.pipeline.data.iter_examples` (so skip/truncate counters, template
   errors and ``source_index`` are identical to a single-process run).
2. Rows already in a finished shard of any part (``OUT/part-*/``) are dropped before dispatch (resume).
3. Each remaining example goes to actor ``(source_index // shard_parts) % N``: a deterministic route, so every actor
   owns a disjoint set of rows and its own folder ``OUT/part-{i}/``. The examples (``source_index``, ``input_ids``,
   ``loss_mask``) become one Ray Dataset per actor, built from Arrow blocks put in the object store block by block,
   so the driver never holds more than one block per actor and big runs spill to disk rather than fail.
4. Each actor holds one rlkd engine (vLLM or HF; ``num_gpus=T`` when the cluster has GPUs, one CPU otherwise),
   iterates its dataset in ``batch_size`` batches and scores/writes them with the single-process code
   (``run.score`` -> ``engine.score``, then ``engines.write_rows`` -> ``CacheWriter.write``), so both paths
   write identical rows.
5. The driver joins the parts with :func:`rlkd.pipeline.merge.build_merged` into ``OUT/manifest.json`` (shard paths
   ``part-{i}/...``), which ``CacheReader``, ``rlkd inspect`` and ``rlkd verify`` read like any cache.

``OUT`` may be a URL (``s3://bucket/prefix``, ``gs://...``): no filesystem is shared then. Each actor builds its own
``CacheLocation`` from the part's URL (an Arrow S3 client must not cross a fork; Ray starts actors as new processes)
and its ``CacheWriter`` uploads shards straight to ``OUT/part-{i}/`` under a lease on that part; the driver holds the
lease on ``OUT`` and writes the merged manifest.

Formatting happens on the driver, and each actor wraps the rlkd engine rather than ``ray.data.llm``: the reasons are
in docs/design.md ("Stage 1 on Ray").

Crash safety: an actor that dies loses at most its open shard (its temporary, removed on reopen); its finished shards
are in its part's manifest (or adopted on reopen). Re-running the same command skips every finished row, whichever
part holds it, so nothing is lost or written twice, even with another ``--replicas``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from rlkd.cache import CacheWriter, make_row_id, read_manifest
from rlkd.cache.lock import writer_lock
from rlkd.cache.manifest import MANIFEST_NAME, CacheMismatchError, identity_differences
from rlkd.cache.schema import FORMAT_VERSION
from rlkd.cache.storage import CacheLocation
from rlkd.config import config_to_dict
from rlkd.errors import UserError
from rlkd.pipeline.config import CacheTeacherConfig
from rlkd.pipeline.stats import RunStats, progress_bar, summarize

PART_PREFIX = "part-"
"""Actor ``i`` writes ``OUT/part-{i}/``."""

BLOCK_ROWS = 1024
"""Examples per Arrow block put in the object store (per actor)."""

BLOCK_TOKENS = 4 << 20
"""...or fewer when the block reaches this many tokens (long sequences)."""


class RayStage1Error(UserError, RuntimeError):
    """A Ray run could not finish; the message says what happened and that a re-run resumes."""


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise RayStage1Error(
            "cache-teacher --ray needs Ray Data: `pip install 'rlkd[ray]'` (or `pip install 'ray[data]'`), "
            "or run without --ray (single process, or --shard I/N on several machines)"
        ) from e
    return ray


# ---- the actor -----------------------------------------------------------------------------------------------------


class Stage1Worker:
    """One engine replica: scores the examples routed to it and writes them to its own part folder.

    Plain class, wrapped with ``ray.remote`` at run time (so importing this module never needs Ray).
    """

    def __init__(self, cfg: CacheTeacherConfig, meta: dict, index: int, part_dir: str, shard_max_bytes: int,
                 exit_after_shards: int | None = None):
        from rlkd.pipeline.run import engine_for

        self.cfg, self.meta, self.index = cfg, meta, index
        self.part_dir, self.shard_max_bytes = part_dir, shard_max_bytes
        self.exit_after_shards = exit_after_shards
        self.stats = RunStats()
        # The engine loads in the constructor, so the N replicas load theirs in parallel.
        self.engine = engine_for(cfg, meta["teacher"]["dtype"])

    def progress(self) -> dict:
        return self.stats.snapshot()

    def run(self, dataset: Any) -> dict:
        """Score every example of ``dataset`` (a Ray Dataset, or None when nothing is routed here); return stats."""
        from ray.data import DataContext

        from rlkd.pipeline.data import Example
        from rlkd.pipeline.engines import write_rows
        from rlkd.pipeline.run import score

        # The driver shows one bar for the whole run. A dataset runs under the context it was created with.
        DataContext.get_current().enable_progress_bars = False
        if dataset is not None:
            dataset.context.enable_progress_bars = False
        cfg, stats = self.cfg, self.stats
        t_run = time.perf_counter()
        # The writer parses part_dir (a path or a URL) here, in the actor's process: its own store client.
        with CacheWriter(self.part_dir, self.meta, k=cfg.top_k, codec=cfg.codec,
                         shard_max_bytes=self.shard_max_bytes, row_group_rows=cfg.row_group_rows,
                         name_prefix=f"part{self.index}", lease_seconds=cfg.lease_seconds,
                         holder=f"cache-teacher --ray replica {self.index}") as w:
            batches = [] if dataset is None else dataset.iter_batches(batch_size=cfg.batch_size,
                                                                      batch_format="pyarrow")
            for table in batches:
                todo = []
                for ex in _examples(table, Example):
                    # The driver already dropped finished rows; this also covers rows of a part this actor reopened.
                    if w.has(make_row_id(ex.input_ids, ex.source_index)):
                        stats.add(already_cached=1)
                    else:
                        todo.append(ex)
                if todo:
                    write_rows(todo, score(todo, self.engine, stats), w, cfg, stats)
                stats.set(shards=w.stats["shards"])
                if self.exit_after_shards is not None and stats.shards >= self.exit_after_shards:
                    os._exit(1)  # test hook: die like a SIGKILL (no cleanup, open shard left as a temporary)
            stats.set(loop_s=time.perf_counter() - t_run)
        stats.set(bytes=w.stats["bytes"], shards=w.stats["shards"])
        return stats.snapshot()


def _examples(table, Example) -> list:
    """An Arrow batch (source_index, input_ids, loss_mask) -> Example objects with numpy arrays."""
    src = table.column("source_index").to_numpy()
    ids_col = table.column("input_ids").combine_chunks()
    mask_col = table.column("loss_mask").combine_chunks()
    ids_flat = ids_col.values.to_numpy()
    mask_flat = mask_col.values.to_numpy(zero_copy_only=False)
    ido, mo = ids_col.offsets.to_numpy(), mask_col.offsets.to_numpy()
    return [Example(int(src[j]), ids_flat[ido[j]:ido[j + 1]].astype(np.int32),
                    mask_flat[mo[j]:mo[j + 1]].astype(bool)) for j in range(len(src))]


def _block(examples: list):
    """Examples -> one Arrow table (list columns built from flat arrays and offsets, no Python lists of ints)."""
    import pyarrow as pa

    lens = np.array([ex.input_ids.shape[0] for ex in examples], dtype=np.int32)
    ids_off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    mask_off = np.concatenate([[0], np.cumsum(lens - 1)]).astype(np.int32)
    return pa.table({
        "source_index": pa.array([ex.source_index for ex in examples], type=pa.int64()),
        "input_ids": pa.ListArray.from_arrays(
            pa.array(ids_off), pa.array(np.concatenate([ex.input_ids for ex in examples]).astype(np.int32))),
        "loss_mask": pa.ListArray.from_arrays(
            pa.array(mask_off), pa.array(np.concatenate([ex.loss_mask for ex in examples]).astype(bool))),
    })


# ---- the driver ----------------------------------------------------------------------------------------------------


def _parts(out: CacheLocation) -> list[CacheLocation]:
    """``OUT/part-{i}`` for every part that exists, in index order (a local folder, or a prefix holding objects)."""
    if out.is_local:
        names = [p.name for p in out.local_path().glob(PART_PREFIX + "*") if p.is_dir()]
    else:
        names = {rel.split("/", 1)[0] for rel in out.list_files() if "/" in rel}
    names = [n for n in names if n.startswith(PART_PREFIX) and n[len(PART_PREFIX):].isdigit()]
    return [out.child(n) for n in sorted(names, key=lambda n: int(n[len(PART_PREFIX):]))]


def _part_index(part: CacheLocation) -> int:
    return int(part.url.rstrip("/").rsplit("/", 1)[-1][len(PART_PREFIX):])


def _check_out(out: CacheLocation, meta: dict, cfg: CacheTeacherConfig) -> None:
    """Refuse an ``out`` that holds a single-process cache, or parts written with other settings (all problems)."""
    problems: list[str] = []
    if out.exists(MANIFEST_NAME):
        m = read_manifest(out)
        if not (m.get("config") or {}).get("ray"):  # a --ray manifest records {"replicas", "config"}
            problems.append(f"{out} holds a cache written without --ray (its manifest lists shards of its own). "
                            "Give --ray runs their own --out, or re-run without --ray to resume that cache")
    new = {"format_version": FORMAT_VERSION, "k": cfg.top_k, "codec": cfg.codec, **meta}
    for part in _parts(out):
        if part.exists(MANIFEST_NAME):
            diffs = identity_differences(read_manifest(part), new)
            if diffs:
                problems.append(f"{part} was written with different settings:\n"
                                + "\n".join(f"      {d}" for d in diffs))
    if problems:
        raise CacheMismatchError(f"cache-teacher --ray cannot resume {out}, {len(problems)} problem(s):\n"
                                 + "\n".join(f"  - {p}" for p in problems)
                                 + "\nUse a new --out, or rerun with the cache's original settings.")


def finished_row_ids(out) -> set[str]:
    """Every row_id in a finished shard of any part of ``out``. Local: every ``*.parquet`` of a part folder, listed
    or not yet listed in its part manifest (a writer adopts those on reopen); temporaries (``*.rlkd-tmp``) are
    unfinished. Object store: the shards each part's manifest lists (an unlisted object is unfinished: its part's
    writer deletes it and its rows are scored again)."""
    import pyarrow.parquet as pq

    out = CacheLocation.parse(out)
    ids: set[str] = set()
    for part in _parts(out):
        if part.is_local:
            files = [f.name for f in sorted(part.local_path().glob("*.parquet"))]
        else:
            files = [e["file"] for e in read_manifest(part).get("shards", [])] if part.exists(MANIFEST_NAME) else []
        for rel in files:
            table = pq.read_table(part.path(rel), filesystem=part.fs, columns=["row_id"])
            ids.update(table.column("row_id").to_pylist())
    return ids


def cache_teacher_ray(cfg: CacheTeacherConfig, *, replicas: int, ray_address: str | None = None,
                      progress: bool = True, shard_max_bytes: int | None = None,
                      _exit_after_shards: tuple[int, int] | None = None) -> dict:
    """Run stage 1 on Ray with ``replicas`` engine actors; return the summary (keys of ``cache_teacher``'s, plus
    ``replicas`` and ``per_replica``), printable with :func:`rlkd.pipeline.stats.format_summary`.

    ``ray_address``: ``"auto"`` joins the running cluster (``ray start`` / a Ray job); ``None`` starts a local one,
    or uses the one this process already initialised. ``shard_max_bytes`` overrides ``cfg.shard_max_mb`` (tests use
    tiny shards). ``_exit_after_shards=(i, n)``: test hook, replica ``i`` exits hard after finishing ``n`` shards.
    """
    if replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {replicas}")
    ray = _import_ray()
    from rlkd.cache.writer import make_cache_dir
    from rlkd.pipeline.data import InputCounters, check_some_examples
    from rlkd.pipeline.run import prepare_run

    t_start = time.perf_counter()
    out = make_cache_dir(cfg.out, "--out")  # refuses a file, or a folder holding files rlkd did not write
    tokenizer, ds, meta = prepare_run(cfg)
    counters = InputCounters()
    started_ray = False
    # The lock every writer of OUT takes (a lease on an object store); each part has its writer's own.
    with writer_lock(out, "cache-teacher --ray driver", lease_seconds=cfg.lease_seconds) as lock:
        try:
            _check_out(out, meta, cfg)
            started_ray = not ray.is_initialized()
            if started_ray:
                ray.init(address=ray_address, include_dashboard=False)
            routed = route(ray, cfg, ds, tokenizer, counters, finished_row_ids(out), replicas)
            check_some_examples(cfg, counters)  # every row was read: none usable is an error
            actors, pending = dispatch(ray, cfg, meta, routed, out, shard_max_bytes, _exit_after_shards)
            bar = progress_bar(counters.rows, counters.rows - routed.dispatched, progress and bool(pending),
                               desc="cache-teacher --ray")
            per_replica, failures = collect(ray, actors, pending, bar, counters.rows - routed.dispatched)
            _close_idle_parts(out, meta, cfg, actors, complete=not failures)
            merged = _write_merged(out, cfg, replicas, lock, allow_incomplete=bool(failures))
        finally:
            if started_ray:
                ray.shutdown()
    if failures:
        raise RayStage1Error(
            f"cache-teacher --ray: {len(failures)} of {replicas} replica(s) stopped:\n"
            + "\n".join(f"  - {f}" for f in failures)
            + f"\nEvery finished shard is kept and listed in {out.name(MANIFEST_NAME)} (marked incomplete). Re-run the "
            "same command to resume: finished rows are skipped, the rest is scored again."
        )
    tot = RunStats.total(per_replica.values())
    tot["loop_s"] = max((p["loop_s"] for p in per_replica.values()), default=0.0)  # replicas run side by side
    return summarize(out=str(out), stats=tot, rows_already_cached=routed.already_cached + tot["already_cached"],
                     rows_in_cache=merged["rows"], seconds=time.perf_counter() - t_start, counters=counters,
                     shard=cfg.shard, replicas=replicas,
                     per_replica=[{"replica": i, **per_replica[i]} for i in sorted(per_replica)])


@dataclass
class Routed:
    """The driver's plan: per replica, the Arrow blocks of its examples in the object store."""

    blocks: list[list]
    """``blocks[i]``: object refs of replica ``i``'s blocks."""
    dispatched: int
    """Examples routed to a replica."""
    already_cached: int
    """Examples skipped because a finished shard of some part holds them."""


def route(ray, cfg: CacheTeacherConfig, ds, tokenizer, counters, done: set[str], replicas: int) -> Routed:
    """Format every example (as a single-process run does), drop finished ones, and route the rest to replica
    ``(source_index // shard_parts) % replicas``, a block at a time into the object store."""
    from rlkd.pipeline.data import iter_examples

    _, shard_parts = cfg.shard_index
    buckets: list[list] = [[] for _ in range(replicas)]
    bucket_tokens = [0] * replicas
    blocks: list[list] = [[] for _ in range(replicas)]
    dispatched = already = 0
    for ex in iter_examples(cfg, ds, tokenizer, counters):
        if make_row_id(ex.input_ids, ex.source_index) in done:
            already += 1
            continue
        i = (ex.source_index // shard_parts) % replicas
        dispatched += 1
        buckets[i].append(ex)
        bucket_tokens[i] += int(ex.input_ids.shape[0])
        if len(buckets[i]) >= BLOCK_ROWS or bucket_tokens[i] >= BLOCK_TOKENS:
            blocks[i].append(ray.put(_block(buckets[i])))
            buckets[i], bucket_tokens[i] = [], 0
    for i in range(replicas):
        if buckets[i]:
            blocks[i].append(ray.put(_block(buckets[i])))
    return Routed(blocks, dispatched, already)


def dispatch(ray, cfg: CacheTeacherConfig, meta: dict, routed: Routed, out: CacheLocation, shard_max_bytes: int | None,
             exit_after: tuple[int, int] | None) -> tuple[dict, dict]:
    """Start one actor per replica that has rows, and its ``run``; return (actors, pending ``run`` refs -> index).

    Only replicas with rows start an engine (on resume, often a few), as a single-process run starts none when
    everything is cached. The datasets are built before the actors take their CPUs: ``from_arrow_refs`` runs a
    (1-CPU) metadata task per block, which would wait forever on a CPU-only cluster whose CPUs all hold engines.
    """
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    if cfg.engine == "vllm" and cfg.tensor_parallel_size > 1 and not use_gpu:
        raise RayStage1Error("--tensor-parallel-size > 1 needs GPUs, and this Ray cluster has none")
    options: dict[str, Any] = {"num_gpus": cfg.tensor_parallel_size, "num_cpus": 1} if use_gpu else {"num_cpus": 1}
    # max_concurrency=2: the driver's progress() calls run beside the long run() call.
    worker = ray.remote(Stage1Worker).options(max_concurrency=2, max_restarts=0, **options)
    shard_bytes = shard_max_bytes if shard_max_bytes is not None else cfg.shard_max_mb << 20
    datasets = {i: ray.data.from_arrow_refs(b) for i, b in enumerate(routed.blocks) if b}
    actors = {i: worker.remote(cfg, meta, i, out.child(f"{PART_PREFIX}{i}").url, shard_bytes,
                               exit_after[1] if exit_after and exit_after[0] == i else None)
              for i in datasets}
    return actors, {actors[i].run.remote(ds_i): i for i, ds_i in datasets.items()}


def collect(ray, actors: dict, pending: dict, bar, rows_done_by_driver: int) -> tuple[dict[int, dict], list[str]]:
    """Wait for every replica, updating the bar; return (each finished replica's stats, failure messages)."""
    per_replica: dict[int, dict] = {}
    failures: list[str] = []
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=2.0)
        for f in ready:
            i = pending.pop(f)
            try:
                per_replica[i] = ray.get(f)
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                failures.append(f"replica {i} ({PART_PREFIX}{i}) failed: {type(e).__name__}: {first}")
            # Free its GPUs (or CPU) now: with more replicas than the cluster holds at once, the ones still waiting
            # for resources start as others finish.
            ray.kill(actors[i])
        if bar is not None:
            rows = sum(p["rows"] + p["already_cached"] for p in per_replica.values())
            for i in pending.values():
                try:
                    p = ray.get(actors[i].progress.remote(), timeout=5)
                    rows += p["rows"] + p["already_cached"]
                except Exception:  # noqa: BLE001 - a dying actor: its run() result says why
                    pass
            bar.n = rows_done_by_driver + rows
            bar.refresh()
    if bar is not None:
        bar.close()
    return per_replica, failures


def _close_idle_parts(out: CacheLocation, meta: dict, cfg: CacheTeacherConfig, actors: dict, complete: bool) -> None:
    """Parts no actor wrote this run (nothing routed to them, or left by a run with more replicas): drop their
    leftovers (temporaries; on a store, unlisted objects) and adopt orphan shards, as their writer would on reopen."""
    for part in _parts(out):
        i = _part_index(part)
        if i not in actors and part.exists(MANIFEST_NAME):
            CacheWriter(part.url, meta, k=cfg.top_k, codec=cfg.codec, row_group_rows=cfg.row_group_rows,
                        name_prefix=f"part{i}", lease_seconds=cfg.lease_seconds,
                        holder="cache-teacher --ray driver").close(complete=complete)


def _write_merged(out: CacheLocation, cfg: CacheTeacherConfig, replicas: int, lock, allow_incomplete: bool) -> dict:
    """Replace ``OUT/manifest.json`` by one listing every part's shards (parts stay where they are)."""
    from rlkd.cache.manifest import write_manifest
    from rlkd.pipeline.merge import build_merged

    parts = [p for p in _parts(out) if p.exists(MANIFEST_NAME)]
    if out.exists(MANIFEST_NAME):  # ours (checked by _check_out): rebuilt from the parts every run
        lock.remove(MANIFEST_NAME)
    if not parts:  # nothing to score at all (every row skipped by the input side)
        return {"rows": 0}
    merged = build_merged(out, [p.url for p in parts], allow_incomplete=allow_incomplete)
    merged["config"]["ray"] = {"replicas": replicas, "config": config_to_dict(cfg)}
    write_manifest(out, merged, lock=lock)
    return merged
