"""Stage 1, top to bottom: teacher + dataset -> formatted examples -> engine -> rows -> cache shards.

``cache_teacher(cfg)`` is what ``rlkd cache-teacher`` calls. Running it again on the same ``out`` resumes: rows whose
``row_id`` is already in a finished shard are skipped before the engine sees them, so a crash (even SIGKILL) costs at
most the rows of the shard that was open.
"""

from __future__ import annotations

import errno
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from rlkd.cache import CacheWriter, make_row_id, tokenizer_identity
from rlkd.config import config_to_dict
from rlkd.errors import UserError
from rlkd.pipeline.config import CacheTeacherConfig
from rlkd.pipeline.overlap import RowWriterThread

_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


class TeacherNotFoundError(UserError, FileNotFoundError):
    """``--teacher`` names neither a local model folder nor a hub model available here."""


class DiskFullError(UserError, OSError):
    """The disk filled up mid-run; finished shards are valid and a re-run resumes."""


# ---- identities ----------------------------------------------------------------------------------------------------


def resolve_teacher(teacher: str, trust_remote_code: bool = False) -> tuple[Path | None, dict]:
    """Check that ``teacher`` exists before any work and return (local folder or None, its config.json as a dict).

    A local folder must hold ``config.json``. Anything else is treated as a hub id and must be loadable by
    ``transformers.AutoConfig`` (from the local HF cache when offline).
    """
    path = Path(teacher).expanduser()
    if path.is_dir():
        cfg = path / "config.json"
        if not cfg.is_file():
            raise TeacherNotFoundError(
                f"--teacher {teacher}: the folder has no config.json, so it is not a Hugging Face model folder. "
                "Point --teacher at the folder holding config.json and the weights (e.g. one saved with "
                "`save_pretrained`, or made by `rlkd convert-teacher`)."
            )
        return path, json.loads(cfg.read_text())
    looks_local = teacher.startswith((".", "/", "~")) or teacher.count("/") > 1 or path.suffix in (".gguf", ".bin")
    if looks_local or path.exists():
        raise TeacherNotFoundError(
            f"--teacher {teacher}: no such model folder ({path.resolve()} does not exist or is not a folder). "
            "Give a local Hugging Face model folder or a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct."
        )
    try:
        from transformers import AutoConfig

        hf_cfg = AutoConfig.from_pretrained(teacher, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for "not found / offline"
        raise TeacherNotFoundError(
            f"--teacher {teacher}: not a local folder, and the hub model could not be loaded ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Check the id and your network (HF_HUB_OFFLINE), or "
            "download it first and pass the local folder."
        ) from e
    return None, hf_cfg.to_dict()


def _resolved_dtype(cfg: CacheTeacherConfig, model_config: dict) -> str:
    if cfg.dtype != "auto":
        return _DTYPE_ALIASES.get(cfg.dtype, cfg.dtype)
    found = model_config.get("torch_dtype") or model_config.get("dtype") or "float32"
    return str(found).replace("torch.", "")


def teacher_identity(cfg: CacheTeacherConfig, local: Path | None, model_config: dict) -> dict:
    """The manifest's ``teacher``: what makes two runs' log-probs comparable.

    The model's name (folder name or hub id), sha256 of its config.json, vocabulary size, the dtype it runs in, and
    the hub revision when known. The full path goes in ``config`` instead, so the same teacher at another path (another
    machine of a sharded run, a moved folder) is still the same teacher.
    """
    if local is not None:
        raw = (local / "config.json").read_bytes()
        name = local.resolve().name
    else:
        raw = json.dumps(model_config, sort_keys=True).encode()
        name = cfg.teacher
    ident: dict[str, Any] = {
        "name": name,
        "config_sha256": hashlib.sha256(raw).hexdigest(),
        "vocab_size": int(model_config.get("vocab_size") or (model_config.get("text_config") or {}).get("vocab_size")
                          or 0),
        "dtype": _resolved_dtype(cfg, model_config),
    }
    revision = model_config.get("_commit_hash")
    if revision:
        ident["revision"] = revision
    return ident


# ---- the run -------------------------------------------------------------------------------------------------------


def prepare_run(cfg: CacheTeacherConfig) -> tuple[Any, Any, dict]:
    """(tokenizer, source dataset, manifest meta) for a run; shared by the single-process and the Ray paths.

    Checks the teacher before any work, so a wrong ``--teacher`` fails in seconds.
    """
    from transformers import AutoTokenizer

    from rlkd.pipeline.data import dataset_identity, load_source

    local, model_config = resolve_teacher(cfg.teacher, cfg.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(
        str(local.resolve()) if local is not None else cfg.teacher, trust_remote_code=cfg.trust_remote_code
    )
    ds = load_source(cfg)
    meta = {
        "teacher": teacher_identity(cfg, local, model_config),
        "tokenizer": tokenizer_identity(tokenizer),
        "dataset": dataset_identity(cfg, ds, tokenizer),
        "config": config_to_dict(cfg),
        "logprobs_mode": "raw_logprobs",
        "temperature": 1.0,
        "engine": cfg.engine,
    }
    return tokenizer, ds, meta


def engine_for(cfg: CacheTeacherConfig, dtype: str):
    """The teacher engine ``cfg`` asks for (vLLM or HF), built now."""
    from rlkd.pipeline.engines import build_engine

    return build_engine(
        cfg.engine, cfg.teacher, k=cfg.top_k, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
        max_length=cfg.max_length, tensor_parallel_size=cfg.tensor_parallel_size,
        gpu_memory_utilization=cfg.gpu_memory_utilization, max_num_batched_tokens=cfg.max_num_batched_tokens,
        enforce_eager=cfg.enforce_eager, seed=cfg.seed,
    )


def _planned_rows(cfg: CacheTeacherConfig, ds) -> int:
    n = len(ds) if cfg.limit is None else min(len(ds), cfg.limit)
    i, parts = cfg.shard_index
    return len(range(i, n, parts))


def cache_teacher(cfg: CacheTeacherConfig, *, engine: Any = None, progress: bool = True,
                  on_batch: Callable[[dict], None] | None = None) -> dict:
    """Run stage 1 as configured and return the summary (also what :func:`format_summary` prints).

    ``engine``: an already-built engine to use (tests pass one to share a vLLM start); built from ``cfg`` otherwise,
    and only once there is something left to score.
    """
    from rlkd.pipeline.data import InputCounters, iter_examples

    t_start = time.perf_counter()
    if engine is not None and getattr(engine, "k", cfg.top_k) < cfg.top_k:
        raise ValueError(f"the engine returns top-{engine.k} but top_k={cfg.top_k} was asked: build it with k >= top_k")
    tokenizer, ds, meta = prepare_run(cfg)
    if engine is not None:
        meta["engine"] = getattr(engine, "name", type(engine).__name__)
    shard_i, shard_n = cfg.shard_index
    dtype = meta["teacher"]["dtype"]
    counters = InputCounters()
    planned = _planned_rows(cfg, ds)
    stats = {"already_cached": 0, "rows": 0, "tokens": 0, "scored_tokens": 0, "positions": 0, "engine_s": 0.0,
             "loop_s": 0.0}
    out = Path(cfg.out)
    name_prefix = "shard" if shard_n == 1 else f"part{shard_i}of{shard_n}"
    writer = None
    try:
        with CacheWriter(out, meta, k=cfg.top_k, codec=cfg.codec, shard_max_bytes=cfg.shard_max_mb << 20,
                         row_group_rows=cfg.row_group_rows, name_prefix=name_prefix) as w:
            writer = w

            def pending() -> Iterator:
                for ex in iter_examples(cfg, ds, tokenizer, counters):
                    if w.has(make_row_id(ex.input_ids, ex.source_index)):
                        stats["already_cached"] += 1
                        continue
                    yield ex

            todo = pending()
            first = next(todo, None)
            if first is not None:
                if engine is None:
                    engine = engine_for(cfg, dtype)
                bar = _progress(planned, stats["already_cached"], enabled=progress)
                batch = [first]
                t_run = time.perf_counter()
                with RowWriterThread(w, cfg, stats) as sink:  # rows are written while the next batch is scored
                    for ex in todo:
                        if len(batch) == cfg.batch_size:
                            score_and_write(batch, engine, w, cfg, stats, sink)
                            _tick(bar, counters, stats, t_run, on_batch)
                            batch = []
                        batch.append(ex)
                    if batch:
                        score_and_write(batch, engine, w, cfg, stats, sink)
                _tick(bar, counters, stats, t_run, on_batch)
                stats["loop_s"] = time.perf_counter() - t_run
                if bar is not None:
                    bar.n = counters.rows  # rows skipped by the input side count as done too
                    bar.close()
        bytes_written = writer.stats["bytes"]  # after close: includes the last shard
    except OSError as e:
        if e.errno == errno.ENOSPC or "No space left" in str(e):
            done = _finished(out)
            raise DiskFullError(
                errno.ENOSPC,
                f"disk full while writing the cache in {out}: the {done['shards']} finished shard(s) "
                f"({done['rows']} rows) are valid and kept; the open shard was dropped. Free some space (or use "
                "--shard-max-mb to write smaller shards) and re-run the same command to resume where it stopped.",
            ) from e
        raise
    wall = time.perf_counter() - t_start
    summary = {
        "out": str(out),
        "rows_written": stats["rows"],
        "rows_already_cached": stats["already_cached"],
        "rows_in_cache": writer.manifest["rows"] if writer is not None else 0,
        "tokens": stats["tokens"],
        "positions": stats["positions"],
        "bytes": bytes_written,
        "bytes_per_token": bytes_written / stats["tokens"] if stats["tokens"] else 0.0,
        "seconds": wall,
        "engine_seconds": stats["engine_s"],
        "loop_seconds": stats["loop_s"],
        "tokens_per_s": stats["tokens"] / wall if wall > 0 else 0.0,
        "input": counters.as_dict(),
        "input_summary": counters.summary(),
        "shard": cfg.shard,
    }
    return summary


def _finished(out: Path) -> dict:
    try:
        from rlkd.cache import read_manifest

        m = read_manifest(out)
        return {"shards": len(m.get("shards", [])), "rows": m.get("rows", 0)}
    except Exception:  # noqa: BLE001 - only for the message
        return {"shards": 0, "rows": 0}


def score_and_write(batch: list, engine, w: CacheWriter, cfg: CacheTeacherConfig, stats: dict,
                    sink=None) -> None:
    """Score a batch of examples and write their rows; the one row-building path of every stage-1 runner.

    With ``sink`` (a :class:`~rlkd.pipeline.overlap.RowWriterThread`), rows are built and written on its thread
    while the caller goes on to score the next batch.
    """
    from rlkd.pipeline.rows import write_rows

    t0 = time.perf_counter()
    scored = engine.score([ex.input_ids for ex in batch])
    stats["engine_s"] += time.perf_counter() - t0
    # The progress bar's rate counts tokens as they are scored: rows still queued for the writer thread lag behind.
    stats["scored_tokens"] += sum(len(ex.input_ids) for ex in batch)
    if sink is not None:
        sink.submit(batch, scored)
    else:
        write_rows(batch, scored, w, cfg, stats)


def _progress(total: int, already: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    # Rows already cached (resume) count as done, so the ETA covers only what is left.
    return tqdm(total=total, initial=already, unit="seq", desc="cache-teacher", dynamic_ncols=True, smoothing=0.1)


def _tick(bar, counters, stats: dict, t_run: float, on_batch) -> None:
    elapsed = time.perf_counter() - t_run
    tps = stats["scored_tokens"] / elapsed if elapsed > 0 else 0.0
    if bar is not None:
        # Source rows consumed so far (written, already cached, or skipped by the input side).
        bar.update(max(0, counters.rows - bar.n))
        bar.set_postfix_str(f"{tps:,.0f} tok/s", refresh=False)
    if on_batch is not None:
        on_batch({"rows": stats["rows"], "tokens": stats["tokens"], "tokens_per_s": tps})


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
    inp = s.get("input_summary")
    if inp:
        lines += ["  input            " + line if i == 0 else "                   " + line
                  for i, line in enumerate(str(inp).splitlines())]
    return "\n".join(lines)
