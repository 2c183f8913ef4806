"""vLLM smoke test: a real ``prompt_logprobs`` request on the tiny teacher against a plain transformers forward.

Stage 1 trusts vLLM's prompt log-probs as the teacher's distribution; this checks, on the same float32 weights,
that they are the log-softmax of the model's logits (max abs diff <= 1e-4), that the top-k ids come in the same
order, and the flat layout the pipeline parses: position 0 empty, then k+1 entries per position, the actual token
first with its true rank, then ranks 1..k.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

K = 20
"""Top-k asked of vLLM: the cache's usual k."""
TOL = 1e-4


def _prompts(tokenizer) -> list[list[int]]:
    texts = [
        "What is the capital of France? The capital of France is Paris.",
        "The teacher and the student rank the token by loss.",
        "Three men came down the river in 1999!",
    ]
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    prompts.append(tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=True, add_generation_prompt=True,
        return_dict=False,
    ))
    return [list(map(int, p)) for p in prompts]


@functools.lru_cache(maxsize=2)
def _reference_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def _reference_logprobs(model_dir, prompt: list[int]) -> np.ndarray:
    """(T, V) float64 log-softmax of a plain transformers float32 forward: row t scores token t + 1."""
    with torch.no_grad():
        logits = _reference_model(model_dir)(torch.tensor([prompt])).logits[0]  # (T, V) float32
    return torch.log_softmax(logits.double(), dim=-1).numpy()  # (T, V)


def test_vllm_prompt_logprobs_match_transformers(vllm_llm, tiny_teacher_dir, record_property):
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_teacher_dir))
    prompts = _prompts(tokenizer)
    params = SamplingParams(max_tokens=1, prompt_logprobs=K, detokenize=False, flat_logprobs=True)
    outputs = vllm_llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    assert len(outputs) == len(prompts)

    max_diff = 0.0
    scored = 0
    for prompt, out in zip(prompts, outputs):
        assert list(out.prompt_token_ids) == prompt
        flat = out.prompt_logprobs
        T = len(prompt)
        assert len(flat.start_indices) == T, "one entry range per prompt position"
        # position 0 has no prefix, so nothing scores it
        assert flat.start_indices[0] == flat.end_indices[0]
        ref = _reference_logprobs(tiny_teacher_dir, prompt)  # (T, V)
        for t in range(1, T):
            s, e = flat.start_indices[t], flat.end_indices[t]
            assert e - s == K + 1, f"position {t}: {e - s} entries, expected the actual token plus top-{K}"
            ids = np.asarray(flat.token_ids[s:e])
            lps = np.asarray(flat.logprobs[s:e], dtype=np.float64)
            ranks = list(flat.ranks[s:e])
            row = ref[t - 1]  # (V,) the distribution over token t given tokens < t

            # actual token first, with its rank in the full distribution
            actual = prompt[t]
            assert ids[0] == actual
            ref_rank = 1 + int((row > row[actual]).sum())
            assert ranks[0] == ref_rank, f"position {t}: vLLM rank {ranks[0]} vs reference {ref_rank}"

            # then the top-k, ranks 1..k, in the reference's order
            ref_top = np.argsort(-row, kind="stable")[:K]
            assert ranks[1:] == list(range(1, K + 1))
            assert ids[1:].tolist() == ref_top.tolist(), f"position {t}: top-{K} ids or order differ"
            diff = np.abs(lps - row[ids]).max()
            max_diff = max(max_diff, float(diff))
            scored += 1
            assert np.all(np.diff(lps[1:]) <= 0), "top-k log-probs must come in decreasing order"

    record_property("vllm_vs_transformers_max_abs_diff", max_diff)
    print(f"\nvLLM vs transformers (float32, {scored} positions, k={K}): max |Δ logprob| = {max_diff:.3e}")
    assert scored > 40
    assert max_diff <= TOL, f"max abs diff {max_diff:.3e} > {TOL}"


def test_reference_top_k_is_not_degenerate(tiny_teacher_dir):
    """Guards the test above: with near-uniform logits (the usual 0.02 init) neighbouring top-k log-probs differ by
    ~1e-6 and an order check would test float rounding instead of the engine."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_teacher_dir))
    gaps, top1 = [], []
    for prompt in _prompts(tokenizer):
        ref = _reference_logprobs(tiny_teacher_dir, prompt)  # (T, V)
        top = -np.sort(-ref, axis=-1)[:, : K + 1]  # (T, k+1) descending
        gaps.append(-np.diff(top, axis=-1).ravel())
        top1.append(np.exp(top[:, 0]))
    gaps, top1 = np.concatenate(gaps), np.concatenate(top1)
    # measured: median neighbour gap 0.087, top-1 probability median 0.25 against 1/V = 0.002
    assert float(np.median(gaps)) > 100 * TOL
    assert float(np.median(top1)) > 20 / len(tokenizer)
