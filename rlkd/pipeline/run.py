"""Stage 1, top to bottom: teacher + dataset -> formatted examples -> engine -> rows -> cache shards.

``cache_teacher(cfg)`` is what ``rlkd cache-teacher`` calls. Running it again on the same ``out`` resumes: rows whose
``row_id`` is already in a finished shard are skipped before the engine sees them, so a crash (even SIGKILL) costs at
most the rows of the shard that was open.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from rlkd.background import BackgroundSink
from rlkd.cache import CacheWriter, make_row_id, tokenizer_identity
from rlkd.cache.storage import CacheLocation
from rlkd.cache.writer import check_cache_dir, is_own_temporary
from rlkd.config import ConfigError, config_to_dict
from rlkd.errors import UserError
from rlkd.pipeline.config import DEFAULT_MAX_LENGTH, CacheTeacherConfig
from rlkd.pipeline.stats import RunStats, progress_bar, summarize

log = logging.getLogger(__name__)

_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                    "sentencepiece.bpe.model", "tokenizer.tiktoken")
"""Any of these in a model folder is a tokenizer transformers can load without converting another format."""

_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_target_positions",
                  "max_sequence_length", "max_seq_length", "seq_len")
"""config.json keys that bound a model's positions, as vLLM reads them (the smallest present wins)."""

_UNSCALED_ROPE = ("su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling")
"""RoPE types whose position limit in config.json is already scaled (vLLM multiplies the others by ``factor``)."""


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
        if not any((path / name).is_file() for name in _TOKENIZER_FILES) and not list(path.glob("*.tiktoken")):
            raise TeacherNotFoundError(
                f"--teacher {teacher}: the folder has no tokenizer (none of {', '.join(_TOKENIZER_FILES[:3])}, ...). "
                "rlkd formats the data with the teacher's own tokenizer: save it into the folder "
                f"(`AutoTokenizer.from_pretrained(ORIGINAL).save_pretrained('{teacher}')`) or use a complete model "
                "folder.")
        try:
            return path, json.loads(cfg.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TeacherNotFoundError(f"--teacher {teacher}: {cfg} is not valid JSON ({e})") from None
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


def position_limit(model_config: dict) -> tuple[int | None, str]:
    """(most positions the model takes, the config key it comes from), read the way vLLM derives its maximum model
    length: the smallest of the position keys (``model_max_length`` wins where present), times the RoPE scaling
    factor for the RoPE types that need it. ``(None, "")`` when the config names no limit."""
    text = model_config.get("text_config") if isinstance(model_config.get("text_config"), dict) else model_config
    found = [(int(text[key]), key) for key in _POSITION_KEYS if isinstance(text.get(key), (int, float))
             and not isinstance(text.get(key), bool) and text[key] > 0]
    if isinstance(text.get("model_max_length"), (int, float)) and text["model_max_length"] > 0:
        found = [(int(text["model_max_length"]), "model_max_length")]
    if not found:
        return None, ""
    limit, key = min(found)
    rope = text.get("rope_parameters") or text.get("rope_scaling")
    ropes = [rope] if isinstance(rope, dict) and "factor" in rope else (
        [r for r in rope.values() if isinstance(r, dict)] if isinstance(rope, dict) else [])
    for r in ropes:
        kind = r.get("rope_type", r.get("type"))
        if kind not in _UNSCALED_ROPE and isinstance(r.get("factor"), (int, float)):
            limit, key = int(limit * r["factor"]), f"{key} x rope factor {r['factor']}"
            break
    return limit, key


def resolve_limits(cfg: CacheTeacherConfig, model_config: dict, engine: Any = None) -> None:
    """Check ``top_k`` and ``max_length`` against the teacher before anything is written, and fill in
    ``cfg.max_length`` (the default, lowered to what the teacher takes, with a note). Raises :class:`ConfigError`
    with every problem, each naming the flag and the limit.

    The most tokens a row may hold: the teacher's position limit (:func:`position_limit`), less one for vLLM, which
    also places the one token it must generate; and, for an engine passed in, its own ``max_model_len`` (less one).
    """
    problems = []
    vocab = int(model_config.get("vocab_size") or (model_config.get("text_config") or {}).get("vocab_size") or 0)
    if vocab and cfg.top_k > vocab:
        problems.append(f"top_k: --top-k {cfg.top_k} is more than the teacher's vocabulary ({vocab} tokens, "
                        f"vocab_size in its config.json): give --top-k {vocab} or less")
    engine_kind = getattr(engine, "name", None) or cfg.engine
    limit, key = position_limit(model_config)
    usable, why = None, ""
    if limit is not None:
        usable = limit - 1 if engine_kind == "vllm" else limit
        why = (f"the teacher takes {limit} positions ({key} in its config.json)"
               + (" and vLLM needs one of them for the token it generates" if engine_kind == "vllm" else ""))
    engine_len = getattr(engine, "max_model_len", None)
    if isinstance(engine_len, int) and (usable is None or engine_len - 1 < usable):
        usable, why = engine_len - 1, f"the engine passed in was built with max_model_len={engine_len}"
    if cfg.max_length is None:
        cfg.max_length = DEFAULT_MAX_LENGTH
        if usable is not None and usable < DEFAULT_MAX_LENGTH:
            cfg.max_length = usable
            log.warning("--max-length defaults to %d, but %s: using --max-length %d", DEFAULT_MAX_LENGTH, why,
                        usable)
    elif usable is not None and cfg.max_length > usable:
        problems.append(f"max_length: --max-length {cfg.max_length} is more than the teacher takes: {why}, so the "
                        f"largest --max-length is {usable}")
    if problems:
        raise ConfigError(problems, source="cache-teacher")


# ---- the run -------------------------------------------------------------------------------------------------------


def prepare_run(cfg: CacheTeacherConfig, engine: Any = None) -> tuple[Any, Any, dict]:
    """(tokenizer, source dataset, manifest meta) for a run; shared by the single-process and the Ray paths.

    Checks the teacher, ``top_k`` and ``max_length`` before any work (:func:`resolve_limits`, which also fills in
    ``cfg.max_length``), so a wrong ``--teacher`` or flag fails in seconds, before anything is written.
    """
    from transformers import AutoTokenizer

    from rlkd.pipeline.data import dataset_identity, load_source

    local, model_config = resolve_teacher(cfg.teacher, cfg.trust_remote_code)
    resolve_limits(cfg, model_config, engine)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(local.resolve()) if local is not None else cfg.teacher, trust_remote_code=cfg.trust_remote_code
        )
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a broken tokenizer
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise TeacherNotFoundError(f"--teacher {cfg.teacher}: its tokenizer cannot be loaded ({type(e).__name__}: "
                                   f"{first})") from e
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
    from rlkd.pipeline.data import InputCounters, check_some_examples, iter_examples
    from rlkd.pipeline.engines import write_rows

    t_start = time.perf_counter()
    if engine is not None and getattr(engine, "k", cfg.top_k) < cfg.top_k:
        raise ValueError(f"the engine returns top-{engine.k} but top_k={cfg.top_k} was asked: build it with k >= top_k")
    check_cache_dir(cfg.out, "--out")  # before the dataset is read: a wrong --out fails at once
    tokenizer, ds, meta = prepare_run(cfg, engine)
    if engine is not None:
        meta["engine"] = getattr(engine, "name", type(engine).__name__)
    shard_i, shard_n = cfg.shard_index
    counters = InputCounters()
    stats = RunStats()
    out = cfg.out
    writer = None
    try:
        with CacheWriter(out, meta, k=cfg.top_k, codec=cfg.codec, shard_max_bytes=cfg.shard_max_mb << 20,
                         row_group_rows=cfg.row_group_rows,
                         name_prefix="shard" if shard_n == 1 else f"part{shard_i}of{shard_n}",
                         verify_shards=cfg.verify_resume, lease_seconds=cfg.lease_seconds) as w:
            writer = w

            def pending() -> Iterator:
                for ex in iter_examples(cfg, ds, tokenizer, counters):
                    if w.has(make_row_id(ex.input_ids, ex.source_index)):
                        stats.add(already_cached=1)
                        continue
                    yield ex

            todo = pending()
            first = next(todo, None)
            if first is None:
                check_some_examples(cfg, counters)  # every row was read: none usable is an error, not an empty cache
            else:
                if engine is None:
                    engine = engine_for(cfg, meta["teacher"]["dtype"])
                bar = progress_bar(_planned_rows(cfg, ds), stats.already_cached, enabled=progress)
                t_run = time.perf_counter()
                # Rows are built and written on a background thread while the engine scores the next batch.
                with BackgroundSink(lambda item: write_rows(*item, w, cfg, stats), name="rlkd-row-writer") as sink:
                    for batch in _batches(first, todo, cfg.batch_size):
                        sink.submit((batch, score(batch, engine, stats)))
                        _tick(bar, counters, stats, t_run, on_batch)
                stats.set(loop_s=time.perf_counter() - t_run)
                _tick(bar, counters, stats, t_run, on_batch)
                if bar is not None:
                    bar.n = counters.rows  # rows skipped by the input side count as done too
                    bar.close()
        stats.set(bytes=writer.stats["bytes"], shards=writer.stats["shards"])  # after close: with the last shard
    except OSError as e:
        if e.errno == errno.ENOSPC or "No space left" in str(e):
            raise _disk_full(out) from e
        raise
    snap = stats.snapshot()
    return summarize(out=str(out), stats=snap, rows_already_cached=snap["already_cached"],
                     rows_in_cache=writer.manifest["rows"] if writer is not None else 0,
                     seconds=time.perf_counter() - t_start, counters=counters, shard=cfg.shard)


def _batches(first, rest: Iterator, size: int) -> Iterator[list]:
    """``first`` and the items of ``rest`` in lists of ``size`` (the last may be shorter)."""
    batch = [first]
    for item in rest:
        if len(batch) == size:
            yield batch
            batch = []
        batch.append(item)
    yield batch


def _disk_full(out: str) -> DiskFullError:
    import tempfile

    done = _finished(out)
    path = CacheLocation.parse(out).local_path()
    if path is None:  # a remote cache: the disk that filled up holds the spooled shard
        where = (f"disk full while spooling a shard for {out} in {tempfile.gettempdir()} (shards are built "
                 "there before upload; set TMPDIR to use another disk)")
        dropped = "the open shard was dropped"
    else:
        where = f"disk full while writing the cache in {out}"
        left = [p.name for p in path.iterdir() if is_own_temporary(p) and p.name.endswith(".parquet.rlkd-tmp")]
        dropped = ("the open shard was dropped" if not left else
                   f"the open shard could not be removed ({', '.join(left)}; the next run removes it)")
    return DiskFullError(
        errno.ENOSPC,
        f"{where}: the {done['shards']} finished shard(s) ({done['rows']} rows) are valid and kept; {dropped}. Free "
        "some space (or use --shard-max-mb to write smaller shards) and re-run the same command to resume where it "
        "stopped.",
    )


def _finished(out: str) -> dict:
    try:
        from rlkd.cache import read_manifest

        m = read_manifest(out)
        return {"shards": len(m.get("shards", [])), "rows": m.get("rows", 0)}
    except Exception:  # noqa: BLE001 - only for the message
        return {"shards": 0, "rows": 0}


def score(batch: list, engine, stats: RunStats) -> list:
    """The engine's output for a batch of examples, timed into ``stats``; the scoring step of every stage-1 runner
    (its rows are then built and written by :func:`rlkd.pipeline.engines.write_rows`)."""
    t0 = time.perf_counter()
    scored = engine.score([ex.input_ids for ex in batch])
    # The progress bar's rate counts tokens as they are scored: rows still queued for the writer thread lag behind.
    stats.add(engine_s=time.perf_counter() - t0, scored_tokens=sum(len(ex.input_ids) for ex in batch))
    return scored


def _tick(bar, counters, stats: RunStats, t_run: float, on_batch) -> None:
    snap = stats.snapshot()
    elapsed = time.perf_counter() - t_run
    tps = snap["scored_tokens"] / elapsed if elapsed > 0 else 0.0
    if bar is not None:
        # Source rows consumed so far (written, already cached, or skipped by the input side).
        bar.update(max(0, counters.rows - bar.n))
        bar.set_postfix_str(f"{tps:,.0f} tok/s", refresh=False)
    if on_batch is not None:
        on_batch({"rows": snap["rows"], "tokens": snap["tokens"], "tokens_per_s": tps})
