"""Stage 1 on Ray (`rlkd cache-teacher --ray`): 2 engine replicas on a local 2-CPU Ray cluster.

The replicas run the HF engine, not vLLM: one vLLM CPU engine takes ~15 s to start and its own KV-cache space, and two
of them on the 2 cores this machine shares do not fit comfortably (the HF engine on the tiny teacher starts in under a
second). The row-building code is the same for both engines.

Checked against an independent reference, a single-process `cache_teacher` run computed here:
- the merged Ray cache holds exactly the same rows, bit for bit (fp32 codec), and each part only the rows routed to it;
- a replica killed mid-run (a hard `os._exit` after it finished 2 shards, as a SIGKILL would) leaves a valid,
  incomplete cache; a re-run resumes: nothing is lost or written twice, and a third run has nothing left to do;
- refusals (no Ray installed, an --out holding a single-process cache) happen before any engine starts;
- with --out s3://... (a real S3 server, moto on 127.0.0.1) each replica writes its part straight to the store and the
  driver writes the merged manifest: the same rows as the single-process cache, no shared filesystem.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from rlkd.cache import CacheMismatchError, CacheReader, read_manifest, verify_cache
from rlkd.config import build_config
from rlkd.pipeline.config import CacheTeacherConfig
from rlkd.pipeline.run import cache_teacher
from tests import tiny
from tests.s3_server import new_bucket, s3_environment, s3_server, set_environment  # noqa: F401  (s3_server: fixture)

ray = pytest.importorskip("ray", reason="needs the [ray] extra: pip install 'rlkd[ray]'")

from rlkd.pipeline.ray_run import RayStage1Error, cache_teacher_ray  # noqa: E402

N_ROWS = 24
K = 8


@pytest.fixture(scope="module")
def ray_cluster(s3_server, tmp_path_factory):
    """One local Ray cluster for the module (a start costs ~10-20 s here). Its workers start with the standard AWS
    environment pointed at the test S3 server, as the nodes of a real cluster would have their credentials."""
    env = pytest.MonkeyPatch()
    set_environment(env, s3_environment(s3_server, tmp_path_factory.mktemp("aws")))
    os.environ["RAY_DISABLE_USAGE_STATS"] = "1"
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 << 20, log_to_driver=False)
    print(f"ray.init took {time.perf_counter() - t0:.1f} s")
    yield
    ray.shutdown()
    env.undo()


@pytest.fixture(scope="module")
def dolly(tmp_path_factory) -> Path:
    """Dolly-shaped rows of pseudo-English; row 3 has an empty response (skipped by the input side)."""
    rng = random.Random(0)

    def text(lo, hi):
        return " ".join(rng.choice(tiny._WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    rows = [{"instruction": text(3, 10), "context": text(3, 12) if i % 3 == 0 else "", "response": text(8, 30)}
            for i in range(N_ROWS)]
    rows[3]["response"] = ""
    path = tmp_path_factory.mktemp("data") / "dolly.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(teacher, dataset, out, **kw) -> CacheTeacherConfig:
    """batch_size=1: the comparison is bit for bit, and a row padded to another batch's longest row can differ in the
    last float32 ulp (the Ray routing groups other rows into batches than the single-process run does)."""
    return build_config(CacheTeacherConfig, {
        "teacher": str(teacher), "dataset": str(dataset), "out": str(out), "engine": "hf", "codec": "fp32",
        "top_k": K, "batch_size": 1, "row_group_rows": 2, **kw})


def _rows(cache) -> dict:
    return {r.row_id: r for r in CacheReader(cache, batch_size=1, shuffle=False).iter_rows()}


def _row_ids_on_disk(out: Path) -> list[str]:
    """Every row_id in a finished shard file under out (duplicates kept, so doubling shows)."""
    return [rid for f in sorted(out.glob("part-*/*.parquet"))
            for rid in pq.read_table(f, columns=["row_id"]).column("row_id").to_pylist()]


@pytest.fixture(scope="module")
def reference(tiny_teacher_dir, dolly, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("single") / "cache"
    cache_teacher(_cfg(tiny_teacher_dir, dolly, out), progress=False)
    return out, _rows(out)


def test_kill_a_replica_then_resume_equals_single_process(ray_cluster, tiny_teacher_dir, dolly, reference, tmp_path):
    _, want = reference
    assert len(want) == N_ROWS - 1  # row 3 is skipped by the input side
    out = tmp_path / "ray"
    cfg = _cfg(tiny_teacher_dir, dolly, out)

    # Run 1: replica 0 dies hard once it has finished 2 shards (2 rows each); replica 1 finishes its rows.
    with pytest.raises(RayStage1Error, match=r"replica 0 \(part-0\) failed") as err:
        cache_teacher_ray(cfg, replicas=2, progress=False, shard_max_bytes=1, _exit_after_shards=(0, 2))
    assert "Re-run the same command" in str(err.value)
    m1 = read_manifest(out)
    assert not m1["complete"]
    problems = verify_cache(out, deep=True)  # the interrupted cache is valid, just incomplete
    assert len(problems) == 1 and "not marked complete" in problems[0], problems
    first = _rows(out)
    assert set(first) < set(want)  # a strict subset: replica 0's open shard and its later rows are missing
    assert 4 <= sum(r.source_index % 2 == 0 for r in first.values()) < sum(r.source_index % 2 == 0
                                                                           for r in want.values())
    assert not read_manifest(out / "part-0")["complete"] and read_manifest(out / "part-1")["complete"]
    # Routing: replica i got exactly the rows with source_index % 2 == i (replica 0 only some of them).
    assert {r.source_index for r in _rows(out / "part-1").values()} == {w.source_index for w in want.values()
                                                                       if w.source_index % 2 == 1}
    assert all(r.source_index % 2 == 0 for r in _rows(out / "part-0").values())

    # Run 2: resume with 3 replicas (3 actors on 2 CPUs: the third starts when one finishes). The routing changes,
    # so only the driver's filter keeps finished rows of part-0/part-1 from being written again into another part.
    s2 = cache_teacher_ray(cfg, replicas=3, progress=False, shard_max_bytes=1)
    assert s2["rows_written"] == len(want) - len(first)
    assert s2["rows_already_cached"] == len(first)
    assert s2["rows_in_cache"] == len(want)
    m2 = read_manifest(out)
    assert m2["complete"] and m2["rows"] == len(want)
    assert m2["config"]["ray"]["replicas"] == 3
    assert {s["file"].split("/")[0] for s in m2["shards"]} == {"part-0", "part-1", "part-2"}
    assert verify_cache(out, deep=True) == []
    on_disk = _row_ids_on_disk(out)
    assert len(on_disk) == len(set(on_disk)) == len(want)  # nothing doubled, nothing lost
    got = _rows(out)
    assert set(got) == set(want)
    for rid, w in want.items():
        g = got[rid]
        assert g.source_index == w.source_index
        for name in ("input_ids", "loss_mask", "topk_count", "topk_ids", "target_rank", "topk_logprobs",
                     "tail_logmass", "target_logprob"):
            np.testing.assert_array_equal(getattr(g, name), getattr(w, name), err_msg=f"{rid} {name}")
    assert all(r.source_index % 3 == 2 for r in _rows(out / "part-2").values())  # new part: run 2's routing

    # Run 3 (back to 2 replicas): nothing left; no engine starts, the manifest is rebuilt identically.
    s3 = cache_teacher_ray(cfg, replicas=2, progress=False, shard_max_bytes=1)
    assert s3["rows_written"] == 0 and s3["rows_already_cached"] == len(want) and s3["per_replica"] == []
    m3 = read_manifest(out)
    assert m3["complete"] and m3["shards"] == m2["shards"]


def test_replicas_write_straight_to_s3_and_equal_single_process(ray_cluster, tiny_teacher_dir, dolly, reference,
                                                                s3_server, tmp_path, monkeypatch):
    _, want = reference
    monkeypatch.chdir(tmp_path)  # nothing may land in a local folder (e.g. one named 's3:')
    bucket = new_bucket(s3_server)
    url = bucket.url("ray/dolly")
    summary = cache_teacher_ray(_cfg(tiny_teacher_dir, dolly, url), replicas=2, progress=False, shard_max_bytes=1)
    assert summary["rows_written"] == len(want) and summary["out"] == url
    m = read_manifest(url)
    assert m["complete"] and m["rows"] == len(want)
    assert {s["file"].split("/")[0] for s in m["shards"]} == {"part-0", "part-1"}
    assert verify_cache(url, deep=True) == []
    got = _rows(url)
    assert set(got) == set(want)
    for rid, w in want.items():
        for name in ("input_ids", "loss_mask", "topk_count", "topk_ids", "target_rank", "topk_logprobs",
                     "tail_logmass", "target_logprob"):
            np.testing.assert_array_equal(getattr(got[rid], name), getattr(w, name), err_msg=f"{rid} {name}")
    keys = bucket.keys("ray/dolly/")
    listed = {f"ray/dolly/{s['file']}" for s in m["shards"]}
    assert {k for k in keys if k.endswith(".parquet")} == listed  # every object listed: nothing doubled or left
    assert not [k for k in keys if k.endswith("writer.lease")]  # every lease (driver and parts) given back
    assert list(tmp_path.iterdir()) == []
    # A re-run resumes from the store: every row is found there, no engine starts.
    again = cache_teacher_ray(_cfg(tiny_teacher_dir, dolly, url), replicas=2, progress=False, shard_max_bytes=1)
    assert again["rows_written"] == 0 and again["rows_already_cached"] == len(want)
    assert read_manifest(url)["shards"] == m["shards"]


def test_refuses_an_out_holding_a_single_process_cache(tiny_teacher_dir, dolly, reference):
    out, _ = reference
    with pytest.raises(CacheMismatchError, match="written without --ray"):
        cache_teacher_ray(_cfg(tiny_teacher_dir, dolly, out), replicas=2, progress=False)


def test_missing_ray_names_the_extra(tiny_teacher_dir, dolly, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(RayStage1Error, match=r"pip install 'rlkd\[ray\]'"):
        cache_teacher_ray(_cfg(tiny_teacher_dir, dolly, tmp_path / "out"), replicas=2)
