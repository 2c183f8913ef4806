"""rlkd.core.targets: the one collate from cache rows to padded model inputs plus (N, k) teacher targets, checked
position by position against the rows themselves (a plain Python loop), and the shared vocabulary check."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rlkd.cache import CacheReader, CacheWriter
from rlkd.core.targets import collate, vocab_problem
from tests.cache_helpers import make_rows, test_meta

K = 7


@pytest.fixture(scope="module")
def rows():
    # fixed-k and adaptive-k rows (some positions keep 1..7 entries), lengths 2..25, prompts of any length
    return make_rows(9, k=K, seed=3, max_len=25) + make_rows(9, k=K, seed=4, max_len=25, source_offset=100,
                                                             min_prob=5e-2)


def expected_targets(rows, all_positions: bool):
    """Per selected position, row-major: (b, t, ids, logprobs, tail, next id, trained), by a loop over positions."""
    out = []
    for b, r in enumerate(rows):
        start = 0
        for t in range(r.num_positions):
            n = int(r.topk_count[t])
            if all_positions or r.loss_mask[t]:
                out.append((b, t, [int(x) for x in r.topk_ids[start:start + n]],
                            [float(x) for x in r.topk_logprobs[start:start + n]], float(r.tail_logmass[t]),
                            int(r.input_ids[t + 1]), bool(r.loss_mask[t])))
            start += n
    return out


@pytest.mark.parametrize("all_positions", [False, True])
def test_collate_equals_a_loop_over_positions(rows, all_positions):
    mb = collate(rows, K, all_positions=all_positions)
    B, T = len(rows), max(len(r.input_ids) for r in rows)
    assert mb.input_ids.shape == (B, T) and mb.input_ids.dtype == torch.int64
    assert mb.attention_mask.dtype == torch.int64 and mb.target_mask.dtype == torch.bool
    for b, r in enumerate(rows):
        Tb = len(r.input_ids)
        assert mb.input_ids[b, :Tb].tolist() == r.input_ids.tolist() and not mb.input_ids[b, Tb:].any()
        assert mb.attention_mask[b].tolist() == [1] * Tb + [0] * (T - Tb)
        want = [True] * (Tb - 1) if all_positions else r.loss_mask.tolist()
        assert mb.target_mask[b].tolist() == want + [False] * (T - Tb + 1)  # the last real token has no target
    exp = expected_targets(rows, all_positions)
    tg = mb.targets
    assert len(tg) == mb.positions == len(exp) == int(mb.target_mask.sum()) and tg.k == K
    assert tg.topk_ids.dtype == torch.int64 and tg.topk_logprobs.dtype == torch.float32
    assert mb.row_ids == [r.row_id for r in rows] and mb.tokens == sum(len(r.input_ids) for r in rows)
    for i, (b, t, ids, lps, tail, nxt, trained) in enumerate(exp):
        n = len(ids)
        assert tg.topk_ids[i].tolist() == ids + [0] * (K - n)
        assert tg.topk_logprobs[i, :n].tolist() == lps and (tg.topk_logprobs[i, n:] == -np.inf).all()
        assert tg.topk_valid[i].tolist() == [True] * n + [False] * (K - n)
        assert tg.tail_logmass[i].item() == tail and tg.target_ids[i].item() == nxt
        assert mb.trained[i].item() == trained
    # hidden[target_mask] lines up with the targets: a (B, T, 2) "hidden state" holding (b, t) finds them in order
    hidden = torch.stack(torch.meshgrid(torch.arange(B), torch.arange(T), indexing="ij"), dim=-1)  # (B, T, 2)
    assert hidden[mb.target_mask].tolist() == [[b, t] for b, t, *_ in exp]
    assert any(len(e[2]) < K for e in exp), "the fixture must hold adaptive-k positions"


def test_collate_of_rows_read_back_from_a_cache(rows, tmp_path):
    """The reader's rows (views into decoded row groups, q8 codec) collate like the rows that were written, up to
    the codec's rounding of log-probs; ids, masks and alignment exactly."""
    with CacheWriter(tmp_path, test_meta(), k=K, codec="q8", row_group_rows=4) as w:
        for r in rows:
            w.write(r)
    read = [r for batch in CacheReader(tmp_path, batch_size=5, shuffle=False) for r in batch]
    a, b = collate(read, K), collate(rows, K)
    for name in ("input_ids", "attention_mask", "target_mask", "trained"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.targets.topk_ids, b.targets.topk_ids)
    assert torch.equal(a.targets.topk_valid, b.targets.topk_valid)
    valid = b.targets.topk_valid
    assert torch.allclose(a.targets.topk_logprobs[valid], b.targets.topk_logprobs[valid], atol=0.05)


def test_select_slice_and_to(rows):
    tg = collate(rows, K, all_positions=True).targets
    mask = torch.arange(len(tg)) % 3 == 0
    sel = tg.select(mask)
    assert len(sel) == int(mask.sum()) and torch.equal(sel.topk_ids, tg.topk_ids[mask])
    assert torch.equal(tg.slice(2, 5).target_ids, tg.target_ids[2:5])
    assert torch.equal(tg.to("cpu").tail_logmass, tg.tail_logmass)
    with pytest.raises(ValueError, match="at least one row"):
        collate([], K)


@pytest.mark.parametrize("record_max", [True, False])
def test_vocab_problem_names_the_largest_id(tmp_path, record_max):
    rows = make_rows(4, k=K, vocab=300, seed=9)
    with CacheWriter(tmp_path, test_meta(vocab=300), k=K) as w:
        for r in rows:
            w.write(r)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    if not record_max:  # an older cache without max_token_id: the check scans the shards
        manifest.pop("max_token_id")
        for s in manifest["shards"]:
            s.pop("max_token_id", None)
    largest = max(max(int(r.topk_ids.max()), int(r.input_ids.max())) for r in rows)
    assert vocab_problem(largest + 1, tmp_path, manifest, who="x", where="y") is None
    msg = vocab_problem(largest, tmp_path, manifest, who="--student s", where="the cache c")
    assert msg.startswith(f"--student s has a vocabulary of {largest} ids, but the cache c holds token id {largest}")
    assert f"at least {largest + 1}" in msg
