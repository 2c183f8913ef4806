"""Stage 2 end to end on tiny models: config, data stream, training, logging, eval split, resume, refusals, CLI.

References are independent of the trainer: logged losses are recomputed with a plain transformers forward (full
logits, no chunking) and :class:`DistillLoss`; resume is compared against an uninterrupted run bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from rlkd.cache import CacheReader, TokenizerMismatchError
from rlkd.config import ConfigError
from rlkd.trainer import checkpoint, loop
from rlkd.trainer.checkpoint import CheckpointError, choose_checkpoint, latest_checkpoint, list_checkpoints, \
    save_checkpoint, verify_checkpoint
from rlkd.trainer.config import SECTIONS, build_train_config
from rlkd.core.targets import TeacherTargets
from rlkd.trainer.data import NothingToTrainError, TrainStream, count_trainable_rows, is_eval_row, load_eval_batches
from rlkd.trainer.losses import DistillLoss
from tests import tiny
from tests.cache_from_model import write_cache_from_model

REPO = Path(__file__).resolve().parents[1]
CACHE_K = 16


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, tiny_teacher_dir) -> Path:
    """64 rows of the tiny teacher's top-16 (fp32 codec), row groups of 8."""
    return write_cache_from_model(tiny_teacher_dir, tmp_path_factory.mktemp("s2cache") / "cache", n_rows=64,
                                  k=CACHE_K)


def make_cfg(student, cache, out, **kw):
    flags = dict(student=str(student), cache=str(cache), out=str(out), progress=False, device="cpu")
    flags.update(kw)
    return build_train_config({}, flags)


def read_metrics(out: Path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in lines if r.get("split") != "eval"], [r for r in lines if r.get("split") == "eval"]


def state_of(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


# ---- config -----------------------------------------------------------------------------------------------------

def test_config_reports_every_problem_together():
    with pytest.raises(ConfigError) as e:
        build_train_config({"loss": {"rank_k": "five"}, "bogus": 1},
                           dict(student="s", cache="c", out="o", max_steps=10, epochs=2, eval_cache="e",
                                eval_fraction=0.1, batch_size=0))
    msg = str(e.value)
    for expected in ("rank_k (--rank-k): expected int", "unknown option 'bogus'", "batch_size must be >= 1"):
        assert expected in msg
    # contradictory flags are named together in one line
    assert any("max_steps" in p and "epochs" in p for p in e.value.problems)
    assert any("eval_cache" in p and "eval_fraction" in p for p in e.value.problems)
    with pytest.raises(ConfigError, match="eval_every .* needs an eval set"):
        build_train_config({}, dict(student="s", cache="c", out="o", max_steps=10, eval_every=5))
    with pytest.raises(ConfigError, match="no loss term is active"):
        build_train_config({}, dict(student="s", cache="c", out="o", max_steps=10, kd="none", rank_weight=0))


def test_config_grouped_and_flat_yaml_agree_and_round_trip():
    names = [f.name for cls in SECTIONS.values() for f in __import__("dataclasses").fields(cls)]
    assert len(names) == len(set(names)), "field names must be unique across sections (flat keys route by name)"
    flat = build_train_config({"student": "s", "cache": "c", "out": "o", "lr": 3e-4, "rank_k": 7, "max_steps": 9})
    grouped = build_train_config({"run": {"student": "s", "out": "o"}, "data": {"cache": "c"},
                                  "optim": {"lr": 3e-4, "max_steps": 9}, "loss": {"rank_k": 7}})
    assert flat == grouped
    assert build_train_config(yaml.safe_load(yaml.safe_dump(flat.to_dict()))) == flat
    flag_wins = build_train_config({"lr": 1.0, "student": "s", "cache": "c", "out": "o", "max_steps": 9}, {"lr": 2.0})
    assert flag_wins.optim.lr == 2.0
    with pytest.raises(ConfigError, match="belongs in optim"):
        build_train_config({"loss": {"lr": 1.0}, "student": "s", "cache": "c", "out": "o", "max_steps": 9})


# ---- data -------------------------------------------------------------------------------------------------------

def test_train_stream_resumes_exactly_and_never_yields_eval_rows(cache_dir):
    kw = dict(batch_size=3, eval_fraction=0.2, group_by_length=True, length_group=3, seed=5, epochs=2)

    def stream():
        return TrainStream(CacheReader(cache_dir, batch_size=3, seed=5, shuffle_buffer=16), **kw)

    full = [b.row_ids for b in stream()]
    all_ids = [r.row_id for r in CacheReader(cache_dir).iter_rows()]
    held_out = {i for i in all_ids if is_eval_row(i, 0.2)}
    assert 0 < len(held_out) < len(all_ids)
    # each of the 2 epochs trains on every non-eval row exactly once
    flat = [i for b in full for i in b]
    assert sorted(flat) == sorted([i for i in all_ids if i not in held_out] * 2)
    # group by length: rows within a batch come from one pool sorted by length, so padding is small
    for cut in (1, 4, 7, len(full) // 2 + 1, len(full) - 1):
        s = stream()
        it = iter(s)
        for _ in range(cut):
            next(it)
        state = json.loads(json.dumps(s.state_dict()))  # must be JSON-safe
        resumed = stream()
        resumed.load_state_dict(state)
        assert [b.row_ids for b in resumed] == full[cut:], f"resume after batch {cut} diverged"


def test_eval_batches_hold_exactly_the_held_out_rows(cache_dir):
    reader = CacheReader(cache_dir, batch_size=4, shuffle=False)
    batches = load_eval_batches(reader, batch_size=4, eval_fraction=0.25, max_rows=1000)
    got = sorted(i for b in batches for i in b.row_ids)
    expected = sorted(r.row_id for r in CacheReader(cache_dir).iter_rows() if is_eval_row(r.row_id, 0.25))
    assert got == expected and len(got) > 0


# ---- training ---------------------------------------------------------------------------------------------------

def test_loss_falls_eval_is_held_out_and_final_loads(cache_dir, tiny_student_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trained_rows: set[str] = set()
    real_step = loop.train_step

    def spy(run, window):
        for b in window:
            trained_rows.update(b.row_ids)
        return real_step(run, window)

    monkeypatch.setattr(loop, "train_step", spy)
    out = tmp_path / "run"
    cfg = make_cfg(tiny_student_dir, cache_dir, out, max_steps=30, batch_size=4, lr=3e-3, warmup_steps=2,
                   eval_fraction=0.25, eval_every=15, save_every=10, keep_last=2)
    summary = loop.train_student(cfg)

    steps, evals = read_metrics(out)
    assert [r["step"] for r in steps] == list(range(1, 31))
    for r in steps:
        for key in ("total", "kd", "rank", "ce", "lr", "grad_norm", "tokens_per_s", "step"):
            assert isinstance(r[key], (int, float)), key
    first = sum(r["total"] for r in steps[:5]) / 5
    last = sum(r["total"] for r in steps[-5:]) / 5
    assert last < first - 0.2, (first, last)

    # evaluation: at steps 15 and 30, every metric present, only held-out rows, none of them trained on
    assert [e["step"] for e in evals] == [15, 30]
    for key in ("eval_kd", "eval_ce", "top1_agreement", "cr@1", "cr@2", "cr@5", "set@5", "set@10", "mor@5", "mor@10"):
        assert isinstance(evals[-1][key], float), key
    all_ids = [r.row_id for r in CacheReader(cache_dir).iter_rows()]
    eval_ids = {i for i in all_ids if is_eval_row(i, 0.25)}
    assert eval_ids and not (eval_ids & trained_rows)
    assert trained_rows == set(all_ids) - eval_ids  # 30 steps x 4 rows > one epoch of the 48 training rows

    # the final folder loads with transformers, holds the trained weights and the student's tokenizer
    final = Path(summary["final"])
    model = AutoModelForCausalLM.from_pretrained(str(final)).eval()
    assert AutoTokenizer.from_pretrained(str(final)).get_vocab() == \
        AutoTokenizer.from_pretrained(str(tiny_student_dir)).get_vocab()
    ckpt = state_of(out / "checkpoint-30" / "model")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in ckpt.items())
    assert [s for s, _ in list_checkpoints(out)] == [20, 30]  # keep_last=2
    assert yaml.safe_load((out / "train_config.yaml").read_text()) == cfg.to_dict()

    # the last eval equals an independent dense computation with the final model
    reader = CacheReader(cache_dir, batch_size=4, shuffle=False)
    eval_cfg = __import__("dataclasses").replace(cfg.loss, rank_weight=0.0)
    kd_sum, top1_hits, n = 0.0, 0, 0
    with torch.no_grad():
        for b in load_eval_batches(reader, batch_size=4, eval_fraction=0.25, max_rows=10**6):
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
            mask = b.target_mask
            targets = b.targets
            kd_sum += float(DistillLoss(eval_cfg)(logits[mask], targets)["kd"].double().sum())
            top1_hits += int((logits[mask].argmax(-1) == targets.topk_ids[:, 0]).sum())
            n += int(mask.sum())
    assert evals[-1]["eval_kd"] == pytest.approx(kd_sum / n, rel=1e-5)
    assert evals[-1]["top1_agreement"] == pytest.approx(top1_hits / n)


def test_logged_loss_and_grad_norm_equal_independent_recompute_under_accumulation(
        cache_dir, tiny_student_dir, tmp_path, monkeypatch):
    """One step of 3 micro-batches of 2 rows: the logged means are over the 6 rows' positions together."""
    from transformers import AutoModelForCausalLM

    windows = []
    real_step = loop.train_step
    monkeypatch.setattr(loop, "train_step", lambda run, w: (windows.append(w), real_step(run, w))[1])
    out = tmp_path / "accum"
    cfg = make_cfg(tiny_student_dir, cache_dir, out, max_steps=1, batch_size=2, grad_accum=3, lr=1e-3,
                   save_every=0, ce_weight=0.5)
    loop.train_student(cfg)
    (logged,), _ = read_metrics(out)
    (window,) = windows
    assert len(window) == 3

    model = AutoModelForCausalLM.from_pretrained(str(tiny_student_dir), dtype=torch.float32)
    logits, targets = [], []
    for b in window:  # plain forward: full (B, T, V) logits, no chunking, no accumulation
        z = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        logits.append(z[b.target_mask])
        targets.append(b.targets)
    cat = TeacherTargets(*(torch.cat([getattr(t, f) for t in targets]) for f in
                           ("topk_ids", "topk_logprobs", "topk_valid", "tail_logmass", "target_ids")))
    terms = DistillLoss(cfg.loss)(torch.cat(logits), cat)
    means = {k: v.mean() for k, v in terms.items()}
    means["total"].backward()
    means = {k: float(v.detach()) for k, v in means.items()}
    grad_norm = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters() if p.grad is not None))
    for key in ("total", "kd", "rank", "ce"):
        assert logged[key] == pytest.approx(means[key], rel=1e-5, abs=1e-6), key
    assert logged["grad_norm"] == pytest.approx(float(grad_norm), rel=1e-4)
    assert logged["positions"] == len(cat) and logged["lr"] == pytest.approx(1e-3)

    # the same 6 rows as one micro-batch give the same update: normalisation is over the window, not per batch
    out6 = tmp_path / "one-batch"
    loop.train_student(make_cfg(tiny_student_dir, cache_dir, out6, max_steps=1, batch_size=6, grad_accum=1,
                                lr=1e-3, save_every=0, ce_weight=0.5))
    (single,), _ = read_metrics(out6)
    # (weights are not compared: Adam's first step is ~lr * sign(g), so float noise in near-zero gradients flips it)
    for key in ("total", "kd", "rank", "ce", "grad_norm"):
        assert single[key] == pytest.approx(logged[key], rel=1e-5), key


_TRAIN_SCRIPT = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {repo!r})
    from rlkd.trainer import loop
    from rlkd.trainer.config import build_train_config
    if {kill_after_save}:
        real_save = loop._save
        def save_then_wait(run):
            real_save(run)
            open(os.path.join({out!r}, "saved-%d" % run.step), "w").close()
            time.sleep(600)  # the parent SIGKILLs us here, right after checkpoint N
        loop._save = save_then_wait
    loop.train_student(build_train_config({{}}, {flags!r}))
""")


def _train_in_child(flags: dict, out: Path, *, kill_after_step: int | None = None) -> None:
    """Train in a fresh process with one thread, so every run of this test reduces floats in the same order.

    (The pytest process may hold vLLM's CPU thread binding, which fixes its own torch thread count; bit-identical
    weights need identical thread counts, not just identical data.)
    """
    script = _TRAIN_SCRIPT.format(repo=str(REPO), out=str(out), flags=flags,
                                  kill_after_save=kill_after_step is not None)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if kill_after_step is None:
        done = subprocess.run([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, timeout=300)
        assert done.returncode == 0, done.stderr.decode()[-3000:]
        return
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 180
        while not (out / f"saved-{kill_after_step}").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "the child never wrote checkpoint N"
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


def test_resume_after_sigkill_is_bit_identical(cache_dir, tiny_student_dir, tmp_path):
    n = 3
    flags = dict(max_steps=2 * n, save_every=n, batch_size=2, grad_accum=2, lr=2e-3, group_by_length=True,
                 length_group=3, eval_fraction=0.1, warmup_steps=1, seed=7)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    killed.mkdir()

    def child_flags(out: Path, **extra) -> dict:
        return dict(student=str(tiny_student_dir), cache=str(cache_dir), out=str(out), progress=False,
                    device="cpu", **flags, **extra)

    _train_in_child(child_flags(straight), straight)
    _train_in_child(child_flags(killed), killed, kill_after_step=n)
    assert latest_checkpoint(killed).name == f"checkpoint-{n}"
    assert not (killed / "final").exists()
    # a save killed half-way leaves only a .tmp folder, which resume ignores
    (killed / f"checkpoint-{2 * n}.tmp" / "model").mkdir(parents=True)

    _train_in_child(child_flags(killed, resume="auto"), killed)
    a, b = state_of(straight / "final"), state_of(killed / "final")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"
    # the metrics of the resumed run continue the killed one's, and equal the straight run's
    timing = ("tokens_per_s", "positions_per_s", "step_time_s")
    def untimed(out):
        return [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(out)[0]]
    assert untimed(killed) == untimed(straight)
    assert [r["step"] for r in untimed(killed)] == list(range(1, 2 * n + 1))


def test_checkpoints_are_atomic_and_pruned(tmp_path, tiny_student_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_student_dir))
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model=model, optimizer=opt, scheduler=sched, trainer_state={"data": {}},
                        keep_last=2)
    (tmp_path / "checkpoint-9.tmp").mkdir()  # killed mid-save
    (tmp_path / "checkpoint-8").mkdir()  # no trainer_state.json: incomplete
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    assert latest_checkpoint(tmp_path).name == "checkpoint-3"


def _zero_64_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2  # inside the tensors, past the zip headers
    data[middle: middle + 64] = bytes(64)
    path.write_bytes(bytes(data))


def test_resume_falls_back_past_a_damaged_checkpoint_and_matches_an_uninterrupted_run(
        cache_dir, tiny_student_dir, tmp_path, capsys):
    """Zeroed bytes in the newest checkpoint's optimizer.pt used to resume silently into other weights, and
    --keep-last 2 then deleted the good older checkpoint."""
    common = dict(batch_size=4, lr=2e-3, schedule="constant", save_every=1, keep_last=2, seed=3)
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    loop.train_student(make_cfg(tiny_student_dir, cache_dir, straight, max_steps=6, **common))
    # the same run stopped at step 4 (a constant lr makes max_steps irrelevant to the first 4 steps)
    loop.train_student(make_cfg(tiny_student_dir, cache_dir, broken, max_steps=4, **common))
    assert [s for s, _ in list_checkpoints(broken)] == [3, 4]
    _zero_64_bytes(broken / "checkpoint-4" / "optimizer.pt")
    assert verify_checkpoint(broken / "checkpoint-3").problems == []
    capsys.readouterr()

    loop.train_student(make_cfg(tiny_student_dir, cache_dir, broken, max_steps=6, resume="auto", **common))
    err = capsys.readouterr().err
    assert "checkpoint-4 does not verify" in err and "optimizer.pt" in err, err
    assert "resuming from checkpoint-3" in err and "resumed from" in err and "at step 3" in err, err
    # from checkpoint-3 on, the run is the uninterrupted one: same weights bit for bit, same metrics
    a, b = state_of(straight / "final"), state_of(broken / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    timing = ("tokens_per_s", "positions_per_s", "step_time_s")
    untimed = [[{k: v for k, v in r.items() if k not in timing} for r in read_metrics(out)[0]]
               for out in (straight, broken)]
    assert untimed[0] == untimed[1] and [r["step"] for r in untimed[1]] == list(range(1, 7))
    # keep_last 2: the damaged checkpoint-4 was replaced by a good one, and what is left verifies
    assert [s for s, _ in list_checkpoints(broken)] == [5, 6]
    assert all(verify_checkpoint(p).problems == [] for _, p in list_checkpoints(broken))


def _tiny_training_state(student_dir: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(student_dir))
    opt = torch.optim.AdamW(model.parameters())
    return dict(model=model, optimizer=opt, scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))


def test_a_checkpoint_is_pruned_only_after_a_newer_one_is_written_and_verified(tmp_path, tiny_student_dir,
                                                                               monkeypatch):
    parts = _tiny_training_state(tiny_student_dir)
    for step in (1, 2):
        save_checkpoint(tmp_path, step, **parts, trainer_state={"data": {}}, keep_last=2)

    # step 3 reads back other bytes than were written (simulated by recording a wrong sha256 for optimizer.pt):
    # it is refused, and nothing older is pruned, even with keep_last=1
    real_digests = checkpoint.file_digests

    def wrong_digests(folder, **kw):
        digests = real_digests(folder, **kw)
        digests["optimizer.pt"] = {**digests["optimizer.pt"], "sha256": "0" * 64}
        return digests

    monkeypatch.setattr(checkpoint, "file_digests", wrong_digests)
    with pytest.raises(CheckpointError, match=r"checkpoint-3 was written but does not read back.*optimizer\.pt.*"
                                              r"no older checkpoint was pruned"):
        save_checkpoint(tmp_path, 3, **parts, trainer_state={"data": {}}, keep_last=1)
    monkeypatch.undo()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2, 3]

    # a resume that fell back to checkpoint-1 saves step 2 again: the fresh checkpoint-2 is kept, the leftover
    # checkpoint-3 (newer, from the abandoned timeline) neither counts towards keep_last nor is deleted
    save_checkpoint(tmp_path, 2, **parts, trainer_state={"data": {}}, keep_last=1)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    assert verify_checkpoint(tmp_path / "checkpoint-2").problems == []


def test_choose_checkpoint_verifies_names_the_damaged_file_and_falls_back(tmp_path, tiny_student_dir):
    parts = _tiny_training_state(tiny_student_dir)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, **parts, trainer_state={"data": {"epoch": 0}}, keep_last=0)
    said: list[str] = []
    assert choose_checkpoint("auto", tmp_path, said.append)[0].name == "checkpoint-3" and said == []

    # a truncated state file, and a state file whose content was edited (still valid JSON)
    state3 = tmp_path / "checkpoint-3" / "trainer_state.json"
    state3.write_text(state3.read_text()[:120])
    state2 = tmp_path / "checkpoint-2" / "trainer_state.json"
    state2.write_text(state2.read_text().replace('"step": 2', '"step": 7'))
    path, state = choose_checkpoint("auto", tmp_path, said.append)
    assert path.name == "checkpoint-1" and state["step"] == 1
    (message,) = said
    assert "checkpoint-3/trainer_state.json is not valid JSON" in message
    assert "checkpoint-2/trainer_state.json does not match its own checksum" in message
    assert "resuming from checkpoint-1" in message

    # an explicit --resume of a damaged checkpoint is refused, naming the file
    with pytest.raises(CheckpointError, match=r"--resume .*checkpoint-3.*trainer_state\.json is not valid JSON"):
        choose_checkpoint(str(tmp_path / "checkpoint-3"), tmp_path, said.append)
    # a missing file is named too; with nothing left that verifies, --resume auto fails clearly
    (tmp_path / "checkpoint-1" / "scheduler.pt").unlink()
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* verifies.*checkpoint-1/scheduler\.pt is missing"):
        choose_checkpoint("auto", tmp_path, said.append)
    # a checkpoint written before checksums existed is used, with a warning that it was not verified
    legacy = json.loads((tmp_path / "checkpoint-1" / "trainer_state.json").read_text())
    del legacy["files"], legacy["state_sha256"]
    (tmp_path / "checkpoint-1" / "trainer_state.json").write_text(json.dumps(legacy))
    said.clear()
    assert choose_checkpoint("auto", tmp_path, said.append)[0].name == "checkpoint-1"
    assert "no checksums" in said[-1]


def test_train_stream_stops_instead_of_looping_over_empty_epochs(cache_dir):
    class EpochLimit(CacheReader):
        def set_epoch(self, epoch: int) -> None:
            assert epoch < 5, "the stream kept looping over epochs that yield nothing"
            super().set_epoch(epoch)

    fraction = 1 - 1e-6  # holds out every row of this cache (checked below)
    assert count_trainable_rows(cache_dir, CacheReader(cache_dir).manifest, fraction, stop_after=None)[
        "trainable"] == 0
    for epochs in (None, 1):
        stream = TrainStream(EpochLimit(cache_dir, batch_size=4, seed=1), batch_size=4, eval_fraction=fraction,
                             epochs=epochs)
        with pytest.raises(NothingToTrainError, match="nothing to train"):
            next(iter(stream))

    # a stream resumed right after the last batch of an epoch yields nothing more of it, and that is no error
    kw = dict(batch_size=4, eval_fraction=0.2, seed=1)

    def stream(epochs):
        return TrainStream(CacheReader(cache_dir, batch_size=4, seed=1), epochs=epochs, **kw)

    first_epoch = len(list(stream(1)))
    full = [b.row_ids for b in stream(2)]
    s = stream(2)
    it = iter(s)
    for _ in range(first_epoch):
        next(it)
    resumed = stream(2)
    resumed.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert [b.row_ids for b in resumed] == full[first_epoch:]


def test_resume_drops_metrics_after_the_checkpoint_and_a_half_written_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "total": 1.0 / s}) for s in (1, 2, 3, 4)]
    lines.insert(2, json.dumps({"step": 2, "split": "eval", "eval_kd": 0.5}))
    path.write_text("\n".join(lines) + '\n{"step": 5, "tot')  # SIGKILL in the middle of a write
    loop._truncate_metrics(path, 3)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 2, 3]


def test_count_trainable_rows_matches_a_row_by_row_count(tiny_teacher_dir, tmp_path):
    from rlkd.cache import CacheWriter, read_manifest
    from tests.cache_from_model import teacher_rows

    reference = write_cache_from_model(tiny_teacher_dir, tmp_path / "ref", n_rows=1, k=4)
    manifest = read_manifest(reference)
    meta = {key: manifest[key] for key in ("teacher", "tokenizer", "dataset", "config", "logprobs_mode",
                                           "temperature", "engine")}
    rows = teacher_rows(tiny_teacher_dir, 30, k=4, seed=2)
    for row in rows[::3]:  # every third row without a trained position
        row.loss_mask[:] = False
    cache = tmp_path / "mixed"
    with CacheWriter(cache, meta, k=4, codec="fp32", row_group_rows=4) as writer:
        for row in rows:
            writer.write(row)
    manifest = read_manifest(cache)
    for fraction in (0.0, 0.4):
        held = [is_eval_row(r.row_id, fraction) for r in rows]
        expected = {"rows": 30, "held_out": sum(held),
                    "no_positions": sum(not h and not r.loss_mask.any() for h, r in zip(held, rows)),
                    "trainable": sum(not h and bool(r.loss_mask.any()) for h, r in zip(held, rows))}
        assert count_trainable_rows(cache, manifest, fraction, stop_after=None) == expected
        assert 0 < expected["no_positions"] and (fraction == 0 or 0 < expected["held_out"])
    early = count_trainable_rows(cache, manifest, 0.0)  # stops after the first row group with a trainable row
    assert early["trainable"] >= 1 and early["rows"] == 4


def test_a_run_that_never_logged_a_step_can_be_retried_and_incomplete_caches_need_a_flag(
        cache_dir, tiny_student_dir, tmp_path, capsys):
    import shutil

    # what a run that failed before its first step (e.g. out of memory) leaves: nothing worth protecting
    out = tmp_path / "retry"
    out.mkdir()
    (out / "train_config.yaml").write_text("run: {seed: 99}\n")
    (out / "metrics.jsonl").write_text("")
    cfg = make_cfg(tiny_student_dir, cache_dir, out, max_steps=1, save_every=0, batch_size=4)
    loop.train_student(cfg)
    assert yaml.safe_load((out / "train_config.yaml").read_text()) == cfg.to_dict()
    assert [r["step"] for r in read_metrics(out)[0]] == [1]
    assert "stopped before logging a step" in capsys.readouterr().err

    incomplete = tmp_path / "incomplete-cache"
    shutil.copytree(cache_dir, incomplete)
    manifest = json.loads((incomplete / "manifest.json").read_text())
    (incomplete / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(loop.TrainSetupError, match="not complete.*--allow-incomplete"):
        loop.train_student(make_cfg(tiny_student_dir, incomplete, tmp_path / "refused", max_steps=1))
    assert not (tmp_path / "refused").exists()
    loop.train_student(make_cfg(tiny_student_dir, incomplete, tmp_path / "allowed", max_steps=1, save_every=0,
                                allow_incomplete=True))
    assert f"using the {manifest['rows']} rows written so far" in capsys.readouterr().err
    assert (tmp_path / "allowed" / "final" / "model.safetensors").is_file()


# ---- refusals ---------------------------------------------------------------------------------------------------

def test_refuses_other_tokenizer_before_training(cache_dir, tmp_path):
    tok_dir, student = tmp_path / "tok400", tmp_path / "other-student"
    tiny.make_tokenizer(tok_dir, vocab_size=400)
    tiny.make_llama(student, tok_dir, hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128)
    out = tmp_path / "out"
    with pytest.raises(TokenizerMismatchError, match="tokenizer mismatch") as e:
        loop.train_student(make_cfg(student, cache_dir, out, max_steps=2, save_every=0))
    assert str(cache_dir) in str(e.value)
    assert not (out / "metrics.jsonl").exists()


def test_refuses_small_vocab_through_the_cli(cache_dir, tiny_tokenizer_dir, tmp_path):
    from click.testing import CliRunner
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rlkd.cli import main

    student = tmp_path / "small-vocab"
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=32)
    LlamaForCausalLM(config).save_pretrained(str(student))
    AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir)).save_pretrained(str(student))
    largest = max(int(r.topk_ids.max()) for r in CacheReader(cache_dir).iter_rows())
    assert largest >= 256
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["train-student", "--student", str(student), "--cache", str(cache_dir),
                                       "--out", str(out), "--max-steps", "2", "--no-progress"])
    assert result.exit_code == 1, result.output
    assert "vocabulary of 256 ids" in result.output and f"token id {largest}" in result.output
    assert not (out / "metrics.jsonl").exists()


def test_cli_trains_from_a_yaml_config(cache_dir, tiny_student_dir, tmp_path):
    from click.testing import CliRunner

    from rlkd.cli import main

    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text(yaml.safe_dump({"data": {"batch_size": 4, "eval_fraction": 0.25},
                                        "optim": {"max_steps": 2, "lr": 1e-3}, "loss": {"rank_k": 4}}))
    out = tmp_path / "cli-run"
    result = CliRunner().invoke(main, ["train-student", "--config", str(cfg_file), "--student",
                                       str(tiny_student_dir), "--cache", str(cache_dir), "--out", str(out),
                                       "--save-every", "0", "--no-progress"])
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((out / "train_config.yaml").read_text())
    assert saved["loss"]["rank_k"] == 4 and saved["data"]["batch_size"] == 4 and saved["run"]["save_every"] == 0
    steps, evals = read_metrics(out)
    assert len(steps) == 2 and len(evals) == 1
    # contradictory flags are refused with both names, before anything runs
    result = CliRunner().invoke(main, ["train-student", "--student", "s", "--cache", "c", "--out", "o",
                                       "--max-steps", "3", "--epochs", "1"])
    assert result.exit_code == 2 and "max_steps (3) and epochs (1.0)" in result.output


def test_epochs_eval_cache_checkpointing_and_tensorboard(cache_dir, tiny_teacher_dir, tiny_student_dir, tmp_path,
                                                        monkeypatch):
    """--epochs 1 reads every row once; --eval-cache evaluates on that cache; gradient checkpointing changes memory,
    not results; --report-to tensorboard writes events (or says which package to install)."""
    eval_cache = write_cache_from_model(tiny_teacher_dir, tmp_path / "eval-cache", n_rows=6, k=CACHE_K, seed=3)
    common = dict(epochs=1, batch_size=8, lr=2e-3, save_every=0, eval_cache=str(eval_cache), eval_max_rows=4)
    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    loop.train_student(make_cfg(tiny_student_dir, cache_dir, plain, **common))
    try:  # tensorboard is optional: with it, events are written; without it, the refusal below is what we test
        import tensorboard  # noqa: F401
        have_tb = True
    except ImportError:
        have_tb = False
    loop.train_student(make_cfg(tiny_student_dir, cache_dir, ckpt, gradient_checkpointing=True,
                                report_to="tensorboard" if have_tb else "none", **common))
    steps, evals = read_metrics(plain)
    assert len(steps) == 8  # 64 rows / 8
    assert len(evals) == 1 and evals[0]["positions"] == sum(
        int(r.loss_mask.sum()) for r in list(CacheReader(eval_cache).iter_rows())[:4])
    a, b = state_of(plain / "final"), state_of(ckpt / "final")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert bool(list((ckpt / "tensorboard").glob("events.out.tfevents.*"))) == have_tb
    # without the package: a clear message before training
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(loop.TrainSetupError, match="pip install tensorboard"):
        loop.train_student(make_cfg(tiny_student_dir, cache_dir, tmp_path / "no-tb", report_to="tensorboard",
                                    **common))
    assert not (tmp_path / "no-tb").exists()  # refused before anything was written
    # an OUT with checkpoints is not silently overwritten
    used_model = __import__("transformers").AutoModelForCausalLM.from_pretrained(str(tiny_student_dir))
    used_opt = torch.optim.SGD(used_model.parameters())
    save_checkpoint(tmp_path / "used", 5, model=used_model, optimizer=used_opt,
                    scheduler=torch.optim.lr_scheduler.LambdaLR(used_opt, lambda s: 1.0), trainer_state={"data": {}})
    with pytest.raises(loop.TrainSetupError, match="--resume auto"):
        loop.train_student(make_cfg(tiny_student_dir, cache_dir, tmp_path / "used", **common))


def test_eval_on_a_small_k_cache_leaves_out_what_it_cannot_define_and_says_so_once(tiny_teacher_dir,
                                                                                    tiny_student_dir, tmp_path,
                                                                                    capsys):
    cache = write_cache_from_model(tiny_teacher_dir, tmp_path / "k8", n_rows=16, k=8, seed=2)
    out = tmp_path / "run"
    loop.train_student(make_cfg(tiny_student_dir, cache, out, max_steps=2, batch_size=4, eval_fraction=0.3,
                                eval_every=1, save_every=0, rank_k=4))
    _, evals = read_metrics(out)
    assert [e["step"] for e in evals] == [1, 2]
    for e in evals:
        assert all(isinstance(e[key], float) for key in ("cr@1", "cr@2", "cr@5", "mor@5", "set@5", "eval_kd"))
        assert not [key for key in e if "@10" in key]
    err = capsys.readouterr().err
    assert err.count("left out mor@10, set@10") == 1 and "--top-k 10" in err
