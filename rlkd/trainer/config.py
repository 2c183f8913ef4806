"""Stage 2 configuration: one typed dataclass per concern, built from ``--config train.yaml`` plus flags.

The YAML file may be flat (``lr: 1e-4``) or grouped by concern (``optim: {lr: 1e-4}``); flags always win. Every
field name is unique across the sections, so a flat key routes to exactly one of them. All problems (unknown keys,
wrong types, out-of-range values, contradictory settings) are collected and reported together in one
:class:`~rlkd.config.ConfigError` naming the options at fault.

The resolved config is written beside the outputs (``OUT/train_config.yaml``) in the grouped form, so it can be
passed back with ``--config``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from rlkd.config import ConfigError, build_config, config_to_dict


@dataclass
class RunConfig:
    """What to train, where to write it, and how to resume."""

    student: str
    """The student: a local Hugging Face folder or a hub name, loaded with ``AutoModelForCausalLM``. Its tokenizer
    must be the one the cache was written with."""
    out: str
    """Output folder: checkpoints, ``final/``, ``metrics.jsonl`` and the resolved config go here. A folder that
    already holds a run (checkpoints, ``final/``, logged metrics, tensorboard events) is refused unless ``resume``
    continues that run."""
    seed: int = 0
    """Seeds torch, numpy and python RNGs and the cache reader's shuffle."""
    resume: str | None = None
    """``auto`` continues from the newest ``OUT/checkpoint-*`` whose sha256 sums verify (falling back past damaged
    ones, and starting from scratch when OUT holds no run); a path continues from that checkpoint, which must verify;
    unset starts from scratch. Resuming onto another student or cache is refused."""
    save_every: int = 500
    """Save ``OUT/checkpoint-{step}/`` every this many optimizer steps (0: only the final model)."""
    keep_last: int = 3
    """Keep only the newest this many checkpoints (0: keep all); older ones are deleted only after a newer one has
    been written and verified."""
    device: str = "auto"
    """``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    gradient_checkpointing: bool = False
    """Recompute the student's layer activations in backward: less memory, roughly a third more compute."""
    nproc: int | None = None
    """Processes (GPUs) on this node: the command re-runs itself under ``torchrun --nproc-per-node N``. Unset: one
    process, or whatever ``torchrun`` started."""
    strategy: Literal["auto", "fsdp", "ddp"] = "auto"
    """How several processes (``torchrun`` or ``--nproc``) share the student: ``fsdp`` shards parameters, gradients
    and optimizer state with FSDP2 (bf16 compute, fp32 reduction on GPU); ``ddp`` replicates the model (fine for small
    students); ``auto`` is ``fsdp``. Ignored in a single process."""
    report_to: Literal["none", "tensorboard"] = "none"
    """Extra metrics sink besides ``OUT/metrics.jsonl``; ``tensorboard`` needs the ``tensorboard`` package."""
    log_every: int = 1
    """Write a ``metrics.jsonl`` line every this many steps."""
    progress: bool = True
    """Show a tqdm bar (rank 0 only) with loss, tokens/s and ETA."""

    def validate(self) -> list[str]:
        problems = []
        if self.save_every < 0:
            problems.append(f"save_every must be >= 0, got {self.save_every}")
        if self.keep_last < 0:
            problems.append(f"keep_last must be >= 0, got {self.keep_last}")
        if self.log_every < 1:
            problems.append(f"log_every must be >= 1, got {self.log_every}")
        if self.nproc is not None and self.nproc < 1:
            problems.append(f"nproc must be >= 1, got {self.nproc}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            problems.append(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        return problems


@dataclass
class DataConfig:
    """Where the teacher targets come from and how they are batched."""

    cache: str
    """The stage 1 cache (with ``manifest.json``): a folder, or a URL such as ``s3://bucket/prefix`` (also
    ``gs://``, ``file://``, read-only ``hf://datasets/...``); credentials come from the environment."""
    batch_size: int = 8
    """Rows per micro-batch (per rank)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step and process. The global batch is ``batch_size * grad_accum * N`` rows for N
    processes; prefer ``global_batch``, which keeps the global batch fixed whatever N is."""
    global_batch: int | None = None
    """Rows per optimizer step over all processes. When set, ``grad_accum`` is derived as
    ``global_batch / (batch_size * N)``, which must be a whole number; the same global batch then gives the same
    training for any N."""
    eval_cache: str | None = None
    """A separate cache (folder or URL) to evaluate on. Mutually exclusive with ``eval_fraction``."""
    eval_fraction: float = 0.0
    """Hold out this fraction of the training cache for evaluation, chosen by a hash of each row's ``row_id`` (so the
    same rows are held out in every run and on every rank) and never trained on. 0 disables it."""
    eval_max_rows: int = 512
    """Evaluate on at most this many rows (the first ones in file order), kept in memory between evaluations."""
    group_by_length: bool = False
    """Sort rows of ``length_group`` consecutive micro-batches by length before batching them: less padding."""
    length_group: int = 16
    """Micro-batches pooled together when ``group_by_length`` is on."""
    shuffle_buffer: int = 1024
    """The cache reader's shuffle buffer, in rows."""
    allow_incomplete: bool = False
    """Train on a cache whose manifest says ``complete: false`` (stage 1 stopped early, or is still running): only
    the shards finished so far are read. Off: such a cache is refused, so a half-written cache is not trained on by
    mistake."""
    prefetch: int = 4
    """Row groups the cache reader fetches and decodes ahead of training, in parallel (0: read in the training
    loop). From object storage this hides request latency; with ``local_cache``, up to this many shards download
    at once."""
    local_cache: str | None = None
    """A local folder for whole-shard copies of a remote cache, so that later epochs read from disk, not the network
    (checked against the manifest's sha256 on download; shareable by the ranks of one node). Ignored for a local
    cache."""
    local_cache_gb: float = 100.0
    """Size budget of ``local_cache`` in GB (10^9 bytes); the least recently used shards are deleted beyond it."""

    def validate(self) -> list[str]:
        problems = []
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.grad_accum < 1:
            problems.append(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.global_batch is not None:
            if self.global_batch < 1:
                problems.append(f"global_batch must be >= 1, got {self.global_batch}")
            elif self.grad_accum != 1:
                problems.append(f"global_batch ({self.global_batch}) and grad_accum ({self.grad_accum}) contradict "
                                "each other: give one (grad_accum is derived from global_batch)")
            elif self.global_batch % self.batch_size:
                problems.append(f"global_batch ({self.global_batch}) must be a multiple of batch_size "
                                f"({self.batch_size})")
        if not 0.0 <= self.eval_fraction < 1.0:
            problems.append(f"eval_fraction must lie in [0, 1), got {self.eval_fraction}")
        if self.eval_cache and self.eval_fraction > 0:
            problems.append(
                f"eval_cache ({self.eval_cache}) and eval_fraction ({self.eval_fraction}) contradict each other: "
                "give --eval-cache or --eval-fraction, not both"
            )
        if self.eval_max_rows < 1:
            problems.append(f"eval_max_rows must be >= 1, got {self.eval_max_rows}")
        if self.length_group < 1:
            problems.append(f"length_group must be >= 1, got {self.length_group}")
        if self.shuffle_buffer < 1:
            problems.append(f"shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        from rlkd.cache.storage import url_problem

        problems += [p for p in (url_problem(self.cache), url_problem(self.eval_cache or "")) if p]
        if self.prefetch < 0:
            problems.append(f"prefetch must be >= 0, got {self.prefetch}")
        if not self.local_cache_gb > 0:
            problems.append(f"local_cache_gb must be > 0, got {self.local_cache_gb}")
        return problems


@dataclass
class OptimConfig:
    """AdamW, the learning-rate schedule, and how long to train."""

    lr: float = 1e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay, applied to matrices only (not to norms and biases)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup: cosine or linear to ``min_lr_ratio * lr``, or constant."""
    warmup_steps: int = 0
    """Linear warmup from 0 over this many optimizer steps."""
    min_lr_ratio: float = 0.0
    """The schedule ends at this fraction of ``lr``."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 disables clipping; the norm is still logged)."""
    max_steps: int | None = None
    """Train for this many optimizer steps. Give this or ``epochs``, not both."""
    epochs: float | None = None
    """Train for this many passes over the cache (whole epochs; the schedule's length is estimated from the row
    count). Give this or ``max_steps``, not both."""
    eval_every: int = 0
    """Evaluate every this many steps, and once at the end (0: only at the end; needs an eval set)."""

    def validate(self) -> list[str]:
        problems = []
        if self.lr <= 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            problems.append(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if self.max_grad_norm < 0:
            problems.append(f"max_grad_norm must be >= 0, got {self.max_grad_norm}")
        if self.max_steps is not None and self.epochs is not None:
            problems.append(
                f"max_steps ({self.max_steps}) and epochs ({self.epochs}) contradict each other: "
                "give --max-steps or --epochs, not both"
            )
        if self.max_steps is None and self.epochs is None:
            problems.append("give how long to train: --max-steps N or --epochs E")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"max_steps must be >= 1, got {self.max_steps}")
        if self.epochs is not None and (self.epochs <= 0 or not float(self.epochs).is_integer()):
            problems.append(f"epochs must be a whole number >= 1, got {self.epochs}")
        if self.max_steps is not None and self.warmup_steps >= self.max_steps > 1:
            problems.append(
                f"warmup_steps ({self.warmup_steps}) must be smaller than max_steps ({self.max_steps})"
            )
        if self.eval_every < 0:
            problems.append(f"eval_every must be >= 0, got {self.eval_every}")
        return problems


@dataclass
class LossConfig:
    """What the student is trained on. Defaults follow RLKD (Peng & Zhang 2024): ``L = 2 * L_rank + L_kd``."""

    kd: Literal["forward_kl", "reverse_kl", "tvd", "none"] = field(default="forward_kl", metadata={"flag": "--loss"})
    """Distribution-matching term against the cached top-k: forward KL(teacher || student), reverse KL, total
    variation distance, or none (ranking and/or CE only)."""
    tail: Literal["bucket", "renormalize"] = "bucket"
    """How the mass outside the cached top-k is handled: one extra bucket per distribution (unbiased for the
    bucketed distributions), or renormalise the teacher over the top-k (DistillKit's ``zero``)."""
    kd_weight: float = 1.0
    """Weight of the kd term in the total."""
    rank_weight: float = 2.0
    """Weight of the RLKD ranking loss (1 - soft Spearman over the union of top-rank_k sets); 0 turns it off."""
    rank_k: int = 5
    """k_r: size of the teacher's and the student's top sets whose union is ranked. The paper uses 5 with KD and
    10-15 for ranking alone. Needs a cache with k >= rank_k."""
    rank_strength: float = 1.0
    """L2 regularisation strength of the soft ranks (torchsort's ``regularization_strength``; 1.0 in the paper).
    Soft ranks are shift- but not scale-invariant, so this acts on log-probability units."""
    dynamic: bool = False
    """Weight the kd term per position by |top-k_r(teacher) & top-k_r(student)| / k_r (detached)."""
    ce_weight: float = 0.0
    """Weight of cross-entropy on the real next token (0 in the paper; always computed and logged)."""
    temperature: float = 1.0
    """Distillation temperature for the kd term (see the module docstring for the tail approximation)."""
    chunk_size: int = 256
    """Positions per chunk of the LM head + loss; bounds the (chunk, vocab) logits kept at once."""

    def validate(self) -> list[str]:
        problems = []
        if self.kd_weight < 0 or self.rank_weight < 0 or self.ce_weight < 0:
            problems.append("kd_weight, rank_weight and ce_weight must be >= 0")
        if self.temperature <= 0:
            problems.append(f"temperature must be > 0, got {self.temperature}")
        if self.rank_k < 2:
            problems.append(f"rank_k must be >= 2 (a rank correlation needs two items), got {self.rank_k}")
        if self.rank_strength <= 0:
            problems.append(f"rank_strength must be > 0, got {self.rank_strength}")
        if self.chunk_size < 1:
            problems.append(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.dynamic and self.kd == "none":
            problems.append("dynamic=true weights the kd term, but kd is 'none': set a kd loss or dynamic=false")
        active = (self.kd != "none" and self.kd_weight > 0) or self.rank_weight > 0 or self.ce_weight > 0
        if not active:
            problems.append("no loss term is active: set kd (with kd_weight > 0), rank_weight > 0 or ce_weight > 0")
        return problems


@dataclass
class TrainConfig:
    """Everything ``rlkd train-student`` needs, one section per concern."""

    run: RunConfig
    """What to train, where to write, resume."""
    data: DataConfig
    """Cache, eval split, batching."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer, schedule, duration."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Loss terms and weights (see :mod:`rlkd.trainer.losses`)."""

    def validate(self) -> list[str]:
        """Problems that involve more than one section."""
        problems = []
        if self.optim.eval_every > 0 and not (self.data.eval_cache or self.data.eval_fraction > 0):
            problems.append(
                f"eval_every ({self.optim.eval_every}) needs an eval set: give --eval-cache DIR or --eval-fraction F"
            )
        return problems

    def grad_accum_for(self, world_size: int) -> int:
        """Micro-batches per optimizer step and process for ``world_size`` processes (see ``global_batch``)."""
        d = self.data
        if d.global_batch is None:
            return d.grad_accum
        per_step = d.batch_size * world_size
        if d.global_batch % per_step:
            raise ConfigError([f"global_batch ({d.global_batch}) must be a multiple of batch_size x processes "
                               f"({d.batch_size} x {world_size} = {per_step}): change --global-batch, --batch-size "
                               "or the number of processes"], "train config")
        return d.global_batch // per_step

    def to_dict(self) -> dict:
        """Grouped, JSON-safe: what is saved to ``OUT/train_config.yaml`` and inside every checkpoint."""
        return {name: config_to_dict(getattr(self, name)) for name in SECTIONS}


SECTIONS: dict[str, type] = {"run": RunConfig, "data": DataConfig, "optim": OptimConfig, "loss": LossConfig}
"""Section name -> dataclass, in the order they are saved."""


def _owner_of() -> dict[str, str]:
    """Field name -> the section that holds it. Names are unique across sections (checked by a test)."""
    owner: dict[str, str] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            owner[f.name] = section
    return owner


def build_train_config(file_values: dict | None = None, flags: dict | None = None, *,
                       source: str = "train config") -> TrainConfig:
    """Build a :class:`TrainConfig` from a YAML mapping (flat or grouped) and flag values (flat; ``None`` = unset).

    Raises :class:`ConfigError` listing every problem: unknown keys, type errors, each section's ``validate()``, and
    the cross-section checks in :meth:`TrainConfig.validate`.
    """
    owner = _owner_of()
    per_section: dict[str, list[dict]] = {s: [{}, {}] for s in SECTIONS}
    problems: list[str] = []

    def route(mapping: dict, layer: int) -> None:
        for key, value in mapping.items():
            name = str(key).replace("-", "_")
            if name in SECTIONS and isinstance(value, dict) and layer == 0:
                for sub_key, sub_value in value.items():
                    sub = str(sub_key).replace("-", "_")
                    if owner.get(sub) != name:
                        where = f" (it belongs in {owner[sub]}:)" if sub in owner else ""
                        problems.append(f"unknown option {name}.{sub_key}{where}")
                        continue
                    per_section[name][layer][sub] = sub_value
            elif name in owner:
                if value is not None:
                    per_section[owner[name]][layer][name] = value
            else:
                close = [f for f in owner if f.startswith(name[:3])]
                hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
                problems.append(f"unknown option {key!r}{hint}")

    route(file_values or {}, 0)
    route({k: v for k, v in (flags or {}).items() if v is not None}, 1)

    built: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        try:
            built[section] = build_config(cls, *per_section[section], source=section)
        except ConfigError as e:
            problems += e.problems
    if problems:
        raise ConfigError(problems, source)
    cfg = TrainConfig(**built)
    problems = cfg.validate()
    if problems:
        raise ConfigError(problems, source)
    return cfg

