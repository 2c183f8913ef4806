"""Checkpoints: ``OUT/checkpoint-{step}/`` holds everything needed to continue bit-identically.

Layout::

    checkpoint-{step}/
      model/              save_pretrained (safetensors) + config.json: the whole model
      optimizer.pt        the whole optimizer state, keyed by parameter name
                          (``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict``)
      scheduler.pt        scheduler.state_dict()
      rng.pt              torch / cuda / numpy / python RNG states (tensors, ints and tuples only)
      trainer_state.json  step, data stream state (incl. the reader's state_dict), config, and the size and sha256
                          of every other file (``files``) plus a checksum of itself (``state_sha256``); written LAST

A checkpoint is written to ``checkpoint-{step}.tmp/`` and renamed into place only when complete, so a SIGKILL during
a save leaves the previous checkpoint intact and a stray ``.tmp`` folder that :func:`latest_checkpoint` ignores
(and the next save removes). Every ``.pt`` file holds only tensors and plain containers and is read with
``torch.load(weights_only=True)``.

Integrity: the writer hashes every file it wrote (after an fsync) into ``trainer_state.json``; after the rename the
checkpoint is read back and verified (:func:`verify_checkpoint`), and only then are older checkpoints pruned to
``keep_last``, so a checkpoint is never deleted before a newer one is known to be good. A resume verifies again
(:func:`choose_checkpoint`): ``--resume auto`` falls back to the newest checkpoint that verifies and says which ones
did not; an explicit ``--resume PATH`` that does not verify is refused. A save reads the checkpoint back twice (to
hash it, then to verify it) and a resume once: for a 1B student that is 16 GB of fp32 weights and AdamW state read
at sha256 speed.

A distributed run (FSDP2 or DDP) gathers the full model and optimizer state to rank 0, which writes this same
layout; so any checkpoint resumes with any number of processes, one included (see :mod:`rlkd.trainer.distributed`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rlkd.cache.manifest import fsync_dir
from rlkd.errors import UserError
from rlkd.trainer.distributed import full_model_state, full_optimizer_state, load_full_optimizer_state

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_REQUIRED = ("step", "data")
"""Keys every trainer state holds (checked on load, so a damaged legacy state names what it lacks)."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be written or resumed from (damaged, incomplete, or none verifies); names the file."""


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


# ---- checksums --------------------------------------------------------------------------------------------------

def _sha256(path: Path, *, sync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if sync:  # the writer's pass: make the bytes durable before recording what they are
            os.fsync(f.fileno())
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def file_digests(folder: Path, *, sync: bool = False) -> dict[str, dict]:
    """``{relative path: {"bytes", "sha256"}}`` for every file under ``folder`` except the state file."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel != STATE_FILE:
            out[rel] = {"bytes": p.stat().st_size, "sha256": _sha256(p, sync=sync)}
    return out


def _state_digest(state: dict) -> str:
    """The state's checksum of itself: sha256 of its canonical JSON without the ``state_sha256`` key."""
    body = {k: v for k, v in state.items() if k != "state_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=False).encode()).hexdigest()


@dataclass
class Verified:
    """What :func:`verify_checkpoint` found."""

    path: Path
    state: dict | None = None
    """The parsed trainer state (None when it is unreadable)."""
    problems: list[str] = field(default_factory=list)
    """Empty when the checkpoint can be resumed from; each problem names the file at fault."""
    checked: bool = True
    """False for a checkpoint without checksums (written before they existed): readable, not verified."""


def read_state(path: str | Path) -> dict:
    """The trainer state of checkpoint ``path``, parsed; :class:`CheckpointError` naming the file otherwise."""
    file = Path(path) / STATE_FILE
    try:
        state = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file} not found: {path} is not a complete checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON (truncated or damaged: {e})") from None
    missing = [k for k in _REQUIRED if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{file} lacks {', '.join(missing)}: it is damaged or not an rlkd trainer state")
    if not isinstance(state["step"], int) or state["step"] < 0:
        raise CheckpointError(f"{file}: step {state['step']!r} is not a step number: the file is damaged")
    return state


def verify_checkpoint(path: str | Path) -> Verified:
    """Check checkpoint ``path`` against the checksums in its state file: every file present, same size, same
    sha256, and the state file itself intact."""
    path = Path(path)
    found = Verified(path)
    try:
        found.state = read_state(path)
    except CheckpointError as e:
        found.problems.append(str(e))
        return found
    state, file = found.state, path / STATE_FILE
    if "files" not in state and "state_sha256" not in state:
        found.checked = False  # a checkpoint from before checksums: nothing to compare against
        return found
    if state.get("state_sha256") != _state_digest(state) or not isinstance(state.get("files"), dict):
        found.problems.append(f"{file} does not match its own checksum (edited or damaged)")
        return found
    for rel, want in state["files"].items():
        p = path / rel
        if not p.is_file():
            found.problems.append(f"{p} is missing")
        elif p.stat().st_size != want["bytes"]:
            found.problems.append(f"{p} has {p.stat().st_size} bytes, {want['bytes']} were written")
        elif _sha256(p) != want["sha256"]:
            found.problems.append(f"{p} is damaged: its sha256 differs from the one recorded when it was written")
    return found


# ---- choosing the checkpoint to resume from ---------------------------------------------------------------------

def choose_checkpoint(resume: str | None, out_dir: str | Path,
                      say: Callable[[str], None] = print) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume from and its trainer state, verified; ``(None, None)`` for a fresh start.

    ``auto``: the newest checkpoint in ``out_dir`` that verifies (none there: a fresh start). Newer ones that do not
    verify are named through ``say`` and left in place. A path: that checkpoint, which must verify. Raises
    :class:`CheckpointError` naming every damaged file when nothing usable is left.
    """
    if not resume:
        return None, None
    if resume != "auto":
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise CheckpointError(f"--resume {resume}: {path / STATE_FILE} not found; give a complete "
                                  "checkpoint-STEP folder or --resume auto")
        found = verify_checkpoint(path)
        if found.problems:
            raise CheckpointError(f"--resume {resume}: the checkpoint is damaged: {'; '.join(found.problems)}. "
                                  "Resume from an older checkpoint (--resume auto picks the newest that verifies)")
        _say_unchecked(found, say)
        return path, found.state
    damaged: list[Verified] = []
    for _, path in reversed(list_checkpoints(out_dir)):
        found = verify_checkpoint(path)
        if found.problems:
            damaged.append(found)
            continue
        if damaged:
            say(f"warning: {_describe(damaged)}; resuming from {path.name}, the newest checkpoint that verifies. "
                f"Nothing was deleted (a save at the same step replaces "
                f"{', '.join(v.path.name for v in damaged)})")
        _say_unchecked(found, say)
        return path, found.state
    if damaged:
        raise CheckpointError(f"--resume auto: no checkpoint in {out_dir} verifies: {_describe(damaged)}. Start "
                              f"fresh with another --out (or delete {out_dir})")
    return None, None


def _describe(damaged: list[Verified]) -> str:
    return "; ".join(f"{v.path.name} does not verify ({'; '.join(v.problems)})" for v in damaged)


def _say_unchecked(found: Verified, say: Callable[[str], None]) -> None:
    if not found.checked:
        say(f"warning: {found.path} has no checksums (written by an older rlkd): resuming from it unverified")


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
    state = dict(trainer_state, step=step, files=file_digests(tmp, sync=True))
    state["state_sha256"] = _state_digest(state)
    with open(tmp / STATE_FILE, "w") as f:  # last: its presence marks a complete checkpoint
        json.dump(state, f, indent=1, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # re-saving the same step (e.g. after a resume that redid it)
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    problems = verify_checkpoint(final).problems  # read back what was written, before anything older goes
    if problems:
        raise CheckpointError(f"{final} was written but does not read back as written ({'; '.join(problems)}); "
                              "no older checkpoint was pruned. Check the disk, then --resume auto")
    if keep_last > 0:
        # Checkpoints newer than this one are left over from a timeline that did not verify on resume: they
        # neither count towards keep_last nor are deleted here.
        older = [p for s, p in list_checkpoints(out_dir) if s <= step]
        for old in older[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, *, model, optimizer, scheduler) -> dict:
    """Restore optimizer, scheduler and RNG states from ``path``; return its trainer state (step, data, config).

    The model weights are loaded by the caller from ``path/model`` (with ``from_pretrained``) before the model is
    wrapped and the optimizer built, so the optimizer's parameters are the restored ones. Every process loads the
    whole optimizer state and keeps its shard of it.
    """
    path = Path(path)
    _restore(path / "optimizer.pt", lambda state: load_full_optimizer_state(model, optimizer, state))
    _restore(path / "scheduler.pt", scheduler.load_state_dict)
    _restore(path / "rng.pt", set_rng_state)
    return read_state(path)


def _load(file: Path):
    try:
        return torch.load(file, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file; name the file instead
        raise CheckpointError(f"{file} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}): the "
                              "checkpoint is damaged; resume from an older one") from None


def _restore(file: Path, apply: Callable[[object], None]) -> None:
    state = _load(file)
    try:
        apply(state)
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:
        raise CheckpointError(f"{file} does not hold what this run expects ({type(e).__name__}: {e}); the "
                              "checkpoint is damaged or from another kind of run") from None
