"""Checkpoints: ``OUT/checkpoint-{step}/`` holds everything needed to continue bit-identically.

Layout::

    checkpoint-{step}/
      model/              save_pretrained (safetensors) + config.json: the whole model
      optimizer.pt        the whole optimizer state, keyed by parameter name
                          (``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict``)
      scheduler.pt        scheduler.state_dict()
      rng.pt              torch / cuda / numpy / python RNG states (tensors, ints and tuples only)
      trainer_state.json  step, data stream state (incl. the reader's state_dict), config; written LAST

A checkpoint is written to ``checkpoint-{step}.tmp/`` and renamed into place only when complete, so a SIGKILL during
a save leaves the previous checkpoint intact and a stray ``.tmp`` folder that :func:`latest_checkpoint` ignores
(and the next save removes). Every ``.pt`` file holds only tensors and plain containers and is read with
``torch.load(weights_only=True)``.

A distributed run (FSDP2 or DDP) gathers the full model and optimizer state to rank 0, which writes this same
layout; so any checkpoint resumes with any number of processes, one included (see :mod:`rlkd.trainer.distributed`).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from rlkd.cache.manifest import fsync_dir
from rlkd.trainer.distributed import full_model_state, full_optimizer_state, load_full_optimizer_state

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dir(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / f"checkpoint-{step}"


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``out_dir`` as (step, path), oldest first. Incomplete (``.tmp``) ones are skipped."""
    out = []
    if not Path(out_dir).is_dir():
        return out
    for p in Path(out_dir).iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def resolve_resume(resume: str | None, out_dir: str | Path) -> Path | None:
    """``auto`` -> the latest complete checkpoint in ``out_dir`` (None when there is none: a fresh start);
    a path -> that checkpoint, checked; None -> None."""
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(out_dir)
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"--resume {resume}: {path / STATE_FILE} not found; give a complete checkpoint-STEP folder "
            "or --resume auto")
    return path


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        # numpy's MT19937 state as tensors/ints so weights_only loading accepts it
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(out_dir: str | Path, step: int, *, model, optimizer, scheduler, trainer_state: dict,
                    keep_last: int = 0) -> Path:
    """Write ``checkpoint-{step}`` atomically (tmp folder + rename), then prune to the newest ``keep_last``.

    ``model`` is the HF model (sharded or not). In a distributed run every process must call this (the state is
    gathered from the shards); only rank 0 writes.
    """
    model_state = full_model_state(model)
    optimizer_state = full_optimizer_state(model, optimizer)
    final = checkpoint_dir(out_dir, step)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return final
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a run killed mid-save
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp / "model"), state_dict=model_state, safe_serialization=True)
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    state = dict(trainer_state, step=step)
    with open(tmp / STATE_FILE, "w") as f:  # last: its presence marks a complete checkpoint
        json.dump(state, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # re-saving the same step (e.g. after a resume that redid it)
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if keep_last > 0:
        for _, old in list_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, *, model, optimizer, scheduler) -> dict:
    """Restore optimizer, scheduler and RNG states from ``path``; return its trainer state (step, data, config).

    The model weights are loaded by the caller from ``path/model`` (with ``from_pretrained``) before the model is
    wrapped and the optimizer built, so the optimizer's parameters are the restored ones. Every process loads the
    whole optimizer state and keeps its shard of it.
    """
    path = Path(path)
    load_full_optimizer_state(model, optimizer, torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return json.loads((path / STATE_FILE).read_text())
