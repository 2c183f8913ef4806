"""Every stage-1 mistake a new user made (issue #13) ends in one clear message: `rlkd cache-teacher` and `rlkd verify`
driven through the CLI, each case asserting the exit code, no traceback, and that the message names the file, row or
flag at fault (and, where it matters, that nothing was written or deleted).

The tiny teacher (tests/conftest.py) differs from the defaults on purpose: 512 positions (default --max-length is
1024) and a 512-token vocabulary.
"""

from __future__ import annotations

import errno
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from rlkd.cache import read_manifest
from rlkd.cache.manifest import TMP_SUFFIX
from rlkd.cli import main
from tests import tiny

N_ROWS = 12


def _rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def text(lo, hi):
        return " ".join(rng.choice(tiny._WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    return [{"instruction": text(3, 8), "context": "", "response": text(6, 20)} for _ in range(n)]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return _jsonl(tmp_path_factory.mktemp("data") / "dolly.jsonl", _rows(N_ROWS))


def _args(teacher, dataset, out, *extra) -> list[str]:
    return ["cache-teacher", "--teacher", str(teacher), "--dataset", str(dataset), "--out", str(out), "--engine", "hf",
            "--codec", "fp32", "--top-k", "4", "--row-group-rows", "2", "--shard-max-mb", "1", "--no-progress",
            *extra]


def _one_row_group_per_shard(mp: pytest.MonkeyPatch) -> None:
    """Rotate shards after every row group (two rows here), so a few rows make several shards."""
    import rlkd.cache.writer as writer_module

    real_init = writer_module.CacheWriter.__init__

    def small_shards(self, *a, **kw):
        kw["shard_max_bytes"] = 1
        real_init(self, *a, **kw)

    mp.setattr(writer_module.CacheWriter, "__init__", small_shards)


@pytest.fixture(scope="module")
def cache(tiny_teacher_dir, data, tmp_path_factory) -> Path:
    """A finished cache of ``data`` with several shards."""
    out = tmp_path_factory.mktemp("cache") / "c"
    mp = pytest.MonkeyPatch()
    _one_row_group_per_shard(mp)
    try:
        result = CliRunner().invoke(main, _args(tiny_teacher_dir, data, out))
    finally:
        mp.undo()
    assert result.exit_code == 0, result.output
    assert len(read_manifest(out)["shards"]) >= 3
    return out


@dataclass
class Case:
    """One mistake: ``setup(tmp_path, ctx)`` builds the inputs and returns the CLI arguments."""

    setup: Callable
    code: int
    names: tuple[str, ...]
    """Substrings the output must hold: the file, row or flag at fault, and what to do."""
    absent: tuple[str, ...] = ()
    check: Callable | None = None
    """``check(tmp_path, ctx)`` after the command: e.g. nothing was written, or the user's file is still there."""
    uses_cache: bool = False
    """The case damages a copy of the module's finished cache."""


def _nonutf8(tmp, ctx):
    rows = _rows(4)
    raw = b"".join(json.dumps(r).encode() + b"\n" for r in rows[:2])
    raw += b'{"instruction": "caf\xe9 au lait?", "context": "", "response": "Yes."}\n'
    raw += b"".join(json.dumps(r).encode() + b"\n" for r in rows[2:])
    (tmp / "latin1.jsonl").write_bytes(raw)
    return _args(ctx.teacher, tmp / "latin1.jsonl", tmp / "out")


def _no_tokenizer(tmp, ctx):
    teacher = tmp / "bare-teacher"
    teacher.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(ctx.teacher / name, teacher / name)
    return _args(teacher, ctx.data, tmp / "out")


def _out_is_file(tmp, ctx):
    (tmp / "results.txt").write_text("mine\n")
    return _args(ctx.teacher, ctx.data, tmp / "results.txt")


def _out_under_file(tmp, ctx):
    (tmp / "results.txt").write_text("mine\n")
    return _args(ctx.teacher, ctx.data, tmp / "results.txt" / "cache")


def _out_with_notes(tmp, ctx):
    (tmp / "out").mkdir()
    (tmp / "out" / "notes.tmp").write_text("notes\n")
    return _args(ctx.teacher, ctx.data, tmp / "out")


def _out_with_parquet(tmp, ctx):
    (tmp / "out").mkdir()
    pq.write_table(pa.table({"x": [1, 2]}), tmp / "out" / "mydata.parquet")
    return _args(ctx.teacher, ctx.data, tmp / "out")


def _untouched(*names):
    """Check: ``out`` holds exactly the user's files, nothing written into it, nothing deleted."""
    def check(tmp, ctx):
        assert sorted(p.name for p in (tmp / "out").iterdir()) == sorted(names)
    return check


def _empty(tmp, ctx):
    (tmp / "empty.jsonl").write_text("\n")
    return _args(ctx.teacher, tmp / "empty.jsonl", tmp / "out")


def _malformed(tmp, ctx):
    rows = _rows(6)
    text = "".join(json.dumps(r) + "\n" for r in rows[:4]) + '{"instruction": "x", "response": \n'
    text += "".join(json.dumps(r) + "\n" for r in rows[4:])
    (tmp / "broken.jsonl").write_text(text)
    return _args(ctx.teacher, tmp / "broken.jsonl", tmp / "out")


def _mixed(tmp, ctx):
    rows = [{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello there."}]}]
    _jsonl(tmp / "mixed.jsonl", rows + _rows(4))
    return _args(ctx.teacher, tmp / "mixed.jsonl", tmp / "out")


def _none_usable(tmp, ctx):
    _jsonl(tmp / "noresp.jsonl", [{"instruction": r["instruction"], "response": ""} for r in _rows(3)])
    return _args(ctx.teacher, tmp / "noresp.jsonl", tmp / "out")


def _top_k_zero(tmp, ctx):
    return _args(ctx.teacher, ctx.data, tmp / "out", "--top-k", "0")


def _top_k_above_vocab(tmp, ctx):
    return _args(ctx.teacher, ctx.data, tmp / "out", "--top-k", "600")


def _retry_with_valid_k_works(tmp, ctx):
    assert not (tmp / "out" / "manifest.json").exists()  # nothing written before the check
    result = CliRunner().invoke(main, _args(ctx.teacher, ctx.data, tmp / "out", "--top-k", "8"))
    assert result.exit_code == 0, result.output
    assert read_manifest(tmp / "out")["k"] == 8


def _max_length_above_limit(tmp, ctx):
    return _args(ctx.teacher, ctx.data, tmp / "out", "--max-length", "600")


def _disk_full(tmp, ctx):
    import rlkd.cache.writer as writer_module

    real, calls = writer_module.CacheWriter._flush_row_group, []

    def flush_until_full(self):
        calls.append(1)
        if len(calls) > 3:  # two shards finished, a third open (its temporary on disk): the disk fills up
            assert list(self.out_dir.glob("*.parquet" + TMP_SUFFIX))
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self)
        if len(calls) <= 2:
            self._finish_shard()

    ctx.monkeypatch.setattr(writer_module.CacheWriter, "_flush_row_group", flush_until_full)
    return _args(ctx.teacher, ctx.data, tmp / "out", "--batch-size", "2")


def _no_temporary_left(tmp, ctx):
    left = [p.name for p in (tmp / "out").iterdir() if "tmp" in p.name]
    assert left == [], left
    assert len(read_manifest(tmp / "out")["shards"]) == 2  # the finished shards are kept


def _copy_cache(tmp, ctx) -> Path:
    out = tmp / "out"
    shutil.copytree(ctx.cache, out)
    return out


def _verify_no_tokenizer(tmp, ctx):
    out = _copy_cache(tmp, ctx)
    m = read_manifest(out)
    del m["tokenizer"]
    (out / "manifest.json").write_text(json.dumps(m))
    return ["verify", "--deep", str(out)]


def _flipped_byte(tmp, ctx):
    out = _copy_cache(tmp, ctx)
    shard = out / read_manifest(out)["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    return _args(ctx.teacher, ctx.data, out)


def _missing_shard(tmp, ctx):
    out = _copy_cache(tmp, ctx)
    (out / read_manifest(out)["shards"][2]["file"]).unlink()
    return _args(ctx.teacher, ctx.data, out)


def _invalid_manifest(tmp, ctx):
    out = _copy_cache(tmp, ctx)
    text = (out / "manifest.json").read_text()
    (out / "manifest.json").write_text(text[: len(text) // 2])
    return _args(ctx.teacher, ctx.data, out)


CASES = {
    "non-utf8 jsonl": Case(_nonutf8, 1, ("latin1.jsonl", "line 3", "not UTF-8")),
    "teacher without tokenizer": Case(_no_tokenizer, 1, ("--teacher", "bare-teacher", "no tokenizer"),
                                      absent=("sentencepiece", "tiktoken")),
    "--out is a file": Case(_out_is_file, 1, ("--out", "results.txt", "is a file")),
    "--out cannot be created": Case(_out_under_file, 1, ("--out", "results.txt", "cannot be created")),
    "--out holds a user's *.tmp": Case(_out_with_notes, 1, ("--out", "not an rlkd cache", "notes.tmp"),
                                      check=_untouched("notes.tmp")),
    "--out holds a user's parquet": Case(_out_with_parquet, 1, ("--out", "not an rlkd cache", "mydata.parquet"),
                                         absent=("CacheCorruptError",),
                                         check=_untouched("mydata.parquet")),
    "empty jsonl": Case(_empty, 1, ("empty.jsonl", "is empty"), absent=("StopIteration",)),
    "malformed line mid-file": Case(_malformed, 1, ("broken.jsonl", "line 5", "not a JSON object"),
                                    absent=("hub", "network")),
    # A run that keeps some rows succeeds; the summary says why the others were dropped.
    "mixed schemas": Case(_mixed, 0, ("bad_value 4 (rows 1, 2, 3, 4)", "column 'messages' is null")),
    "no usable row": Case(_none_usable, 1, ("noresp.jsonl", "none of its rows", "empty_response 3",
                                            "every assistant turn is empty")),
    "--top-k 0": Case(_top_k_zero, 2, ("top_k", "got 0"), absent=("min_k",)),
    "--top-k above the vocabulary": Case(_top_k_above_vocab, 2, ("--top-k 600", "512 tokens"),
                                         check=_retry_with_valid_k_works),
    "--max-length above the position limit": Case(_max_length_above_limit, 2,
                                                  ("--max-length 600", "512 positions",
                                                   "largest --max-length is 512")),
    "disk full": Case(_disk_full, 1, ("disk full", "2 finished shard(s)", "open shard was dropped",
                                      "re-run the same command"),
                      check=_no_temporary_left),
    "verify --deep without tokenizer identity": Case(_verify_no_tokenizer, 1, ("no tokenizer identity",
                                                                               "train-student"),
                                                     absent=("OK",), uses_cache=True),
    "resume onto a flipped byte": Case(_flipped_byte, 1, ("sha256", "rlkd verify --repair", "shard-00001.parquet"),
                                       absent=("by hand", "remove its entry"), uses_cache=True),
    "resume onto a missing shard": Case(_missing_shard, 1, ("shard-00002.parquet", "missing",
                                                            "rlkd verify --repair"),
                                        absent=("by hand", "remove its entry"), uses_cache=True),
    "resume onto an invalid manifest": Case(_invalid_manifest, 1, ("manifest.json", "not valid JSON",
                                                                   "new folder"),
                                            absent=("by hand", "CacheCorruptError"), uses_cache=True),
}


@dataclass
class Ctx:
    teacher: Path
    data: Path
    cache: Path | None
    monkeypatch: pytest.MonkeyPatch


@pytest.mark.parametrize("name", list(CASES))
def test_stage1_mistake_gives_one_clear_message(name, tiny_teacher_dir, data, request, tmp_path, monkeypatch):
    case = CASES[name]
    ctx = Ctx(tiny_teacher_dir, data, request.getfixturevalue("cache") if case.uses_cache else None, monkeypatch)
    args = case.setup(tmp_path, ctx)
    result = CliRunner().invoke(main, args)
    out = result.output
    assert result.exit_code == case.code, out
    assert "Traceback" not in out and not (result.exception and not isinstance(result.exception, SystemExit)), (
        out, result.exception)
    for needle in case.names:
        assert needle in out, (needle, out)
    for needle in case.absent:
        assert needle not in out, (needle, out)
    if case.check is not None:
        monkeypatch.undo()
        case.check(tmp_path, ctx)
