"""Stage 1 end to end: `rlkd cache-teacher` on the tiny teacher, checked against independent references.

- fidelity: the vLLM-written fp32 cache equals a brute-force transformers forward computed here;
- alignment: target at position t is input_ids[t+1], and the loss mask covers exactly the response (+ end of turn);
- crash and resume: SIGKILL a real `rlkd cache-teacher --engine hf` process, resume, compare with an uninterrupted run;
- sharding: --shard 0/2 + --shard 1/2, merged by `rlkd cache-merge`, equals the unsharded cache;
- refusals: a different k on an existing --out, an unknown teacher.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from rlkd.cache import CacheMismatchError, CacheReader, read_manifest, verify_cache
from rlkd.cache.manifest import TMP_SUFFIX
from rlkd.cli import main
from rlkd.config import build_config
from rlkd.pipeline.config import CacheTeacherConfig
from rlkd.pipeline.engines import HFEngine, VLLMEngine
from rlkd.pipeline.merge import MergeError, merge_caches
from rlkd.pipeline.run import cache_teacher
from tests import tiny

TOL = 1e-4
REPO = Path(__file__).resolve().parents[1]


def _write_dolly(path: Path, n: int, seed: int, words: tuple[int, int] = (8, 30)) -> list[dict]:
    """Dolly-shaped rows (instruction, context, response) of pseudo-English; row 3 has an empty response."""
    rng = random.Random(seed)

    def text(lo, hi):
        return " ".join(rng.choice(tiny._WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    rows = [{"instruction": text(3, 10), "context": text(3, 12) if i % 3 == 0 else "", "response": text(*words)}
            for i in range(n)]
    if n > 3:
        rows[3]["response"] = ""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _cfg(teacher, dataset, out, **kw) -> CacheTeacherConfig:
    return build_config(CacheTeacherConfig, {"teacher": str(teacher), "dataset": str(dataset), "out": str(out),
                                             "codec": "fp32", "top_k": 8, **kw})


def _rows(cache) -> dict:
    return {r.row_id: r for r in CacheReader(cache, batch_size=1, shuffle=False).iter_rows()}


def _assert_same_rows(got: dict, want: dict, atol: float = 1e-5) -> None:
    assert set(got) == set(want)
    for rid, w in want.items():
        g = got[rid]
        assert g.source_index == w.source_index
        for name in ("input_ids", "loss_mask", "topk_count", "topk_ids", "target_rank"):
            np.testing.assert_array_equal(getattr(g, name), getattr(w, name), err_msg=f"{rid} {name}")
        for name in ("topk_logprobs", "tail_logmass", "target_logprob"):
            np.testing.assert_allclose(getattr(g, name), getattr(w, name), atol=atol, rtol=0, err_msg=f"{rid} {name}")


@pytest.fixture(scope="module")
def dolly(tmp_path_factory) -> tuple[Path, list[dict]]:
    path = tmp_path_factory.mktemp("data") / "dolly.jsonl"
    return path, _write_dolly(path, 24, seed=0)


@pytest.fixture(scope="module")
def hf_engine(tiny_teacher_dir):
    return HFEngine(tiny_teacher_dir, k=8, dtype="float32", device="cpu")


# ---- fidelity and alignment (vLLM engine) ------------------------------------------------------------------------


def test_vllm_cache_equals_brute_force_forward_and_aligns(vllm_llm, tiny_teacher_dir, dolly, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, source = dolly
    out = tmp_path / "cache"
    summary = cache_teacher(_cfg(tiny_teacher_dir, path, out), engine=VLLMEngine(llm=vllm_llm, k=8), progress=False)
    rows = _rows(out)
    assert summary["rows_written"] == len(rows) == len(source) - 1  # the empty response is skipped ...
    assert summary["input"]["skipped"] == {"empty_response": 1}  # ... and counted with its reason
    assert verify_cache(out, deep=True) == []
    manifest = read_manifest(out)
    assert manifest["complete"] and manifest["k"] == 8 and manifest["codec"] == "fp32"
    assert manifest["config"]["top_k"] == 8 and manifest["engine"] == "vllm"
    assert manifest["teacher"]["vocab_size"] == 512 and len(manifest["teacher"]["config_sha256"]) == 64

    model = AutoModelForCausalLM.from_pretrained(str(tiny_teacher_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_teacher_dir))
    hits = 0
    for row in rows.values():
        ids = row.input_ids.astype(np.int64)
        P = ids.shape[0] - 1
        with torch.no_grad():
            logits = model(torch.tensor(ids[None])).logits[0, :-1]  # (P, V), one sequence, no padding
        lp = torch.log_softmax(logits.double(), dim=-1).numpy()  # (P, V) float64
        order = np.argsort(-lp, axis=1, kind="stable")[:, :8]  # (P, 8)
        top = np.take_along_axis(lp, order, axis=1)
        tgt = lp[np.arange(P), ids[1:]]
        assert row.topk_count.tolist() == [8] * P
        np.testing.assert_array_equal(row.topk_ids.reshape(P, 8), order)
        np.testing.assert_allclose(row.topk_logprobs.reshape(P, 8), top, atol=TOL, rtol=0)
        np.testing.assert_allclose(row.tail_logmass, np.log1p(-np.exp(top).sum(1)), atol=TOL, rtol=0)
        np.testing.assert_allclose(row.target_logprob, tgt, atol=TOL, rtol=0)
        np.testing.assert_array_equal(row.target_rank, 1 + (lp > tgt[:, None]).sum(1))

        # Alignment: wherever input_ids[t+1] is in position t's top-k, it is there with the target's log-prob
        # and at the target's rank.
        top_ids = row.topk_ids.reshape(P, 8)
        hit = top_ids == ids[1:, None]  # (P, 8)
        t_in = hit.any(1)
        hits += int(t_in.sum())
        assert (row.target_rank[t_in] <= 8).all() and (row.target_rank[~t_in] > 8).all()
        np.testing.assert_array_equal(hit.argmax(1)[t_in] + 1, row.target_rank[t_in])
        np.testing.assert_allclose(row.topk_logprobs.reshape(P, 8)[hit], row.target_logprob[t_in], atol=1e-6)

        # The mask lines up with the response: the trained targets are exactly the response and its end of turn.
        targets = ids[1:][row.loss_mask]
        assert tok.decode(targets) == source[row.source_index]["response"] + "<|im_end|>"
        span = np.flatnonzero(row.loss_mask)
        assert span[-1] - span[0] + 1 == span.size  # one contiguous span (the single assistant turn)
    assert hits > 0  # the in-top-k branch of the alignment check did run


# ---- sharding and merge ------------------------------------------------------------------------------------------


def test_shards_merged_equal_unsharded(tiny_teacher_dir, dolly, hf_engine, tmp_path):
    path, _ = dolly
    cache_teacher(_cfg(tiny_teacher_dir, path, tmp_path / "full", engine="hf"), engine=hf_engine, progress=False)
    merged = tmp_path / "merged"
    for i in range(2):
        cache_teacher(_cfg(tiny_teacher_dir, path, merged / f"part-{i}", engine="hf", shard=f"{i}/2"),
                      engine=hf_engine, progress=False)
    result = CliRunner().invoke(main, ["cache-merge", str(merged), str(merged / "part-0"), str(merged / "part-1")])
    assert result.exit_code == 0, result.output
    m = read_manifest(merged)
    assert m["complete"] and all(s["file"].startswith(("part-0/", "part-1/")) for s in m["shards"])
    assert not list(merged.glob("*.parquet"))  # nothing copied: the manifest points into the parts
    assert verify_cache(merged, deep=True) == []
    assert m["max_token_id"] == read_manifest(tmp_path / "full")["max_token_id"]
    full, parts = _rows(tmp_path / "full"), _rows(merged)
    assert len(parts) == m["rows"] == len(full)
    _assert_same_rows(parts, full)

    # Refusals: overlapping parts, a part given twice, an output that already holds a cache.
    with pytest.raises(MergeError, match="appear both"):
        merge_caches(tmp_path / "overlap", [tmp_path / "full", merged / "part-1"])
    with pytest.raises(MergeError, match="given twice"):
        merge_caches(tmp_path / "twice", [merged / "part-0", merged / "part-0"])
    with pytest.raises(MergeError, match="already exists"):
        merge_caches(merged, [merged / "part-0"])
    other = tmp_path / "other-k"
    cache_teacher(_cfg(tiny_teacher_dir, path, other, engine="hf", top_k=4, shard="1/2"),
                  engine=HFEngine(hf_model=hf_engine.model, k=4), progress=False)
    with pytest.raises(MergeError, match="k: 8 in the cache, 4 now"):
        merge_caches(tmp_path / "mixed", [merged / "part-0", other])


# ---- refusals ----------------------------------------------------------------------------------------------------


def test_reopen_with_different_k_is_refused(tiny_teacher_dir, dolly, hf_engine, tmp_path):
    path, _ = dolly
    out = tmp_path / "cache"
    cache_teacher(_cfg(tiny_teacher_dir, path, out, engine="hf", limit=4), engine=hf_engine, progress=False)
    with pytest.raises(CacheMismatchError, match="k: 8 in the cache, 4 now"):
        cache_teacher(_cfg(tiny_teacher_dir, path, out, engine="hf", top_k=4, limit=4), progress=False)
    # Through the CLI: a clean message, exit code 1, and the cache untouched.
    before = read_manifest(out)
    result = CliRunner().invoke(main, ["cache-teacher", "--teacher", str(tiny_teacher_dir), "--dataset", str(path),
                                       "--out", str(out), "--engine", "hf", "--codec", "fp32", "--top-k", "4"])
    assert result.exit_code == 1 and "k: 8 in the cache, 4 now" in result.output
    assert read_manifest(out)["shards"] == before["shards"]


def test_cli_config_file_gives_defaults_and_flags_override(tiny_teacher_dir, dolly, tmp_path):
    path, _ = dolly
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(f"teacher: {tiny_teacher_dir}\ndataset: {path}\nengine: hf\ncodec: fp32\ntop_k: 4\n"
                        "limit: 5\nbatch-size: 2\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["cache-teacher", "--config", str(run_yaml), "--out", str(out), "--top-k", "6",
                                       "--no-progress"])
    assert result.exit_code == 0, result.output
    m = read_manifest(out)
    assert m["k"] == 6 and m["codec"] == "fp32"  # the flag beat the file; the file beat the default (q8)
    assert m["config"]["top_k"] == 6 and m["config"]["limit"] == 5 and m["config"]["batch_size"] == 2
    assert m["rows"] == 4  # rows 0-4 minus the empty response at row 3
    assert "rows written     4" in result.output and "empty_response 1" in result.output
    bad = CliRunner().invoke(main, ["cache-teacher", "--config", str(run_yaml), "--out", str(out), "--top-k", "0",
                                    "--min-k", "3"])
    assert bad.exit_code == 2 and "top_k" in bad.output and "min_k" in bad.output  # every problem at once


def test_unknown_teacher_fails_before_any_work(dolly, tmp_path):
    path, _ = dolly
    result = CliRunner().invoke(main, ["cache-teacher", "--teacher", str(tmp_path / "no-such-model"),
                                       "--dataset", str(path), "--out", str(tmp_path / "out"), "--engine", "hf"])
    assert result.exit_code == 1
    assert "no such model folder" in result.output and "no-such-model" in result.output
    assert not (tmp_path / "out").exists()


# ---- crash and resume --------------------------------------------------------------------------------------------

# Small row groups and big rows (k = 128, fp32: ~1 KB per token) make 1 MiB shards finish every ~20 rows, so a
# kill lands with some shards finished, one open, and rows left.
CRASH_K = 128


def _crash_cmd(teacher, data, out) -> list[str]:
    return [sys.executable, "-m", "rlkd.cli", "cache-teacher", "--teacher", str(teacher), "--dataset", str(data),
            "--out", str(out), "--engine", "hf", "--codec", "fp32", "--top-k", str(CRASH_K), "--batch-size", "2",
            "--row-group-rows", "2", "--shard-max-mb", "1", "--no-progress"]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _shards_listed(out: Path) -> int:
    try:
        return len(json.loads((out / "manifest.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return -1  # no manifest yet (or caught mid-replace, which os.replace makes impossible, but be safe)


def _kill_when(cmd: list[str], out: Path, shards: int | None, after_s: float | None = None) -> None:
    """Start ``cmd`` and SIGKILL it once ``out``'s manifest lists ``shards`` shards (or after ``after_s``)."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    try:
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace")[-2000:]
                pytest.fail(f"the run ended (rc {proc.returncode}) before the kill point {shards=} {after_s=}; make "
                            f"the data bigger. stderr:\n{err}")
            if shards is not None and _shards_listed(out) >= shards:
                break
            if after_s is not None and time.monotonic() - t0 >= after_s:
                break
            if time.monotonic() - t0 > 300:
                pytest.fail("kill point never reached in 300 s")
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _reference(teacher, data, tmp_path) -> dict:
    ref = tmp_path / "reference"
    cache_teacher(_cfg(teacher, data, ref, engine="hf", top_k=CRASH_K, batch_size=2, row_group_rows=2, shard_max_mb=1),
                  engine=HFEngine(teacher, k=CRASH_K, dtype="float32", device="cpu"), progress=False)
    return _rows(ref)


def _resume_and_compare(teacher, data, out, reference: dict) -> None:
    done = subprocess.run(_crash_cmd(teacher, data, out), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "already cached, skipped" in done.stderr
    got = _rows(out)
    manifest = read_manifest(out)
    assert manifest["complete"] and manifest["rows"] == len(got) == len(reference)  # nothing doubled, nothing lost
    assert verify_cache(out, deep=True) == []
    _assert_same_rows(got, reference)


def _crash_data(tmp_path: Path, n: int) -> Path:
    """``n`` rows of ~95 tokens: about 20 rows per 1 MiB shard at k = 128 in fp32."""
    path = tmp_path / "dolly.jsonl"
    _write_dolly(path, n, seed=1, words=(25, 60))
    return path


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tiny_teacher_dir, tmp_path):
    data = _crash_data(tmp_path, 60)  # ~3 shards
    out = tmp_path / "cache"
    _kill_when(_crash_cmd(tiny_teacher_dir, data, out), out, shards=1)
    listed = read_manifest(out)
    assert not listed["complete"] and len(listed["shards"]) >= 1
    _resume_and_compare(tiny_teacher_dir, data, out, _reference(tiny_teacher_dir, data, tmp_path))


@pytest.mark.slow
def test_sigkill_at_many_points_then_resume_equals_uninterrupted(tiny_teacher_dir, tmp_path):
    data = _crash_data(tmp_path, 160)  # ~8 shards
    out = tmp_path / "cache"
    cmd = _crash_cmd(tiny_teacher_dir, data, out)
    _kill_when(cmd, out, shards=None, after_s=1.0)  # 1: during start-up, before the cache exists
    _kill_when(cmd, out, shards=0)  # 2: the writer has just opened the cache; a shard is being written
    _kill_when(cmd, out, shards=1)  # 3: right after the first shard is listed
    _kill_when(cmd, out, shards=_shards_listed(out) + 1)  # 4: after one more shard of this (resumed) run
    _kill_when(cmd, out, shards=_shards_listed(out) + 2)  # 5: two shards later
    assert not read_manifest(out)["complete"]
    _resume_and_compare(tiny_teacher_dir, data, out, _reference(tiny_teacher_dir, data, tmp_path))


def test_disk_full_keeps_finished_shards_and_resumes(tiny_teacher_dir, hf_engine, tmp_path, monkeypatch):
    import errno

    from rlkd.cache.writer import CacheWriter
    from rlkd.pipeline.run import DiskFullError

    data = _crash_data(tmp_path, 60)
    out = tmp_path / "cache"
    cfg = _cfg(tiny_teacher_dir, data, out, engine="hf", top_k=CRASH_K, row_group_rows=2, shard_max_mb=1)
    engine = HFEngine(hf_model=hf_engine.model, k=CRASH_K)
    real_flush, calls = CacheWriter._flush_row_group, []

    def flush_until_full(self):
        calls.append(1)
        if len(calls) > 20:  # ~40 rows in: after the first shard(s) finished, mid-way through another
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_flush(self)

    monkeypatch.setattr(CacheWriter, "_flush_row_group", flush_until_full)
    with pytest.raises(DiskFullError, match="(?s)Free some space.*re-run the same command to resume") as exc:
        cache_teacher(cfg, engine=engine, progress=False)
    assert exc.value.errno == errno.ENOSPC
    kept = read_manifest(out)
    assert not kept["complete"] and len(kept["shards"]) >= 1
    assert "the open shard was dropped" in str(exc.value)
    assert not [p.name for p in out.iterdir() if p.name.endswith((TMP_SUFFIX, ".tmp"))]  # ... and really is gone
    assert verify_cache(out, deep=True) == [
        "manifest is not marked complete: the writer did not finish (resume stage 1 to complete it: re-run the "
        "`rlkd cache-teacher` command that wrote it)"]
    monkeypatch.setattr(CacheWriter, "_flush_row_group", real_flush)
    summary = cache_teacher(cfg, engine=engine, progress=False)
    assert summary["rows_already_cached"] == kept["rows"] and summary["rows_in_cache"] == 59
    assert verify_cache(out, deep=True) == []


# ---- a teacher whose position limit is the default --max-length; what the terminal shows --------------------------

DEPENDENCY_NOISE = ("Traceback", "Tokenizer not available", "NUMA", "reduce_op", "Triton", "triton",
                    "Loading safetensors", "Generating train split", "INFO", "WARNING")
"""What vLLM, torch and datasets print during a run (issue #13): none of it may reach the terminal by default."""


def test_vllm_default_flags_on_a_1024_position_teacher_and_a_quiet_terminal(tiny_tokenizer_dir, vllm_cache_root,
                                                                            tmp_path):
    """One vLLM start, through the real CLI in a subprocess: a Llama with max_position_embeddings = 1024 (the default
    --max-length, like every GPT-2) caches with default flags: the max length is lowered to 1023 (vLLM needs one
    position for its generated token) and the run says so; rows are cut to exactly that. The terminal shows rlkd's
    note, progress and summary, and none of vLLM's own output, which goes to OUT/cache-teacher.log."""
    from rlkd.cache.writer import LOG_NAME

    teacher = tmp_path / "teacher-1024"
    tiny.make_llama(teacher, tiny_tokenizer_dir, max_position_embeddings=1024, seed=3)
    data = tmp_path / "long.jsonl"
    rows = _write_dolly(data, 4, seed=5)
    rows[1]["response"] = " ".join(["the river is long and the model is good"] * 150)  # > 1024 tokens
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    # An explicit --max-length above the limit: one clear error naming it, before anything is written.
    too_long = CliRunner().invoke(main, ["cache-teacher", "--teacher", str(teacher), "--dataset", str(data),
                                         "--out", str(tmp_path / "refused"), "--max-length", "1024"])
    assert too_long.exit_code == 2, too_long.output
    assert "--max-length 1024" in too_long.output and "largest --max-length is 1023" in too_long.output
    assert "Traceback" not in too_long.output and not (tmp_path / "refused" / "manifest.json").exists()

    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "rlkd.cli", "cache-teacher", "--teacher", str(teacher), "--dataset", str(data),
           "--out", str(out), "--dtype", "float32", "--top-k", "8", "--enforce-eager", "--codec", "fp32"]
    env = dict(_env(), OMP_NUM_THREADS="2", VLLM_CACHE_ROOT=str(vllm_cache_root))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "using --max-length 1023" in done.stderr and "1024 positions" in done.stderr
    assert "cache-teacher done" in done.stderr and str(out / LOG_NAME) in done.stderr
    for noise in DEPENDENCY_NOISE:
        assert noise not in done.stderr, (noise, done.stderr)
    assert done.stdout == ""
    log = (out / LOG_NAME).read_text()
    assert "'max_model_len': 1024" in log  # vLLM's own lines are kept, in the log
    cached = _rows(out)
    assert max(len(r.input_ids) for r in cached.values()) == 1023  # the long row is cut to the lowered limit
    assert verify_cache(out, deep=True) == []


def test_verbose_shows_dependency_output_and_default_keeps_it_in_the_log(tiny_teacher_dir, tmp_path):
    from rlkd.cache.writer import LOG_NAME

    outputs = {}
    for mode, flags in (("default", []), ("verbose", ["--verbose"])):
        data = tmp_path / f"{mode}.jsonl"  # a new file: `datasets` prints "Generating train split" for it
        _write_dolly(data, 3, seed=6)
        result = CliRunner().invoke(main, ["cache-teacher", "--teacher", str(tiny_teacher_dir), "--dataset", str(data),
                                           "--engine", "hf", "--out", str(tmp_path / mode), "--no-progress",
                                           "--top-k", "4", *flags])
        assert result.exit_code == 0, result.output
        outputs[mode] = result.output
    assert "Generating train split" in outputs["verbose"]
    assert "Generating train split" not in outputs["default"]
    assert "Generating train split" in (tmp_path / "default" / LOG_NAME).read_text()
    assert not (tmp_path / "verbose" / LOG_NAME).exists()
    for text in outputs.values():
        assert "using --max-length 512" in text and "cache-teacher done" in text  # rlkd's own lines either way
