"""Teacher engines: token ids in, per-position top-k log-probabilities out, then the cache row.

Two engines with one interface, ``engine.score(list of (T,) id arrays) -> list[Scored]``:

- :class:`VLLMEngine` (the default) runs vLLM's ``prompt_logprobs`` path and reads the flat output with numpy;
- :class:`HFEngine` is a batched transformers forward, for machines without vLLM and as the reference.

Both follow the alignment of :mod:`rlkd.cache.schema`: a sequence of ``T`` tokens has ``P = T - 1`` scored positions,
position ``t`` being the distribution over ``input_ids[t+1]``. The last token's own next-token distribution is *not*
computed: nothing in the row would be its target. ``prompt_logprobs`` gives exactly positions ``0..T-2`` (its entry
``t+1`` is our position ``t``; entry 0 is empty), so no token is appended. A chat row ends with the template's
end-of-turn token, so predicting that token (the model learning to stop) is scored.

Conventions both engines share, so that they give identical rows for identical weights:

- log-probabilities are ``log_softmax`` in float32 over the full vocabulary of the model-dtype logits, temperature 1
  (vLLM: ``logprobs_mode="raw_logprobs"``);
- top-k is in descending log-prob order (``torch.topk``; the order of exactly tied values is unspecified);
- ``target_rank`` counts the vocabulary entries whose log-prob is ``>=`` the target's (vLLM's rank field:
  ``(logprobs >= target).sum()``). Without ties that is "strictly greater, plus 1"; a target tied with other tokens
  gets the *last* rank of its tie group;
- ``tail_logmass = log1p(-sum(exp(topk)))`` in float64 from the float32 values before any quantisation, ``-inf`` once
  the sum reaches 1: computed once, by :func:`build_row`, from the entries the row keeps.

:func:`build_row` turns one engine output into the cache row (adaptive k, the tail); :func:`write_rows` writes a
batch of them. Every stage-1 runner goes through these two, so every path writes identical rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np

from rlkd.cache.codec import adaptive_counts
from rlkd.cache.schema import TeacherRow, make_row_id
from rlkd.errors import UserError


@dataclass
class Scored:
    """The teacher's view of one sequence of ``T`` tokens: ``P = T - 1`` scored positions, full-precision values."""

    topk_ids: np.ndarray
    """(P, k) int32: top-k token ids per position, best first."""
    topk_logprobs: np.ndarray
    """(P, k) float32: their log-probabilities (exact engine output, non-increasing along k)."""
    target_logprob: np.ndarray
    """(P,) float32: log-probability of the actual next token ``input_ids[t+1]``."""
    target_rank: np.ndarray
    """(P,) int32: its 1-based rank over the full vocabulary (ties ranked last, see the module docstring)."""

    @property
    def num_positions(self) -> int:
        return int(self.topk_ids.shape[0])


class Engine(Protocol):
    """What the stage-1 runner needs from an engine."""

    k: int
    name: str

    def score(self, sequences: Sequence[np.ndarray]) -> list[Scored]:
        """Score each (T,) id array (T >= 2); results are in input order."""
        ...


def tail_logmass(topk_logprobs: np.ndarray) -> np.ndarray:
    """``log(1 - sum(exp(lp)))`` over the last axis, in float64; -inf where the kept mass reaches 1.

    ``topk_logprobs`` (..., k) may hold -inf (padding or zero-probability entries); they add nothing to the sum.
    """
    mass = np.exp(np.asarray(topk_logprobs, dtype=np.float64)).sum(axis=-1)  # (...,)
    out = np.full(mass.shape, -np.inf, dtype=np.float64)
    left = mass < 1.0
    out[left] = np.log1p(-mass[left])
    return out


class EngineError(UserError, RuntimeError):
    """An engine cannot run as configured; the message says which option to change."""


# ---- vLLM ----------------------------------------------------------------------------------------------------------


def _import_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise EngineError(
            "the vllm engine needs vLLM: `pip install vllm` (GPU) or `pip install 'rlkd[cpu]'` (CPU build), "
            "or run with `--engine hf`"
        ) from e
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    return LLM, SamplingParams, TokensPrompt


def _first_reason(e: ValueError) -> str:
    """The message of a vLLM/pydantic validation error without pydantic's framing (type, input dump, URL)."""
    errors = getattr(e, "errors", None)
    if callable(errors):
        try:
            msg = str(errors()[0].get("msg", ""))
            if msg:
                return msg.removeprefix("Value error, ")
        except Exception:  # noqa: BLE001 - fall back to the text
            pass
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


class VLLMEngine:
    """Scores sequences with vLLM's ``prompt_logprobs`` path.

    Pass ``llm=`` to reuse an engine you already built (its ``max_logprobs`` must be ``>= k`` and its
    ``logprobs_mode`` ``"raw_logprobs"``); otherwise one is built from ``model`` with ``max_logprobs=k``.
    """

    name = "vllm"

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        *,
        k: int,
        llm: Any = None,
        dtype: str = "auto",
        revision: str | None = None,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        max_num_batched_tokens: int | None = None,
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        trust_remote_code: bool = False,
        seed: int = 0,
    ):
        LLM, SamplingParams, TokensPrompt = _import_vllm()
        self.k = int(k)
        self._TokensPrompt = TokensPrompt
        if llm is None:
            if model is None:
                raise EngineError("VLLMEngine needs a model path or an existing `llm=`")
            kwargs: dict[str, Any] = dict(
                model=str(model),
                max_logprobs=self.k,
                logprobs_mode="raw_logprobs",
                skip_tokenizer_init=True,
                dtype=dtype,
                revision=revision,
                tensor_parallel_size=tensor_parallel_size,
                gpu_memory_utilization=gpu_memory_utilization,
                enforce_eager=enforce_eager,
                trust_remote_code=trust_remote_code,
                seed=seed,
            )
            if max_num_batched_tokens is not None:
                kwargs["max_num_batched_tokens"] = max_num_batched_tokens
            if max_model_len is not None:
                kwargs["max_model_len"] = max_model_len
            try:
                llm = LLM(**kwargs)
            except ValueError as e:  # a setting vLLM refuses (pydantic's ValidationError is a ValueError)
                raise EngineError(f"vLLM refused the engine settings for {model}: {_first_reason(e)}") from e
        self.llm = llm
        mc = llm.model_config
        # Fail now, not after an hour of work: vLLM would reject every request with k > max_logprobs.
        if mc.max_logprobs != -1 and self.k > mc.max_logprobs:
            raise EngineError(
                f"top-k {self.k} exceeds the vLLM engine's max_logprobs={mc.max_logprobs}: build the LLM with "
                f"max_logprobs >= {self.k} (rlkd's own engine sets max_logprobs=k) or lower --top-k"
            )
        if mc.logprobs_mode != "raw_logprobs":
            raise EngineError(
                f"the vLLM engine was built with logprobs_mode={mc.logprobs_mode!r}; the cache needs the model's own "
                "distribution: build it with logprobs_mode='raw_logprobs'"
            )
        self.vocab_size = int(mc.get_vocab_size())
        if self.k > self.vocab_size:
            raise EngineError(f"top-k {self.k} exceeds the teacher's vocabulary ({self.vocab_size}); lower --top-k")
        self.max_model_len = int(mc.max_model_len)
        self.dtype = str(mc.dtype).replace("torch.", "")
        self._params = SamplingParams(
            max_tokens=1, prompt_logprobs=self.k, detokenize=False, flat_logprobs=True, temperature=1.0
        )

    def score(self, sequences: Sequence[np.ndarray]) -> list[Scored]:
        seqs = [np.asarray(s) for s in sequences]
        for i, s in enumerate(seqs):
            if s.ndim != 1 or s.shape[0] < 2:
                raise ValueError(f"sequence {i} must be a 1-D array of at least 2 token ids, got shape {s.shape}")
            if s.shape[0] > self.max_model_len:
                raise EngineError(
                    f"sequence {i} has {s.shape[0]} tokens, more than the engine's max_model_len={self.max_model_len}; "
                    "lower --max-length or raise the engine's max_model_len"
                )
        if not seqs:
            return []
        prompts = [self._TokensPrompt(prompt_token_ids=s.tolist()) for s in seqs]
        outputs = self.llm.generate(prompts, self._params, use_tqdm=False)
        return [self._read(out.prompt_logprobs, s) for out, s in zip(outputs, seqs)]

    def _read(self, flat: Any, ids: np.ndarray) -> Scored:
        """Vectorised read of one request's ``FlatLogprobs``: (T-1) positions × (k+1) entries, actual token first."""
        k, T = self.k, int(ids.shape[0])
        P, width = T - 1, self.k + 1
        if not hasattr(flat, "start_indices"):
            raise EngineError("vLLM returned list-of-dict prompt logprobs; this engine needs flat_logprobs=True")
        n = len(flat.logprobs)
        # Position 0 has no prefix, so it is empty: every later position has exactly k+1 entries.
        if len(flat.start_indices) != T or n != P * width or flat.end_indices[0] != flat.start_indices[0]:
            raise EngineError(
                f"unexpected prompt_logprobs layout from vLLM: {len(flat.start_indices)} positions and {n} entries "
                f"for {T} tokens with k={k} (expected {T} positions, {P * width} entries)"
            )
        token_ids = np.asarray(flat.token_ids, dtype=np.int64).reshape(P, width)  # (P, k+1)
        logprobs = np.asarray(flat.logprobs, dtype=np.float32).reshape(P, width)  # (P, k+1), exact float32 values
        ranks = np.asarray(flat.ranks[0::width], dtype=np.int64)  # (P,) the actual token's rank, column 0
        if not np.array_equal(token_ids[:, 0], ids[1:]):
            raise EngineError("vLLM's prompt_logprobs targets do not match input_ids[1:]; alignment is broken")
        topk_lp = np.ascontiguousarray(logprobs[:, 1:])  # (P, k)
        return Scored(
            topk_ids=np.ascontiguousarray(token_ids[:, 1:], dtype=np.int32),
            topk_logprobs=topk_lp,
            target_logprob=np.ascontiguousarray(logprobs[:, 0]),
            target_rank=ranks.astype(np.int32),
        )


# ---- transformers --------------------------------------------------------------------------------------------------


class HFEngine:
    """A batched transformers forward: right padding with an attention mask, then the LM head in position chunks.

    The transformer body runs once per batch; the LM head, ``log_softmax`` (float32), top-k and ranks run over at
    most ``chunk_positions`` positions at a time, so the float32 logits never exceed ``chunk_positions × V``.
    """

    name = "hf"

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        *,
        k: int,
        hf_model: Any = None,
        dtype: str = "auto",
        revision: str | None = None,
        device: str | None = None,
        max_batch_tokens: int = 8192,
        chunk_positions: int = 1024,
        trust_remote_code: bool = False,
    ):
        import torch

        self.k = int(k)
        self.max_batch_tokens = int(max_batch_tokens)
        self.chunk_positions = int(chunk_positions)
        if hf_model is None:
            if model is None:
                raise EngineError("HFEngine needs a model path or an existing `hf_model=`")
            from transformers import AutoModelForCausalLM

            torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
            hf_model = AutoModelForCausalLM.from_pretrained(
                str(model), dtype=torch_dtype, revision=revision, trust_remote_code=trust_remote_code
            )
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = hf_model.to(self.device).eval()
        self.dtype = str(next(self.model.parameters()).dtype).replace("torch.", "")
        self.body = getattr(self.model, self.model.base_model_prefix)
        self.head = self.model.get_output_embeddings()
        if self.head is None:
            raise EngineError(f"{type(self.model).__name__} has no output embeddings (LM head) to score with")
        cfg = self.model.config
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        self.logit_scale = getattr(cfg, "logit_scale", None)
        self.vocab_size = int(self.head.weight.shape[0])
        if self.k > self.vocab_size:
            raise EngineError(f"top-k {self.k} exceeds the teacher's vocabulary ({self.vocab_size}); lower --top-k")

    def _logits(self, hidden):  # (N, H) -> (N, V) in the model dtype, as the model's own forward would give
        logits = self.head(hidden)
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.softcap is not None:
            logits = (logits / self.softcap).tanh() * self.softcap
        return logits

    def score(self, sequences: Sequence[np.ndarray]) -> list[Scored]:
        seqs = [np.asarray(s) for s in sequences]
        for i, s in enumerate(seqs):
            if s.ndim != 1 or s.shape[0] < 2:
                raise ValueError(f"sequence {i} must be a 1-D array of at least 2 token ids, got shape {s.shape}")
        out: list[Scored | None] = [None] * len(seqs)
        # Longest first, so each padded batch holds similar lengths and stays under max_batch_tokens.
        order = sorted(range(len(seqs)), key=lambda i: -seqs[i].shape[0])
        batch: list[int] = []
        for i in order:
            T = seqs[i].shape[0]
            longest = seqs[batch[0]].shape[0] if batch else T
            if batch and longest * (len(batch) + 1) > self.max_batch_tokens:
                self._score_batch([seqs[j] for j in batch], batch, out)
                batch = []
            batch.append(i)
        if batch:
            self._score_batch([seqs[j] for j in batch], batch, out)
        return out  # type: ignore[return-value]

    def _score_batch(self, seqs: list[np.ndarray], where: list[int], out: list) -> None:
        import torch

        B, T = len(seqs), max(s.shape[0] for s in seqs)
        ids = torch.zeros((B, T), dtype=torch.long)  # (B, T), right-padded
        mask = torch.zeros((B, T), dtype=torch.long)  # (B, T)
        for b, s in enumerate(seqs):
            ids[b, : s.shape[0]] = torch.from_numpy(s.astype(np.int64))
            mask[b, : s.shape[0]] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        with torch.inference_mode():
            hidden = self.body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # (B, T, H)
            # Scored positions only: 0..T_b-2 of each row; their targets are ids[b, 1..T_b-1].
            scored = mask[:, 1:].bool()  # (B, T-1)
            h = hidden[:, :-1][scored]  # (N, H), row after row
            tgt = ids[:, 1:][scored]  # (N,)
            N = h.shape[0]
            topk_ids = torch.empty((N, self.k), dtype=torch.int32)
            topk_lp = torch.empty((N, self.k), dtype=torch.float32)
            tgt_lp = torch.empty((N,), dtype=torch.float32)
            tgt_rank = torch.empty((N,), dtype=torch.int32)
            for a in range(0, N, self.chunk_positions):
                z = slice(a, min(N, a + self.chunk_positions))
                lp = self._logits(h[z]).log_softmax(dim=-1, dtype=torch.float32)  # (n, V) float32
                vals, idx = torch.topk(lp, self.k, dim=-1)  # (n, k)
                t_lp = lp.gather(-1, tgt[z].unsqueeze(-1))  # (n, 1)
                # vLLM's rank: entries >= the target's log-prob (ties ranked last).
                rank = (lp >= t_lp).sum(-1)  # (n,)
                topk_ids[z] = idx.to("cpu", torch.int32)
                topk_lp[z] = vals.cpu()
                tgt_lp[z] = t_lp.squeeze(-1).cpu()
                tgt_rank[z] = rank.to("cpu", torch.int32)
                del lp  # the (n, V) float32 block is the biggest allocation here
        ids_np, lp_np = topk_ids.numpy(), topk_lp.numpy()
        t_lp_np, rank_np = tgt_lp.numpy(), tgt_rank.numpy()
        start = 0
        for s, i in zip(seqs, where):
            P = s.shape[0] - 1
            z = slice(start, start + P)
            out[i] = Scored(
                topk_ids=ids_np[z].copy(),
                topk_logprobs=lp_np[z].copy(),
                target_logprob=t_lp_np[z].copy(),
                target_rank=rank_np[z].copy(),
            )
            start += P


def build_engine(
    kind: str,
    model: str | os.PathLike,
    *,
    k: int,
    dtype: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    max_length: int | None = None,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.9,
    max_num_batched_tokens: int | None = None,
    enforce_eager: bool = False,
    hf_batch_tokens: int = 8192,
    seed: int = 0,
) -> Engine:
    """The engine ``kind`` ("vllm" or "hf") on ``model``, with ``max_logprobs = k`` for vLLM."""
    if kind == "vllm":
        return VLLMEngine(
            model, k=k, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code,
            max_model_len=max_length + 1 if max_length else None,  # + the one generated token vLLM insists on
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization, max_num_batched_tokens=max_num_batched_tokens,
            enforce_eager=enforce_eager, seed=seed,
        )
    if kind == "hf":
        return HFEngine(model, k=k, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code,
                        max_batch_tokens=hf_batch_tokens)
    raise EngineError(f"unknown engine {kind!r}: use 'vllm' or 'hf'")


def lm_head_flop_fraction(config: Any) -> float:
    """F_last / F_all for a decoder: FLOPs per token with the LM head once per sequence over with it at every token.

    Counts matmul FLOPs per token (2 × parameters touched) for attention projections, MLP and LM head, ignoring the
    attention score term (small at the lengths we cache). With the head once per sequence its per-token cost is
    negligible, so the ratio is body / (body + head).
    """
    h = int(config.hidden_size)
    layers = int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or h // heads)
    inter = int(getattr(config, "intermediate_size", 4 * h))
    vocab = int(config.vocab_size)
    attn = h * heads * head_dim + 2 * h * kv * head_dim + heads * head_dim * h  # q, k, v, o
    mlp = 3 * h * inter  # gate, up, down (gated MLP, as in Llama/Qwen/SmolLM)
    body = 2 * layers * (attn + mlp)
    head = 2 * h * vocab
    return body / (body + head)


# ---- engine output -> cache row ------------------------------------------------------------------------------


def keep_counts(topk_logprobs: np.ndarray, k: int, min_prob: float | None, min_k: int) -> np.ndarray:
    """(P, k) full-precision log-probs -> (P,) int32 entries to keep per position.

    Without ``min_prob`` every position keeps ``k``. With it, a position keeps the entries whose probability is
    ``>= min_prob`` (the top-k is sorted, so that is a prefix), but never fewer than ``min_k`` nor more than ``k``
    (the cache's own :func:`rlkd.cache.adaptive_counts`, so every tool counts the same way).
    """
    if min_prob is None:
        return np.full(topk_logprobs.shape[0], k, dtype=np.int32)
    return adaptive_counts(topk_logprobs[:, :k], min_prob, min_k)


def build_row(example, scored: Scored, k: int, min_prob: float | None = None, min_k: int = 1) -> TeacherRow:
    """The cache row for ``example`` (an :class:`rlkd.pipeline.data.Example`) from its engine output.

    ``scored`` may hold more than ``k`` entries per position (an engine run with a larger k); only the first ``k``
    are used. When entries are dropped (``k`` below the engine's, or adaptive k), the tail is recomputed exactly from
    the full-precision kept entries, so ``exp(tail) + sum(exp(kept)) == 1`` up to float rounding.
    """
    ids = np.asarray(example.input_ids, dtype=np.int32)  # (T,)
    P = ids.shape[0] - 1
    if scored.num_positions != P:
        raise ValueError(
            f"example {example.source_index}: engine scored {scored.num_positions} positions for {ids.shape[0]} "
            f"tokens (expected {P})"
        )
    if scored.topk_ids.shape[1] < k:
        raise ValueError(f"engine returned top-{scored.topk_ids.shape[1]} but the cache needs k={k}")
    lp = scored.topk_logprobs[:, :k]  # (P, k) float32, full precision
    counts = keep_counts(lp, k, min_prob, min_k)  # (P,)
    # The tail from the full-precision kept entries (before the codec rounds them): computed here only.
    lp_kept = np.where(np.arange(k)[None, :] < counts[:, None], lp, -np.inf)  # (P, k)
    tail = tail_logmass(lp_kept)  # (P,)
    keep = np.arange(k)[None, :] < counts[:, None]  # (P, k); row-major flattening = position after position
    return TeacherRow(
        row_id=make_row_id(ids, int(example.source_index)),
        source_index=int(example.source_index),
        input_ids=ids,
        loss_mask=np.asarray(example.loss_mask, dtype=bool),
        topk_count=counts,
        topk_ids=np.ascontiguousarray(scored.topk_ids[:, :k][keep], dtype=np.int32),
        topk_logprobs=np.ascontiguousarray(lp[keep], dtype=np.float32),
        tail_logmass=np.asarray(tail, dtype=np.float32),
        target_logprob=np.asarray(scored.target_logprob, dtype=np.float32),
        target_rank=np.asarray(scored.target_rank, dtype=np.int32),
    )


def write_rows(batch: list, scored: list, w, cfg, stats) -> None:
    """Build each example's row and write it to ``w`` (a CacheWriter), counting rows, tokens and positions written
    into ``stats`` (a :class:`~rlkd.pipeline.stats.RunStats`); the one row-writing path of every stage-1 runner."""
    for ex, sc in zip(batch, scored):
        row = build_row(ex, sc, cfg.top_k, cfg.min_prob, cfg.min_k)
        if w.write(row):
            stats.add(rows=1, tokens=int(row.input_ids.shape[0]), positions=row.num_positions)


__all__ = [
    "Scored", "Engine", "EngineError", "VLLMEngine", "HFEngine", "build_engine", "build_row", "keep_counts",
    "tail_logmass", "write_rows",
    "lm_head_flop_fraction",
]
