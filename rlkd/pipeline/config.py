"""Stage 1's config: what `rlkd cache-teacher` reads, from a YAML file with flags on top (see :mod:`rlkd.config`).

The resolved config is written into the cache manifest, so every cache says how it was made.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from rlkd.cache.schema import CODECS, MAX_K
from rlkd.cache.storage import url_problem

DEFAULT_MAX_LENGTH = 1024
"""``max_length`` when it is not given (lowered to what the teacher takes)."""

_SHARD_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(shard: str | None) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)``; ``None`` -> ``(0, 1)``. Raises ``ValueError`` with the fix when malformed."""
    if shard is None:
        return 0, 1
    m = _SHARD_RE.match(str(shard))
    if not m:
        raise ValueError(f"shard: expected I/N such as 0/4 (this machine's part I of N), got {shard!r}")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard: need 0 <= I < N, got I={i}, N={n} (parts are numbered 0..N-1, e.g. 0/{max(n, 2)})")
    return i, n


@dataclass
class CacheTeacherConfig:
    """Everything `rlkd cache-teacher` needs: teacher, dataset, formatting, top-k, engine and output."""

    # ---- what to run -------------------------------------------------------------------------------------------
    teacher: str
    """Teacher model: a local HF folder or a hub id. Its tokenizer formats the data."""
    dataset: str
    """Source data: a hub dataset id (with ``split``/``subset``), or a local .jsonl/.json/.parquet/.csv file, a folder
    of such files, or a folder written by ``datasets.save_to_disk``."""
    out: str
    """Cache to write (or resume): a local folder (created if missing) or a URL, ``s3://bucket/prefix``,
    ``gs://bucket/prefix``, ``file:///path`` (credentials and endpoint from the environment: AWS_ACCESS_KEY_ID,
    AWS_ENDPOINT_URL, ...). On a store each shard is built in $TMPDIR, uploaded whole and read back."""

    # ---- dataset selection -------------------------------------------------------------------------------------
    split: str = "train"
    """Dataset split. Slices work too (``train[:1000]``). A single local file is the ``train`` split."""
    subset: str | None = None
    """Hub dataset config name (the second argument of ``datasets.load_dataset``), if the dataset has several."""
    dataset_format: Literal["json", "parquet", "csv", "arrow"] | None = None
    """Force the loader for local files: json, parquet, csv or arrow. By default it comes from the file suffix."""
    limit: int | None = None
    """Use only the first N rows of the source. Applied *before* ``shard``, so the parts of ``--shard I/N`` runs with
    the same limit together cover exactly the rows of the unsharded run. Not part of the dataset identity: a later
    run may raise it on the same ``out`` and resume."""
    shard: str | None = None
    """``I/N``: this run caches the source rows whose index i has ``i % N == I``. N machines each take one part;
    ``rlkd cache-merge`` joins them."""

    # ---- column mapping (defaults are auto-detected; see rlkd.pipeline.formatting) -----------------------------
    messages_column: str | None = None
    """Column holding a chat: a list of {role, content} dicts. Auto: ``messages``."""
    prompt_column: str | None = None
    """Prompt column of a prompt/completion dataset. Auto: ``prompt``."""
    completion_column: str | None = None
    """Completion column of a prompt/completion dataset. Auto: ``completion``."""
    instruction_column: str | None = None
    """Instruction column (Dolly, Alpaca). Auto: ``instruction``."""
    context_column: str | None = None
    """Optional context/input column appended to the instruction after a blank line. Auto: ``context``, else
    ``input``."""
    response_column: str | None = None
    """Response column for instruction data. Auto: ``response``, else ``output``."""
    text_column: str | None = None
    """Plain text column for language modelling (loss on every token). Auto: ``text``."""

    # ---- formatting ------------------------------------------------------------------------------------------
    prompt_format: Literal["auto", "chat", "plain"] = "auto"
    """``chat``: the teacher tokenizer's chat template. ``plain``: rlkd's own plain format (see
    ``rlkd.pipeline.formatting.PLAIN_FORMAT``). ``auto``: chat when the tokenizer has a template, else plain."""
    loss_on: Literal["response", "all"] = "response"
    """``response``: train on the assistant/response tokens only (and their end-of-turn token). ``all``: every
    token. ``text`` datasets are always trained on every token."""
    max_length: int | None = None
    """Longest sequence in tokens, prompt and response together. Unset: ``DEFAULT_MAX_LENGTH`` (1024), lowered (with a
    note) to the most the teacher takes: the position limit in its config.json, less the one token vLLM generates.
    A value above that limit is refused before any work."""
    overlong: Literal["truncate", "skip"] = "truncate"
    """Rows longer than ``max_length``: ``truncate`` keeps the prompt and cuts the response; ``skip`` drops them.
    A row whose prompt alone fills ``max_length`` is always skipped. Both are counted in the summary."""

    # ---- what to cache -----------------------------------------------------------------------------------------
    top_k: int = 20
    """Teacher log-probs kept per position (the most likely ``top_k`` tokens)."""
    min_prob: float | None = None
    """Adaptive k: keep only entries with probability >= this (but at least ``min_k``). ``None``: always ``top_k``."""
    min_k: int = 1
    """With ``min_prob``: entries always kept per position."""
    codec: Literal[CODECS] = "q8"
    """Log-prob codec of the cache: q8 (default, compact), fp16, or fp32 (lossless)."""
    shard_max_mb: int = 64
    """Rotate to a new Parquet shard after about this many MiB."""
    row_group_rows: int = 256
    """Rows per Parquet row group: the unit stage 2 reads and shuffles, and the granularity of shard rotation."""
    lease_seconds: float = 60.0
    """With a URL ``out``: the writer's lease on the prefix, renewed every quarter of it while the run lives. A second
    run is refused while it is fresh; a killed run's lease blocks the prefix this long, then a new run takes over and
    resumes; a run that cannot reach the store this long stops writing. At least 5. See docs/design.md."""
    verify_resume: bool = True
    """On resume, check the sha256 of every finished shard before trusting it (reads the whole cache once; a damaged
    shard stops the run with the way out). ``False`` checks sizes only: faster on a large cache, but a flipped byte
    goes unnoticed until ``rlkd verify``."""

    # ---- engine --------------------------------------------------------------------------------------------------
    engine: Literal["vllm", "hf"] = "vllm"
    """``vllm`` (fast, default) or ``hf`` (transformers forward; the reference, and for machines without vLLM)."""
    dtype: str = "auto"
    """Teacher weights' dtype: auto (the checkpoint's), bfloat16, float16 or float32."""
    batch_size: int = 64
    """Sequences sent to the engine per call."""
    tensor_parallel_size: int = 1
    """vLLM: GPUs to split the teacher over."""
    gpu_memory_utilization: float = 0.85
    """vLLM: fraction of GPU memory it may take. Leave room: prompt log-probs are not in vLLM's profile."""
    max_num_batched_tokens: int | None = None
    """vLLM: cap on tokens per engine step; lower it when prompt log-probs run out of memory."""
    enforce_eager: bool = False
    """vLLM: skip torch.compile and CUDA graphs. Starts in seconds instead of minutes, runs somewhat slower: worth it
    for short runs and on CPU, where vLLM's compile cache may not reload."""
    trust_remote_code: bool = False
    """Allow model/tokenizer code from the checkpoint. Off unless you trust the source."""
    seed: int = 0
    """Engine seed (the cache is deterministic anyway: no sampling happens)."""

    # ---- running it ----------------------------------------------------------------------------------------------
    ray: bool = False
    """Run on a Ray cluster: ``replicas`` engines, each writing ``OUT/part-I``; one manifest at the end. Needs
    ``pip install 'rlkd[ray]'``."""
    ray_address: str | None = None
    """With ``ray``: the cluster to join (``auto`` = the running one). Default: start a local one."""
    replicas: int = 1
    """With ``ray``: engine replicas, each on ``tensor_parallel_size`` GPUs."""
    progress: bool = True
    """Show the progress bar."""
    verbose: bool = False
    """Show vLLM's, torch's and datasets' own output on the terminal. Default: it goes to ``OUT/cache-teacher.log``,
    and the terminal shows rlkd's progress, notes and errors."""

    def validate(self) -> list[str]:
        """Every problem with the settings, each naming the option and the fix (empty when fine)."""
        p: list[str] = []
        for name in ("teacher", "dataset", "out"):
            if not str(getattr(self, name) or "").strip():
                p.append(f"{name}: required (give --{name})")
        out_problem = url_problem(self.out or "")
        if out_problem:
            p.append(f"out: {out_problem}")
        elif str(self.out or "").startswith("hf://"):
            p.append(f"out: {self.out}: hf:// caches are read-only in rlkd; write to a local folder or s3:// and "
                     "upload it with `huggingface-cli upload`")
        if not self.lease_seconds >= 5:
            p.append(f"lease_seconds: must be >= 5 (the store's clock counts whole seconds), got {self.lease_seconds}")

        if self.dtype not in ("auto", "bfloat16", "float16", "float32", "bf16", "fp16", "fp32", "half", "float"):
            p.append(f"dtype: {self.dtype!r} is not one of auto, bfloat16, float16, float32")
        if not 1 <= self.top_k <= MAX_K:
            p.append(f"top_k: must lie in 1..{MAX_K}, got {self.top_k}")
        if self.min_prob is not None and not 0.0 < self.min_prob < 1.0:
            p.append(f"min_prob: must lie in (0, 1), got {self.min_prob}")
        top_k_ok = 1 <= self.top_k <= MAX_K
        if top_k_ok and not 1 <= self.min_k <= self.top_k:  # against an invalid top_k this would only add noise
            p.append(f"min_k: must lie in 1..top_k={self.top_k}, got {self.min_k}")
        elif not top_k_ok and self.min_k < 1:
            p.append(f"min_k: must be >= 1, got {self.min_k}")
        if self.min_prob is None and self.min_k != 1:
            p.append(f"min_k={self.min_k} has no effect without min_prob: set --min-prob too, or drop --min-k")
        if self.max_length is not None and self.max_length < 2:
            p.append(f"max_length: must be >= 2 tokens (one prompt token and one target), got {self.max_length}")
        if self.limit is not None and self.limit < 1:
            p.append(f"limit: must be >= 1, got {self.limit} (leave it unset to use every row)")
        try:
            parse_shard(self.shard)
        except ValueError as e:
            p.append(str(e))
        if self.batch_size < 1:
            p.append(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.tensor_parallel_size < 1:
            p.append(f"tensor_parallel_size: must be >= 1, got {self.tensor_parallel_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            p.append(f"gpu_memory_utilization: must lie in (0, 1], got {self.gpu_memory_utilization}")
        # max_num_batched_tokens may be below max_length: vLLM then prefills long rows in chunks, which is the point
        # of the cap (prompt log-probs of a whole step are held at once).
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            p.append(f"max_num_batched_tokens: must be >= 1, got {self.max_num_batched_tokens}")
        if self.row_group_rows < 1:
            p.append(f"row_group_rows: must be >= 1, got {self.row_group_rows}")
        if self.shard_max_mb < 1:
            p.append(f"shard_max_mb: must be >= 1, got {self.shard_max_mb}")
        if self.engine == "hf" and self.tensor_parallel_size != 1:
            p.append("tensor_parallel_size > 1 needs engine=vllm (the hf engine runs on one device)")
        if self.replicas < 1:
            p.append(f"replicas: must be >= 1, got {self.replicas}")
        if not self.ray and (self.ray_address is not None or self.replicas != 1):
            p.append("ray_address and replicas need ray (give --ray)")
        return p

    @property
    def shard_index(self) -> tuple[int, int]:
        """``(I, N)`` from ``shard`` (``(0, 1)`` when unsharded)."""
        return parse_shard(self.shard)
