"""Caches on object storage, read side: a real S3 server (moto, started here on 127.0.0.1), no mocked client. (The
write side is tests/test_cache_remote_write.py.)

A cache is written locally with the existing writer, uploaded to a fresh bucket, and everything that reads it from
``s3://`` is compared with the same code reading the local folder (the reference): rows, batches and their order,
resume, verify, inspect, ``datasets.load_dataset`` and two training steps. Faults are real: the server is stopped
and restarted, answers HTTP 503, or serves an object with a flipped byte.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rlkd.cache import CacheCorruptError, CacheReader, CacheWriter, decode_logprobs, read_manifest, verify_report
from rlkd.cache.manifest import shard_files
from rlkd.cache.shard_io import LocalShardCache
from rlkd.cache.storage import CacheLocation, RetryPolicy, StorageError, StorageURLError, url_problem
from tests.cache_helpers import assert_rows_equal, make_rows, test_meta
from tests.s3_server import flip_byte, s3_bucket, s3_server, upload_dir  # noqa: F401  (pytest fixtures)

K = 5
FAST_RETRY = RetryPolicy(attempts=4, first_delay=0.05, max_delay=0.2)


@pytest.fixture(scope="module")
def rows():
    # fixed-k and adaptive-k rows, lengths 2..26, vocab 211 (not the helpers' default)
    return make_rows(60, k=K, vocab=211, seed=31, max_len=26) + make_rows(
        37, k=K, vocab=211, seed=32, source_offset=900, max_len=26, min_prob=4e-2)


@pytest.fixture(scope="module")
def local_cache(tmp_path_factory, rows) -> Path:
    """97 rows in q8, row groups of 7 rows, shards of ~9 KB: 5+ shards, 14 row groups."""
    out = tmp_path_factory.mktemp("remote-src") / "cache"
    with CacheWriter(out, test_meta(vocab=211), k=K, codec="q8", row_group_rows=7, shard_max_bytes=9_000) as w:
        for r in rows:
            w.write(r)
    assert len(read_manifest(out)["shards"]) >= 4
    return out


@pytest.fixture
def remote(s3_bucket, local_cache) -> str:
    return upload_dir(local_cache, s3_bucket, "caches/run-1")


def batches(reader) -> list[list]:
    return list(reader)


def assert_batches_equal(a: list[list], b: list[list]) -> None:
    """Batches of TeacherRow, equal row by row and array by array."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert [r.row_id for r in x] == [r.row_id for r in y]
        for rx, ry in zip(x, y):
            for key, value in vars(rx).items():
                if isinstance(value, np.ndarray):
                    np.testing.assert_array_equal(value, getattr(ry, key), err_msg=key)
                else:
                    assert value == getattr(ry, key), key


def shard_bytes(cache: Path) -> int:
    return sum(s["bytes"] for s in read_manifest(cache)["shards"])


# ---- locations --------------------------------------------------------------------------------------------------

def test_locations_parse_and_refuse_secrets_and_options(tmp_path):
    assert url_problem("cache/dolly") is None and url_problem("s3://bucket/a/b") is None
    loc = CacheLocation.parse(f"file://{tmp_path}/c")
    assert loc.is_local and loc.local_path() == tmp_path / "c" and loc.name("x.parquet") == f"{tmp_path}/c/x.parquet"
    plain = CacheLocation.parse(tmp_path / "c")
    assert plain.is_local and plain.path("m.json") == f"{tmp_path}/c/m.json"
    # a secret in the URL is refused, and the refusal does not repeat it
    msg = url_problem("s3://AKIAXXXX:supersecret@bucket/prefix")
    assert "credentials" in msg and "supersecret" not in msg and "AKIAXXXX" not in msg
    with pytest.raises(StorageURLError) as e:
        CacheLocation.parse("s3://AKIAXXXX:supersecret@bucket/prefix")
    assert "supersecret" not in str(e.value)
    assert "options in the URL" in url_problem("s3://bucket/p?endpoint_override=x&secret_key=hunter2")
    assert "hunter2" not in url_problem("s3://bucket/p?endpoint_override=x&secret_key=hunter2")
    assert "no bucket" in url_problem("s3:///prefix")
    assert "unknown scheme ftp://" in url_problem("ftp://host/cache")
    assert "dataset repositories" in url_problem("hf://models/org/name")
    assert url_problem("hf://datasets/org/name/sub") is None and url_problem("gs://b/p") is None


def test_train_config_reports_url_and_io_problems_together():
    from rlkd.config import ConfigError
    from rlkd.trainer.config import build_train_config

    with pytest.raises(ConfigError) as e:
        build_train_config({}, dict(student="s", cache="s3://AK:SK@bucket/c", out="o", max_steps=1, prefetch=-1,
                                    local_cache_gb=0, eval_cache="ftp://x/y"))
    msg = str(e.value)
    for expected in ("credentials do not belong", "prefetch must be >= 0", "local_cache_gb must be > 0",
                     "unknown scheme ftp://"):
        assert expected in msg
    assert "SK@" not in msg
    cfg = build_train_config({}, dict(student="s", cache="s3://bucket/c", out="o", max_steps=1,
                                      local_cache="/tmp/lc", local_cache_gb=2.5))
    assert (cfg.data.cache, cfg.data.local_cache, cfg.data.local_cache_gb, cfg.data.prefetch) == \
        ("s3://bucket/c", "/tmp/lc", 2.5, 4)


@pytest.mark.parametrize("message, transient", [
    ("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 7, Couldn't connect to server", True),
    ("AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate.", True),
    ("AWS Error UNKNOWN (HTTP status 503) during GetObject operation", True),
    ("AWS Error INTERNAL_FAILURE during GetObject operation: Failed to flush response stream", True),
    ("AWS Error ACCESS_DENIED during GetObject operation: Access Denied", False),
    ("AWS Error UNKNOWN (HTTP status 403) during HeadObject operation: No response body.", False),
    ("AWS Error NO_SUCH_BUCKET during ListObjectsV2 operation", False),
    ("404 Client Error. Repository Not Found for url: https://huggingface.co/api/datasets/x/y", False),
    ("Offline mode is enabled. Tried to reach https://huggingface.co/api/datasets/x/y", False),
])
def test_transient_errors_are_told_apart_from_permanent_ones(message, transient):
    from rlkd.cache.storage import is_transient

    assert is_transient(OSError(message)) is transient
    assert not is_transient(FileNotFoundError(message)) and not is_transient(ValueError(message))
    assert is_transient(ConnectionResetError("reset by peer")) and is_transient(TimeoutError())


def test_hf_locations_are_read_only():
    loc = CacheLocation.parse("hf://datasets/someone/some-cache/sub")
    assert loc.read_only and loc.root == "datasets/someone/some-cache/sub"
    with pytest.raises(StorageError, match="read-only"):
        loc.write_bytes("manifest.json", b"{}")


def test_s3_location_basics(s3_bucket):
    loc = CacheLocation.parse(s3_bucket.url("a/b/"), retry=FAST_RETRY)
    assert loc.url == s3_bucket.url("a/b") and not loc.is_dir()
    loc.write_bytes("x/y.bin", b"0123456789")
    assert loc.list_files() == {"x/y.bin": 10} and loc.is_dir() and loc.is_file("x/y.bin")
    assert loc.read_range("x/y.bin", 2, 3) == b"234" and loc.size("x/y.bin") == 10 and loc.size("zz") is None
    assert s3_bucket.keys() == ["a/b/x/y.bin"]
    loc.write_bytes("x/y.bin", b"new")  # replaces the whole object
    assert loc.read_bytes("x/y.bin") == b"new"
    with pytest.raises(FileNotFoundError, match=f"{s3_bucket.url('a/b')}/nope does not exist"):
        loc.read_bytes("nope")
    assert loc.stats.retries == 0  # a missing object is not retried
    loc.remove("x/y.bin")
    assert loc.list_files() == {}


# ---- reads ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefetch", [0, 3])
def test_remote_epoch_equals_local_with_resume_in_the_middle(local_cache, remote, prefetch):
    kw = dict(batch_size=4, shuffle=True, seed=7, shuffle_buffer=13, epoch=2)
    want = batches(CacheReader(local_cache, prefetch=2, **kw))
    got = batches(CacheReader(remote, prefetch=prefetch, retry=FAST_RETRY, **kw))
    assert_batches_equal(got, want)
    # stop after 5 batches, resume a fresh remote reader from its state: the rest is identical
    first = CacheReader(remote, prefetch=prefetch, **kw)
    head = []
    for b in first:
        head.append(b)
        if len(head) == 5:
            break
    state = json.loads(json.dumps(first.state_dict()))
    assert state == {**CacheReader(local_cache, **kw).state_dict(), "position": 20}  # same state as a local read
    second = CacheReader(remote, prefetch=prefetch, **kw)
    second.load_state_dict(state)
    assert_batches_equal(head + batches(second), want)


def test_remote_rank_split_and_columns_match_local(local_cache, remote, rows):
    for rank in range(2):
        kw = dict(batch_size=3, seed=1, rank=rank, world_size=2, shuffle_buffer=5)
        assert_batches_equal(batches(CacheReader(remote, **kw)), batches(CacheReader(local_cache, **kw)))
    by_id = {r.row_id: r for r in rows}
    got = list(CacheReader(remote, shuffle=False).iter_rows())
    assert [r.row_id for r in got] == [r.row_id for r in CacheReader(local_cache, shuffle=False).iter_rows()]
    for r in got:  # against the rows as written (q8 log-probs within the codec's error)
        assert_rows_equal(r, by_id[r.row_id], logprobs=False)
    blocks = list(CacheReader(remote, shuffle=False).iter_blocks(columns=["input_ids"]))
    assert sum(b.num_rows for b in blocks) == len(rows)


def test_ranged_reads_download_about_the_cache_once(local_cache, remote, s3_server):
    reader = CacheReader(remote, batch_size=8, seed=3, prefetch=2)
    before, read_before = len(s3_server.log), reader.location.stats.bytes_read
    n = sum(len(b) for b in reader)
    assert n == reader.num_rows
    served = sum(r.bytes for r in s3_server.log[before:] if r.method == "GET" and "shard-" in r.path)
    size = shard_bytes(local_cache)
    # every row group once, plus each shard's footer once (the footer read is at most 64 KiB of a small shard)
    assert size * 0.95 <= served <= size * 2.05, (served, size)
    assert reader.location.stats.bytes_read - read_before == served
    # one ranged GET per row group plus one per footer, and no HEAD per read
    gets = [r for r in s3_server.log[before:] if r.method == "GET" and "shard-" in r.path]
    heads = [r for r in s3_server.log[before:] if r.method == "HEAD"]
    n_shards, n_groups = len(reader.manifest["shards"]), len(reader._units)
    assert len(gets) == n_shards + n_groups and len(heads) <= n_shards, (len(gets), len(heads))


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_prefetch_keeps_at_most_n_reads_in_flight(local_cache, remote, s3_server, prefetch):
    kw = dict(batch_size=4, seed=6)
    reader = CacheReader(remote, prefetch=prefetch, **kw)
    s3_server.stall_next(10_000, 0.05, match="shard-")  # every read takes a while, so reads overlap if they can
    s3_server.recorder.reset_inflight()
    try:
        got = batches(reader)
    finally:
        s3_server.stall_next(0, 0.0)
    assert_batches_equal(got, batches(CacheReader(local_cache, **kw)))
    assert s3_server.recorder.max_inflight == max(1, prefetch)


def test_server_restart_mid_epoch_is_retried_and_the_epoch_is_identical(local_cache, remote, s3_server):
    kw = dict(batch_size=3, seed=5, shuffle_buffer=9)
    want = batches(CacheReader(local_cache, **kw))
    reader = CacheReader(remote, prefetch=2, retry=RetryPolicy(attempts=8, first_delay=0.25, max_delay=1.0), **kw)
    got = []
    restarted = threading.Event()

    def restart_later():
        # Longer than one read attempt can last against a stopped server (0.7-2.8 s measured: the AWS SDK retries
        # inside it), so the outage outlasts the SDK's own retries and rlkd's must ride it out.
        time.sleep(5.0)
        s3_server.start()
        restarted.set()

    try:
        for b in reader:
            got.append(b)
            if len(got) == 3:
                s3_server.stop()  # refuses connections from now on, mid-epoch
                threading.Thread(target=restart_later, daemon=True).start()
    finally:
        restarted.wait(10)
        if not restarted.is_set():
            s3_server.start()
    assert reader.location.stats.retries > 0  # the outage was hit, and ridden out
    assert_batches_equal(got, want)


def test_http_503s_are_retried_and_an_outage_names_the_object(local_cache, remote, s3_server):
    kw = dict(batch_size=5, seed=2)
    want = batches(CacheReader(local_cache, **kw))
    reader = CacheReader(remote, prefetch=0, retry=FAST_RETRY, **kw)
    s3_server.fail_next(5, match="shard-")  # more than the AWS SDK's own 3 tries: our retry takes over
    assert_batches_equal(batches(reader), want)
    assert reader.location.stats.retries >= 1
    reader = CacheReader(remote, prefetch=0, retry=FAST_RETRY, **kw)
    s3_server.fail_next(10_000, match="shard-")
    try:
        with pytest.raises(StorageError) as e:
            batches(reader)
    finally:
        s3_server.fail_next(0)
    msg = str(e.value)
    assert f"{remote}/shard-" in msg and "after 4 attempts" in msg


def test_a_stalled_store_times_out_and_is_retried(local_cache, remote, s3_server):
    kw = dict(batch_size=7, seed=8)
    want = batches(CacheReader(local_cache, **kw))
    reader = CacheReader(remote, prefetch=0, retry=FAST_RETRY, **kw)
    s3_server.stall_next(2, 20.0, match="shard-")  # two requests that would hang for 20 s
    t0 = time.perf_counter()
    assert_batches_equal(batches(reader), want)
    assert time.perf_counter() - t0 < 20  # each stall was cut by a timeout (~3 s), not waited out


def test_flipped_byte_in_a_remote_shard_is_caught_and_named(local_cache, remote, s3_bucket):
    m = read_manifest(local_cache)
    shard = m["shards"][1]
    key = f"caches/run-1/{shard['file']}"
    flip_byte(s3_bucket, key, 200)  # inside the first row group's data pages
    report = verify_report(remote)
    assert any(f"{remote}/{shard['file']}" in p and "sha256" in p for p in report["problems"]), report
    # the reader's page checksums catch it on ranged reads too, naming the object
    with pytest.raises(CacheCorruptError, match=f"shard {remote}/{shard['file']}"):
        batches(CacheReader(remote, shuffle=False, batch_size=50))


def test_local_cache_copy_is_checked_against_the_manifest(local_cache, remote, s3_bucket, tmp_path):
    shard = read_manifest(local_cache)["shards"][0]
    flip_byte(s3_bucket, f"caches/run-1/{shard['file']}", 100)
    with pytest.raises(CacheCorruptError, match=f"shard {remote}/{shard['file']}: the downloaded copy"):
        batches(CacheReader(remote, shuffle=False, local_cache=tmp_path / "lc"))
    assert not list((tmp_path / "lc").iterdir())  # the bad copy is not kept, not even under a temporary name


def test_local_cache_makes_epoch_two_download_nothing(local_cache, remote, s3_server, tmp_path):
    kw = dict(batch_size=4, seed=9, shuffle_buffer=11)
    reader = CacheReader(remote, local_cache=tmp_path / "lc", prefetch=3, **kw)
    local = CacheReader(local_cache, **kw)
    size = shard_bytes(local_cache)
    for epoch in range(3):
        reader.set_epoch(epoch)
        local.set_epoch(epoch)
        before, read_before = len(s3_server.log), reader.location.stats.bytes_read
        assert_batches_equal(batches(reader), batches(local))
        served = sum(r.bytes for r in s3_server.log[before:] if r.method == "GET" and "shard-" in r.path)
        if epoch == 0:
            assert served == size  # each shard downloaded whole, exactly once
        else:
            assert served == 0 and not [r for r in s3_server.log[before:] if "shard-" in r.path]
        assert reader.location.stats.bytes_read - read_before == served
    assert sorted(p.name for p in (tmp_path / "lc").glob("*.parquet")) == \
        sorted(f"{s['sha256']}.parquet" for s in read_manifest(local_cache)["shards"])


def test_local_cache_budget_evicts_least_recently_used(local_cache, remote, tmp_path):
    shards = read_manifest(local_cache)["shards"]
    budget = sum(s["bytes"] for s in shards[:2]) + 10  # room for about two shards
    (tmp_path / "lc").mkdir()
    stale, fresh = tmp_path / "lc" / ".x.parquet.1.rlkd-download", tmp_path / "lc" / ".y.parquet.2.rlkd-download"
    stale.write_bytes(b"left by a killed process")
    fresh.write_bytes(b"another process is downloading this")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    cache = LocalShardCache(tmp_path / "lc", budget)
    assert not stale.exists() and fresh.exists()
    fresh.unlink()
    loc = CacheLocation.parse(remote)
    for s in shards[:2]:
        cache.fetch(loc, s["file"], sha256=s["sha256"], size=s["bytes"])
    time.sleep(0.01)
    cache.fetch(loc, shards[0]["file"], sha256=shards[0]["sha256"], size=shards[0]["bytes"])  # 0 is now newer
    cache.fetch(loc, shards[2]["file"], sha256=shards[2]["sha256"], size=shards[2]["bytes"])  # evicts 1, not 0
    held = {p.name for p in (tmp_path / "lc").glob("*.parquet")}
    assert held == {f"{shards[0]['sha256']}.parquet", f"{shards[2]['sha256']}.parquet"}
    assert cache.total_bytes() <= budget and cache.hits == 1 and cache.misses == 3
    # a whole epoch through a budget of two shards (the two reads in flight) still reads every row, identically,
    # evicting and fetching again as the shuffle comes back to a shard
    budget = 2 * max(s["bytes"] for s in shards) + 10
    kw = dict(batch_size=6, seed=4)
    small = CacheReader(remote, local_cache=tmp_path / "lc2", local_cache_gb=budget / 1e9, prefetch=2, **kw)
    assert_batches_equal(batches(small), batches(CacheReader(local_cache, **kw)))
    assert sum(p.stat().st_size for p in (tmp_path / "lc2").glob("*.parquet")) <= budget
    assert small.local_cache.downloaded_bytes > shard_bytes(local_cache)


def test_missing_remote_cache_and_shard_are_clear(s3_bucket, local_cache, remote):
    with pytest.raises(FileNotFoundError, match="no cache there"):
        CacheReader(s3_bucket.url("nothing/here"))
    s3_bucket.client().delete_object(Bucket=s3_bucket.name, Key="caches/run-1/" +
                                     read_manifest(local_cache)["shards"][0]["file"])
    with pytest.raises(CacheCorruptError, match=f"shard {remote}/shard-.* is listed in {remote}/manifest.json but"):
        CacheReader(remote)


# ---- interop ----------------------------------------------------------------------------------------------------

def _datasets_rows(data_files, tmp_path, monkeypatch) -> list[dict]:
    import datasets

    # HF_HUB_OFFLINE=1 (the Makefile sets it: the tests use no hub) also makes datasets refuse s3:// files
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    ds = datasets.load_dataset("parquet", data_files=data_files, split="train", cache_dir=str(tmp_path / "hf"))
    return list(ds)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_datasets_load_dataset_reads_the_cache(local_cache, remote, rows, tmp_path, monkeypatch, where):
    files = shard_files(local_cache if where == "local" else remote)
    assert files[0].startswith(str(local_cache) if where == "local" else f"{remote}/shard-")
    got = _datasets_rows(files, tmp_path, monkeypatch)
    want = list(CacheReader(local_cache, shuffle=False).iter_rows())
    assert [g["row_id"] for g in got] == [r.row_id for r in want]
    columns = set(got[0])
    assert {"row_id", "source_index", "input_ids", "loss_mask", "topk_count", "topk_ids", "top1_logprob",
            "logprob_gaps", "tail_logmass", "target_logprob", "target_rank"} == columns
    by_id = {r.row_id: r for r in rows}
    decoded = {r.row_id: r for r in want}
    for g in got:
        r = by_id[g["row_id"]]
        # the README's recipe: q8 log-probs decode with rlkd.cache.decode_logprobs, as the reader decodes them
        lp = decode_logprobs("q8", {"top1_logprob": np.asarray(g["top1_logprob"], np.float16),
                                    "logprob_gaps": np.frombuffer(g["logprob_gaps"], np.uint8)},
                             np.asarray(g["topk_count"]))
        np.testing.assert_array_equal(lp, decoded[g["row_id"]].topk_logprobs)
        assert g["source_index"] == r.source_index and g["input_ids"] == r.input_ids.tolist()
        assert g["topk_ids"] == r.topk_ids.tolist() and g["topk_count"] == r.topk_count.tolist()
        assert g["loss_mask"] == r.loss_mask.tolist() and g["target_rank"] == r.target_rank.tolist()
        np.testing.assert_array_equal(np.float32(g["tail_logmass"]), r.tail_logmass)


# ---- commands ---------------------------------------------------------------------------------------------------

def test_verify_and_inspect_json_on_s3(local_cache, remote):
    from click.testing import CliRunner

    from rlkd.cli import main

    runner = CliRunner()
    local = json.loads(runner.invoke(main, ["verify", str(local_cache), "--deep", "--json"]).output)
    res = runner.invoke(main, ["verify", remote, "--deep", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    assert {k: v for k, v in got.items() if k != "cache"} == {k: v for k, v in local.items() if k != "cache"}
    assert got["ok"] and got["cache"] == remote and got["rows"] == 97
    res = runner.invoke(main, ["inspect", remote, "--json"])
    assert res.exit_code == 0, res.output
    want = json.loads(runner.invoke(main, ["inspect", str(local_cache), "--json"]).output)
    got = json.loads(res.output)
    for obj in (got, want):
        obj["summary"].pop("cache"), obj["summary"].pop("timing")
    assert got == want
    res = runner.invoke(main, ["inspect", remote, "--json", "--row", "3", "--tokenizer", "none-such"])
    assert res.exit_code == 1 and "Traceback" not in res.output  # no tokenizer: one clear line
    res = runner.invoke(main, ["verify", remote + "-missing"])
    assert res.exit_code == 1 and "no cache there" in res.output
    assert "rlkd-test-secret" not in res.output + str(got)  # the fixture's secret key never shows


def test_verify_names_remote_objects_missing_and_unlisted(local_cache, remote, s3_bucket):
    shard = read_manifest(local_cache)["shards"][0]["file"]
    client = s3_bucket.client()
    client.copy_object(Bucket=s3_bucket.name, Key="caches/run-1/stray.parquet",
                       CopySource={"Bucket": s3_bucket.name, "Key": f"caches/run-1/{shard}"})
    client.delete_object(Bucket=s3_bucket.name, Key=f"caches/run-1/{shard}")
    problems = verify_report(remote)["problems"]
    assert f"shard {remote}/{shard}: missing" in problems
    assert any(p.startswith(f"{remote}/stray.parquet is not listed") for p in problems)


def test_two_training_steps_from_s3_equal_training_from_the_local_copy(tiny_teacher_dir, tiny_student_dir, s3_bucket,
                                                                        tmp_path):
    from click.testing import CliRunner
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from rlkd.cache import tokenizer_identity
    from rlkd.cli import main
    from tests.cache_from_model import teacher_rows

    tok = AutoTokenizer.from_pretrained(str(tiny_teacher_dir))
    meta = {**test_meta(vocab=len(tok)), "tokenizer": tokenizer_identity(tok),
            "teacher": {"name_or_path": str(tiny_teacher_dir), "vocab_size": len(tok)}}
    local = tmp_path / "cache"
    with CacheWriter(local, meta, k=12, codec="fp32", row_group_rows=4, shard_max_bytes=20_000) as w:
        for r in teacher_rows(tiny_teacher_dir, 24, k=12, seed=3):
            w.write(r)
    assert len(read_manifest(local)["shards"]) >= 2
    remote = upload_dir(local, s3_bucket, "kd/cache")
    common = ["train-student", "--student", str(tiny_student_dir), "--max-steps", "2", "--batch-size", "3",
              "--lr", "3e-3", "--device", "cpu", "--no-progress", "--save-every", "0", "--seed", "4"]
    runner = CliRunner()
    evals = ["--eval-every", "2", "--eval-max-rows", "5"]
    res = runner.invoke(main, common + evals + ["--cache", str(local), "--eval-cache", str(local),
                                                "--out", str(tmp_path / "run-local")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, common + evals + ["--cache", remote, "--eval-cache", remote, "--out",
                                                str(tmp_path / "run-s3"), "--local-cache", str(tmp_path / "lc"),
                                                "--local-cache-gb", "0.5", "--prefetch", "3"])
    assert res.exit_code == 0, res.output
    metrics = [[json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
               for run in ("run-local", "run-s3")]
    drop = ("_per_s", "time", "elapsed", "wall")  # rates and clocks differ run to run
    strip = [[{k: v for k, v in m.items() if not any(d in k for d in drop)} for m in ms] for ms in metrics]
    assert strip[0] == strip[1] and any(m.get("split") == "eval" for m in metrics[1])
    a = load_file(str(tmp_path / "run-local" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "run-s3" / "final" / "model.safetensors"))
    before = load_file(str(Path(tiny_student_dir) / "model.safetensors"))
    assert a.keys() == b.keys() and any(not torch.equal(a[n], before[n]) for n in a)  # it did train
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert list((tmp_path / "lc").glob("*.parquet"))  # the shards came through the local cache
    # inspect --row on the remote copy decodes the teacher's tokens as on the local one
    views = [runner.invoke(main, ["inspect", c, "--row", "2", "--json", "--positions", "0:6"]) for c in (str(local),
                                                                                                   remote)]
    assert all(v.exit_code == 0 for v in views), [v.output for v in views]
    assert json.loads(views[0].output) == json.loads(views[1].output)
    # a broken URL is one clear line before anything runs
    res = runner.invoke(main, common + ["--cache", "s3://key:secret@bucket/x", "--out", str(tmp_path / "bad")])
    assert res.exit_code != 0 and "credentials do not belong" in res.output and "secret@" not in res.output
