"""Generation engines: prompt token ids in, generated token ids out.

Two engines with one interface, ``generator.generate(prompts, seeds, settings) -> list[list[Generation]]`` (one list
of ``settings.samples`` generations per prompt, in input order):

- :class:`VLLMGenerator` (the default when vLLM is installed) sends token-id prompts to ``vllm.LLM.generate``;
- :class:`HFGenerator` is a batched transformers ``generate`` (left padding), for machines without vLLM.

Conventions both follow, so that greedy decoding of the same weights gives the same tokens:

- only rlkd's settings decide the decoding: temperature, top-p, nothing else (no top-k, no repetition penalty);
  the model's ``generation_config.json`` contributes only its end-of-sequence ids;
- a generation stops at the first *stop id* (the tokenizer's EOS plus the ``eos_token_id`` of
  ``generation_config.json``), which is not part of the returned ids, or after ``max_new_tokens`` tokens, in which
  case it "hit the limit";
- sampling seeds: vLLM takes one seed per prompt (derived from ``--seed`` and the row's source index, so a row's
  samples do not depend on which rows share its batch); transformers' ``generate`` has one random stream per call,
  seeded from the seed of the batch's first row, so its samples depend on ``--batch-size``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from rlkd.errors import UserError


class GenerationError(UserError, RuntimeError):
    """An engine cannot run as configured; the message says which option to change."""


@dataclass(frozen=True)
class Settings:
    """How to decode (the generation part of :class:`~rlkd.eval.config.EvalConfig`)."""

    max_new_tokens: int
    temperature: float
    top_p: float
    samples: int
    stop_ids: tuple[int, ...]


@dataclass
class Generation:
    """One generated answer."""

    token_ids: list[int]
    """Generated ids, without the stop id that ended them."""
    hit_limit: bool
    """It reached ``max_new_tokens`` without a stop id."""


class Generator(Protocol):
    name: str
    max_model_len: int
    dtype: str

    def generate(self, prompts: Sequence[np.ndarray], seeds: Sequence[int], settings: Settings
                 ) -> list[list[Generation]]:
        ...


def row_seed(seed: int, source_index: int) -> int:
    """A row's own sampling seed: a hash of the run seed and the row, so neighbouring rows are not correlated."""
    digest = hashlib.sha256(f"rlkd-eval:{seed}:{source_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def stop_ids(tokenizer: Any, model: str) -> tuple[int, ...]:
    """End-of-sequence ids: the tokenizer's EOS and those of the model's ``generation_config.json`` (Llama 3 lists
    several end-of-turn ids there)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    try:
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(str(model)).eos_token_id
    except Exception:  # noqa: BLE001 - no generation_config.json is common and fine
        eos = None
    if eos is not None:
        ids.update(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    return tuple(sorted(ids))


def _finish(ids: Sequence[int], settings: Settings) -> Generation:
    """Cut at the first stop id; without one, the answer hit the limit if it has ``max_new_tokens`` tokens."""
    ids = [int(t) for t in ids]
    stops = set(settings.stop_ids)
    for j, t in enumerate(ids):
        if t in stops:
            return Generation(ids[:j], False)
    return Generation(ids, len(ids) >= settings.max_new_tokens)


# ---- vLLM ----------------------------------------------------------------------------------------------------------


class VLLMGenerator:
    """Generates with ``vllm.LLM`` from token ids (its tokenizer is never used). Pass ``llm=`` to reuse an engine."""

    name = "vllm"

    def __init__(self, model: str | os.PathLike | None = None, *, llm: Any = None, dtype: str = "auto",
                 max_model_len: int | None = None, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.85, enforce_eager: bool = False, trust_remote_code: bool = False,
                 seed: int = 0):
        # vLLM logs to stdout by default, which would corrupt `rlkd eval --json`; its log goes to stderr instead.
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        self._SamplingParams, self._TokensPrompt = SamplingParams, TokensPrompt
        if llm is None:
            if model is None:
                raise GenerationError("VLLMGenerator needs a model path or an existing `llm=`")
            kwargs: dict[str, Any] = {
                "model": str(model), "skip_tokenizer_init": True, "dtype": dtype,
                "tensor_parallel_size": tensor_parallel_size, "gpu_memory_utilization": gpu_memory_utilization,
                "enforce_eager": enforce_eager, "trust_remote_code": trust_remote_code, "seed": seed}
            if max_model_len is not None:
                kwargs["max_model_len"] = max_model_len
            try:
                llm = LLM(**kwargs)
            except Exception as e:  # noqa: BLE001 - vLLM raises many types at start-up; all mean "cannot start"
                last = (str(e).strip().splitlines() or [""])[-1]  # vLLM's messages end with the actual reason
                raise GenerationError(
                    f"vLLM could not start on {model}: {type(e).__name__}: {last} "
                    "(on the CPU build, --gpu-memory-utilization is the share of RAM vLLM reserves: lower it if "
                    "memory is short; or generate with --engine hf)") from e
        self.llm = llm
        self.max_model_len = int(llm.model_config.max_model_len)
        self.dtype = str(llm.model_config.dtype).replace("torch.", "")

    def generate(self, prompts: Sequence[np.ndarray], seeds: Sequence[int], settings: Settings
                 ) -> list[list[Generation]]:
        if not prompts:
            return []
        greedy = settings.temperature == 0
        params = [
            self._SamplingParams(
                n=settings.samples, max_tokens=settings.max_new_tokens, temperature=settings.temperature,
                top_p=1.0 if greedy else settings.top_p, top_k=0, seed=None if greedy else int(s),
                stop_token_ids=list(settings.stop_ids), detokenize=False)
            for s in seeds
        ]
        reqs = [self._TokensPrompt(prompt_token_ids=np.asarray(p).tolist()) for p in prompts]
        outs = self.llm.generate(reqs, params, use_tqdm=False)
        return [[_finish(c.token_ids, settings) for c in o.outputs] for o in outs]

    def close(self) -> None:
        """Free the engine's memory (its KV-cache reservation) before the next student's engine starts."""
        import gc

        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()  # dropping the last reference alone leaves the in-process engine core alive until exit
        del self.llm
        gc.collect()


# ---- transformers --------------------------------------------------------------------------------------------------


class HFGenerator:
    """Batched ``model.generate`` with left padding, on CUDA when available, else the CPU."""

    name = "hf"

    def __init__(self, model: str | os.PathLike | None = None, *, hf_model: Any = None, dtype: str = "auto",
                 device: str | None = None, trust_remote_code: bool = False, pad_id: int = 0):
        import torch

        if hf_model is None:
            if model is None:
                raise GenerationError("HFGenerator needs a model path or an existing `hf_model=`")
            from transformers import AutoModelForCausalLM

            torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
            try:
                hf_model = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch_dtype,
                                                                trust_remote_code=trust_remote_code)
            except Exception as e:  # noqa: BLE001 - any failure means this model cannot generate here
                raise GenerationError(f"cannot load {model} with transformers: {type(e).__name__}: {e}") from e
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = hf_model.to(self.device).eval()
        self.dtype = str(next(self.model.parameters()).dtype).replace("torch.", "")
        self.max_model_len = int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)
        self.pad_id = int(pad_id)

    def generate(self, prompts: Sequence[np.ndarray], seeds: Sequence[int], settings: Settings
                 ) -> list[list[Generation]]:
        import torch
        from transformers import GenerationConfig

        if not prompts:
            return []
        B, T = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((B, T), self.pad_id, dtype=torch.long)  # (B, T), left-padded
        mask = torch.zeros((B, T), dtype=torch.long)  # (B, T)
        for b, p in enumerate(prompts):
            ids[b, T - len(p):] = torch.as_tensor(np.asarray(p, dtype=np.int64))
            mask[b, T - len(p):] = 1
        greedy = settings.temperature == 0
        # A complete config, so that nothing of the model's generation_config.json (top_k=50, a repetition
        # penalty, ...) changes the decoding behind the user's back.
        gen = GenerationConfig(
            max_new_tokens=settings.max_new_tokens, min_new_tokens=0, do_sample=not greedy, num_beams=1,
            temperature=None if greedy else settings.temperature, top_p=None if greedy else settings.top_p,
            top_k=None if greedy else 0, repetition_penalty=1.0, num_return_sequences=settings.samples,
            eos_token_id=list(settings.stop_ids) or None, pad_token_id=self.pad_id)
        if not greedy:
            torch.manual_seed(int(seeds[0]))
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      generation_config=gen)  # (B * samples, T + new)
        new = out[:, T:].cpu().numpy()
        n = settings.samples
        return [[_finish(new[b * n + j], settings) for j in range(n)] for b in range(B)]

    def close(self) -> None:
        del self.model


def vllm_available() -> bool:
    """Whether vLLM is installed (without importing it: that takes seconds)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def build_generator(engine: str, model: str, *, dtype: str, max_model_len: int, pad_id: int,
                    tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.85, enforce_eager: bool = False,
                    trust_remote_code: bool = False, seed: int = 0) -> Generator:
    """The generator ``engine`` ("vllm" or "hf"; "auto" is resolved by the caller) on ``model``."""
    if engine == "vllm":
        if not vllm_available():
            raise GenerationError("--engine vllm needs vLLM: `pip install vllm` (GPU) or `pip install 'rlkd[cpu]'` "
                                  "(CPU build), or run with --engine hf")
        return VLLMGenerator(model, dtype=dtype, max_model_len=max_model_len,
                             tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                             enforce_eager=enforce_eager, trust_remote_code=trust_remote_code, seed=seed)
    if engine == "hf":
        return HFGenerator(model, dtype=dtype, trust_remote_code=trust_remote_code, pad_id=pad_id)
    raise GenerationError(f"unknown engine {engine!r}: use 'vllm' or 'hf'")
