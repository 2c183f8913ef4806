"""CacheWriter: round trips, rotation, manifest contents, resume without loss or duplication, crash, lock, mismatch."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from rlkd.cache import (
    CacheLockedError,
    CacheMismatchError,
    CacheReader,
    CacheWriter,
    read_manifest,
    roundtrip,
    verify_cache,
)
from rlkd.cache.manifest import TMP_SUFFIX, write_manifest
from tests.cache_helpers import assert_rows_equal, make_rows, test_meta

REPO = Path(__file__).resolve().parents[1]


def write_all(out, rows, **kw):
    kw.setdefault("k", 8)
    with CacheWriter(out, kw.pop("meta", test_meta()), **kw) as w:
        for r in rows:
            if not w.has(r.row_id):
                w.write(r)
    return out


def read_ids(out) -> list[str]:
    return [r.row_id for r in CacheReader(out, shuffle=False).iter_rows()]


@pytest.mark.parametrize("codec", ["fp32", "fp16", "q8"])
def test_round_trip_each_codec(tmp_path, codec):
    rows = make_rows(30, k=8, seed=1) + make_rows(15, k=8, seed=2, source_offset=100, min_prob=2e-2, min_k=2)
    write_all(tmp_path, rows, codec=codec, row_group_rows=7)
    back = list(CacheReader(tmp_path, shuffle=False).iter_rows())
    assert len(back) == len(rows)
    for a, b in zip(rows, back):
        assert_rows_equal(a, b, logprobs=codec == "fp32")  # all other fields are exact for every codec
        np.testing.assert_array_equal(b.topk_logprobs, roundtrip(codec, a.topk_logprobs, a.topk_count))
        fin = np.isfinite(a.topk_logprobs)
        err = np.abs(b.topk_logprobs[fin].astype(np.float64) - a.topk_logprobs[fin])
        bound = {"fp32": 0.0, "fp16": np.abs(a.topk_logprobs[fin]) * 2.0**-11, "q8": 1 / 32 + 4e-3}[codec]
        near = (np.repeat(a.topk_logprobs[np.cumsum(a.topk_count) - a.topk_count], a.topk_count) - a.topk_logprobs
                )[fin] < 15.8
        assert (err[near] <= bound if codec != "fp16" else err <= bound).all()
    assert verify_cache(tmp_path, deep=True) == []


V1_STORAGE = {  # how format-version-1 shards were stored before the storage tuning (zstd-1, fewer encodings)
    "compression": "zstd", "compression_level": 1, "write_statistics": False, "write_page_checksum": True,
    "store_schema": True, "use_dictionary": ["topk_count.list.element"],
    "column_encoding": {f"{n}.list.element": "BYTE_STREAM_SPLIT" for n in ("topk_ids", "tail_logmass", "target_logprob",
                                                                          "top1_logprob")},
}


def test_caches_stored_the_earlier_way_still_read_and_verify(tmp_path, monkeypatch):
    """Storage choices (levels, encodings, page size) are not format changes: a cache written with the earlier
    choices reads back the same rows as one written now, and both pass verify --deep."""
    import rlkd.cache.writer as writer_mod

    rows = make_rows(20, k=8, seed=3) + make_rows(10, k=8, seed=4, source_offset=50, min_prob=2e-2, min_k=2)
    write_all(tmp_path / "now", rows, row_group_rows=6)
    monkeypatch.setattr(writer_mod, "parquet_write_options", lambda codec, level=None: dict(V1_STORAGE))
    write_all(tmp_path / "then", rows, row_group_rows=6)
    monkeypatch.undo()
    md = pq.ParquetFile(next((tmp_path / "then").glob("*.parquet"))).metadata.row_group(0)
    encodings = {md.column(i).path_in_schema: md.column(i).encodings for i in range(md.num_columns)}
    assert "RLE_DICTIONARY" in encodings["topk_count.list.element"]  # really the earlier layout
    assert "BYTE_STREAM_SPLIT" not in encodings["target_rank.list.element"]
    then = list(CacheReader(tmp_path / "then", shuffle=False).iter_rows())
    now = list(CacheReader(tmp_path / "now", shuffle=False).iter_rows())
    assert len(then) == len(now) == len(rows)
    for a, b, r in zip(then, now, rows):
        assert_rows_equal(a, b, logprobs=True)  # the same q8 bytes decode the same way
        assert_rows_equal(a, r, logprobs=False)
    assert verify_cache(tmp_path / "then", deep=True) == []
    assert verify_cache(tmp_path / "now", deep=True) == []


def test_rotation_row_groups_and_manifest_entries(tmp_path):
    rows = make_rows(60, k=8, seed=3)
    write_all(tmp_path, rows, row_group_rows=10, shard_max_bytes=8_000)
    m = read_manifest(tmp_path)
    assert m["complete"] is True and m["k"] == 8 and m["codec"] == "q8" and m["format_version"] == 1
    assert len(m["shards"]) >= 3, "small shard_max_bytes must rotate"
    assert m["rows"] == 60 and m["positions"] == sum(r.num_positions for r in rows)
    for e in m["shards"]:
        path = tmp_path / e["file"]
        assert not path.name.endswith(TMP_SUFFIX)
        assert e["bytes"] == path.stat().st_size
        assert e["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        md = pq.ParquetFile(path).metadata
        assert e["rows"] == md.num_rows
        assert e["row_group_rows"] == [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        assert all(n <= 10 for n in e["row_group_rows"])
        lens = pq.read_table(path, columns=["input_ids"]).column("input_ids").to_pylist()
        assert e["positions"] == sum(len(x) - 1 for x in lens) and e["tokens"] == sum(len(x) for x in lens)
        ids = pq.read_table(path, columns=["input_ids", "topk_ids"]).to_pylist()
        assert e["max_token_id"] == max(max(r["input_ids"] + r["topk_ids"]) for r in ids)
    # the largest id of the whole cache, so stage 2 can check a student's vocabulary without a scan
    assert m["max_token_id"] == max(int(max(r.input_ids.max(), r.topk_ids.max())) for r in rows)
    assert sorted(read_ids(tmp_path)) == sorted(r.row_id for r in rows)
    assert not list(tmp_path.glob("*" + TMP_SUFFIX))


def test_reopen_appends_without_duplicates(tmp_path):
    rows = make_rows(40, k=8, seed=4)
    write_all(tmp_path, rows[:25], row_group_rows=8)
    with CacheWriter(tmp_path, test_meta(config={"k": 8, "batch": 2}), k=8, row_group_rows=8) as w:
        assert all(w.has(r.row_id) for r in rows[:25]) and not w.has(rows[25].row_id)
        assert w.write(rows[0]) is False  # a duplicate is skipped, not written twice
        for r in rows:
            if not w.has(r.row_id):
                assert w.write(r)
        assert w.stats["rows"] == 15 and w.stats["skipped_duplicates"] == 1 and w.stats["total_rows"] == 40
    ids = read_ids(tmp_path)
    assert len(ids) == 40 and sorted(ids) == sorted(r.row_id for r in rows)
    m = read_manifest(tmp_path)
    assert m["config"] == {"k": 8, "batch": 2} and len(m["resumed"]) == 1
    assert verify_cache(tmp_path) == []


def test_crash_with_tmp_left_loses_and_doubles_nothing(tmp_path):
    """In-process crash: one shard finished, a second half-written as a temporary, the manifest not marked complete."""
    rows = make_rows(50, k=8, seed=5)
    w = CacheWriter(tmp_path, test_meta(), k=8, row_group_rows=5, shard_max_bytes=6_000)
    for r in rows[:30]:
        w.write(r)
    assert list(tmp_path.glob("*.parquet" + TMP_SUFFIX)), "the test needs an unfinished shard"
    finished = set(read_ids(tmp_path))
    assert 0 < len(finished) < 30
    w._lock.release()  # the process "dies": the kernel drops the flock, nothing is closed
    del w
    with CacheWriter(tmp_path, test_meta(), k=8, row_group_rows=5, shard_max_bytes=6_000) as w2:
        assert not list(tmp_path.glob("*" + TMP_SUFFIX)), "leftover temporaries are removed on reopen"
        assert {r.row_id for r in rows if w2.has(r.row_id)} == finished
        for r in rows:
            if not w2.has(r.row_id):
                w2.write(r)
    ids = read_ids(tmp_path)
    assert sorted(ids) == sorted(r.row_id for r in rows) and len(ids) == len(set(ids))
    assert verify_cache(tmp_path, deep=True) == []


CHILD = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    from rlkd.cache import CacheWriter
    from tests.cache_helpers import make_rows, test_meta
    rows = make_rows(50, k=8, seed=6)
    w = CacheWriter({out!r}, test_meta(), k=8, row_group_rows=5, shard_max_bytes=6_000)
    for r in rows[:30]:
        w.write(r)
    print("ready", flush=True)
    sys.stdin.readline()  # hold the lock until the parent has tried to open a second writer
    os.kill(os.getpid(), signal.SIGKILL)  # crash: no close, no cleanup
""")


def test_concurrent_writer_refused_and_lock_dies_with_process(tmp_path):
    out = tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(repo=str(REPO), out=str(out))],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "ready"
        with pytest.raises(CacheLockedError, match=f"pid {child.pid}") as err:
            CacheWriter(out, test_meta(), k=8)
        assert "another rlkd process (CacheWriter, pid" in str(err.value)
        assert list(out.glob("*.parquet" + TMP_SUFFIX)), "the other writer's temporary must survive a refused open"
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
    rows = make_rows(50, k=8, seed=6)
    write_all(out, rows, row_group_rows=5, shard_max_bytes=6_000)  # lock released by the kernel at death
    ids = read_ids(out)
    assert sorted(ids) == sorted(r.row_id for r in rows) and len(ids) == 50
    assert verify_cache(out) == []


def test_second_writer_in_same_process_refused(tmp_path):
    with CacheWriter(tmp_path, test_meta(), k=8):
        with pytest.raises(CacheLockedError):
            CacheWriter(tmp_path, test_meta(), k=8)
    with CacheWriter(tmp_path, test_meta(), k=8):  # released on close
        pass


def test_orphan_shard_is_adopted(tmp_path):
    """Crash between the shard rename and the manifest update: the finished shard is adopted, not rewritten."""
    rows = make_rows(30, k=8, seed=7)
    write_all(tmp_path, rows, row_group_rows=5, shard_max_bytes=6_000)
    m = read_manifest(tmp_path)
    dropped = m["shards"].pop()
    write_manifest(tmp_path, m)
    assert verify_cache(tmp_path) != []  # the unlisted shard and the totals are reported
    with CacheWriter(tmp_path, test_meta(), k=8) as w:
        assert all(w.has(r.row_id) for r in rows)
    m2 = read_manifest(tmp_path)
    assert m2["shards"][-1] == dropped and m2["rows"] == 30
    assert verify_cache(tmp_path) == []


def test_mismatch_lists_every_difference(tmp_path):
    write_all(tmp_path, make_rows(3, k=8))
    meta = test_meta()
    meta["tokenizer"] = {**meta["tokenizer"], "sha256": "2" * 64}
    meta["teacher"] = {**meta["teacher"], "config_sha256": "f" * 64}
    meta["dataset"] = {**meta["dataset"], "split": "validation"}
    with pytest.raises(CacheMismatchError) as err:
        CacheWriter(tmp_path, meta, k=16, codec="fp16")
    msg = str(err.value)
    for key in ("k:", "codec:", "tokenizer.sha256", "teacher.config_sha256", "dataset.split"):
        assert key in msg, key
    assert "5 difference(s)" in msg
    with CacheWriter(tmp_path, test_meta(config={"other": 1}, engine="vllm 9"), k=8):  # config/engine may change
        pass


def test_sub_folder_shards_from_merged_writers(tmp_path):
    """Two workers write sibling folders with their own prefixes; a merged manifest lists files with sub-folders."""
    rows = make_rows(40, k=8, seed=8)
    for i, part in enumerate((rows[:20], rows[20:])):
        write_all(tmp_path / f"part-{i}", part, name_prefix=f"w{i}", row_group_rows=6)
    merged = read_manifest(tmp_path / "part-0")
    merged["shards"] = [
        {**e, "file": f"part-{i}/{e['file']}"} for i in range(2) for e in read_manifest(tmp_path / f"part-{i}")["shards"]
    ]
    for key in ("rows", "positions", "tokens", "bytes"):
        merged[key] = sum(e[key] for e in merged["shards"])
    write_manifest(tmp_path, merged)
    assert len({Path(e["file"]).name for e in merged["shards"]}) == len(merged["shards"])  # names unique
    assert sorted(read_ids(tmp_path)) == sorted(r.row_id for r in rows)
    assert verify_cache(tmp_path, deep=True) == []
    more = make_rows(5, k=8, seed=9, source_offset=1000)
    with CacheWriter(tmp_path, test_meta(), k=8) as w:  # a writer appends to the merged cache
        assert all(w.has(r.row_id) for r in rows)
        for r in more:
            w.write(r)
    assert len(read_ids(tmp_path)) == 45 and verify_cache(tmp_path) == []


def test_exception_inside_with_keeps_written_rows_and_marks_incomplete(tmp_path):
    rows = make_rows(12, k=8, seed=10)
    with pytest.raises(KeyError):
        with CacheWriter(tmp_path, test_meta(), k=8, row_group_rows=5) as w:
            for r in rows:
                w.write(r)
            raise KeyError("stage 1 failed")
    m = read_manifest(tmp_path)
    assert m["complete"] is False and m["rows"] == 12
    assert any("not marked complete" in p for p in verify_cache(tmp_path))
    json.dumps(m)  # JSON-safe


# ---- the cache folder: only rlkd's own files are touched, foreign folders are refused ------------------------------


def test_only_own_temporaries_are_removed_on_reopen(tmp_path):
    """A user's ``*.tmp`` (or anything not named and shaped like rlkd's temporary) survives a reopen; the writer's
    own leftover shard temporary is removed."""
    rows = make_rows(20, k=8, seed=30)
    write_all(tmp_path, rows[:10], row_group_rows=5)
    own = tmp_path / ("shard-00007.parquet" + TMP_SUFFIX)
    own.write_bytes(b"PAR1 half a shard")  # what a killed writer leaves
    keep = {
        "notes.tmp": b"my notes",
        "shard-00001.parquet.tmp": b"PAR1 not rlkd's current name",
        "shard-00008.parquet" + TMP_SUFFIX: b"not a parquet file",  # rlkd's name, but not its content
        "data" + TMP_SUFFIX: b"PAR1",  # not a shard name
    }
    for name, data in keep.items():
        (tmp_path / name).write_bytes(data)
    write_all(tmp_path, rows, row_group_rows=5)
    assert not own.exists()
    for name, data in keep.items():
        assert (tmp_path / name).read_bytes() == data, name
    assert sorted(read_ids(tmp_path)) == sorted(r.row_id for r in rows)


def test_folder_with_foreign_files_is_refused_before_anything_is_written(tmp_path):
    import pyarrow as pa

    from rlkd.cache import CacheDirError

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.tmp").write_text("notes\n")
    with pytest.raises(CacheDirError, match=r"not empty and is not an rlkd cache.*notes\.tmp"):
        CacheWriter(notes, test_meta(), k=8)
    assert sorted(p.name for p in notes.iterdir()) == ["notes.tmp"]  # no lock, no manifest written into it

    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.table({"x": [1, 2, 3]}), data / "mydata.parquet")
    with pytest.raises(CacheDirError, match="mydata.parquet"):
        CacheWriter(data, test_meta(), k=8)
    assert sorted(p.name for p in data.iterdir()) == ["mydata.parquet"]

    lost = tmp_path / "lost"  # rlkd shards whose manifest is gone: say so rather than "not a cache"
    write_all(lost, make_rows(5, k=8, seed=31))
    (lost / "manifest.json").unlink()
    with pytest.raises(CacheDirError, match="holds rlkd shards .* but no manifest.json"):
        CacheWriter(lost, test_meta(), k=8)

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(CacheDirError, match="is a file, not a folder"):
        CacheWriter(a_file, test_meta(), k=8)
    with pytest.raises(CacheDirError, match="a-file is a file"):
        CacheWriter(a_file / "sub", test_meta(), k=8)
    empty = tmp_path / "empty"
    empty.mkdir()
    write_all(empty, make_rows(3, k=8))  # an empty folder is fine
    assert read_manifest(empty)["rows"] == 3


def test_unlisted_foreign_parquet_in_a_cache_is_refused_not_deleted(tmp_path):
    import pyarrow as pa

    write_all(tmp_path, make_rows(5, k=8, seed=32))
    pq.write_table(pa.table({"x": [1]}), tmp_path / "mydata.parquet")
    with pytest.raises(Exception, match="mydata.parquet is not an rlkd shard") as err:
        CacheWriter(tmp_path, test_meta(), k=8)
    assert "delete" not in str(err.value)
    assert (tmp_path / "mydata.parquet").is_file()


def test_empty_manifest_never_blocks_a_fresh_start(tmp_path):
    """A run that stopped before its first shard (e.g. a bad --top-k) leaves a manifest listing nothing: the retry,
    with other settings, starts afresh on it. A cache that holds rows still refuses other settings."""
    with pytest.raises(RuntimeError):
        with CacheWriter(tmp_path, test_meta(), k=16, codec="fp16"):
            raise RuntimeError("the engine refused k=16")
    m = read_manifest(tmp_path)
    assert m["rows"] == 0 and m["shards"] == [] and not m["complete"] and m["k"] == 16
    assert any("cache is empty" in p for p in verify_cache(tmp_path))
    rows = make_rows(6, k=8, seed=33)
    write_all(tmp_path, rows, meta=test_meta(dataset={"source": "other", "split": "train", "fingerprint": "x"}))
    m = read_manifest(tmp_path)
    assert m["k"] == 8 and m["codec"] == "q8" and m["rows"] == 6 and m["dataset"]["source"] == "other"
    assert verify_cache(tmp_path, deep=True) == []
    with pytest.raises(CacheMismatchError, match="k: 8 in the cache, 16 now"):
        CacheWriter(tmp_path, test_meta(), k=16)


# ---- resuming a damaged cache --------------------------------------------------------------------------------------


def _three_shards(out) -> list[Path]:
    rows = make_rows(45, k=8, seed=34)
    write_all(out, rows, row_group_rows=5, shard_max_bytes=6_000)
    shards = [out / e["file"] for e in read_manifest(out)["shards"]]
    assert len(shards) >= 3
    return shards


def test_resume_checks_kept_shards_and_names_the_way_out(tmp_path):
    from rlkd.cache import CacheCorruptError

    shards = _three_shards(tmp_path)
    data = bytearray(shards[1].read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit: only the checksum sees it
    shards[1].write_bytes(bytes(data))
    shards[2].unlink()
    with pytest.raises(CacheCorruptError) as err:
        CacheWriter(tmp_path, test_meta(), k=8)
    msg = str(err.value)
    assert f"{shards[1].name}" in msg and "sha256" in msg
    assert f"{shards[2].name}" in msg and "missing" in msg
    assert f"rlkd verify --repair {tmp_path}" in msg and "remove its entry" not in msg
    assert read_manifest(tmp_path)["complete"] is True  # refused before touching the manifest
    # --no-verify-resume: sizes only, so the flipped bit goes unnoticed (the documented trade-off), the missing
    # shard does not
    shards[2].write_bytes(b"")
    with pytest.raises(CacheCorruptError, match=shards[2].name) as err:
        CacheWriter(tmp_path, test_meta(), k=8, verify_shards=False)
    assert shards[1].name not in str(err.value)


def test_repair_then_resume_rescores_exactly_the_dropped_rows(tmp_path):
    from rlkd.cache import repair_cache

    rows = make_rows(45, k=8, seed=34)
    shards = _three_shards(tmp_path)
    before = read_manifest(tmp_path)
    lost = {e["file"]: e["rows"] for e in before["shards"][1:3]}
    data = bytearray(shards[1].read_bytes())
    data[len(data) // 2] ^= 0x01
    shards[1].write_bytes(bytes(data))
    damaged_bytes = shards[1].read_bytes()
    shards[2].unlink()
    result = repair_cache(tmp_path)
    assert result["moved"] == [(shards[1].name, shards[1].name + ".damaged")]
    assert result["missing"] == [shards[2].name] and result["rows_dropped"] == sum(lost.values())
    assert (tmp_path / (shards[1].name + ".damaged")).read_bytes() == damaged_bytes  # moved aside, not deleted
    m = read_manifest(tmp_path)
    assert not m["complete"] and [e["file"] for e in m["shards"]] == [e["file"] for e in before["shards"]
                                                                      if e["file"] not in lost]
    assert m["rows"] == before["rows"] - sum(lost.values())
    with CacheWriter(tmp_path, test_meta(), k=8, row_group_rows=5, shard_max_bytes=6_000) as w:
        missing = [r for r in rows if not w.has(r.row_id)]
        assert len(missing) == sum(lost.values())
        for r in missing:
            w.write(r)
    assert sorted(read_ids(tmp_path)) == sorted(r.row_id for r in rows)
    assert verify_cache(tmp_path, deep=True) == []
    back = {r.row_id: r for r in CacheReader(tmp_path, shuffle=False).iter_rows()}
    for r in rows:
        assert_rows_equal(r, back[r.row_id], logprobs=False)
