"""Stage 2 across processes: torchrun, FSDP2 or DDP, and the few collectives the loop needs.

How a distributed run works
---------------------------
* **Launch:** ``torchrun --nproc-per-node N -m rlkd.cli train-student ...``, or ``rlkd train-student --nproc N ...``,
  which re-executes itself under torchrun (:func:`relaunch_under_torchrun`). One process per GPU
  (``cuda:LOCAL_RANK``, NCCL); on CPU the processes use gloo.
* **Model:** ``fsdp`` (the default when ``WORLD_SIZE > 1``) applies FSDP2's ``fully_shard`` to each decoder block,
  then to the root :class:`~rlkd.trainer.student.StudentWithHead`, so the embeddings, final norm and LM head are
  gathered by the root's hooks around the one forward that also computes the loss. On CUDA, parameters are cast to
  bf16 for compute and gradients are reduced in fp32 (``MixedPrecisionPolicy``); the sharded master weights and
  AdamW state stay fp32. ``ddp`` replicates the model instead (fine for small students).
* **Data:** every rank reads the *same* global stream of micro-batches and keeps every N-th one (see
  :func:`rank_share`), so an optimizer step sees the same rows whatever N is: with ``global_batch`` fixed, the loss
  trajectory does not depend on the number of processes. Each rank decodes the whole stream; the reader decodes
  millions of positions per second per core, orders of magnitude more than a trainer consumes, so this costs little
  and keeps resume simple (the stream state is the same on every rank).
* **Equal work per rank:** FSDP and DDP run collectives inside forward and backward, so every rank must make the
  same number of passes. When a step's last window or the evaluation set does not divide evenly, the ranks that run
  out repeat a micro-batch with weight 0 (:func:`rank_share` says which).
* **Checkpoints:** the full model and optimizer state dicts are gathered to rank 0 (``torch.distributed.checkpoint``'s
  ``get_*_state_dict(full_state_dict=True, cpu_offload=True)``) and written in the single-process format, so a run
  resumes onto the same or a different N, including N=1. Rank 0, the writer, also computes and verifies the
  checksums; on resume rank 0 verifies and broadcasts the step it chose (:func:`broadcast_int`). This needs the
  full fp32 model and AdamW state in rank 0's CPU memory (16 bytes per parameter: 16 GB for a 1B student). Larger
  students would want sharded DCP checkpoints.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    """This process's place in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "none"
    """``none`` (one process), ``fsdp`` or ``ddp``."""

    @property
    def distributed(self) -> bool:
        return self.strategy != "none"


def launched_world_size() -> int:
    """Processes torchrun started (1 when not under torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device_name: str, strategy: str) -> tuple[DistContext, torch.device]:
    """Join the process group torchrun set up (if any) and pick this process's device.

    ``device_name`` is the config's ``auto``/``cpu``/``cuda``/``cuda:N``; under torchrun on CUDA each process takes
    ``cuda:LOCAL_RANK`` (an explicit ``cuda:N`` would put every process on one GPU, so it is refused).
    """
    world = launched_world_size()
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if world == 1 and "LOCAL_RANK" not in os.environ:  # not under torchrun (torchrun with 1 process still shards)
        return DistContext(), _single_device(device_name, use_cuda)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        if ":" in device_name:
            raise ValueError(f"--device {device_name} under torchrun: every process would use the same GPU; use "
                             "--device cuda or auto (each process takes cuda:LOCAL_RANK)")
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device_name}: CUDA is not available here; use --device cpu")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    chosen = "fsdp" if strategy == "auto" else strategy
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, chosen), device


def _single_device(device_name: str, use_cuda: bool) -> torch.device:
    if device_name == "auto":
        return torch.device("cuda" if use_cuda else "cpu")
    if use_cuda and not torch.cuda.is_available():
        raise ValueError(f"--device {device_name}: CUDA is not available here; use --device cpu or auto")
    return torch.device(device_name)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---- model wrapping ---------------------------------------------------------------------------------------------

def wrap(student: torch.nn.Module, ctx: DistContext, device: torch.device) -> torch.nn.Module:
    """Shard (FSDP2) or replicate (DDP) ``student`` (a ``StudentWithHead``) across the process group."""
    if ctx.strategy == "none":
        return student
    if ctx.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # bf16 compute with fp32 gradient reduction on GPU; on CPU bf16 matmuls are slow, so stay fp32 there.
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if device.type == "cuda" else MixedPrecisionPolicy())
    for layer in decoder_layers(student.model):
        fully_shard(layer, mp_policy=mp)
    fully_shard(student, mp_policy=mp)  # root: embeddings, final norm, LM head (tied or not)
    return student


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of an HF causal LM (``model.model.layers`` for Llama/Qwen/Mistral/SmolLM...)."""
    base = model.get_decoder()
    for name in ("layers", "h", "blocks"):
        layers = getattr(base, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return list(layers)
    raise ValueError(f"cannot find the decoder blocks of {type(model).__name__} (looked for .layers, .h, .blocks "
                     "on its decoder) to shard with FSDP2; use --strategy ddp")


@contextlib.contextmanager
def grad_sync(model: torch.nn.Module, ctx: DistContext, enabled: bool):
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch of an accumulation window."""
    if ctx.strategy == "fsdp":
        model.set_requires_gradient_sync(enabled)
        yield
    elif ctx.strategy == "ddp" and not enabled:
        with model.no_sync():
            yield
    else:
        yield


def rank_share(n_items: int, ctx: DistContext) -> list[tuple[int, float]]:
    """This rank's items of a list of ``n_items`` shared by all ranks, as (index, weight) pairs.

    Rank r takes items r, r+N, r+2N, ...; every rank gets the same number of pairs, ``ceil(n_items / N)``, and a rank
    whose share runs out pads with ``(0, 0.0)``: a pass over item 0 whose result counts for nothing, so the
    collectives inside forward/backward still line up across ranks.
    """
    n, r = ctx.world_size, ctx.rank
    passes = -(-n_items // n)
    return [(i, 1.0) if i < n_items else (0, 0.0) for i in range(r, r + passes * n, n)]


# ---- collectives ------------------------------------------------------------------------------------------------

def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (``t`` itself when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t


def broadcast_int(value: int, device: torch.device) -> int:
    """Rank 0's ``value`` on every rank (``value`` itself when not distributed). ``device``: this rank's device
    (NCCL moves CUDA tensors only)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return int(t.item())


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def as_local_scalar(x) -> float:
    """A norm returned by ``clip_grad_norm_``: a DTensor under FSDP2, a tensor otherwise."""
    return float(x.full_tensor()) if hasattr(x, "full_tensor") else float(x)


# ---- full state dicts (checkpoints and the final model) --------------------------------------------------------

def full_model_state(model: torch.nn.Module) -> dict:
    """The whole model's state dict on CPU, on rank 0 (empty elsewhere); collective when sharded."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state keyed by parameter name, on CPU, on rank 0 (empty elsewhere); collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a state saved by :func:`full_optimizer_state` (given on every rank), resharding it to this run's N."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


# ---- launching --------------------------------------------------------------------------------------------------

def relaunch_under_torchrun(nproc: int, argv: list[str]) -> None:
    """Replace this process with ``torchrun --standalone --nproc-per-node nproc -m rlkd.cli <argv>``.

    ``argv`` is the train-student command line without ``--nproc``. ``--standalone`` runs a single-node rendezvous
    on a free port; for several nodes call torchrun yourself.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "rlkd.cli", *argv]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, cmd)


def strip_nproc(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out
