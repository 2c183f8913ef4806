"""verify_cache / `rlkd verify` and the reader's integrity errors: flipped bytes, truncation, missing shards, and
the deep invariants (vocab range, rank order, mass, alignment)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import rlkd.cache.writer as writer_module
from rlkd.cache import CacheCorruptError, CacheReader, CacheWriter, TeacherRow, verify_cache
from rlkd.cli import main
from tests.cache_helpers import assert_rows_equal, make_rows, test_meta


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    out = tmp_path_factory.mktemp("verify-clean")
    with CacheWriter(out, test_meta(), k=8, row_group_rows=10, shard_max_bytes=8_000) as w:
        for r in make_rows(45, k=8, seed=20) + make_rows(10, k=8, seed=21, source_offset=90, min_prob=1e-2):
            w.write(r)
    return out


@pytest.fixture
def cache(clean, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(clean, out)
    return out


def read_all(path):
    """Every row, through the reader's batched iteration (the trainer's path)."""
    return [r for batch in CacheReader(path, batch_size=4, shuffle=False) for r in batch]


def test_clean_cache_passes(clean):
    assert verify_cache(clean) == []
    assert verify_cache(clean, deep=True) == []


def _column_span(path, column):
    """Byte range of one column chunk's pages in row group 0, from the file's own metadata."""
    md = pq.ParquetFile(path).metadata.row_group(0)
    for i in range(md.num_columns):
        c = md.column(i)
        if c.path_in_schema == column:
            start = c.dictionary_page_offset or c.data_page_offset
            return start, start + c.total_compressed_size
    raise KeyError(column)


@pytest.mark.parametrize("column", ["topk_ids.list.element", "logprob_gaps", "tail_logmass.list.element"])
def test_flipped_byte_in_data_caught_by_verify_and_reader(cache, column):
    shard = sorted(cache.glob("*.parquet"))[0]
    start, end = _column_span(shard, column)
    data = bytearray(shard.read_bytes())
    at = end - 3  # inside the last page's compressed data, past its header
    data[at] ^= 0x5A
    shard.write_bytes(bytes(data))
    problems = verify_cache(cache)
    assert any(shard.name in p and "sha256" in p for p in problems)
    with pytest.raises(CacheCorruptError, match=shard.name):
        read_all(cache)


def test_any_flipped_byte_is_caught_or_harmless(cache, clean):
    """Flip bytes all over a shard: verify always reports it; the reader either names the shard or returns
    exactly the original data (a byte no reader uses, e.g. in an unused header field)."""
    shard = sorted(cache.glob("*.parquet"))[0]
    original = shard.read_bytes()
    expected = read_all(clean)
    rng = np.random.default_rng(0)
    offsets = sorted(set(rng.integers(0, len(original), size=20).tolist()) | {0, len(original) - 1, len(original) // 2})
    caught = 0
    for at in offsets:
        data = bytearray(original)
        data[at] ^= 0xFF
        shard.write_bytes(bytes(data))
        assert any(shard.name in p for p in verify_cache(cache)), at
        try:
            got = read_all(cache)
        except CacheCorruptError as e:
            assert shard.name in str(e)
            caught += 1
            continue
        assert [r.row_id for r in got] == [r.row_id for r in expected], at
        for a, b in zip(got, expected):
            assert_rows_equal(a, b)
    shard.write_bytes(original)
    assert caught >= len(offsets) // 2


def test_truncated_and_missing_shards(cache):
    shards = sorted(cache.glob("*.parquet"))
    assert len(shards) >= 3
    data = shards[0].read_bytes()
    shards[0].write_bytes(data[: len(data) // 2])
    shards[1].unlink()
    problems = verify_cache(cache)
    assert any(shards[0].name in p and "truncated" in p for p in problems)
    assert any(shards[1].name in p and "missing" in p for p in problems)
    with pytest.raises(CacheCorruptError, match=shards[0].name):
        CacheReader(cache)


def test_truncated_with_matching_size_caught_by_reader(cache):
    """Even if someone also edits the manifest's byte count, the reader names the shard (footer unreadable)."""
    shard = sorted(cache.glob("*.parquet"))[0]
    data = shard.read_bytes()[:-100]
    shard.write_bytes(data)
    m = json.loads((cache / "manifest.json").read_text())
    for e in m["shards"]:
        if e["file"] == shard.name:
            e["bytes"] = len(data)
    (cache / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheCorruptError, match=shard.name):
        read_all(cache)
    assert any(shard.name in p for p in verify_cache(cache))


def test_manifest_problems_all_reported(cache):
    m = json.loads((cache / "manifest.json").read_text())
    m["rows"] += 2  # the shard entries add up to one less
    m["shards"][0]["rows"] += 1
    m["complete"] = False
    (cache / "manifest.json").write_text(json.dumps(m))
    shutil.copy(cache / m["shards"][1]["file"], cache / "stray.parquet")
    problems = verify_cache(cache)
    text = "\n".join(problems)
    for needle in ("manifest total rows", f"{m['shards'][0]['file']}:", "not marked complete", "stray.parquet"):
        assert needle in text, needle
    m["format_version"] = 99
    (cache / "manifest.json").write_text(json.dumps(m))
    assert any("format_version 99" in p for p in verify_cache(cache))


def _broken(row: TeacherRow, how: str) -> TeacherRow:
    f = dict(row.__dict__)
    if how == "vocab":
        ids = row.topk_ids.copy()
        ids[0] = 5000
        f["topk_ids"] = ids
    elif how == "order":
        lp = row.topk_logprobs.copy()
        lp[1] = lp[0] + 0.5 if lp[0] < -0.6 else 0.0
        lp[0] = lp[1] - 0.5
        f["topk_logprobs"] = lp
    elif how == "mass":
        f["topk_logprobs"] = np.full_like(row.topk_logprobs, -0.1)
    elif how == "misaligned":  # targets shifted by one position
        f["target_logprob"] = np.roll(row.target_logprob, 1)
    return TeacherRow(**f)


def test_deep_finds_each_broken_invariant(tmp_path, monkeypatch):
    monkeypatch.setattr(writer_module, "row_problems", lambda *a, **k: [])  # let bad rows through
    rows = make_rows(8, k=8, seed=22, min_len=12)
    bad = {how: _broken(rows[i], how) for i, how in enumerate(["vocab", "order", "mass", "misaligned"])}
    with CacheWriter(tmp_path, test_meta(), k=8, codec="fp32") as w:
        for r in list(bad.values()) + rows[4:]:
            w.write(r)
    assert verify_cache(tmp_path) == []  # the shallow check does not decode
    deep = "\n".join(verify_cache(tmp_path, deep=True))
    assert "outside [0, 300)" in deep
    assert "increase along rank" in deep
    assert "mass exceeds 1" in deep
    assert "misaligned" in deep
    for r in bad.values():
        assert r.row_id in deep


def test_cli_verify_exit_codes_and_json(cache):
    runner = CliRunner()
    ok = runner.invoke(main, ["verify", str(cache), "--deep"])
    assert ok.exit_code == 0, ok.output
    assert "OK" in ok.output
    shards = sorted(cache.glob("*.parquet"))
    shards[0].unlink()
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    bad = runner.invoke(main, ["verify", str(cache)])
    assert bad.exit_code == 1
    assert shards[0].name in bad.output and shards[1].name in bad.output  # all problems at once
    js = runner.invoke(main, ["verify", str(cache), "--json"])
    assert js.exit_code == 1
    report = json.loads(js.output)
    assert report["ok"] is False and len(report["problems"]) >= 2
    assert runner.invoke(main, ["verify", str(cache / "nope")]).exit_code == 1


def test_tokenizer_compatibility(tiny_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    from rlkd.cache import TokenizerMismatchError, check_tokenizer_compatible, tokenizer_identity

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    ident = tokenizer_identity(tok)
    check_tokenizer_compatible(tok, ident)
    tok.add_tokens(["<extra_token>"])
    with pytest.raises(TokenizerMismatchError, match="vocab"):
        check_tokenizer_compatible(tok, ident)


def test_manifest_without_tokenizer_identity_is_reported(tmp_path):
    """train-student refuses a cache whose manifest has no tokenizer identity, so verify must not call it OK."""
    meta = test_meta()
    del meta["tokenizer"]
    with CacheWriter(tmp_path, meta, k=8) as w:
        for r in make_rows(5, k=8, seed=23):
            w.write(r)
    for deep in (False, True):
        problems = verify_cache(tmp_path, deep=deep)
        assert len(problems) == 1 and "no tokenizer identity" in problems[0], problems
    result = CliRunner().invoke(main, ["verify", str(tmp_path), "--deep"])
    assert result.exit_code == 1 and "OK" not in result.output and "tokenizer" in result.output


def test_cli_repair_moves_damaged_shards_aside_and_reports(cache):
    runner = CliRunner()
    shards = sorted(cache.glob("*.parquet"))
    data = shards[0].read_bytes()
    shards[0].write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    shards[1].unlink()
    result = runner.invoke(main, ["verify", str(cache), "--repair"])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert f"{shards[0].name} -> {shards[0].name}.damaged" in result.output
    assert f"{shards[1].name} (missing)" in result.output and "rlkd cache-teacher" in result.output
    assert (cache / f"{shards[0].name}.damaged").read_bytes() == data[:-1] + bytes([data[-1] ^ 1])
    after = verify_cache(cache)
    assert after == ["manifest is not marked complete: the writer did not finish (resume stage 1 to complete it: "
                     "re-run the `rlkd cache-teacher` command that wrote it)"]
    again = runner.invoke(main, ["verify", str(cache), "--repair"])  # nothing left to repair
    assert again.exit_code == 0 and "nothing to repair" in again.output


def test_repair_refuses_merged_caches_and_unreadable_manifests(clean, tmp_path):
    from rlkd.pipeline.merge import merge_caches

    part = tmp_path / "part-0"
    shutil.copytree(clean, part)
    merge_caches(tmp_path, [part])
    result = CliRunner().invoke(main, ["verify", str(tmp_path), "--repair"])
    assert result.exit_code == 1 and "merged from parts" in result.output and "Traceback" not in result.output
    (part / "manifest.json").write_text("{not json")
    result = CliRunner().invoke(main, ["verify", str(part), "--repair"])
    assert result.exit_code == 1 and "not valid JSON" in result.output and "Traceback" not in result.output
    assert "by hand" not in result.output
