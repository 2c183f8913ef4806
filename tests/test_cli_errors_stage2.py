"""`rlkd train-student` user errors: one clear line naming the flag or file, exit code 1 or 2, no traceback, and
nothing written to --out.

Every case drives the real CLI (click's CliRunner) on tiny local fixtures: a 24-row k=8 cache (the trainer tests use
64 rows, k=16), a finished run with checkpoints, a finished run without any, and caches that cannot be trained on.
Before these were fixed, the cases hung forever (nothing to train with --max-steps), exited 0 (an untrained final
student, a silently replaced final/, a resume that trained another student), or ended in a traceback.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from rlkd.cache import CacheWriter, read_manifest
from tests import tiny
from tests.cache_from_model import teacher_rows, write_cache_from_model

K = 8
ROWS = 24


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_teacher_dir, tiny_tokenizer_dir) -> dict[str, Path]:
    """Caches, students and finished runs that the cases copy before they break them."""
    root = tmp_path_factory.mktemp("stage2-errors")
    w = {"root": root, "student": root / "student", "other_student": root / "other-student"}
    for name, seed in (("student", 1), ("other_student", 2)):  # same tokenizer, other weights
        tiny.make_llama(w[name], tiny_tokenizer_dir, hidden_size=64, num_layers=1, num_heads=2,
                        intermediate_size=128, seed=seed, init_std=0.02)
    w["cache"] = write_cache_from_model(tiny_teacher_dir, root / "cache", n_rows=ROWS, k=K, row_group_rows=4)
    w["other_cache"] = write_cache_from_model(tiny_teacher_dir, root / "other-cache", n_rows=ROWS, k=K, seed=9)
    w["empty_cache"] = write_cache_from_model(tiny_teacher_dir, root / "empty-cache", n_rows=0, k=K)

    # Same rows, no trained position: what a cache looks like when every response was cut off.
    manifest = read_manifest(w["cache"])
    meta = {key: manifest[key] for key in ("teacher", "tokenizer", "dataset", "config", "logprobs_mode",
                                           "temperature", "engine")}
    w["no_positions_cache"] = root / "no-positions-cache"
    with CacheWriter(w["no_positions_cache"], meta, k=K, codec="fp32", row_group_rows=4) as writer:
        for row in teacher_rows(tiny_teacher_dir, ROWS, k=K):
            row.loss_mask[:] = False
            writer.write(row)

    # A cache whose stage 1 stopped early: the writer leaves `complete: false` in the manifest.
    w["incomplete_cache"] = root / "incomplete-cache"
    shutil.copytree(w["cache"], w["incomplete_cache"])
    path = w["incomplete_cache"] / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "complete": False}))

    from rlkd.trainer import loop
    from rlkd.trainer.config import build_train_config

    for name, save_every in (("run_with_checkpoints", 1), ("run_without_checkpoints", 0)):
        w[name] = root / name
        loop.train_student(build_train_config({}, dict(
            student=str(w["student"]), cache=str(w["cache"]), out=str(w[name]), max_steps=2, batch_size=4,
            save_every=save_every, progress=False, device="cpu")))
    return w


def _zero(path: Path, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle: middle + n] = bytes(n)
    path.write_bytes(bytes(data))


def _strip_checksums(checkpoint: Path) -> None:
    """Make ``checkpoint`` look like one written before checksums existed."""
    state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text())
    for key in ("files", "state_sha256"):
        state.pop(key)
    state_file.write_text(json.dumps(state))


def _snapshot(folder: Path) -> dict[str, str] | None:
    if not folder.exists():
        return None
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# Each case: (prepare(world, out) -> extra CLI args, exit code, words the message must hold). `prepare` may fill
# `out` (a fresh path) with a copy of a finished run; the case then checks that --out was not touched.

def _fresh(*args):
    return lambda w, out: list(args)


def _copy_of(run: str, *args, breaks=None):
    def prepare(w, out):
        shutil.copytree(w[run], out)
        if breaks:
            breaks(out)
        return [str(a).replace("{out}", str(out)) for a in args]
    return prepare


def _cache(name: str, *args):
    return lambda w, out: ["--cache", str(w[name]), *args]


def _config_file(text: str):
    def prepare(w, out):
        path = out.parent / "train.yaml"
        path.write_text(text)
        return ["--config", str(path)]
    return prepare


def _out_is_a_file(w, out):
    out.write_text("not a folder\n")
    return []


def _damaged_student(w, out):
    student = out.parent / "damaged-student"
    shutil.copytree(w["student"], student)
    (student / "model.safetensors").write_bytes((student / "model.safetensors").read_bytes()[:100])
    return ["--student", str(student)]


CASES = {
    # non-finite numbers (they passed `lr <= 0`, then broke AdamW with a traceback, or trained on nan)
    "lr-nan": (_fresh("--lr", "nan"), 2, ["--lr", "finite", "nan"]),
    "lr-inf": (_fresh("--lr", "inf"), 2, ["--lr", "finite", "inf"]),
    "kd-weight-minus-inf": (_fresh("--kd-weight", "-inf"), 2, ["--kd-weight", "finite"]),
    "temperature-nan-in-yaml": (_config_file("loss: {temperature: .nan}\n"), 2, ["temperature", "finite"]),
    # nothing to train: hung forever with --max-steps, saved an untrained "final student" with --epochs 1
    "empty-cache-max-steps": (_cache("empty_cache"), 1, ["nothing to train", "holds no rows", "empty-cache"]),
    "empty-cache-epochs": (_cache("empty_cache", "--epochs", "1"), 1, ["nothing to train", "holds no rows"]),
    "all-rows-held-out-max-steps": (_fresh("--eval-fraction", "0.999"), 1,
                                    ["nothing to train", "--eval-fraction", f"all {ROWS} rows"]),
    "all-rows-held-out-epochs": (_fresh("--eval-fraction", "0.999", "--epochs", "1"), 1,
                                 ["nothing to train", "--eval-fraction"]),
    "no-trained-position": (_cache("no_positions_cache"), 1,
                            ["nothing to train", "no-positions-cache", "trained position", "loss_mask"]),
    "incomplete-cache": (_cache("incomplete_cache"), 1, ["incomplete-cache", "complete: false",
                                                         "--allow-incomplete"]),
    # --out already holds a run: final/ was silently replaced and metrics.jsonl appended to
    "second-run-without-checkpoints": (_copy_of("run_without_checkpoints"), 1,
                                       ["--out", "already holds a run", "final/", "metrics.jsonl"]),
    "resume-auto-without-checkpoints": (_copy_of("run_without_checkpoints", "--resume", "auto"), 1,
                                        ["--out", "--resume auto has nothing to continue from"]),
    "fresh-run-onto-checkpoints": (_copy_of("run_with_checkpoints"), 1, ["--out", "checkpoint-2", "--resume auto"]),
    "out-is-a-file": (_out_is_a_file, 1, ["--out", "is a file"]),
    # resuming onto something else: a traceback after rewriting train_config.yaml, or training the wrong student
    "resume-onto-other-cache": (_copy_of("run_with_checkpoints", "--resume", "auto", "--cache", "OTHER_CACHE"), 1,
                                ["--cache", "other-cache", "checkpoint-2"]),
    "resume-with-other-student": (_copy_of("run_with_checkpoints", "--resume", "auto", "--student",
                                           "OTHER_STUDENT"), 1, ["--student", "other-student", "checkpoint-2"]),
    "resume-with-other-seed": (_copy_of("run_with_checkpoints", "--resume", "auto", "--seed", "3"), 1,
                               ["--seed 0", "checkpoint-2"]),
    # damaged checkpoints
    "truncated-trainer-state": (_copy_of("run_with_checkpoints", "--resume", "auto", breaks=lambda out: (
        shutil.rmtree(out / "checkpoint-1"),
        (out / "checkpoint-2" / "trainer_state.json").write_text('{"data": {"epo'))), 1,
        ["checkpoint-2/trainer_state.json", "not valid JSON"]),
    "damaged-explicit-resume": (_copy_of("run_with_checkpoints", "--resume", "{out}/checkpoint-2", breaks=lambda out:
                                         _zero(out / "checkpoint-2" / "model" / "model.safetensors")), 1,
                                ["--resume", "checkpoint-2/model/model.safetensors", "damaged"]),
    "damaged-weights-without-checksums": (_copy_of("run_with_checkpoints", "--resume", "auto", breaks=lambda out: (
        shutil.rmtree(out / "checkpoint-1"), _strip_checksums(out / "checkpoint-2"),
        (out / "checkpoint-2" / "model" / "model.safetensors").write_bytes(b"\0" * 100))), 1,
        ["checkpoint-2/model", "cannot load the model weights"]),
    "damaged-optimizer-without-checksums": (_copy_of("run_with_checkpoints", "--resume", "auto", breaks=lambda out: (
        shutil.rmtree(out / "checkpoint-1"), _strip_checksums(out / "checkpoint-2"),
        (out / "checkpoint-2" / "optimizer.pt").write_bytes(b"PK\3\4" + b"\0" * 60))), 1,
        ["checkpoint-2/optimizer.pt", "cannot be read"]),
    "damaged-student": (_damaged_student, 1, ["--student", "damaged-student", "cannot load"]),
}


@pytest.mark.timeout(300)  # the nothing-to-train cases used to loop forever
@pytest.mark.parametrize("case", list(CASES))
def test_train_student_user_errors(case, world, tmp_path):
    from click.testing import CliRunner

    from rlkd.cli import main

    prepare, code, words = CASES[case]
    out = tmp_path / "out"
    args = ["--student", str(world["student"]), "--cache", str(world["cache"]), "--out", str(out),
            "--max-steps", "3", "--batch-size", "4", "--save-every", "1", "--device", "cpu", "--no-progress"]
    extra = [{"OTHER_CACHE": str(world["other_cache"]), "OTHER_STUDENT": str(world["other_student"])}.get(a, a)
             for a in prepare(world, out)]
    if "--epochs" in extra:
        i = args.index("--max-steps")
        del args[i: i + 2]
    before = _snapshot(out)

    result = CliRunner().invoke(main, ["train-student", *args, *extra])

    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    message = result.output.strip().splitlines()
    assert any(line.startswith("Error:") for line in message), result.output
    for word in words:
        assert word in result.output, f"{word!r} not in: {result.output}"
    assert _snapshot(out) == before, "a refused run changed --out"
