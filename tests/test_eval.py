"""`rlkd eval` end to end on the tiny models: prompts cut from stage 1's formatting, vLLM vs transformers greedy
generations, SIGKILL and resume, refusals (tokenizer vs cache, students keeping different rows, changed settings),
--cache agreement equal to `rlkd inspect --student`, and the generations JSONL as a `cache-teacher` input."""

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
from click.testing import CliRunner

from rlkd.cli import main
from rlkd.config import ConfigError, build_config
from rlkd.eval.config import EvalConfig
from rlkd.eval.generate import HFGenerator, Settings, VLLMGenerator, row_seed, stop_ids
from rlkd.eval.prompts import EvalDataError, encode_prompts, load_rows
from rlkd.eval.run import EvalError, parse_students, run_eval
from rlkd.eval.store import GenerationStore, StoreError
from tests import tiny

REPO = Path(__file__).resolve().parents[1]


def _write_dolly(path: Path, n: int, seed: int, words: tuple[int, int] = (3, 8)) -> list[dict]:
    """Short Dolly-shaped rows; row 2 has an empty response (skipped by stage 1's row reader: empty_response)."""
    rng = random.Random(seed)

    def text(lo, hi):
        return " ".join(rng.choice(tiny._WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    rows = [{"instruction": text(2, 6), "context": text(2, 5) if i % 4 == 0 else "", "response": text(*words)}
            for i in range(n)]
    if n > 2:
        rows[2]["response"] = ""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _cfg(students, dataset, out, **kw) -> EvalConfig:
    base = {"students": [str(s) for s in students], "dataset": str(dataset), "out": str(out), "engine": "hf",
            "max_prompt_length": 96, "max_new_tokens": 12, "batch_size": 4, "bootstrap": 200, "progress": False}
    return build_config(EvalConfig, {**base, **kw})


@pytest.fixture(scope="module")
def dolly(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval-data") / "dolly.jsonl"
    _write_dolly(path, 14, seed=3)
    return path


@pytest.fixture(scope="module")
def other_tok_student(tmp_path_factory) -> Path:
    """A model with another tokenizer (vocabulary 384 instead of 512)."""
    root = tmp_path_factory.mktemp("other-tok")
    tiny.make_tokenizer(root / "tok", vocab_size=384)
    tiny.make_llama(root / "model", root / "tok", hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128,
                    seed=5)
    return root / "model"


# ---- prompts -------------------------------------------------------------------------------------------------------


def test_prompt_is_stage1_formatting_cut_before_the_answer(tiny_teacher_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_teacher_dir))
    data = tmp_path / "chat.jsonl"
    convs = [
        [{"role": "user", "content": "Name a river."}, {"role": "assistant", "content": "The big river."}],
        [{"role": "system", "content": "Be short."}, {"role": "user", "content": "One?"},
         {"role": "assistant", "content": "Two."}, {"role": "user", "content": "Three?"},
         {"role": "assistant", "content": "Four and five."}],
        [{"role": "user", "content": "Empty answer?"}, {"role": "assistant", "content": "  "}],
        [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "B."}, {"role": "user", "content": "C?"},
         {"role": "assistant", "content": ""}],
    ]
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    cfg = _cfg([tiny_teacher_dir], data, tmp_path / "out")
    sel, identity = load_rows(cfg)
    assert [r.source_index for r in sel.rows] == [0, 1] and dict(sel.skipped) == {"empty_response": 1,
                                                                            "empty_reference": 1}
    assert sel.rows[1].messages == convs[1][:-1] and sel.rows[1].reference == "Four and five."
    assert len(identity["fingerprint"]) == 64

    # chat: the template's own rendering of the conversation so far, with the generation prompt
    ids, skipped = encode_prompts(sel.rows, tok, "chat", 1000)
    for r in sel.rows:
        want = tok(tok.apply_chat_template(r.messages, tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"]
        assert ids[r.source_index].tolist() == want
    # plain (rlkd-plain-v1): headers, turns separated by a blank line, earlier answers followed by EOS
    ids, _ = encode_prompts(sel.rows, tok, "plain", 1000)
    pieces = ["### System:\nBe short.\n\n### User:\nOne?\n\n### Assistant:\n", "Two.", None,
              "\n\n### User:\nThree?\n\n### Assistant:\n"]
    want = []
    for p in pieces:
        want += [tok.eos_token_id] if p is None else tok(p, add_special_tokens=False)["input_ids"]
    assert ids[1].tolist() == want
    # too long: skipped and counted
    ids, skipped = encode_prompts(sel.rows, tok, "chat", 12)
    assert 0 not in ids or len(ids[0]) <= 12
    assert sum(skipped.values()) + len(ids) == 2 and skipped.get("prompt_too_long", 0) >= 1

    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "just text"}) + "\n")
    with pytest.raises(EvalDataError, match="no prompts and reference answers"):
        load_rows(_cfg([tiny_teacher_dir], text, tmp_path / "out2"))


# ---- engines -------------------------------------------------------------------------------------------------------


def _prompts(teacher_dir, dolly_path, n=None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    sel, _ = load_rows(_cfg([teacher_dir], dolly_path, "unused"))
    ids, _ = encode_prompts(sel.rows, tok, "auto", 1000)
    rows = [r for r in sel.rows if r.source_index in ids][:n]
    return tok, rows, [ids[r.source_index] for r in rows]


def test_vllm_and_hf_greedy_generations_agree(vllm_llm, tiny_teacher_dir, dolly, record_property):
    import torch
    from transformers import AutoModelForCausalLM

    tok, rows, prompts = _prompts(tiny_teacher_dir, dolly)
    settings = Settings(max_new_tokens=24, temperature=0.0, top_p=1.0, samples=1,
                        stop_ids=stop_ids(tok, tiny_teacher_dir))
    seeds = [row_seed(0, r.source_index) for r in rows]
    vllm_out = VLLMGenerator(llm=vllm_llm).generate(prompts, seeds, settings)
    hf_model = AutoModelForCausalLM.from_pretrained(str(tiny_teacher_dir), dtype=torch.float32)
    hf_out = HFGenerator(hf_model=hf_model, device="cpu", pad_id=tok.pad_token_id).generate(prompts, seeds, settings)
    same = total = 0
    for v, h in zip(vllm_out, hf_out):
        a, b = v[0].token_ids, h[0].token_ids
        total += max(len(a), len(b))
        # tokens agree up to the first difference (after it, the two continue from different prefixes)
        same += next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    share = same / total
    record_property("vllm_hf_greedy_token_agreement", share)
    print(f"vLLM vs transformers greedy: {same}/{total} generated tokens agree ({100 * share:.2f}%)")
    assert total >= 24 * len(rows) // 2 and share >= 0.99
    # hit_limit is exactly "no stop id within max_new_tokens"
    for v in vllm_out:
        assert v[0].hit_limit == (len(v[0].token_ids) == 24)
        assert not set(v[0].token_ids) & set(settings.stop_ids)


def test_hf_generation_equals_a_plain_greedy_loop(tiny_student_dir, dolly):
    # An independent reference: argmax of a full forward, token after token, without generate() or padding.
    import torch
    from transformers import AutoModelForCausalLM

    tok, _, prompts = _prompts(tiny_student_dir, dolly, n=3)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_student_dir), dtype=torch.float32).eval()
    settings = Settings(8, 0.0, 1.0, 1, stop_ids(tok, tiny_student_dir))
    got = HFGenerator(hf_model=model, device="cpu", pad_id=tok.pad_token_id).generate(prompts, [0] * 3, settings)
    for p, g in zip(prompts, got):
        ids = torch.tensor(p, dtype=torch.long)[None]
        want = []
        with torch.no_grad():
            for _ in range(8):
                nxt = int(model(input_ids=ids).logits[0, -1].argmax())
                if nxt in settings.stop_ids:
                    break
                want.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        assert g[0].token_ids == want


def test_vllm_sampling_seeds_are_per_row(vllm_llm, tiny_teacher_dir, dolly):
    tok, rows, prompts = _prompts(tiny_teacher_dir, dolly, n=4)
    settings = Settings(10, 1.0, 0.9, 3, stop_ids(tok, tiny_teacher_dir))
    gen = VLLMGenerator(llm=vllm_llm)
    seeds = [row_seed(7, r.source_index) for r in rows]
    together = gen.generate(prompts, seeds, settings)
    alone = gen.generate(prompts[2:3], seeds[2:3], settings)
    assert [g.token_ids for g in alone[0]] == [g.token_ids for g in together[2]]  # batch-independent: resumable
    assert len({tuple(g.token_ids) for g in together[2]}) > 1  # three samples, not three copies
    again = gen.generate(prompts[:1], [row_seed(8, rows[0].source_index)], settings)
    assert [g.token_ids for g in again[0]] != [g.token_ids for g in together[0]]  # another --seed, other samples


def test_run_with_the_vllm_engine_and_teacher_as_a_row(vllm_llm, tiny_teacher_dir, tiny_student_dir, dolly, tmp_path):
    # the teacher through the session's vLLM engine, the student through transformers (a second vLLM engine in this
    # process would cost a start-up and its memory)
    cfg = _cfg([f"teacher={tiny_teacher_dir}", tiny_student_dir], dolly, tmp_path / "out", engine="hf")
    report = run_eval(cfg, generators={str(tiny_teacher_dir): VLLMGenerator(llm=vllm_llm)})
    assert [s["name"] for s in report["students"]] == ["teacher", tiny_student_dir.name]
    settings = json.loads((tmp_path / "out" / "teacher" / "settings.json").read_text())
    assert settings["engine"] == "vllm" and report["generation"]["engine"] == "hf, vllm"
    assert report["dataset"]["rows_evaluated"] == 13 and report["dataset"]["skipped"] == {"empty_response": 1}
    lines = [json.loads(x) for x in (tmp_path / "out" / "teacher" / "generations.jsonl").read_text().splitlines()]
    assert [x["row"] for x in lines] == [i for i in range(14) if i != 2]
    # the table's numbers are the means of the per-row scores written beside the generations
    per_row = [json.loads(x) for x in (tmp_path / "out" / "teacher" / "scores.jsonl").read_text().splitlines()]
    g = report["students"][0]["generation"]
    assert g["tokens"]["value"] == pytest.approx(np.mean([x["tokens"] for x in lines]))
    assert g["rougeL"]["value"] == pytest.approx(np.mean([x["rougeL"] for x in per_row]))
    assert g["rougeL"]["low"] <= g["rougeL"]["value"] <= g["rougeL"]["high"]
    d = report["differences"][0]
    assert (d["a"], d["b"]) == ("teacher", tiny_student_dir.name)
    assert d["generation"]["tokens"]["value"] == pytest.approx(
        report["students"][1]["generation"]["tokens"]["value"] - g["tokens"]["value"])
    assert (tmp_path / "out" / "report.md").read_text().count("|") > 20


# ---- resume --------------------------------------------------------------------------------------------------------


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _eval_args(teacher, data, out) -> list[str]:
    return ["eval", str(teacher), "--dataset", str(data), "--out", str(out), "--engine", "hf", "--batch-size", "2",
            "--max-new-tokens", "16", "--max-prompt-length", "96", "--temperature", "0.8", "--seed", "3",
            "--bootstrap", "200", "--no-progress", "--json"]


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tiny_teacher_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    _write_dolly(data, 25, seed=11)
    out = tmp_path / "killed"
    gens = out / tiny_teacher_dir.name / "generations.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "rlkd.cli", *_eval_args(tiny_teacher_dir, data, out)],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while not (gens.exists() and gens.read_bytes().count(b"\n") >= 4):
            if proc.poll() is not None:
                pytest.fail(f"the run ended (rc {proc.returncode}) before the kill: {proc.stderr.read()[-2000:]!r}")
            if time.time() > deadline:
                pytest.fail("no generations written within 300 s")
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    done_at_kill = gens.read_bytes().count(b"\n")
    assert 4 <= done_at_kill < 24, "the kill must land mid-run"
    with open(gens, "ab") as f:  # and a torn last line, as a kill in the middle of a write leaves
        f.write(b'{"row": 99, "sample": 0, "prompt": [{"ro')

    resumed = CliRunner().invoke(main, _eval_args(tiny_teacher_dir, data, out))
    assert resumed.exit_code == 0, resumed.output
    fresh = CliRunner().invoke(main, _eval_args(tiny_teacher_dir, data, tmp_path / "fresh"))
    assert fresh.exit_code == 0, fresh.output
    want = (tmp_path / "fresh" / tiny_teacher_dir.name / "generations.jsonl").read_bytes()
    assert gens.read_bytes() == want and want.count(b"\n") == 24
    a, b = json.loads(resumed.output), json.loads(fresh.output)
    assert a["students"][0]["generation"] == b["students"][0]["generation"]


def test_store_cuts_an_incomplete_row_and_refuses_other_settings(tmp_path):
    def line(row, sample):
        return {"row": row, "sample": sample, "prompt": [], "reference": "r", "completion": "c", "tokens": 1,
                "prompt_tokens": 1, "hit_limit": False}

    store = GenerationStore(tmp_path / "s", {"temperature": 1.0}, samples=2)
    store.append([[line(0, 0), line(0, 1)], [line(5, 0), line(5, 1)]])
    with open(store.path, "a") as f:  # row 7 lost its second sample in a kill
        f.write(json.dumps(line(7, 0)) + "\n")
    again = GenerationStore(tmp_path / "s", {"temperature": 1.0}, samples=2)
    assert sorted(again.rows) == [0, 5] and store.path.read_text().count("\n") == 4
    with pytest.raises(StoreError, match=r"temperature: was 1.0, now 0.5.*another --out"):
        GenerationStore(tmp_path / "s", {"temperature": 0.5}, samples=2)
    with open(store.path, "a") as f:
        f.write("not json\n" + json.dumps(line(9, 0)) + "\n")
    with pytest.raises(StoreError, match=r"generations.jsonl:5 is not a generation line"):
        GenerationStore(tmp_path / "s", {"temperature": 1.0}, samples=2)


def test_rerun_with_other_settings_is_refused_and_more_rows_resume(tiny_student_dir, dolly, tmp_path):
    out = tmp_path / "out"
    r1 = run_eval(_cfg([tiny_student_dir], dolly, out, limit=6, bootstrap=0))
    assert r1["dataset"]["rows_evaluated"] == 5 and r1["students"][0]["generation"]["rougeL"]["low"] is None
    gens = out / tiny_student_dir.name / "generations.jsonl"
    first = gens.read_text()
    with pytest.raises(StoreError, match="max_new_tokens: was 12, now 13"):
        run_eval(_cfg([tiny_student_dir], dolly, out, max_new_tokens=13))
    r2 = run_eval(_cfg([tiny_student_dir], dolly, out, limit=10))  # a higher limit continues the same file
    assert r2["dataset"]["rows_evaluated"] == 9 and gens.read_text().startswith(first)
    assert gens.read_text().count("\n") == 9
    # the same run from the CLI generates nothing more and prints the table (text, then Markdown)
    args = ["eval", str(tiny_student_dir), "--dataset", str(dolly), "--out", str(out), "--engine", "hf", "--limit",
            "10", "--max-prompt-length", "96", "--max-new-tokens", "12", "--batch-size", "4", "--bootstrap", "200",
            "--no-progress"]
    text = CliRunner().invoke(main, args)
    assert text.exit_code == 0, text.output
    rouge = r2["students"][0]["generation"]["rougeL"]
    assert f"ROUGE-L %        {100 * rouge['value']:.2f} [{100 * rouge['low']:.2f}, {100 * rouge['high']:.2f}]" \
        in text.output
    assert "9 rows of dolly.jsonl, greedy, <= 12 new tokens (hf)" in text.output
    md = CliRunner().invoke(main, args + ["--markdown"])
    assert md.exit_code == 0 and "| metric | " + tiny_student_dir.name + " |" in md.output
    assert gens.read_text().count("\n") == 9


# ---- refusals ------------------------------------------------------------------------------------------------------


def test_config_problems_are_reported_together():
    with pytest.raises(ConfigError) as e:
        build_config(EvalConfig, {"students": ["x"], "dataset": "d", "out": "o", "samples": 3, "top_p": 1.5,
                                  "bootstrap": 10, "cache_max_rows": 5})
    msg = str(e.value)
    assert "4 problem(s)" in msg and "samples=3 with temperature 0" in msg and "top_p" in msg
    assert "bootstrap" in msg and "cache_max_rows limits the rows of --cache" in msg
    result = CliRunner().invoke(main, ["eval", "--dataset", "d", "--out", "o", "--temperature", "-1"])
    assert result.exit_code == 2 and "students: required" in result.output and "temperature" in result.output


def test_student_names():
    got = parse_students(["runs/kl/final", "rlkd=runs/rlkd/final", "students/smol-16l", "HuggingFaceTB/SmolLM2"])
    assert [s.name for s in got] == ["kl-final", "rlkd", "smol-16l", "SmolLM2"]
    assert got[1].path == "runs/rlkd/final"
    with pytest.raises(EvalError, match="both named 'x-final'.*NAME=PATH"):
        parse_students(["a/x/final", "b/x/final"])


def test_missing_student_fails_before_any_work(tiny_student_dir, dolly, tmp_path):
    result = CliRunner().invoke(main, ["eval", str(tiny_student_dir), str(tmp_path / "nope"), "--dataset",
                                       str(dolly), "--out", str(tmp_path / "out"), "--engine", "hf"])
    assert result.exit_code == 1 and "nope is not a model folder" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
    # a folder that passes the checks but has no weights: the engine's failure is one clear line too
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_student_dir, broken, ignore=shutil.ignore_patterns("*.safetensors"))
    result = CliRunner().invoke(main, ["eval", str(broken), "--dataset", str(dolly), "--out", str(tmp_path / "o2"),
                                       "--engine", "hf", "--max-prompt-length", "96", "--max-new-tokens", "4"])
    assert result.exit_code == 1 and f"cannot load {broken} with transformers" in result.output
    assert "Traceback" not in result.output


def test_students_whose_tokenizers_keep_different_rows_are_refused(tiny_student_dir, other_tok_student, dolly,
                                                                   tmp_path):
    from transformers import AutoTokenizer

    sel, _ = load_rows(_cfg([tiny_student_dir], dolly, "x"))
    lens = [{i: len(p) for i, p in encode_prompts(sel.rows, AutoTokenizer.from_pretrained(str(m)), "auto",
                                                  10_000)[0].items()} for m in (tiny_student_dir, other_tok_student)]
    # a limit that one tokenizer's prompt fits and the other's does not
    cut = next(min(a, b) for a, b in zip(lens[0].values(), lens[1].values()) if a != b)
    result = CliRunner().invoke(main, ["eval", str(tiny_student_dir), str(other_tok_student), "--dataset",
                                       str(dolly), "--out", str(tmp_path / "out"), "--engine", "hf",
                                       "--max-prompt-length", str(cut), "--max-new-tokens", "4"])
    assert result.exit_code == 1 and "different rows fit --max-prompt-length" in result.output
    assert "Traceback" not in result.output
    # with room for every prompt they are comparable (scores are on text), and the table says lengths differ in kind
    report = run_eval(_cfg([tiny_student_dir, other_tok_student], dolly, tmp_path / "ok", max_new_tokens=4,
                           max_prompt_length=400))
    assert any("tokenise differently" in n for n in report["notes"])


# ---- against a teacher cache ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dolly_cache(tmp_path_factory, tiny_teacher_dir, dolly) -> Path:
    from rlkd.pipeline.config import CacheTeacherConfig
    from rlkd.pipeline.engines import HFEngine
    from rlkd.pipeline.run import cache_teacher

    out = tmp_path_factory.mktemp("eval-cache") / "cache"
    cfg = build_config(CacheTeacherConfig, {"teacher": str(tiny_teacher_dir), "dataset": str(dolly), "out": str(out),
                                            "top_k": 12, "codec": "fp32", "engine": "hf"})
    cache_teacher(cfg, engine=HFEngine(tiny_teacher_dir, k=12), progress=False)
    return out


def test_cache_agreement_equals_inspect_student(tiny_student_dir, dolly, dolly_cache, tmp_path):
    from rlkd.inspect.student import student_agreement

    report = run_eval(_cfg([f"s={tiny_student_dir}"], dolly, tmp_path / "out", cache=str(dolly_cache),
                           max_new_tokens=4))
    want = student_agreement(dolly_cache, tiny_student_dir)["metrics"]["response"]
    got = report["students"][0]["agreement"]
    assert report["cache"]["rows"] == 13 and report["cache"]["positions"] == want["positions"]
    assert "same dataset" in report["cache"]["rows_from"]
    for m in ("cr@1", "cr@2", "cr@5", "mor@5", "mor@10", "top1_agreement", "kd"):
        assert got[m]["value"] == pytest.approx(want[m], abs=1e-9), m
        assert got[m]["low"] <= got[m]["value"] <= got[m]["high"]


def test_student_with_another_tokenizer_than_the_cache_gets_one_clear_error(tiny_student_dir, other_tok_student,
                                                                            dolly, dolly_cache, tmp_path):
    result = CliRunner().invoke(main, ["eval", str(tiny_student_dir), f"odd={other_tok_student}", "--dataset",
                                       str(dolly), "--out", str(tmp_path / "out"), "--engine", "hf",
                                       "--cache", str(dolly_cache), "--max-new-tokens", "4",
                                       "--max-prompt-length", "96"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert "1 problem(s) before generating" in result.output and "student odd" in result.output
    assert "tokenizer mismatch" in result.output and "vocab 384" in result.output
    assert not (tmp_path / "out").exists()  # refused before any generation


def test_cache_without_comparable_rows_is_refused_before_generating(tiny_teacher_dir, tiny_student_dir, dolly,
                                                                    dolly_cache, tmp_path):
    from rlkd.pipeline.config import CacheTeacherConfig
    from rlkd.pipeline.engines import HFEngine
    from rlkd.pipeline.run import cache_teacher

    # a cache whose run has not finished a shard yet: its manifest lists no rows
    empty = tmp_path / "empty"
    empty.mkdir()
    manifest = json.loads((dolly_cache / "manifest.json").read_text())
    (empty / "manifest.json").write_text(json.dumps({**manifest, "rows": 0, "shards": [], "complete": False}))
    args = ["eval", str(tiny_student_dir), "--dataset", str(dolly), "--engine", "hf", "--max-prompt-length", "96",
            "--max-new-tokens", "4"]
    result = CliRunner().invoke(main, args + ["--out", str(tmp_path / "o1"), "--cache", str(empty)])
    assert result.exit_code == 1 and "holds no rows yet" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o1").exists()
    # the odd rows of the same dataset, against an evaluation of row 0 only: nothing in common
    odd = tmp_path / "odd"
    cfg = build_config(CacheTeacherConfig, {"teacher": str(tiny_teacher_dir), "dataset": str(dolly), "out": str(odd),
                                            "top_k": 12, "engine": "hf", "shard": "1/2", "limit": 4})
    cache_teacher(cfg, engine=HFEngine(tiny_teacher_dir, k=12), progress=False)
    result = CliRunner().invoke(main, args + ["--out", str(tmp_path / "o2"), "--cache", str(odd), "--limit", "1"])
    assert result.exit_code == 1 and "none of its 2 rows is among the 1 rows evaluated" in result.output
    assert not (tmp_path / "o2" / tiny_student_dir.name / "generations.jsonl").exists()


# ---- generations feed stage 1 ------------------------------------------------------------------------------------


def test_generations_jsonl_is_a_cache_teacher_input(tiny_teacher_dir, tiny_student_dir, dolly, tmp_path):
    from transformers import AutoTokenizer

    from rlkd.cache import CacheReader, read_manifest

    run_eval(_cfg([tiny_student_dir], dolly, tmp_path / "ev", temperature=1.0, samples=2, seed=1,
                  max_new_tokens=10))
    gens_path = tmp_path / "ev" / tiny_student_dir.name / "generations.jsonl"
    gens = [json.loads(x) for x in gens_path.read_text().splitlines()]
    result = CliRunner().invoke(main, ["cache-teacher", "--teacher", str(tiny_teacher_dir), "--dataset",
                                       str(gens_path), "--out", str(tmp_path / "cache"), "--engine", "hf",
                                       "--top-k", "8", "--codec", "fp32", "--no-progress"])
    assert result.exit_code == 0, result.output
    m = read_manifest(tmp_path / "cache")
    assert m["dataset"]["columns"]["kind"] == "prompt_completion"
    kept = [g for g in gens if g["completion"].strip()]
    assert m["rows"] == len(kept) > 0
    tok = AutoTokenizer.from_pretrained(str(tiny_teacher_dir))
    rows = {r.source_index: r for r in CacheReader(tmp_path / "cache", shuffle=False).iter_rows()}
    for line_no, g in enumerate(gens):
        if not g["completion"].strip():
            continue
        row = rows[line_no]  # one training row per generation line
        conv = g["prompt"] + [{"role": "assistant", "content": g["completion"]}]
        want = tok(tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False)["input_ids"]
        assert np.asarray(row.input_ids).tolist() == want
        trained = np.asarray(row.input_ids)[1:][np.asarray(row.loss_mask, dtype=bool)]
        assert tok.decode(trained) == g["completion"] + "<|im_end|>"  # the teacher scores the student's answer
