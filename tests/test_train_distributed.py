"""Stage 2 with several processes: torchrun, gloo on CPU, 2 processes, FSDP2 and DDP.

The reference is always a plain single-process run of the same command with the same global batch: the loss
trajectory (and the evaluations) must match it within float tolerance, whether the run goes straight through, is
SIGKILLed and resumed with the same number of processes, or resumed with a different number.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlkd.trainer.distributed import DistContext, rank_share, strip_nproc
from tests.cache_from_model import write_cache_from_model

REPO = Path(__file__).resolve().parents[1]
TERMS = ("total", "kd", "rank", "ce", "grad_norm")
EVAL_TERMS = ("eval_kd", "eval_ce", "eval_rank", "top1_agreement", "cr@1", "mor@5")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, tiny_teacher_dir) -> Path:
    """64 rows of the tiny teacher's top-16 (fp32 codec), row groups of 8."""
    return write_cache_from_model(tiny_teacher_dir, tmp_path_factory.mktemp("distcache") / "cache", n_rows=64, k=16)


def _args(student, cache, out, **flags) -> list[str]:
    base = dict(student=student, cache=cache, out=out, device="cpu", batch_size=2, global_batch=8, lr=2e-3,
                schedule="constant", warmup_steps=1, eval_fraction=0.1, seed=7, keep_last=0)
    base.update(flags)
    args = ["--no-progress"]
    for key, value in base.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def _command(nproc: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "rlkd.cli", "train-student", *args] + (["--nproc", str(nproc)] if nproc > 1 else [])


def _env() -> dict:
    # One thread per process: two processes share this machine's cores, and runs stay comparable.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def train(nproc: int, args: list[str]) -> None:
    done = subprocess.run(_command(nproc, args), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in new sessions, so killpg would miss them)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def train_until_checkpoint_then_sigkill(nproc: int, args: list[str], checkpoint: Path) -> None:
    """Start a run that would go on for long, wait for ``checkpoint`` to be complete, then SIGKILL every process."""
    proc = subprocess.Popen(_command(nproc, args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while not (checkpoint / "trainer_state.json").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-4000:]
            assert time.time() < deadline, f"{checkpoint} never appeared"
            time.sleep(0.05)
        victims = [proc.pid, *_descendants(proc.pid)]
        assert len(victims) >= 1 + nproc, f"expected torchrun and {nproc} workers, found {victims}"
        for pid in victims:  # all at once, like a node going down
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)
        time.sleep(0.5)
        assert not [p for p in victims if Path(f"/proc/{p}").exists()
                    and "Z" not in Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


def metrics(out: Path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in lines if r.get("split") != "eval"], [r for r in lines if r.get("split") == "eval"]


def assert_same_trajectory(out: Path, reference: Path, steps: int, rel: float = 1e-4) -> None:
    (got, got_eval), (ref, ref_eval) = metrics(out), metrics(reference)
    assert [r["step"] for r in got] == list(range(1, steps + 1)), f"{out}: steps {[r['step'] for r in got]}"
    for a, b in zip(got, ref[:steps]):
        assert a["positions"] == b["positions"] and a["tokens"] == b["tokens"], f"step {a['step']}: other rows"
        for key in TERMS:
            assert a[key] == pytest.approx(b[key], rel=rel, abs=1e-6), f"step {a['step']} {key}: {a[key]} vs {b[key]}"
    ref_eval = [e for e in ref_eval if e["step"] <= steps]
    assert [e["step"] for e in got_eval] == [e["step"] for e in ref_eval]
    for a, b in zip(got_eval, ref_eval):
        for key in EVAL_TERMS:
            assert a[key] == pytest.approx(b[key], rel=rel, abs=1e-6), f"eval step {a['step']} {key}"


def assert_final_loads_and_matches(out: Path, reference: Path, atol: float) -> None:
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(str(out / "final"))
    b = AutoModelForCausalLM.from_pretrained(str(reference / "final"))
    ids = torch.arange(3, 40).view(1, -1)
    with torch.no_grad():
        la, lb = a(input_ids=ids).logits, b(input_ids=ids).logits
    assert torch.isfinite(la).all()
    assert (la - lb).abs().max() < atol, f"final logits differ by {(la - lb).abs().max():.2e}"


# ---- unit: who does what --------------------------------------------------------------------------------------

def test_rank_share_covers_every_item_once_with_equal_pass_counts():
    for n_items in range(0, 9):
        for world in (1, 2, 3):
            shares = [rank_share(n_items, DistContext(rank=r, world_size=world)) for r in range(world)]
            assert len({len(s) for s in shares}) == 1, "every rank makes the same number of passes"
            real = sorted(i for s in shares for i, w in s if w)
            assert real == list(range(n_items)), (n_items, world, shares)
            assert all(w in (0.0, 1.0) for s in shares for _, w in s)


def test_strip_nproc():
    assert strip_nproc(["train-student", "--nproc", "2", "--lr", "1"]) == ["train-student", "--lr", "1"]
    assert strip_nproc(["train-student", "--nproc=4", "--out", "x"]) == ["train-student", "--out", "x"]


# ---- end to end ------------------------------------------------------------------------------------------------

def test_fsdp2_two_processes_match_one_and_resume_after_sigkill_onto_any_n(cache_dir, tiny_student_dir, tmp_path):
    steps = 6
    common = dict(student=tiny_student_dir, cache=cache_dir, eval_every=3, save_every=2)
    single, killed, to_one, from_one = (tmp_path / n for n in ("single", "killed", "to-one", "from-one"))

    # the reference: one process, 4 micro-batches of 2 rows per step
    train(1, _args(out=single, max_steps=steps, **common))
    # two FSDP2 processes, 2 micro-batches each; killed (all processes, SIGKILL) after checkpoint 2 is complete
    train_until_checkpoint_then_sigkill(2, _args(out=killed, max_steps=1000, **common), killed / "checkpoint-2")
    assert not (killed / "final").exists()
    # resumed onto a different N: the 2-process checkpoint continued by one process ...
    train(1, _args(out=to_one, max_steps=steps, resume=killed / "checkpoint-2", **common))
    # ... and a 1-process checkpoint continued by two
    train(2, _args(out=from_one, max_steps=steps, resume=single / "checkpoint-4", **common))
    # ... and the killed run itself, resumed by two processes from where it stopped
    train(2, _args(out=killed, max_steps=steps, resume=killed / "checkpoint-2", **common))

    first = metrics(killed)[0][:2]
    ref = metrics(single)[0][:2]
    assert [r["total"] for r in first] == pytest.approx([r["total"] for r in ref], rel=1e-4)
    assert_same_trajectory(killed, single, steps)
    # to_one / from_one start at a checkpoint in a fresh OUT: they log only the steps they ran
    for out, start in ((to_one, 2), (from_one, 4)):
        got = metrics(out)[0]
        assert [r["step"] for r in got] == list(range(start + 1, steps + 1))
        for a, b in zip(got, metrics(single)[0][start:]):
            for key in TERMS:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), f"{out.name} step {a['step']} {key}"
    for out in (killed, to_one, from_one):
        assert_final_loads_and_matches(out, single, atol=1e-2)


def test_ddp_two_processes_match_one_over_an_epoch_with_a_short_last_step(cache_dir, tiny_student_dir, tmp_path):
    from rlkd.cache import CacheReader
    from rlkd.trainer.data import is_eval_row

    # Pick a global batch whose last step of the epoch holds an odd number of 2-row micro-batches, so one of the
    # two processes makes a padding pass there.
    rows = sum(1 for r in CacheReader(cache_dir).iter_rows() if not is_eval_row(r.row_id, 0.1) and r.loss_mask.any())
    micro = -(-rows // 2)
    global_batch = next(g for g in (4, 8, 12, 16, 20) if (micro % (g // 2)) % 2 == 1)
    common = dict(student=tiny_student_dir, cache=cache_dir, epochs=1, save_every=0, strategy="ddp",
                  global_batch=global_batch)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    train(1, _args(out=single, **common))
    train(2, _args(out=ddp, **common))
    ref = metrics(single)[0]
    assert len(ref) == -(-micro // (global_batch // 2))
    assert_same_trajectory(ddp, single, len(ref))
    assert_final_loads_and_matches(ddp, single, atol=1e-2)


def test_two_processes_resume_auto_falls_back_past_a_damaged_checkpoint(cache_dir, tiny_student_dir, tmp_path):
    """Rank 0 writes and verifies the checksums; on resume it verifies, falls back, says so once, and tells the
    other rank which checkpoint to load."""
    steps = 4
    common = dict(student=tiny_student_dir, cache=cache_dir, save_every=2, max_steps=steps, strategy="ddp")
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    train(2, _args(out=reference, **common))
    shutil.copytree(reference, resumed)
    optimizer = resumed / "checkpoint-4" / "optimizer.pt"
    data = bytearray(optimizer.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    optimizer.write_bytes(bytes(data))

    done = subprocess.run(_command(2, _args(out=resumed, resume="auto", **common)), env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert done.stderr.count("checkpoint-4 does not verify") == 1, done.stderr[-4000:]  # rank 0 only
    assert "resumed from" in done.stderr and "checkpoint-2 at step 2" in done.stderr
    assert_same_trajectory(resumed, reference, steps)
    assert_final_loads_and_matches(resumed, reference, atol=1e-4)
