"""Build a teacher cache without stage 1: a plain transformers forward of a (tiny) teacher, written with CacheWriter.

Independent of vLLM and of ``rlkd.pipeline``, so trainer and viewer tests can make a cache in a second. Rows follow
the contract of :mod:`rlkd.cache.schema`: position ``t`` holds the teacher's distribution over ``input_ids[t+1]``.
Each row is a "prompt" and a "response" made from :func:`tests.tiny.corpus` lines; only positions whose target is a
response token are trained (``loss_mask``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def teacher_rows(teacher_dir: str | Path, n_rows: int = 32, *, k: int = 16, seed: int = 0, min_len: int = 8,
                 max_len: int = 48) -> list:
    """``n_rows`` TeacherRows scored by the model in ``teacher_dir`` (float64 log-softmax of its logits)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlkd.cache import TeacherRow, make_row_id
    from tests.tiny import corpus

    tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    lines = corpus(4 * n_rows + 8, seed=seed + 1)
    rng = np.random.default_rng(seed)
    rows = []
    i = 0
    while len(rows) < n_rows:
        prompt = tok(lines[i], add_special_tokens=False)["input_ids"]
        response = tok(" " + lines[i + 1], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        i += 2
        length = int(rng.integers(min_len, max_len + 1))
        ids = (prompt + response)[:length]
        if len(ids) < 3 or len(prompt) >= len(ids):
            continue
        input_ids = np.asarray(ids, dtype=np.int32)
        with torch.no_grad():
            logits = model(torch.as_tensor(input_ids[None], dtype=torch.long)).logits[0, :-1]  # (P, V)
        logp = torch.log_softmax(logits.double(), dim=-1)  # (P, V)
        top = torch.topk(logp, k, dim=-1)  # (P, k) sorted
        next_ids = torch.as_tensor(input_ids[1:], dtype=torch.long)  # (P,)
        target_lp = logp.gather(1, next_ids[:, None]).squeeze(1)  # (P,)
        target_rank = (logp > target_lp[:, None]).sum(dim=1) + 1  # 1-based full-vocab rank
        mass = top.values.exp().sum(dim=1).clamp(max=1.0)  # (P,)
        tail = torch.log1p(-mass)  # -inf when the top-k holds all the mass
        P = len(ids) - 1
        loss_mask = np.arange(P) + 1 >= len(prompt)  # target input_ids[t+1] is a response token
        source_index = len(rows)
        rows.append(TeacherRow(
            row_id=make_row_id(input_ids, source_index),
            source_index=source_index,
            input_ids=input_ids,
            loss_mask=loss_mask,
            topk_count=np.full(P, k, dtype=np.int32),
            topk_ids=top.indices.numpy().astype(np.int32).reshape(-1),
            topk_logprobs=top.values.float().numpy().reshape(-1),
            tail_logmass=tail.float().numpy(),
            target_logprob=target_lp.float().numpy(),
            target_rank=target_rank.numpy().astype(np.int32),
        ))
    return rows


def write_cache_from_model(teacher_dir: str | Path, out_dir: str | Path, n_rows: int = 32, *, k: int = 16,
                           codec: str = "fp32", seed: int = 0, row_group_rows: int = 8, **row_kwargs) -> Path:
    """Score ``n_rows`` rows with the teacher and write them to a cache at ``out_dir``; returns ``out_dir``."""
    from transformers import AutoTokenizer

    from rlkd.cache import CacheWriter, tokenizer_identity

    tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    meta = {
        "teacher": {"name_or_path": str(teacher_dir), "vocab_size": len(tok)},
        "tokenizer": tokenizer_identity(tok),
        "dataset": {"name": "tests.tiny.corpus", "seed": seed, "rows": n_rows},
        "config": {"source": "tests/cache_from_model.py"},
        "logprobs_mode": "raw_logprobs",
        "temperature": 1.0,
        "engine": "transformers",
    }
    with CacheWriter(out_dir, meta, k=k, codec=codec, row_group_rows=row_group_rows) as w:
        for row in teacher_rows(teacher_dir, n_rows, k=k, seed=seed, **row_kwargs):
            w.write(row)
    return Path(out_dir)
