"""The config of `rlkd eval`: which students, which rows, how to generate, what to score against.

Built from ``--config eval.yaml`` plus flags by :func:`rlkd.config.build_config`; the resolved config is written to
``OUT/eval_config.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class EvalConfig:
    """Everything `rlkd eval` needs: students, dataset, generation settings, statistics and an optional cache."""

    # ---- what to evaluate ----------------------------------------------------------------------------------------
    students: list[str] = field(default_factory=list, metadata={"argument": True, "metavar": "STUDENT..."})
    """Models to evaluate, each a local HF folder or a hub id, optionally named ``NAME=PATH``. The first is the
    baseline of the paired differences. Any model can be a "student": pass the teacher to see the ceiling."""
    dataset: str = ""
    """Prompts and references: a hub dataset id (with ``split``/``subset``) or a local .jsonl/.json/.parquet/.csv
    file or folder, with the row shapes of stage 1 (messages | prompt+completion | instruction[+context]+response).
    The prompt is the conversation before the last assistant turn, the reference is that turn."""
    out: str = ""
    """Output folder: ``NAME/generations.jsonl`` per student, ``scores.json``, ``report.md``, ``eval_config.yaml``.
    Running again on the same folder resumes."""

    # ---- dataset selection (as stage 1) --------------------------------------------------------------------------
    split: str = "train"
    """Dataset split; slices work (``test[:500]``). A single local file is the ``train`` split."""
    subset: str | None = None
    """Hub dataset config name, if the dataset has several."""
    dataset_format: Literal["json", "parquet", "csv", "arrow"] | None = None
    """Force the loader for local files: json, parquet, csv or arrow. By default it comes from the file suffix."""
    limit: int | None = None
    """Evaluate only the first N source rows. May be raised on a later run over the same ``out``: the rows already
    generated are kept."""
    messages_column: str | None = None
    """Chat column (a list of {role, content}). Auto: ``messages``."""
    prompt_column: str | None = None
    """Prompt column of a prompt/completion dataset. Auto: ``prompt``."""
    completion_column: str | None = None
    """Completion column of a prompt/completion dataset (the reference). Auto: ``completion``."""
    instruction_column: str | None = None
    """Instruction column (Dolly, Alpaca). Auto: ``instruction``."""
    context_column: str | None = None
    """Context/input column appended to the instruction after a blank line. Auto: ``context``, else ``input``."""
    response_column: str | None = None
    """Response column of instruction data (the reference). Auto: ``response``, else ``output``."""
    prompt_format: Literal["auto", "chat", "plain"] = "auto"
    """How prompts are formatted, exactly as stage 1: ``chat`` (each student tokenizer's chat template), ``plain``
    (rlkd-plain-v1) or ``auto`` (chat when the tokenizer has a template)."""
    max_prompt_length: int = 512
    """Rows whose formatted prompt is longer than this many tokens are skipped (and counted). Together with
    ``max_new_tokens`` it must fit the model's context."""

    # ---- generation -----------------------------------------------------------------------------------------------
    max_new_tokens: int = 256
    """Most tokens generated per answer. An answer that reaches it without the end-of-turn token "hit the limit"."""
    temperature: float = 0.0
    """0: greedy. Above 0: sampling at this temperature (with ``top_p``)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens holding this much probability (1: off)."""
    samples: int = 1
    """Generations per prompt (needs ``temperature`` > 0 when above 1); scores average over them per row."""
    seed: int = 0
    """Sampling seed. Each row draws from its own seed derived from this and its source index, so a resumed run and
    an uninterrupted one give the same samples (vLLM; the hf engine seeds per batch, see the README)."""
    batch_size: int = 32
    """Prompts per engine call; generations are saved after each call."""
    engine: Literal["auto", "vllm", "hf"] = "auto"
    """``vllm``, ``hf`` (transformers ``generate``) or ``auto`` (vLLM when it is installed, else hf)."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Model weights' dtype: auto (the checkpoint's), bfloat16, float16 or float32 (use float32 on CPU)."""
    tensor_parallel_size: int = 1
    """vLLM: GPUs to split each model over."""
    gpu_memory_utilization: float = 0.85
    """vLLM: fraction of GPU memory it may take."""
    enforce_eager: bool = False
    """vLLM: skip compilation (starts in seconds; use it on CPU and for short runs)."""
    trust_remote_code: bool = False
    """Allow model/tokenizer code from the checkpoint. Off unless you trust the source."""

    # ---- statistics ------------------------------------------------------------------------------------------------
    compare: Literal["first", "all"] = "first"
    """Paired differences: ``first`` (every other student minus the first) or ``all`` (every pair, later minus
    earlier)."""
    bootstrap: int = 1000
    """Bootstrap resamples of the rows for the 95% intervals (0: no intervals)."""
    bootstrap_seed: int = 0
    """Seed of the bootstrap; the same resampled rows are used for every student and metric (paired)."""

    # ---- peak agreement against a teacher cache -------------------------------------------------------------------
    cache: str | None = None
    """A stage 1 cache: also report CR@k, MOR@k, top-1 agreement and sparse KL of each student against it, with the
    code of ``rlkd inspect --student`` and the trainer. Every student must share the cache's tokenizer."""
    cache_max_rows: int | None = None
    """Score at most this many cache rows (the first in file order, among those selected)."""

    # ---- output -------------------------------------------------------------------------------------------------------
    progress: bool = True
    """Show a progress bar per student."""
    json: bool = False
    """Print the result as one JSON object (schema ``rlkd.eval/1``) instead of the table."""
    markdown: bool = False
    """Print the result as Markdown tables instead of the terminal table."""

    def validate(self) -> list[str]:
        """Every problem with the settings, each naming the option and the fix (empty when fine)."""
        p: list[str] = []
        if not self.students:
            p.append("students: required (give one or more model folders: `rlkd eval STUDENT [STUDENT ...]`)")
        for name in ("dataset", "out"):
            if not str(getattr(self, name) or "").strip():
                p.append(f"{name}: required (give --{name})")
        if self.json and self.markdown:
            p.append("json and markdown both choose the output: give --json or --markdown, not both")
        if self.limit is not None and self.limit < 1:
            p.append(f"limit: must be >= 1, got {self.limit} (leave it unset to use every row)")
        if self.max_prompt_length < 1:
            p.append(f"max_prompt_length: must be >= 1, got {self.max_prompt_length}")
        if self.max_new_tokens < 1:
            p.append(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            p.append(f"temperature: must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            p.append(f"top_p: must lie in (0, 1], got {self.top_p}")
        if self.samples < 1:
            p.append(f"samples: must be >= 1, got {self.samples}")
        elif self.samples > 1 and self.temperature == 0:
            p.append(f"samples={self.samples} with temperature 0 gives {self.samples} identical greedy answers: set "
                     "--temperature above 0, or --samples 1")
        if self.top_p < 1.0 and self.temperature == 0:
            p.append(f"top_p={self.top_p} has no effect on greedy decoding: set --temperature above 0 too")
        if self.batch_size < 1:
            p.append(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.tensor_parallel_size < 1:
            p.append(f"tensor_parallel_size: must be >= 1, got {self.tensor_parallel_size}")
        if self.engine == "hf" and self.tensor_parallel_size != 1:
            p.append("tensor_parallel_size > 1 needs the vllm engine (the hf engine runs on one device)")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            p.append(f"gpu_memory_utilization: must lie in (0, 1], got {self.gpu_memory_utilization}")
        if self.bootstrap < 0:
            p.append(f"bootstrap: must be >= 0 resamples (0 turns the intervals off), got {self.bootstrap}")
        elif 0 < self.bootstrap < 100:
            p.append(f"bootstrap: {self.bootstrap} resamples cannot place 2.5% tails; use >= 100 (1000 is usual)")
        if self.cache_max_rows is not None:
            if self.cache is None:
                p.append("cache_max_rows limits the rows of --cache: give --cache too")
            elif self.cache_max_rows < 1:
                p.append(f"cache_max_rows: must be >= 1, got {self.cache_max_rows}")
        return p

    def data_config(self):
        """This config's dataset options as stage 1's config, so the same loading, column detection and dataset
        identity code serves both (``teacher`` and ``out`` are placeholders nothing here reads)."""
        from rlkd.pipeline.config import CacheTeacherConfig

        return CacheTeacherConfig(
            teacher="(rlkd eval)", dataset=self.dataset, out=self.out, split=self.split, subset=self.subset,
            dataset_format=self.dataset_format, limit=self.limit, messages_column=self.messages_column,
            prompt_column=self.prompt_column, completion_column=self.completion_column,
            instruction_column=self.instruction_column, context_column=self.context_column,
            response_column=self.response_column, prompt_format=self.prompt_format, loss_on="response",
            max_length=self.max_prompt_length + self.max_new_tokens,
        )
