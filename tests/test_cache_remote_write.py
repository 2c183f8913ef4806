"""Caches on object storage, write side: stage 1 writing straight to s3://, against a real S3 server (moto, started
here on 127.0.0.1; each test gets a fresh bucket), no mocked client.

References are independent of the remote path: the same run written to a local folder (the rename-based writer),
compared row by row and byte by byte; training from the local copy; an uninterrupted run. Faults are real: a
process SIGKILLed while the server holds its upload, a SIGSTOPped writer whose lease expires, a flipped byte in a
stored object, a store that ignores conditional headers.
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

import pytest
import torch
from click.testing import CliRunner

from rlkd.cache import CacheCorruptError, CacheLockedError, CacheReader, CacheWriter, read_manifest, verify_cache
from rlkd.cache.lease import LEASE_NAME, Lease, LeaseLostError
from rlkd.cache.manifest import MANIFEST_NAME, CacheDirError
from rlkd.cache.storage import CacheLocation, StorageError
from rlkd.cli import main
from rlkd.config import build_config
from rlkd.pipeline.config import CacheTeacherConfig
from rlkd.pipeline.engines import HFEngine
from rlkd.pipeline.run import cache_teacher
from tests import tiny
from tests.cache_helpers import assert_rows_equal, make_rows, test_meta
from tests.s3_server import flip_byte, s3_bucket, s3_server  # noqa: F401  (pytest fixtures)

REPO = Path(__file__).resolve().parents[1]
K = 128  # big rows (fp32, ~1 KB per token): 1 MiB shards finish every ~20 rows, so a run has a few shards


def _write_dolly(path: Path, n: int, seed: int) -> Path:
    """Dolly-shaped rows of ~95 tokens of pseudo-English; row 3 has an empty response (skipped)."""
    rng = random.Random(seed)

    def text(lo, hi):
        return " ".join(rng.choice(tiny._WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    rows = [{"instruction": text(3, 10), "context": text(3, 12) if i % 3 == 0 else "", "response": text(25, 60)}
            for i in range(n)]
    rows[3]["response"] = ""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return _write_dolly(tmp_path_factory.mktemp("data") / "dolly.jsonl", 60, seed=1)


def _args(teacher, data, out, *extra) -> list[str]:
    return ["cache-teacher", "--teacher", str(teacher), "--dataset", str(data), "--out", str(out), "--engine", "hf",
            "--codec", "fp32", "--top-k", str(K), "--batch-size", "2", "--row-group-rows", "2", "--shard-max-mb", "1",
            "--no-progress", *extra]


@pytest.fixture(scope="module")
def local_run(tiny_teacher_dir, data, tmp_path_factory) -> Path:
    """The reference: the same command, written to a local folder."""
    out = tmp_path_factory.mktemp("local") / "cache"
    res = CliRunner().invoke(main, _args(tiny_teacher_dir, data, out))
    assert res.exit_code == 0, res.output
    assert len(read_manifest(out)["shards"]) >= 3
    return out


@pytest.fixture(autouse=True)
def _rlkd_home(tmp_path, monkeypatch):
    monkeypatch.setenv("RLKD_HOME", str(tmp_path / "rlkd-home"))  # stage 1's log of a URL --out goes there


def _rows(cache) -> dict:
    return {r.row_id: r for r in CacheReader(cache, batch_size=1, shuffle=False).iter_rows()}


def _assert_same_rows(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for rid, w in want.items():
        assert_rows_equal(got[rid], w)  # exact: fp32 codec, same engine, same batches


def _shard_objects(bucket, prefix: str) -> list[str]:
    return [k[len(prefix) + 1:] for k in bucket.keys(prefix + "/") if k.endswith(".parquet")]


def _row_ids_in_objects(bucket, prefix: str) -> list[str]:
    """Every row_id in every shard object under the prefix, listed or not (duplicates kept: doubling shows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    client = bucket.client()
    ids = []
    for name in _shard_objects(bucket, prefix):
        body = client.get_object(Bucket=bucket.name, Key=f"{prefix}/{name}")["Body"].read()
        ids += pq.read_table(pa.BufferReader(body), columns=["row_id"]).column("row_id").to_pylist()
    return ids


# ---- one URL end to end -------------------------------------------------------------------------------------------

def test_one_url_end_to_end_equals_the_local_run(tiny_teacher_dir, tiny_student_dir, data, local_run, s3_bucket,
                                                 tmp_path):
    from safetensors.torch import load_file

    url = s3_bucket.url("runs/dolly")
    runner = CliRunner()
    res = runner.invoke(main, _args(tiny_teacher_dir, data, url))
    assert res.exit_code == 0, res.output
    assert f"cache-teacher done: {url}" in res.output

    # The cache equals the local run: same manifest entries, same bytes in every shard, same rows.
    remote, local = read_manifest(url), read_manifest(local_run)
    assert remote["complete"] and [(s["file"], s["sha256"], s["bytes"]) for s in remote["shards"]] == \
        [(s["file"], s["sha256"], s["bytes"]) for s in local["shards"]]
    for s in local["shards"]:
        body = s3_bucket.client().get_object(Bucket=s3_bucket.name, Key=f"runs/dolly/{s['file']}")["Body"].read()
        assert body == (local_run / s["file"]).read_bytes(), s["file"]
    _assert_same_rows(_rows(url), _rows(local_run))
    assert s3_bucket.keys("runs/dolly/") == sorted(f"runs/dolly/{n}" for n in [MANIFEST_NAME] +
                                                   [s["file"] for s in remote["shards"]])  # no lease left behind
    assert list((tmp_path / "rlkd-home" / "logs").glob("*cache-teacher.log"))  # the dependency log stayed local

    res = runner.invoke(main, ["verify", url, "--deep"])
    assert res.exit_code == 0 and "OK (deep check" in res.output, res.output

    # Two training steps from the URL equal two from the local folder, weight for weight.
    common = ["train-student", "--student", str(tiny_student_dir), "--max-steps", "2", "--batch-size", "3",
              "--lr", "3e-3", "--device", "cpu", "--no-progress", "--save-every", "0", "--seed", "4"]
    for name, cache in (("local", str(local_run)), ("s3", url)):
        res = runner.invoke(main, common + ["--cache", cache, "--out", str(tmp_path / f"run-{name}")])
        assert res.exit_code == 0, res.output
    a = load_file(str(tmp_path / "run-local" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "run-s3" / "final" / "model.safetensors"))
    before = load_file(str(Path(tiny_student_dir) / "model.safetensors"))
    assert any(not torch.equal(a[n], before[n]) for n in a)  # it did train
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)

    views = [runner.invoke(main, ["inspect", c, "--json"]) for c in (str(local_run), url)]
    assert all(v.exit_code == 0 for v in views), [v.output for v in views]
    got, want = (json.loads(v.output) for v in views)
    for obj in (got, want):
        obj["summary"].pop("cache"), obj["summary"].pop("timing")
    assert got == want


# ---- SIGKILL during an upload, then resume --------------------------------------------------------------------------

def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _wait(predicate, timeout: float, what: str, proc=None) -> None:
    t0 = time.monotonic()
    while not predicate():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process ended (rc {proc.returncode}) before {what}:\n"
                        + proc.stderr.read().decode(errors="replace")[-3000:])
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_sigkill_during_an_upload_then_resume_equals_uninterrupted(tiny_teacher_dir, data, local_run, s3_bucket,
                                                                   s3_server):
    url = s3_bucket.url("kill")
    # The server holds the upload of the second shard (whatever request starts it: PUT, or POST for a multipart
    # upload); the process is killed while that request is in flight.
    s3_server.stall_next(1, 3.0, match="kill/shard-00001.parquet", methods=("PUT", "POST"))
    proc = subprocess.Popen([sys.executable, "-m", "rlkd.cli", *_args(tiny_teacher_dir, data, url,
                                                                       "--lease-seconds", "8")],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait(s3_server.recorder.faults.stalled.is_set, 300, "the upload of shard-00001", proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = time.monotonic()
    # Let the server finish the held request (from a dead client), as a store would, before looking.
    _wait(lambda: any("kill/shard-00001" in r.path and r.method in ("PUT", "POST") for r in list(s3_server.log)),
          30, "the held request to end")
    m = read_manifest(url)
    assert not m["complete"] and [s["file"] for s in m["shards"]] == ["shard-00000.parquet"]

    # The killed run's lease is still fresh: a second writer is refused, naming it.
    with pytest.raises(CacheLockedError, match=rf"(?s)another rlkd process \(CacheWriter, pid {proc.pid} .*expires in"):
        CacheWriter(url, {}, k=K)
    time.sleep(max(0.0, 8.5 - (time.monotonic() - killed_at)))  # then it expires (8 s after its last renewal)

    res = CliRunner().invoke(main, _args(tiny_teacher_dir, data, url))
    assert res.exit_code == 0, res.output
    assert f"already cached, skipped: {m['rows']}" in res.output
    got, want = _rows(url), _rows(local_run)
    _assert_same_rows(got, want)
    final = read_manifest(url)
    assert final["complete"] and final["rows"] == len(want)
    ids = _row_ids_in_objects(s3_bucket, "kill")
    assert len(ids) == len(set(ids)) == len(want)  # nothing doubled, not even in an unlisted object
    assert sorted(_shard_objects(s3_bucket, "kill")) == sorted(s["file"] for s in final["shards"])
    assert verify_cache(url, deep=True) == []


# ---- corruption ---------------------------------------------------------------------------------------------------

def _write(url, rows, **kw):
    kw = {"k": 8, "row_group_rows": 5, "shard_max_bytes": 6_000, **kw}
    with CacheWriter(url, test_meta(), **kw) as w:
        for r in rows:
            if not w.has(r.row_id):
                w.write(r)


def test_flipped_byte_in_a_remote_shard_is_caught_on_resume_and_by_verify_then_repaired(s3_bucket):
    rows = make_rows(45, k=8, seed=34)
    url = s3_bucket.url("c")
    _write(url, rows)
    shard = read_manifest(url)["shards"][1]
    flip_byte(s3_bucket, f"c/{shard['file']}", shard["bytes"] // 2)
    with pytest.raises(CacheCorruptError) as err:
        CacheWriter(url, test_meta(), k=8)
    msg = str(err.value)
    assert f"shard {shard['file']} ({shard['rows']} rows): its sha256 differs" in msg
    assert f"rlkd verify --repair {url}" in msg
    runner = CliRunner()
    res = runner.invoke(main, ["verify", url])
    assert res.exit_code == 1 and f"shard {url}/{shard['file']}: sha256 differs" in res.output
    damaged = s3_bucket.client().get_object(Bucket=s3_bucket.name, Key=f"c/{shard['file']}")["Body"].read()

    # Repair on the store: the object is copied aside (nothing deleted), dropped from the manifest; resume rescores.
    res = runner.invoke(main, ["verify", url, "--repair"])
    assert res.exit_code == 0 and f"{shard['file']} -> {shard['file']}.damaged" in res.output, res.output
    keys = s3_bucket.keys("c/")
    assert f"c/{shard['file']}" not in keys and f"c/{shard['file']}.damaged" in keys
    moved = s3_bucket.client().get_object(Bucket=s3_bucket.name, Key=f"c/{shard['file']}.damaged")["Body"].read()
    assert moved == damaged
    m = read_manifest(url)
    assert not m["complete"] and shard["file"] not in [s["file"] for s in m["shards"]]
    with CacheWriter(url, test_meta(), k=8, row_group_rows=5, shard_max_bytes=6_000) as w:
        missing = [r for r in rows if not w.has(r.row_id)]
        assert len(missing) == shard["rows"]
        for r in missing:
            w.write(r)
    back = _rows(url)
    assert sorted(back) == sorted(r.row_id for r in rows)
    for r in rows:
        assert_rows_equal(back[r.row_id], r, logprobs=False)
    assert verify_cache(url, deep=True) == []


def test_each_upload_is_read_back_and_a_bad_copy_is_sent_again_or_refused(s3_bucket, monkeypatch, tmp_path):
    """The store keeps other bytes than it was sent (a corrupting proxy, here: a corrupted copy uploaded in place of
    the file): the read-back sha256 catches it."""
    rows = make_rows(30, k=8, seed=5)
    url = s3_bucket.url("rb")
    real_upload, bad = CacheLocation.upload, {"left": 1}

    def corrupting_upload(self, rel, source, **kw):
        if bad["left"] > 0:
            bad["left"] -= 1
            data = bytearray(Path(source).read_bytes())
            data[len(data) // 2] ^= 0x40
            copy = tmp_path / "corrupted"
            copy.write_bytes(bytes(data))
            source = copy
        return real_upload(self, rel, source, **kw)

    monkeypatch.setattr(CacheLocation, "upload", corrupting_upload)
    _write(url, rows)  # the first shard's first upload is bad: it is uploaded again
    assert bad["left"] == 0 and verify_cache(url, deep=True) == []
    assert sorted(_rows(url)) == sorted(r.row_id for r in rows)

    url2 = s3_bucket.url("rb2")
    bad["left"] = 10**6  # every upload is bad
    with pytest.raises(StorageError, match=rf"{url2}/shard-00000.parquet: read back after two uploads, its sha256"):
        _write(url2, rows)
    m = read_manifest(url2)
    assert m["shards"] == [] and not m["complete"]  # the bad object never entered the manifest
    monkeypatch.setattr(CacheLocation, "upload", real_upload)
    _write(url2, rows)  # a resume deletes the unlisted object and scores its rows again
    assert verify_cache(url2, deep=True) == [] and len(_rows(url2)) == 30


def test_unlisted_objects_are_unfinished_and_foreign_ones_refused(s3_bucket, tmp_path):
    rows = make_rows(30, k=8, seed=7)
    url = s3_bucket.url("u")
    _write(url, rows)
    loc = CacheLocation.parse(url)
    m = read_manifest(url)
    dropped = m["shards"].pop()  # a crash between an upload and the manifest update
    loc.write_bytes(MANIFEST_NAME, json.dumps(m).encode())
    with CacheWriter(url, test_meta(), k=8, row_group_rows=5, shard_max_bytes=6_000) as w:
        assert not loc.exists(dropped["file"])  # deleted, not adopted: the manifest never vouched for it
        missing = [r for r in rows if not w.has(r.row_id)]
        assert len(missing) == dropped["rows"]
        for r in missing:
            w.write(r)
    assert verify_cache(url) == [] and len(_rows(url)) == 30

    # A Parquet file named like a shard but not written by rlkd is someone else's: refused, never deleted.
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "foreign.parquet")
    loc.upload("shard-00099.parquet", tmp_path / "foreign.parquet")
    with pytest.raises(CacheCorruptError, match=r"shard-00099.parquet is not an rlkd shard"):
        CacheWriter(url, test_meta(), k=8)
    assert loc.exists("shard-00099.parquet")

    # A prefix holding other data is refused before anything is written; hf:// is read-only.
    other = CacheLocation.parse(s3_bucket.url("mine"))
    other.write_bytes("notes.txt", b"my notes")
    with pytest.raises(CacheDirError, match=r"(?s)mine is not empty and is not an rlkd cache.*notes.txt"):
        CacheWriter(other.url, test_meta(), k=8)
    assert other.list_files() == {"notes.txt": 8}


# ---- the lease -----------------------------------------------------------------------------------------------------

CHILD = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from rlkd.cache import CacheWriter
from tests.cache_helpers import make_rows, test_meta
rows = make_rows(40, k=8, seed=6)
w = CacheWriter({url!r}, test_meta(), k=8, row_group_rows=5, shard_max_bytes=6000, lease_seconds={lease},
                holder="child writer")
for r in rows[:20]:
    w.write(r)
w.flush()
print("ready", flush=True)
sys.stdin.readline()
if {then!r} == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
try:
    for r in rows[20:]:
        w.write(r)
    w.close()
except Exception as e:
    print(type(e).__name__, e, flush=True)
    sys.exit(3)
print("finished", flush=True)
"""


def _child(url: str, lease: float, then: str) -> subprocess.Popen:
    code = CHILD.format(repo=str(REPO), url=url, lease=lease, then=then)
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env=_env())
    assert child.stdout.readline().strip() == "ready"
    return child


def test_second_writer_refused_while_the_lease_is_fresh_then_resumes_after_it_expires(s3_bucket):
    url = s3_bucket.url("two")
    rows = make_rows(40, k=8, seed=6)
    child = _child(url, 6, "kill")
    try:
        with pytest.raises(CacheLockedError) as err:
            CacheWriter(url, test_meta(), k=8)
        msg = str(err.value)
        assert f"{url} is being written by another rlkd process (child writer, pid {child.pid} on" in msg
        assert f"its lease ({url}/{LEASE_NAME}) expires in" in msg and "run this command again after" in msg
        res = CliRunner().invoke(main, ["verify", url, "--repair"])  # every writer takes the lease, repair too
        assert res.exit_code == 1 and f"child writer, pid {child.pid}" in res.output
        assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
    killed = time.monotonic()
    with pytest.raises(CacheLockedError, match="child writer"):  # a killed writer's lease outlives it ...
        CacheWriter(url, test_meta(), k=8)
    while True:  # ... until it expires: at most 6 s after its last renewal
        try:
            w = CacheWriter(url, test_meta(), k=8, row_group_rows=5, shard_max_bytes=6_000)
            break
        except CacheLockedError:
            assert time.monotonic() - killed < 10
            time.sleep(0.25)
    assert 6 - 2 <= time.monotonic() - killed  # not before its lease could have run out (renewed every 1.5 s)
    with w:
        assert w._lock.took_over["holder"] == "child writer"
        assert all(w.has(r.row_id) for r in rows[:20]) and not any(w.has(r.row_id) for r in rows[20:])
        for r in rows[20:]:
            w.write(r)
    assert sorted(_rows(url)) == sorted(r.row_id for r in rows)
    assert verify_cache(url, deep=True) == [] and LEASE_NAME not in CacheLocation.parse(url).list_files()


def test_a_paused_writer_whose_lease_expired_writes_nothing_more(s3_bucket):
    """SIGSTOP a writer past its lease; another run takes over and finishes; the woken writer must stop."""
    url = s3_bucket.url("paused")
    rows = make_rows(40, k=8, seed=6)
    child = _child(url, 5, "continue")
    try:
        os.kill(child.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        while True:
            try:
                w = CacheWriter(url, test_meta(), k=8, row_group_rows=5, shard_max_bytes=6_000)
                break
            except CacheLockedError:
                assert time.monotonic() - stopped < 10
                time.sleep(0.25)
        with w:
            assert w._lock.took_over["holder"] == "child writer"
            for r in rows[20:30]:
                w.write(r)
        taken = read_manifest(url)
        os.kill(child.pid, signal.SIGCONT)
        child.stdin.write("go\n")
        child.stdin.flush()
        out = child.stdout.read()
        assert child.wait(timeout=60) == 3, out
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGCONT)
            child.kill()
    assert out.startswith("LeaseLostError") and ("lost its lease" in out or "could not renew its lease" in out), out
    assert read_manifest(url) == taken  # the woken writer changed nothing
    keys = CacheLocation.parse(url).list_files()
    assert sorted(k for k in keys if k.endswith(".parquet")) == sorted(s["file"] for s in taken["shards"])
    assert sorted(_rows(url)) == sorted(r.row_id for r in rows[:30]) and verify_cache(url) == []


def test_manifest_writes_are_fenced_by_the_lease(s3_bucket):
    """A holder paused between its check and its write (simulated: its renewals stopped, its own clock told it was
    still valid) cannot replace the manifest once another writer has taken over: the write is conditional."""
    loc = CacheLocation.parse(s3_bucket.url("fence"))
    a = Lease(loc, "writer A", seconds=5).acquire()
    assert a.conditional and a.read(MANIFEST_NAME) is None
    a.put(MANIFEST_NAME, b'{"by": "A"}')
    a._stop.set()  # A stops renewing (paused) ...
    time.sleep(6.5)
    b = Lease(loc, "writer B", seconds=5).acquire()  # ... B takes the expired lease over
    assert b.took_over["holder"] == "writer A"
    assert b.read(MANIFEST_NAME) == b'{"by": "A"}'
    b.put(MANIFEST_NAME, b'{"by": "B"}')
    a._valid_until = time.monotonic() + 60  # A wakes up believing its lease is still good
    with pytest.raises(LeaseLostError, match="was changed by another writer"):
        a.put(MANIFEST_NAME, b'{"by": "A again"}')
    assert loc.read_bytes(MANIFEST_NAME) == b'{"by": "B"}'
    with pytest.raises(LeaseLostError):
        a.check()
    a.release()  # not A's any more: B's lease stays
    assert json.loads(loc.read_bytes(LEASE_NAME))["holder"] == "writer B"
    b.release()
    assert not loc.exists(LEASE_NAME)


def test_a_store_without_conditional_writes_falls_back_and_still_refuses(s3_bucket, s3_server, caplog):
    loc = CacheLocation.parse(s3_bucket.url("plain"))
    s3_server.ignore_conditions()
    try:
        with caplog.at_level("WARNING", logger="rlkd.cache.lease"):
            a = Lease(loc, "writer A", seconds=5).acquire()
        assert not a.conditional and "ignores If-None-Match" in caplog.text
        with pytest.raises(CacheLockedError, match="writer A"):
            Lease(loc, "writer B", seconds=5).acquire()
        a.release()
        b = Lease(loc, "writer B", seconds=5).acquire()
        assert b.took_over is None
        b.release()
    finally:
        s3_server.ignore_conditions(False)
    assert not loc.exists(LEASE_NAME)


def test_without_botocore_the_lease_uses_plain_writes(s3_bucket, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "botocore", None)  # `import botocore.session` now fails
    loc = CacheLocation.parse(s3_bucket.url("nobotocore"))
    with caplog.at_level("WARNING", logger="rlkd.cache.lease"):
        a = Lease(loc, "writer A", seconds=5).acquire()
    assert not a.conditional and "botocore is not installed" in caplog.text
    assert not [k for k in loc.list_files() if k != LEASE_NAME]  # the clock probe is gone again
    with pytest.raises(CacheLockedError, match="writer A"):
        Lease(loc, "writer B", seconds=5).acquire()
    a._stop.set()  # A stops renewing: B may take over once 5 s have passed on the store's clock
    time.sleep(6.5)
    b = Lease(loc, "writer B", seconds=5).acquire()
    assert b.took_over["holder"] == "writer A"
    with pytest.raises(LeaseLostError):  # A, on waking, finds its lease gone and stops
        a._renew()
        a.check()
    b.release()


# ---- sharded runs merged on the store; the CLI's refusals ---------------------------------------------------------

def test_shards_on_s3_merged_on_s3_equal_unsharded(tiny_teacher_dir, data, s3_bucket, tmp_path):
    engine = HFEngine(tiny_teacher_dir, k=8, dtype="float32", device="cpu")

    def cfg(out, **kw):
        return build_config(CacheTeacherConfig, {"teacher": str(tiny_teacher_dir), "dataset": str(data),
                                                 "out": str(out), "engine": "hf", "codec": "fp32", "top_k": 8,
                                                 "limit": 20, **kw})

    cache_teacher(cfg(tmp_path / "full"), engine=engine, progress=False)
    for i in range(2):
        cache_teacher(cfg(s3_bucket.url(f"m/part-{i}"), shard=f"{i}/2"), engine=engine, progress=False)
    res = CliRunner().invoke(main, ["cache-merge", s3_bucket.url("m"), s3_bucket.url("m/part-0"),
                                    s3_bucket.url("m/part-1")])
    assert res.exit_code == 0, res.output
    merged = read_manifest(s3_bucket.url("m"))
    assert merged["complete"] and all(s["file"].startswith(("part-0/", "part-1/")) for s in merged["shards"])
    assert verify_cache(s3_bucket.url("m"), deep=True) == []
    _assert_same_rows(_rows(s3_bucket.url("m")), _rows(tmp_path / "full"))
    res = CliRunner().invoke(main, ["cache-merge", s3_bucket.url("elsewhere"), s3_bucket.url("m/part-0")])
    assert res.exit_code == 1 and "does not lie under" in res.output


def test_stage1_url_problems_are_one_clear_line(tiny_teacher_dir, tmp_path, monkeypatch, s3_bucket):
    """What replaced the phase-1 refusal of any URL --out: a URL is written to, and a bad one is one clear line
    before anything is written (never a local folder named 's3:')."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text('{"text": "hello"}\n')
    base = ["cache-teacher", "--teacher", str(tiny_teacher_dir), "--dataset", "d.jsonl", "--engine", "hf"]
    for out, expected in (("ftp://host/cache", "unknown scheme ftp://"),
                          ("hf://datasets/org/name", "hf:// caches are read-only"),
                          ("s3://key:secret@bucket/c", "credentials do not belong")):
        res = CliRunner().invoke(main, base + ["--out", out, "--lease-seconds", "2"])
        assert res.exit_code == 2 and expected in res.output and "lease_seconds: must be >= 5" in res.output, \
            res.output
        assert "secret@" not in res.output
    res = CliRunner().invoke(main, base + ["--out", "s3://rlkd-no-such-bucket-here/c"])
    assert res.exit_code == 1 and "the bucket rlkd-no-such-bucket-here does not exist" in res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["cache-merge", s3_bucket.url("m"), s3_bucket.url("m/part-0")])
    assert res.exit_code == 1 and f"part {s3_bucket.url('m/part-0')}: {s3_bucket.url('m/part-0')}: no cache there" \
        in res.output, res.output
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(":")]  # no folder named 's3:', 'ftp:', 'hf:'


def test_a_process_running_the_s3_server_can_still_build_a_vllm_engine(s3_server):
    """vLLM scans every module's globals with ``hasattr(value, "__dict__")`` while building an engine
    (``vllm.triton_utils.dispatcher._rebind_kernels``); flask's context proxies (moto's server imports flask) raised
    RuntimeError there, so `make test` failed to start vLLM in test_cache_teacher.py after the S3 tests had run. The
    same check on every such proxy in any loaded module must answer, not raise."""
    from werkzeug.local import LocalProxy

    proxies = [value for module in list(sys.modules.values())
               for value in list((getattr(module, "__dict__", None) or {}).values())
               if type(value) is LocalProxy or isinstance(type(value), type) and issubclass(type(value), LocalProxy)]
    assert proxies  # flask.request, flask.current_app, ...
    for proxy in proxies:
        hasattr(proxy, "__dict__")  # raised RuntimeError for an unbound proxy
    import flask

    assert not hasattr(flask.request, "__dict__")  # outside a request: missing, as vLLM expects
