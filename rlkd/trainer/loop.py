"""Stage 2: train a student from the cache alone. Reads top to bottom: ``setup`` -> ``train`` -> ``cleanup``.

One optimizer step
------------------
1. Pull the step's window of ``grad_accum x N`` micro-batches from :class:`~rlkd.trainer.data.TrainStream` (N
   processes; every process reads the same stream and works on its share, see :mod:`rlkd.trainer.distributed`).
2. Count the trained positions of the whole window, ``N_window``.
3. Per micro-batch of this process: run the student's *base* model (``model.get_decoder()``: embeddings, layers,
   final norm) to hidden states (B, T, H), keep the trained positions (N, H), and hand them with the LM head's
   weight to :func:`~rlkd.trainer.chunked.chunked_distill_loss`, which computes the head, the log-softmax and every
   loss term in chunks of positions, so the (tokens x vocab) logits are never built. It returns the *sum* of each
   term over the micro-batch's positions; we backpropagate ``sum / N_window`` (times N, because FSDP and DDP
   average gradients over processes). Both run inside one ``forward`` of
   :class:`~rlkd.trainer.student.StudentWithHead`, so sharding frameworks see the head used inside the model.
4. Clip the gradient norm, AdamW step, schedule step.

Normalisation: the loss of a step is the mean over every trained position of the global batch (all micro-batches
of the window, all ranks), not a mean of per-micro-batch means. So the gradient does not depend on how the global
batch is split into micro-batches or processes, and a short last micro-batch is not over-weighted. The logged ``kd``,
``rank``, ``ce`` and ``total`` are those same means, i.e. exactly what was backpropagated.

The teacher is never loaded: its top-k comes from the cache.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from rlkd.cache import CacheReader, check_tokenizer_compatible, read_manifest
from rlkd.config import ConfigError
from rlkd.core.metrics import PeakMetrics, left_out_note
from rlkd.core.targets import ModelBatch, vocab_problem
from rlkd.errors import UserError
from rlkd.trainer import distributed as dist
from rlkd.trainer.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    choose_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_state,
    save_checkpoint,
)
from rlkd.trainer.chunked import chunked_distill_loss
from rlkd.trainer.config import TrainConfig
from rlkd.trainer.data import TrainStream, count_trainable_rows, load_eval_batches
from rlkd.trainer.losses import DistillLoss, RankLoss
from rlkd.trainer.student import StudentWithHead

LOGGED_TERMS = ("total", "kd", "rank", "ce", "overlap")
"""Loss terms logged per step (means over the step's trained positions)."""


class TrainSetupError(UserError, ValueError):
    """The student, cache or output folder cannot be used; raised before any step, naming what to fix."""


@dataclass
class Run:
    """Everything ``setup`` builds and ``train`` uses."""

    cfg: TrainConfig
    out: Path
    device: torch.device
    model: torch.nn.Module
    """The HF causal LM (its parameters are sharded DTensors under FSDP2)."""
    tokenizer: object
    loss_fn: DistillLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    stream: TrainStream
    total_steps: int
    eval_reader: CacheReader | None
    step: int = 0
    ctx: dist.DistContext = field(default_factory=dist.DistContext)
    student: torch.nn.Module | None = None
    """What forward and backward run: ``StudentWithHead(model)``, wrapped by FSDP2 or DDP when distributed."""
    grad_accum: int = 1
    """Micro-batches per step and process (``data.grad_accum``, or derived from ``data.global_batch``)."""
    eval_batches: list | None = None
    sinks: list = field(default_factory=list)
    last_metrics: dict = field(default_factory=dict)
    last_eval: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.student is None:
            self.student = StudentWithHead(self.model)

    @property
    def rank(self) -> int:
        return self.ctx.rank


def train_student(cfg: TrainConfig) -> dict:
    """Run stage 2 end to end; returns a summary (final folder, steps, last metrics, last eval)."""
    run = setup(cfg)
    try:
        train(run)
        final = save_final(run)
    finally:
        cleanup(run)
        dist.shutdown()
    return {"final": str(final), "step": run.step, "metrics": run.last_metrics, "eval": run.last_eval}


# ---- setup ------------------------------------------------------------------------------------------------------

def setup(cfg: TrainConfig) -> Run:
    """Check everything that can be checked before a step, then build model, data, optimizer and sinks.

    Nothing is written to OUT before every check has passed (on every process), so a refused run leaves OUT as it
    was.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-save "Writing model shards" bars would break our tqdm line

    try:
        ctx, device = dist.init_distributed(cfg.run.device, cfg.run.strategy)
        grad_accum = cfg.grad_accum_for(ctx.world_size)
    except (ValueError, ConfigError) as e:
        raise TrainSetupError(str(e)) from None
    out = Path(cfg.run.out)
    check_out(out, cfg.run.resume)
    if cfg.run.report_to == "tensorboard":
        _summary_writer()  # refuse a missing package now, not after writing into OUT
    resume_from, saved = _choose_resume(cfg, out, ctx, device)

    # Refusals: the cache's ids must mean the same tokens to the student, and fit in its vocabulary.
    tokenizer, student_config = _load_student_files(cfg.run.student)
    check_student_fits_cache(cfg, tokenizer, student_config)

    # Every process reads the same global stream (rank 0 of 1) and takes its share of each step's window.
    io = {"prefetch": cfg.data.prefetch, "local_cache": cfg.data.local_cache,
          "local_cache_gb": cfg.data.local_cache_gb}  # how shards are fetched; never what is read, or in which order
    reader = CacheReader(cfg.data.cache, batch_size=cfg.data.batch_size, shuffle=True, seed=cfg.run.seed,
                         shuffle_buffer=cfg.data.shuffle_buffer, **io)
    check_something_to_train(cfg, reader, say=lambda m: _say_rank0(ctx, m))
    if saved is not None:
        check_resume_matches(cfg, saved, resume_from, reader)

    _seed_everything(cfg.run.seed)
    model_path = resume_from / "model" if resume_from else Path(cfg.run.student)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)  # fp32 master weights
    except Exception as e:  # noqa: BLE001 - transformers/safetensors raise many types; name the folder instead
        what = f"the checkpoint {resume_from}" if resume_from else f"--student {cfg.run.student}"
        raise TrainSetupError(f"cannot load the model weights of {what} from {model_path} ({type(e).__name__}: "
                              f"{_first_line(e)}): the files are damaged or incomplete") from None
    model.to(device)
    model.config.use_cache = False
    if cfg.run.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    student = dist.wrap(StudentWithHead(model), ctx, device)

    epochs = int(cfg.optim.epochs) if cfg.optim.epochs is not None else None
    stream = TrainStream(reader, batch_size=cfg.data.batch_size, eval_fraction=cfg.data.eval_fraction,
                         group_by_length=cfg.data.group_by_length, length_group=cfg.data.length_group,
                         seed=cfg.run.seed, epochs=epochs)
    rows_per_step = cfg.data.batch_size * grad_accum * ctx.world_size
    if cfg.optim.max_steps is not None:
        total_steps = cfg.optim.max_steps
    else:  # an estimate: the exact count depends on the eval split and grouping, known only after a pass
        rows = reader.num_rows * (1.0 - cfg.data.eval_fraction)
        total_steps = max(1, math.ceil(rows / rows_per_step)) * epochs
    eval_reader = None
    if cfg.data.eval_cache or cfg.data.eval_fraction > 0:
        eval_reader = CacheReader(cfg.data.eval_cache or cfg.data.cache, batch_size=cfg.data.batch_size,
                                  shuffle=False, **io)

    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, total_steps))
    run = Run(cfg=cfg, out=out, device=device, model=model, tokenizer=tokenizer, loss_fn=DistillLoss(cfg.loss),
              optimizer=optimizer, scheduler=scheduler, stream=stream, total_steps=total_steps,
              eval_reader=eval_reader, ctx=ctx, student=student, grad_accum=grad_accum)
    if resume_from is not None:
        state = load_checkpoint(resume_from, model=model, optimizer=optimizer, scheduler=scheduler)
        run.step = int(state["step"])
        stream.load_state_dict(state["data"])

    dist.barrier()  # every process has checked OUT before rank 0 writes into it
    if ctx.rank == 0:
        if not run_outputs(out) and (out / "train_config.yaml").is_file():
            _say(run, f"note: {out} holds the config of a run that stopped before logging a step; replacing it")
        out.mkdir(parents=True, exist_ok=True)
        if resume_from is not None:
            _warn_config_changes(saved.get("config", {}), cfg.to_dict(), resume_from)
            _truncate_metrics(out / "metrics.jsonl", run.step)
        (out / "train_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        run.sinks = _open_sinks(cfg, out)
    if resume_from is not None:
        _say(run, f"resumed from {resume_from} at step {run.step}")
    if ctx.distributed:
        _say(run, f"{ctx.world_size} processes ({ctx.strategy}, {device.type}), {grad_accum} micro-batch(es) of "
                  f"{cfg.data.batch_size} rows per process and step: {rows_per_step} rows per step")
    dist.barrier()  # OUT exists before anyone writes into it
    return run


# ---- setup checks -----------------------------------------------------------------------------------------------

def run_outputs(out: Path) -> list[str]:
    """What an earlier run left in ``out`` that a new run would overwrite or mix with: checkpoints, ``final/``,
    logged metrics, tensorboard events, and then its ``train_config.yaml``. A run that stopped before logging a
    step (a config and an empty ``metrics.jsonl``) left nothing to lose and is not listed."""
    if not out.is_dir():
        return []
    checkpoints = [p.name for _, p in list_checkpoints(out)]
    if len(checkpoints) > 3:
        checkpoints = [f"{len(checkpoints)} checkpoints up to {checkpoints[-1]}"]
    found = list(checkpoints)
    found += [f"{name}/" for name in ("final", "tensorboard") if (out / name).is_dir()]
    metrics = out / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append("metrics.jsonl")
    if found and (out / "train_config.yaml").exists():
        found.append("train_config.yaml")
    return found


def check_out(out: Path, resume: str | None) -> None:
    """Refuse an ``--out`` that cannot be written, or whose earlier run this one would overwrite or mix with.

    A fresh run needs an OUT without run outputs; ``--resume auto`` needs a checkpoint in it when it holds any
    (else there is nothing to continue from, and ``final/`` and the metrics would be silently replaced);
    ``--resume PATH`` continues into its own OUT, or into one without run outputs.
    """
    if out.exists() and not out.is_dir():
        raise TrainSetupError(f"--out {out} is a file, not a folder: choose another --out")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise TrainSetupError(f"--out {out}: cannot write into {existing} (not a writable folder): choose another "
                              "--out")
    found = run_outputs(out)
    if not found:
        return
    own_checkpoint = resume not in (None, "auto") and Path(resume).resolve().parent == out.resolve()
    if own_checkpoint or (resume == "auto" and list_checkpoints(out)):
        return
    held = ", ".join(found)
    if list_checkpoints(out):
        raise TrainSetupError(f"--out {out} already holds a run ({held}): pass --resume auto to continue it from "
                              f"its newest checkpoint, or choose another --out (or delete {out}) to start fresh")
    raise TrainSetupError(
        f"--out {out} already holds a run that saved no checkpoint ({held}), so "
        f"{'--resume auto has nothing to continue from' if resume == 'auto' else 'it cannot be continued'} and a "
        f"new run would replace it: choose another --out, or delete {out} to start fresh (--save-every N makes a "
        "run resumable)")


def _choose_resume(cfg: TrainConfig, out: Path, ctx: dist.DistContext,
                   device: torch.device) -> tuple[Path | None, dict | None]:
    """The verified checkpoint to resume from and its trainer state (None, None: a fresh start).

    Rank 0 reads and verifies the checkpoints (one read of each, not one per process) and tells the others which
    step it chose; they then read only its small state file.
    """
    if not cfg.run.resume:
        return None, None
    path, state, error = None, None, None
    if ctx.rank == 0:
        try:
            path, state = choose_checkpoint(cfg.run.resume, out, say=lambda m: _say_rank0(ctx, m))
        except CheckpointError as e:
            error = e
    chosen = dist.broadcast_int(-2 if error else -1 if path is None else int(state["step"]), device)
    if error is not None:
        raise error
    if chosen == -2:
        raise CheckpointError("rank 0 found no checkpoint to resume from (its message says why)")
    if chosen == -1:
        return None, None
    if ctx.rank != 0:
        path = checkpoint_dir(out, chosen) if cfg.run.resume == "auto" else Path(cfg.run.resume)
        state = read_state(path)
    return path, state


def _load_student_files(student: str):
    """The student's tokenizer and config, with one clear error when ``--student`` is not a usable model."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(student), AutoConfig.from_pretrained(student)
    except Exception as e:  # noqa: BLE001 - OSError, ValueError, hub errors...: name the flag instead
        raise TrainSetupError(f"--student {student}: cannot load its tokenizer and config ({type(e).__name__}: "
                              f"{_first_line(e)}); give a Hugging Face model folder or hub name") from None


def check_something_to_train(cfg: TrainConfig, reader: CacheReader, say) -> None:
    """Refuse an incomplete cache (unless ``allow_incomplete``) and a cache none of whose rows can be trained on:
    empty, every row held out by ``eval_fraction``, or no row with a trained position."""
    cache = cfg.data.cache
    if cfg.data.eval_cache:
        eval_manifest = read_manifest(cfg.data.eval_cache)
        if eval_manifest.get("complete") is False:
            _incomplete(cfg, f"the eval cache {cfg.data.eval_cache} (--eval-cache)", eval_manifest, say)
    rows = reader.total_rows
    if rows == 0:
        stopped = (" and its manifest says complete: false: stage 1 stopped before it finished a shard; re-run its "
                   "`rlkd cache-teacher` command" if reader.manifest.get("complete") is False
                   else ": re-run stage 1 on a dataset that has rows")
        raise TrainSetupError(f"nothing to train: the cache {cache} (--cache) holds no rows{stopped}")
    if reader.manifest.get("complete") is False:
        _incomplete(cfg, f"the cache {cache} (--cache)", reader.manifest, say)
    counts = count_trainable_rows(cache, reader.manifest, cfg.data.eval_fraction)
    if counts["trainable"]:
        return
    held, empty = counts["held_out"], counts["no_positions"]
    fix_split = "lower --eval-fraction, or evaluate on a separate --eval-cache"
    fix_mask = ("rebuild it so responses fit (a larger --max-length in `rlkd cache-teacher`) or with --loss-on all")
    if empty == 0:
        why = f"--eval-fraction {cfg.data.eval_fraction} holds out all {held} rows of the cache {cache}: {fix_split}"
    elif held == 0:
        why = (f"none of the {empty} rows of the cache {cache} has a trained position (its loss_mask is all "
               f"false): {fix_mask}")
    else:
        why = (f"of the {rows} rows of the cache {cache}, --eval-fraction {cfg.data.eval_fraction} holds out {held} "
               f"and the other {empty} have no trained position (loss_mask all false): {fix_split}, or {fix_mask}")
    raise TrainSetupError(f"nothing to train: {why}")


def _incomplete(cfg: TrainConfig, what: str, manifest: dict, say) -> None:
    rows = int(manifest.get("rows", 0))
    if not cfg.data.allow_incomplete:
        raise TrainSetupError(
            f"{what} is not complete (its manifest says complete: false: stage 1 stopped early or is still "
            f"running, {rows} rows so far): re-run its `rlkd cache-teacher` command to finish it, or pass "
            "--allow-incomplete to use the rows written so far")
    say(f"warning: {what} is not complete (--allow-incomplete): using the {rows} rows written so far")


def check_resume_matches(cfg: TrainConfig, state: dict, path: Path, reader: CacheReader) -> None:
    """Refuse to resume a checkpoint onto another student or another cache (or another data order): the run would
    silently continue the checkpoint's model, or fail part-way. All mismatches are reported together."""
    saved = state.get("config") or {}
    problems = []
    saved_student = (saved.get("run") or {}).get("student")
    if saved_student is not None and not _same_path(saved_student, cfg.run.student):
        problems.append(f"it continues the student {saved_student}, but --student is {cfg.run.student}: pass "
                        f"--student {saved_student} to resume that run, or choose another --out (or delete "
                        f"{cfg.run.out}) to train {cfg.run.student} from scratch")
    pool = (state.get("data") or {}).get("pool_start") or {}
    saved_cache = state.get("cache") or {"path": (saved.get("data") or {}).get("cache"),
                                         "shards": pool.get("shards"), "rows": pool.get("total_rows")}
    now = reader.state_dict()
    if saved_cache.get("shards") and saved_cache["shards"] != now["shards"]:
        problems.append(f"it was trained on the cache {saved_cache.get('path')} ({saved_cache.get('rows')} rows), "
                        f"but --cache {cfg.data.cache} holds other shards ({now['total_rows']} rows): pass --cache "
                        f"{saved_cache.get('path')} to resume that run, or choose another --out to train on "
                        f"{cfg.data.cache} from scratch")
    for key in ("seed", "shuffle_buffer"):
        if key in pool and pool[key] != now[key]:
            flag = "--" + key.replace("_", "-")
            problems.append(f"it was trained with {flag} {pool[key]} and this run has {flag} {now[key]}: the data "
                            f"order depends on it; pass {flag} {pool[key]} to resume")
    if not problems and pool:
        try:  # anything else the reader's exact resume depends on
            reader.load_state_dict(pool)
        except ValueError as e:
            problems.append(str(e).replace("\n", " "))
    if problems:
        raise TrainSetupError(f"cannot resume from {path}: " + "; ".join(problems))


def _same_path(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # a hub name, or a folder that is gone
        return False


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else repr(e)


def check_student_fits_cache(cfg: TrainConfig, tokenizer, student_config) -> None:
    """Refuse, before any step, a student that cannot learn from the cache(s), naming what to change."""
    caches = [cfg.data.cache] + ([cfg.data.eval_cache] if cfg.data.eval_cache else [])
    vocab = int(student_config.vocab_size)
    for i, cache_dir in enumerate(caches):
        manifest = read_manifest(cache_dir)
        where = f"the {'eval ' if i else ''}cache {cache_dir}"
        check_tokenizer_compatible(tokenizer, manifest.get("tokenizer") or {}, where=where)
        problem = vocab_problem(vocab, cache_dir, manifest, who=f"the student {cfg.run.student}", where=where)
        if problem:
            raise TrainSetupError(problem)
        cache_k = int(manifest.get("k", 0))
        if (cfg.loss.rank_weight > 0 or cfg.loss.dynamic) and cache_k < cfg.loss.rank_k:
            raise TrainSetupError(
                f"rank_k={cfg.loss.rank_k} needs a cache with k >= {cfg.loss.rank_k}, but {where} has k={cache_k}: "
                "lower --rank-k or rebuild the cache with a larger `rlkd cache-teacher --top-k`")
    for attr in ("final_logit_softcapping", "logit_scale"):
        if getattr(student_config, attr, None) not in (None, 1.0):
            raise TrainSetupError(
                f"the student's config sets {attr}={getattr(student_config, attr)}: the chunked loss applies the LM "
                "head as a plain linear layer and would train different logits than the model serves")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains and biases are not decayed)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    o = cfg.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)


def _lr_lambda(cfg: TrainConfig, total_steps: int):
    """Multiplier of the peak lr at optimizer step ``s`` (0-based): linear warmup, then cosine/linear/constant."""
    o = cfg.optim
    warmup, floor = o.warmup_steps, o.min_lr_ratio

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, total_steps - warmup))
        decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if o.schedule == "cosine" else 1.0 - progress
        return floor + (1.0 - floor) * decay

    return factor


def _warn_config_changes(saved: dict, now: dict, where: Path) -> None:
    changed = [f"{sec}.{k}: {saved[sec][k]!r} -> {now[sec][k]!r}"
               for sec in now if sec in saved for k in now[sec]
               if k in saved[sec] and saved[sec][k] != now[sec][k] and k not in ("resume",)]
    if changed:
        print(f"warning: resuming {where} with a different config (the run will not match an uninterrupted one): "
              + "; ".join(changed), file=sys.stderr)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint we resume from: they will be logged again. A line that does not parse
    (the half-written last line of a killed run) is dropped too."""
    if not path.is_file():
        return

    def step_of(line: str) -> int | None:
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            return None

    kept = [line for line in path.read_text(errors="replace").splitlines()
            if (logged := step_of(line)) is not None and logged <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _open_sinks(cfg: TrainConfig, out: Path) -> list:
    sinks = [TensorboardSink(out / "tensorboard")] if cfg.run.report_to == "tensorboard" else []  # may refuse
    return [JsonlSink(out / "metrics.jsonl")] + sinks


class JsonlSink:
    """One JSON object per line; appended and flushed so a killed run keeps what it logged."""

    def __init__(self, path: Path):
        self.f = open(path, "a")

    def log(self, record: dict) -> None:
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def _summary_writer():
    """TensorBoard's ``SummaryWriter`` class, or a :class:`TrainSetupError` saying what to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch ships the wrapper; the writer needs the tensorboard package
        raise TrainSetupError("--report-to tensorboard needs the tensorboard package: `pip install tensorboard`"
                              ) from e
    return SummaryWriter


class TensorboardSink:
    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.make_writer = _summary_writer()
        self.writer = None  # made on the first record: a run that fails before it leaves no events folder

    def log(self, record: dict) -> None:
        if self.writer is None:
            self.writer = self.make_writer(str(self.log_dir))
        prefix = "eval/" if record.get("split") == "eval" else "train/"
        for key, value in record.items():
            if key not in ("step", "split", "epoch") and isinstance(value, (int, float)):
                self.writer.add_scalar(prefix + key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ---- train ------------------------------------------------------------------------------------------------------

def train(run: Run) -> None:
    """Optimizer steps until ``max_steps`` (or the last epoch), with evaluation and checkpoints."""
    from tqdm.auto import tqdm

    cfg = run.cfg
    batches = iter(run.stream)
    bar = tqdm(total=run.total_steps, initial=run.step, unit="step", dynamic_ncols=True,
               disable=not cfg.run.progress or run.rank != 0, desc="train")
    while cfg.optim.max_steps is None or run.step < cfg.optim.max_steps:
        window = [b for _, b in zip(range(run.grad_accum * run.ctx.world_size), batches)]
        if not window:
            break  # the last epoch is over
        record = train_step(run, window)
        run.step += 1
        record["step"] = run.step
        record["epoch"] = run.stream.epoch
        run.last_metrics = record
        if run.step % cfg.run.log_every == 0:
            _log(run, record)
        bar.set_postfix(loss=f"{record['total']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        bar.update(1)
        if cfg.optim.eval_every and run.step % cfg.optim.eval_every == 0:
            run_eval(run)
        if cfg.run.save_every and run.step % cfg.run.save_every == 0:
            _save(run)
    bar.close()
    if run.eval_reader is not None and not (cfg.optim.eval_every and run.step % cfg.optim.eval_every == 0):
        run_eval(run)  # always end with an evaluation


def _autocast(device: torch.device):
    # bf16 autocast on GPU (master weights, optimizer and loss reductions stay fp32); plain fp32 on CPU.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _loss_head(targets, loss_fn: DistillLoss, chunk_size: int):
    """The ``head_fn`` of :class:`StudentWithHead` for training: LM head + loss in chunks, term sums out."""
    return lambda hidden, weight, bias: chunked_distill_loss(hidden, weight, targets, loss_fn,
                                                             chunk_size=chunk_size, lm_head_bias=bias)


def train_step(run: Run, window: list[ModelBatch]) -> dict:
    """One optimizer step over a window (every process's micro-batches); returns the logged record (means over the
    window)."""
    t0 = time.perf_counter()
    cfg, ctx = run.cfg, run.ctx
    n_window = sum(b.positions for b in window)  # every process holds the whole window: no collective
    share = dist.rank_share(len(window), ctx)  # (index, weight 1, or 0 for a padding pass)
    sums = {k: torch.zeros((), device=run.device, dtype=torch.float64) for k in LOGGED_TERMS}
    for i, (index, w) in enumerate(share):
        mb = window[index].to(run.device)
        with dist.grad_sync(run.student, ctx, enabled=i == len(share) - 1), _autocast(run.device):
            terms = run.student(mb, _loss_head(mb.targets, run.loss_fn, cfg.loss.chunk_size))
        # The window's mean: FSDP/DDP average gradients over the N processes, hence the factor N.
        (terms["total"] * (w * ctx.world_size / n_window)).backward()
        if w:
            for k in LOGGED_TERMS:
                sums[k] += terms[k].detach().double()
    clip = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(run.student.parameters(), clip)  # pre-clip norm
    lr = run.scheduler.get_last_lr()[0]  # the lr this step uses
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)

    # .item() calls below are a CPU-GPU sync point, once per step
    total = dist.all_sum(torch.stack([sums[k] for k in LOGGED_TERMS]))  # (terms,)
    means = dict(zip(LOGGED_TERMS, (total / n_window).tolist()))
    tokens = sum(b.tokens for b in window)
    elapsed = time.perf_counter() - t0
    record = {**means, "lr": lr, "grad_norm": dist.as_local_scalar(grad_norm), "tokens": tokens,
              "positions": n_window, "tokens_per_s": tokens / elapsed, "positions_per_s": n_window / elapsed,
              "step_time_s": elapsed}
    if run.device.type == "cuda":  # this process's peak so far
        record["peak_mem_gib"] = torch.cuda.max_memory_allocated(run.device) / 2**30
    return record


@torch.no_grad()
def evaluate(student: torch.nn.Module, batches: list[ModelBatch], loss_cfg, device: torch.device,
             ctx: dist.DistContext | None = None) -> dict:
    """The peak metrics (:mod:`rlkd.core.metrics`, the same function as ``rlkd inspect --student``), the sparse
    forward KL with the configured tail as ``eval_kd``, CE as ``eval_ce`` and the rank loss as ``eval_rank``.

    ``student`` is a :class:`StudentWithHead` (wrapped or not). The KL here is always the forward sparse KL at
    temperature 1, whatever the training loss, so runs with different losses compare on one scale. Metrics whose k
    exceeds the cache's are left out. With several processes each evaluates its share of ``batches`` and the sums
    are added up.
    """
    if not batches:
        return {}
    ctx = ctx or dist.DistContext()
    peaks = PeakMetrics(batches[0].targets.k, tail=loss_cfg.tail)
    rank_loss = RankLoss(loss_cfg.rank_k, loss_cfg.rank_strength) if loss_cfg.rank_weight > 0 else None
    rank_sum = torch.zeros((), dtype=torch.float64)

    def eval_head(targets):
        def head(hidden, weight, bias):  # hidden (N, H); the LM head in chunks bounds the (chunk, V) logits
            nonlocal rank_sum
            for start in range(0, len(targets), loss_cfg.chunk_size):
                end = min(start + loss_cfg.chunk_size, len(targets))
                logits = torch.nn.functional.linear(hidden[start:end], weight, bias).float()  # (n, V)
                tgt = targets.slice(start, end)
                peaks.update(logits, tgt)
                if rank_loss is not None:
                    rank_sum += rank_loss(logits, tgt)[0].double().sum().cpu()
        return head

    was_training = student.training
    student.eval()
    for index, w in dist.rank_share(len(batches), ctx):
        mb = batches[index].to(device)
        with _autocast(device):
            # A padding pass (w == 0) only keeps the processes' collectives in step.
            student(mb, eval_head(mb.targets) if w else lambda hidden, weight, bias: None)
    student.train(was_training)
    rank_sum = dist.all_sum(rank_sum.to(device)).cpu()
    peaks.all_reduce(device)
    metrics = peaks.compute()
    result = {"eval_kd": metrics.pop("kd"), "eval_ce": metrics.pop("ce"),
              "eval_rank": float(rank_sum) / max(peaks.positions, 1)}
    result.update(metrics)
    return result


def run_eval(run: Run) -> dict:
    if run.eval_reader is None:
        return {}
    if run.eval_batches is None:  # read once, kept in memory
        run.eval_batches = load_eval_batches(run.eval_reader, batch_size=run.cfg.data.batch_size,
                                             eval_fraction=0.0 if run.cfg.data.eval_cache
                                             else run.cfg.data.eval_fraction,
                                             max_rows=run.cfg.data.eval_max_rows)
        if not run.eval_batches:
            _say(run, "warning: the eval set is empty (eval_fraction too small for this cache?); no evaluation")
        note = left_out_note(run.eval_reader.k)
        if note and run.eval_batches:
            _say(run, f"eval: {note}")  # once per run: the cache's k does not change
    if not run.eval_batches:
        return {}
    result = evaluate(run.student, run.eval_batches, run.cfg.loss, run.device, run.ctx)
    result = {"step": run.step, "split": "eval", **result}
    run.last_eval = result
    _log(run, result)
    shown = {k: result.get(k) for k in ("eval_kd", "eval_ce", "top1_agreement", "cr@1", "mor@5")}
    _say(run, f"eval step {run.step}: " + " ".join(f"{k} {v:.4f}" for k, v in shown.items() if v is not None))
    return result


def _save(run: Run) -> None:
    # Every process takes part (the state is gathered from the shards); rank 0 writes.
    reader = run.stream.reader.state_dict()
    cache = {"path": run.cfg.data.cache, "shards": reader["shards"], "rows": reader["total_rows"]}
    save_checkpoint(run.out, run.step, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
                    trainer_state={"data": run.stream.state_dict(), "config": run.cfg.to_dict(), "cache": cache},
                    keep_last=run.cfg.run.keep_last)
    dist.barrier()


def _log(run: Run, record: dict) -> None:
    for sink in run.sinks:
        sink.log(record)


def _say(run: Run, message: str) -> None:
    _say_rank0(run.ctx, message)


def _say_rank0(ctx: dist.DistContext, message: str) -> None:
    if ctx.rank == 0:
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)


# ---- cleanup ----------------------------------------------------------------------------------------------------

def save_final(run: Run) -> Path:
    """``OUT/final``: the student (safetensors) with its tokenizer, loadable by transformers and vLLM."""
    final = run.out / "final"
    state = dist.full_model_state(run.model)  # every process takes part; rank 0 gets the whole model
    if run.rank != 0:
        dist.barrier()
        return final
    tmp = run.out / "final.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    model = run.model
    if run.cfg.run.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    model.config.use_cache = True  # restore inference defaults in the saved config
    model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
    run.tokenizer.save_pretrained(str(tmp))
    (tmp / "rlkd_train.json").write_text(json.dumps(
        {"step": run.step, "config": run.cfg.to_dict(), "metrics": run.last_metrics, "eval": run.last_eval},
        indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    dist.barrier()
    return final


def cleanup(run: Run) -> None:
    for sink in run.sinks:
        sink.close()
    run.sinks = []
