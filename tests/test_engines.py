"""Teacher engines: vLLM and transformers agree with each other and with a plain, unbatched transformers forward.

References are computed here, independently: a one-sequence-at-a-time ``model(input_ids).logits`` with
``log_softmax`` in float64, a full-vocabulary sort for top-k, and ranks counted over the whole vocabulary.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlkd.pipeline.data import Example
from rlkd.pipeline.engines import (
    EngineError,
    HFEngine,
    Scored,
    VLLMEngine,
    build_row,
    lm_head_flop_fraction,
    tail_logmass,
)

K = 16
TOL = 1e-4


def _sequences(vocab: int) -> list[np.ndarray]:
    """Mixed lengths, including the shortest scorable one (2 tokens), in no particular order."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab, size=n).astype(np.int32) for n in (37, 2, 90, 5, 64, 17)]


@pytest.fixture(scope="module")
def hf_model(tiny_teacher_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_teacher_dir), dtype=torch.float32).eval()


def _brute_force(model, ids: np.ndarray, k: int) -> dict:
    """Unbatched float32 forward; everything after the logits in float64 over the full vocabulary."""
    with torch.no_grad():
        logits = model(torch.tensor(ids[None].astype(np.int64))).logits[0, :-1]  # (P, V): position t -> ids[t+1]
    lp = torch.log_softmax(logits.double(), dim=-1).numpy()  # (P, V)
    order = np.argsort(-lp, axis=1, kind="stable")[:, :k]  # (P, k)
    top = np.take_along_axis(lp, order, axis=1)  # (P, k)
    tgt = lp[np.arange(lp.shape[0]), ids[1:]]  # (P,)
    return {
        "topk_ids": order,
        "topk_logprobs": top,
        "tail_logmass": np.log1p(-np.exp(top).sum(axis=1)),
        "target_logprob": tgt,
        "target_rank": 1 + (lp > tgt[:, None]).sum(axis=1),  # strictly greater + 1 (no ties in this model)
    }


def _tail(got: Scored, ids: np.ndarray) -> np.ndarray:
    """The tail the cache row gets from this engine output (computed by build_row only)."""
    ex = Example(source_index=0, input_ids=ids, loss_mask=np.ones(ids.shape[0] - 1, dtype=bool))
    return build_row(ex, got, k=got.topk_ids.shape[1]).tail_logmass


def _assert_matches(got: Scored, ref: dict, what: str, ids: np.ndarray) -> None:
    np.testing.assert_array_equal(got.topk_ids, ref["topk_ids"], err_msg=f"{what}: top-k ids/order")
    np.testing.assert_allclose(got.topk_logprobs, ref["topk_logprobs"], atol=TOL, rtol=0, err_msg=f"{what}: logprobs")
    np.testing.assert_allclose(_tail(got, ids), ref["tail_logmass"], atol=TOL, rtol=0, err_msg=f"{what}: tail")
    np.testing.assert_allclose(got.target_logprob, ref["target_logprob"], atol=TOL, rtol=0, err_msg=f"{what}: target")
    np.testing.assert_array_equal(got.target_rank, ref["target_rank"], err_msg=f"{what}: target rank")
    assert got.topk_ids.dtype == np.int32 and got.topk_logprobs.dtype == np.float32
    assert got.target_rank.dtype == np.int32 and got.target_rank.shape == (got.num_positions,)


def test_vllm_and_hf_engines_agree_with_brute_force(vllm_llm, tiny_teacher_dir, hf_model):
    vocab = hf_model.config.vocab_size
    seqs = _sequences(vocab)
    # A greedy continuation: its targets are the teacher's argmax, so rank 1 and in-top-k targets occur too.
    with torch.no_grad():
        greedy = hf_model.generate(torch.tensor(seqs[3][None].astype(np.int64)), max_new_tokens=24, do_sample=False,
                                   min_new_tokens=24, pad_token_id=0)[0].numpy().astype(np.int32)
    seqs.append(greedy)
    vllm = VLLMEngine(llm=vllm_llm, k=K)
    # Small token budget and position chunks: several padded batches and several LM-head chunks per batch.
    hf = HFEngine(hf_model=hf_model, k=K, max_batch_tokens=160, chunk_positions=29, device="cpu")
    got_v, got_h = vllm.score(seqs), hf.score(seqs)
    assert len(got_v) == len(got_h) == len(seqs)
    for i, ids in enumerate(seqs):
        ref = _brute_force(hf_model, ids, K)
        assert got_v[i].num_positions == got_h[i].num_positions == ids.shape[0] - 1
        _assert_matches(got_v[i], ref, f"vllm seq {i}", ids)
        _assert_matches(got_h[i], ref, f"hf seq {i}", ids)
        # The two engines against each other, directly.
        np.testing.assert_array_equal(got_v[i].topk_ids, got_h[i].topk_ids)
        np.testing.assert_array_equal(got_v[i].target_rank, got_h[i].target_rank)
        np.testing.assert_allclose(got_v[i].topk_logprobs, got_h[i].topk_logprobs, atol=TOL, rtol=0)
        np.testing.assert_allclose(_tail(got_v[i], ids), _tail(got_h[i], ids), atol=TOL, rtol=0)
    # Some targets fall outside the top-k, so ranks > k are exercised too.
    ranks = np.concatenate([g.target_rank for g in got_v])
    assert ranks.max() > K and ranks.min() == 1


def test_vllm_engine_refuses_k_above_max_logprobs_up_front(vllm_llm):
    limit = vllm_llm.model_config.max_logprobs
    with pytest.raises(EngineError, match=f"max_logprobs={limit}"):
        VLLMEngine(llm=vllm_llm, k=limit + 1)


def test_vllm_engine_checks_length_before_running(vllm_llm):
    engine = VLLMEngine(llm=vllm_llm, k=4)
    too_long = np.zeros(vllm_llm.model_config.max_model_len + 1, dtype=np.int32)
    with pytest.raises(EngineError, match="max_model_len"):
        engine.score([too_long])
    with pytest.raises(ValueError, match="at least 2"):
        engine.score([np.array([3], dtype=np.int32)])


def test_tail_logmass_hand_values():
    with np.errstate(divide="ignore"):
        lp = np.log(np.array([[0.5, 0.25], [1.0, 0.0], [0.9, 0.0]], dtype=np.float64)).astype(np.float32)
    got = tail_logmass(lp)
    assert got.dtype == np.float64
    assert got[0] == pytest.approx(np.log(0.25), abs=1e-7)
    assert got[1] == -np.inf  # the kept entries hold all the mass: clamp, never NaN
    assert got[2] == pytest.approx(np.log(0.1), abs=1e-6)  # exp(-inf) = 0 adds nothing


def test_build_row_adaptive_k_recomputes_tail_exactly():
    # Two positions, k = 4: probabilities written out by hand.
    probs = np.array([[0.5, 0.2, 0.05, 0.01], [0.9, 0.04, 0.03, 0.02]])
    lp = np.log(probs).astype(np.float32)
    scored = Scored(
        topk_ids=np.array([[7, 3, 9, 1], [2, 8, 5, 4]], dtype=np.int32),
        topk_logprobs=lp,
        target_logprob=np.log([0.2, 0.001]).astype(np.float32),
        target_rank=np.array([2, 40], dtype=np.int32),
    )
    ex = Example(source_index=5, input_ids=np.array([1, 3, 4], dtype=np.int32), loss_mask=np.array([False, True]))
    full = build_row(ex, scored, k=4)
    assert full.topk_count.tolist() == [4, 4]
    np.testing.assert_allclose(full.tail_logmass, np.log([0.24, 0.01]), atol=1e-6)
    # p >= 0.1 keeps [0.5, 0.2] and [0.9]; min_k = 2 lifts the second to [0.9, 0.04].
    row = build_row(ex, scored, k=4, min_prob=0.1, min_k=2)
    assert row.topk_count.tolist() == [2, 2]
    assert row.topk_ids.tolist() == [7, 3, 2, 8]
    np.testing.assert_allclose(row.topk_logprobs, np.log([0.5, 0.2, 0.9, 0.04]), atol=1e-6)
    np.testing.assert_allclose(row.tail_logmass, np.log([0.3, 0.06]), atol=1e-6)
    # A smaller k than the engine's: the first k entries, tail recomputed from them.
    row3 = build_row(ex, scored, k=3)
    assert row3.topk_count.tolist() == [3, 3]
    np.testing.assert_allclose(row3.tail_logmass, np.log([0.25, 0.03]), atol=1e-6)
    assert row.row_id == full.row_id and row.source_index == 5
    with pytest.raises(ValueError, match="positions"):
        build_row(Example(5, np.array([1, 3], dtype=np.int32), np.array([True])), scored, k=4)


def test_lm_head_flop_fraction_smollm2_135m():
    """SmolLM2-135M (config values from its config.json): the issue's figure, F_last / F_all ~ 0.79, by hand below."""
    from types import SimpleNamespace

    cfg = SimpleNamespace(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                          head_dim=64, intermediate_size=1536, vocab_size=49152)
    # Per layer: q,o 2·576·576 + k,v 2·576·192 + MLP 3·576·1536 = 3,538,944 MACs; head 576·49152 = 28,311,552.
    body = 30 * 3_538_944
    assert lm_head_flop_fraction(cfg) == pytest.approx(body / (body + 28_311_552), rel=1e-12)
    assert lm_head_flop_fraction(cfg) == pytest.approx(0.79, abs=0.005)


def test_vllm_setting_it_refuses_is_one_clear_engine_error(tiny_teacher_dir, vllm_cache_root):
    """vLLM validates its settings before loading anything; what it refuses (here a max_model_len above the tiny
    teacher's 512 positions) is an EngineError with vLLM's reason, not a pydantic traceback."""
    with pytest.raises(EngineError, match=r"vLLM refused the engine settings .*max_model_len \(600\)") as err:
        VLLMEngine(tiny_teacher_dir, k=4, dtype="float32", max_model_len=600, enforce_eager=True)
    assert "pydantic" not in str(err.value) and "For further information" not in str(err.value)
