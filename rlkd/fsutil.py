"""Small filesystem helpers shared by the cache writer and the model tools: hashes, timestamps, atomic folders.

A folder is written under a hidden temporary name beside its target and renamed into place when complete, so a crash
never leaves a half-written model (or cache part) where a later run would pick it up.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
from pathlib import Path


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in ``chunk``-byte blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second (manifests, markers)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_json(path: str | Path, data: dict) -> None:
    """Write ``data`` as indented, key-sorted JSON."""
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def pid_alive(pid: int) -> bool:
    """True if a process with this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- atomic folder writes ---------------------------------------------------------------------------------------

def _tmp_dir_for(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"


def _clean_stale_tmp(out_dir: Path) -> None:
    """Remove temp dirs of earlier runs that crashed (their process is gone)."""
    for tmp in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid == os.getpid() or not pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)


def prepare_atomic_dir(out_dir: Path, *, overwrite: bool, error: type[Exception] = FileExistsError) -> Path:
    """Create and return the temporary folder to build ``out_dir`` in; :func:`publish_atomic_dir` finishes it.

    Refuses (raising ``error``) an ``out_dir`` that exists and is not empty, unless ``overwrite``.
    """
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise error(f"{out_dir} already exists and is not empty: choose another --out or pass --overwrite")
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()  # an empty dir would block the final rename
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(out_dir)
    tmp = _tmp_dir_for(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish_atomic_dir(tmp: Path, out_dir: Path, *, overwrite: bool) -> None:
    """Rename the finished ``tmp`` into ``out_dir`` (replacing it when ``overwrite``)."""
    if out_dir.exists() and overwrite:
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out_dir)
