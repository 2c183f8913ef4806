"""Stage 1 input: config validation, dataset loading, examples (masks, truncation, skips), sharding, identity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from rlkd.config import ConfigError, build_config
from rlkd.pipeline.config import CacheTeacherConfig, parse_shard
from rlkd.pipeline.data import (
    DOLLY_SAMPLE,
    DatasetError,
    InputCounters,
    dataset_identity,
    iter_examples,
    load_source,
    run_indices,
)
from rlkd.pipeline.formatting import TemplateError

END = "<|im_end|>"


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cfg_for(path, **kw) -> CacheTeacherConfig:
    return CacheTeacherConfig(teacher="unused", dataset=str(path), out="unused", **kw)


def run(cfg, tok):
    counters = InputCounters()
    ds = load_source(cfg)
    return list(iter_examples(cfg, ds, tok, counters)), counters


def masked_targets(tok, ex) -> str:
    """The text the loss trains on: input_ids[t+1] for every position t with loss_mask[t]."""
    return tok.decode(ex.input_ids[1:][ex.loss_mask])


def dolly_rows(n: int) -> list[dict]:
    return [{"instruction": f"Question {i} about the river?", "context": "The river is long." if i % 2 else "",
             "response": f"Answer {i}: the river." if i % 7 != 3 else "", "category": "qa"} for i in range(n)]


# ---- config -------------------------------------------------------------------------------------------------------

def test_config_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as e:
        build_config(CacheTeacherConfig, {"teacher": "t", "dataset": "x.jsonl", "out": "o", "engine": "tpu",
                                          "overlong": "drop", "top_k": 0, "shard": "2/2", "max_length": 1,
                                          "codec": "q4", "prompt_format": "fancy", "loss_on": "prompt"})
    problems = str(e.value)
    for needle in ("engine", "overlong", "top_k", "0 <= I < N", "max_length", "codec", "prompt_format", "loss_on"):
        assert needle in problems, needle


def test_config_from_yaml_and_flags(tmp_path):
    (tmp_path / "run.yaml").write_text("teacher: t\ndataset: d.jsonl\nout: o\ntop_k: 8\nshard: 1/4\n")
    from rlkd.config import load_yaml

    cfg = build_config(CacheTeacherConfig, load_yaml(tmp_path / "run.yaml"), {"top-k": "16", "limit": None})
    assert cfg.top_k == 16 and cfg.shard_index == (1, 4) and cfg.limit is None
    with pytest.raises(ConfigError) as e:
        build_config(CacheTeacherConfig, {"teacher": "t", "dataset": "d", "out": "o", "top_kk": 3, "shard": "x"})
    assert "top_kk" in str(e.value)


def test_every_config_field_has_a_docstring():
    import ast
    import dataclasses
    import inspect

    import rlkd.pipeline.config as mod

    cls = next(n for n in ast.parse(inspect.getsource(mod)).body
               if isinstance(n, ast.ClassDef) and n.name == "CacheTeacherConfig")
    documented = {
        a.target.id for a, nxt in zip(cls.body, cls.body[1:])
        if isinstance(a, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
    }
    assert {f.name for f in dataclasses.fields(CacheTeacherConfig)} == documented


@pytest.mark.parametrize("bad", ["2/2", "-1/2", "a/b", "0/0", "1", "1/2/3"])
def test_parse_shard_rejects(bad):
    with pytest.raises(ValueError, match="shard"):
        parse_shard(bad)


def test_parse_shard_accepts():
    assert parse_shard(None) == (0, 1)
    assert parse_shard("0/1") == (0, 1)
    assert parse_shard(" 3 / 4 ") == (3, 4)


# ---- loading ------------------------------------------------------------------------------------------------------

def test_load_local_formats(tmp_path):
    rows = dolly_rows(5)
    a = load_source(cfg_for(write_jsonl(tmp_path / "a.jsonl", rows)))
    (tmp_path / "b.json").write_text(json.dumps(rows))
    b = load_source(cfg_for(tmp_path / "b.json"))
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "c.parquet"))
    c = load_source(cfg_for(tmp_path / "c.parquet"))
    d = load_source(cfg_for(write_jsonl(tmp_path / "d.data", rows), dataset_format="json"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:2]),
                          "test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
    e = load_source(cfg_for(tmp_path / "saved", split="test"))
    for ds in (a, b, c, d, e):
        assert ds.to_list() == rows
    assert len(load_source(cfg_for(tmp_path / "a.jsonl", split="train[:3]"))) == 3


def test_load_errors_name_the_source_and_fix(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        load_source(cfg_for(tmp_path / "missing.jsonl"))
    (tmp_path / "rows.data").write_text("{}\n")
    with pytest.raises(DatasetError, match="--dataset-format"):
        load_source(cfg_for(tmp_path / "rows.data"))
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(dolly_rows(2))}).save_to_disk(str(tmp_path / "s"))
    with pytest.raises(DatasetError, match="no split 'dev'.*train"):
        load_source(cfg_for(tmp_path / "s", split="dev"))
    with pytest.raises(DatasetError, match="someone/not-a-dataset.*--split"):
        load_source(cfg_for("someone/not-a-dataset"))  # offline in tests: a clear error, not a traceback
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{not json\n')
    with pytest.raises(DatasetError, match="broken.jsonl"):
        load_source(cfg_for(tmp_path / "broken.jsonl"))


def test_missing_columns_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    cfg = cfg_for(path)
    ds = load_source(cfg)
    with pytest.raises(DatasetError) as e:
        next(iter_examples(cfg, ds, tok))
    msg = str(e.value)
    for needle in ("question, answer", "prompt + completion", "instruction", "--prompt-column", "qa.jsonl"):
        assert needle in msg
    # The same data with a mapping works.
    cfg = cfg_for(path, prompt_column="question", completion_column="answer")
    [ex] = list(iter_examples(cfg, ds, tok))
    assert masked_targets(tok, ex) == "a" + END


# ---- every column shape -------------------------------------------------------------------------------------------

def test_instruction_rows_chat(tmp_path, tok):
    rows = dolly_rows(12)
    exs, counters = run(cfg_for(write_jsonl(tmp_path / "d.jsonl", rows)), tok)
    kept = [i for i, r in enumerate(rows) if r["response"]]
    assert [e.source_index for e in exs] == kept
    assert counters.skipped == {"empty_response": 2} and counters.first_rows["empty_response"] == [3, 10]
    assert counters.rows == 12 and counters.examples == 10 and not counters.truncated
    for e in exs:
        r = rows[e.source_index]
        user = r["instruction"] + (f"\n\n{r['context']}" if r["context"] else "")
        ref = tok.apply_chat_template([{"role": "user", "content": user}, {"role": "assistant", "content": r["response"]}],
                                      tokenize=True)["input_ids"]
        assert e.input_ids.dtype == np.int32 and e.input_ids.tolist() == list(ref)
        assert e.loss_mask.dtype == bool and e.loss_mask.shape == (len(e.input_ids) - 1,)
        assert masked_targets(tok, e) == r["response"] + END
        assert not e.truncated


def test_alpaca_prompt_completion_messages_text_shapes(tmp_path, tok):
    alpaca = [{"instruction": "Name a river.", "input": "In france.", "output": "The Seine."}]
    [e], _ = run(cfg_for(write_jsonl(tmp_path / "alpaca.jsonl", alpaca)), tok)
    assert "Name a river.\n\nIn france." in tok.decode(e.input_ids)
    assert masked_targets(tok, e) == "The Seine." + END

    pc = [{"prompt": "Capital of france?", "completion": "Paris."}]
    [e], _ = run(cfg_for(write_jsonl(tmp_path / "pc.jsonl", pc)), tok)
    assert masked_targets(tok, e) == "Paris." + END

    chat = [{"messages": [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "One."},
                          {"role": "user", "content": "B?"}, {"role": "assistant", "content": "Two."}]},
            {"messages": [{"role": "user", "content": "Only a question"}]}]
    exs, counters = run(cfg_for(write_jsonl(tmp_path / "chat.jsonl", chat)), tok)
    assert [masked_targets(tok, e) for e in exs] == ["One." + END + "Two." + END]
    assert counters.skipped == {"no_assistant_turn": 1}

    text = [{"text": "The model is a teacher."}, {"text": "  "}]
    exs, counters = run(cfg_for(write_jsonl(tmp_path / "text.jsonl", text)), tok)
    [e] = exs
    assert tok.decode(e.input_ids) == "The model is a teacher." + END and e.loss_mask.all()
    assert counters.skipped == {"empty_text": 1}


def test_plain_format_without_template(tmp_path, tiny_tokenizer_dir):
    t = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    t.chat_template = None
    rows = dolly_rows(3)
    cfg = cfg_for(write_jsonl(tmp_path / "d.jsonl", rows))
    exs, _ = run(cfg, t)
    for e in exs:
        r = rows[e.source_index]
        user = r["instruction"] + (f"\n\n{r['context']}" if r["context"] else "")
        assert t.decode(e.input_ids) == f"### User:\n{user}\n\n### Assistant:\n{r['response']}{END}"
        assert masked_targets(t, e) == r["response"] + END
    ident = dataset_identity(cfg, load_source(cfg), t)
    assert ident["prompt_format"] == {"name": "rlkd-plain-v1"}


def test_template_failing_on_every_row_raises(tmp_path, tiny_tokenizer_dir):
    t = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    t.chat_template = t.chat_template.replace(
        "{% for message in messages %}",
        "{% for message in messages %}{% if 'river' in message['content'] %}"
        "{{ raise_exception('rivers are not allowed') }}{% endif %}")
    cfg = cfg_for(write_jsonl(tmp_path / "d.jsonl", dolly_rows(10)))
    with pytest.raises(TemplateError, match="rivers are not allowed"):
        run(cfg, t)


# ---- length ------------------------------------------------------------------------------------------------------

def test_truncate_skip_and_prompt_too_long(tmp_path, tok):
    rows = [
        {"instruction": "Short?", "context": "", "response": "Yes."},
        {"instruction": "Long answer?", "context": "", "response": "the river is long " * 20},
        {"instruction": "the model rank loss token " * 30, "context": "", "response": "Ok."},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    full, _ = run(cfg_for(path, max_length=4096), tok)
    full = {e.source_index: e for e in full}
    L = 48
    assert len(full[0].input_ids) <= L < len(full[1].input_ids) and len(full[2].input_ids) > L

    exs, c = run(cfg_for(path, max_length=L), tok)
    assert [e.source_index for e in exs] == [0, 1]
    assert c.truncated == {"over_max_length": 1} and c.skipped == {"prompt_too_long": 1}
    cut = exs[1]
    assert cut.truncated and len(cut.input_ids) == L
    np.testing.assert_array_equal(cut.input_ids, full[1].input_ids[:L])  # the prompt is kept, the response cut
    np.testing.assert_array_equal(cut.loss_mask, full[1].loss_mask[: L - 1])
    assert rows[1]["response"].startswith(masked_targets(tok, cut))

    exs, c = run(cfg_for(path, max_length=L, overlong="skip"), tok)
    assert [e.source_index for e in exs] == [0]
    assert c.skipped == {"too_long": 1, "prompt_too_long": 1} and not c.truncated
    assert "prompt_too_long 1 (rows 2)" in c.summary() and "too_long 1 (rows 1)" in c.summary()


def test_prompt_filling_all_but_one_token_keeps_one_target(tmp_path, tok):
    rows = [{"instruction": "What river?", "context": "", "response": "The Seine is a river in france."}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    [full], _ = run(cfg_for(path), tok)
    prompt_len = int(np.argmax(full.loss_mask)) + 1  # first response token index
    [e], c = run(cfg_for(path, max_length=prompt_len + 1), tok)
    assert e.loss_mask.sum() == 1 and e.truncated
    exs, c = run(cfg_for(path, max_length=prompt_len), tok)
    assert exs == [] and c.skipped == {"prompt_too_long": 1}


# ---- limit and shards ---------------------------------------------------------------------------------------------

def test_shards_cover_every_row_once(tmp_path, tok):
    rows = dolly_rows(23)
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    for limit in (None, 17):
        whole, cw = run(cfg_for(path, limit=limit), tok)
        parts, skipped = [], 0
        for i in range(3):
            exs, c = run(cfg_for(path, limit=limit, shard=f"{i}/3"), tok)
            assert all(e.source_index % 3 == i for e in exs)
            parts += exs
            skipped += sum(c.skipped.values())
        assert sorted(e.source_index for e in parts) == [e.source_index for e in whole]
        assert skipped == sum(cw.skipped.values())
        by_index = {e.source_index: e for e in parts}
        for e in whole:
            np.testing.assert_array_equal(by_index[e.source_index].input_ids, e.input_ids)
            np.testing.assert_array_equal(by_index[e.source_index].loss_mask, e.loss_mask)
        assert max(e.source_index for e in whole) < (limit or len(rows))
    assert list(run_indices(cfg_for(path, limit=10, shard="1/4"), 23)) == [1, 5, 9]
    assert list(run_indices(cfg_for(path, shard="3/4"), 3)) == []


def test_batches_larger_than_one_tokenizer_call(tmp_path, tok, monkeypatch):
    import rlkd.pipeline.data as data

    rows = dolly_rows(30)
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    big, _ = run(cfg_for(path), tok)
    monkeypatch.setattr(data, "BATCH_ROWS", 4)
    small, _ = run(cfg_for(path), tok)
    assert [e.source_index for e in big] == [e.source_index for e in small]
    for a, b in zip(big, small):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.loss_mask, b.loss_mask)


# ---- identity -----------------------------------------------------------------------------------------------------

def test_dataset_identity(tmp_path, tok):
    rows = dolly_rows(8)
    (tmp_path / "m1").mkdir()
    (tmp_path / "m2").mkdir()
    a = cfg_for(write_jsonl(tmp_path / "m1" / "d.jsonl", rows))
    b = cfg_for(write_jsonl(tmp_path / "m2" / "d.jsonl", rows), shard="1/2", limit=3)
    ia, ib = dataset_identity(a, load_source(a), tok), dataset_identity(b, load_source(b), tok)
    assert ia == ib  # same content elsewhere, another shard, another limit: the same dataset
    assert ia["source"] == "d.jsonl" and ia["num_rows"] == 8 and ia["columns"]["kind"] == "instruction"
    assert ia["prompt_format"]["name"] == "chat"
    json.dumps(ia)

    unused = [dict(r, category="other") for r in rows]  # a column the formatter does not read
    c = cfg_for(write_jsonl(tmp_path / "m1" / "d.jsonl", unused))
    assert dataset_identity(c, load_source(c), tok)["fingerprint"] == ia["fingerprint"]

    changed = [dict(r) for r in rows]
    changed[5]["response"] += "!"
    d = cfg_for(write_jsonl(tmp_path / "m2" / "d.jsonl", changed))
    assert dataset_identity(d, load_source(d), tok)["fingerprint"] != ia["fingerprint"]
    e = cfg_for(tmp_path / "m1" / "d.jsonl", max_length=77, prompt_format="plain")
    ie = dataset_identity(e, load_source(e), tok)
    assert ie["max_length"] == 77 and ie["prompt_format"] == {"name": "rlkd-plain-v1"}


# ---- shipped sample ----------------------------------------------------------------------------------------------

def test_shipped_dolly_sample(tok):
    lines = DOLLY_SAMPLE.read_text().splitlines()
    assert len(lines) == 300
    assert set(json.loads(lines[0])) == {"instruction", "context", "response", "category"}
    license_text = (DOLLY_SAMPLE.parent / "DOLLY_LICENSE.md").read_text()
    assert "CC BY-SA 3.0" in license_text and "Databricks" in license_text
    cfg = cfg_for(DOLLY_SAMPLE, limit=20, max_length=256)
    exs, c = run(cfg, tok)
    assert c.rows == 20 and c.examples + sum(c.skipped.values()) == 20
    for e in exs:
        r = json.loads(lines[e.source_index])
        text = masked_targets(tok, e)
        assert text == r["response"] + END or (e.truncated and r["response"].startswith(text))


def test_utf8_check_names_the_line_across_read_blocks(tmp_path):
    """The UTF-8 check reads in 4 MiB blocks: a character split between two blocks is valid, and a bad byte after it
    is reported at its line and column (counted here by hand)."""
    from rlkd.pipeline.data import DatasetError, check_text_file

    path = tmp_path / "big.jsonl"
    ok = b"a" * ((1 << 22) - 1) + "é".encode() + b"\n" + "line two ü\n".encode()
    path.write_bytes(ok)
    check_text_file(path, "json")  # no error: the split "é" is one valid character
    path.write_bytes(ok + b"line three caf\xe9\n")
    with pytest.raises(DatasetError, match=r"line 3 is not UTF-8 \(byte 0xe9 at column 15"):
        check_text_file(path, "json")
    path.write_bytes(b"\n \n")
    with pytest.raises(DatasetError, match="is empty"):
        check_text_file(path, "json")
