"""Stage 2 benchmark: what training from the cache costs, side by side in one run, same student and batches.

Measures (CPU by default; ``--device cuda`` for bf16 on a GPU):

1. **Step time** of one optimizer step on the same batches, for the variants
   - ``kd_rank``: the trainer's own step (:func:`rlkd.trainer.loop.train_step`) with the default loss
     (sparse forward KL + 2 x RLKD rank loss) from cached targets;
   - ``kd_only``: the same with ``rank_weight=0`` (gives the ranking loss's overhead);
   - ``ce_chunked``: the same step with only cross-entropy (the chunked loss, no teacher terms);
   - ``ce_hf``: plain transformers fine-tuning, ``model(input_ids, labels=...)`` (full logits);
   - ``online_kd``: the teacher held in memory and run on every batch (no grad), its top-k taken on the fly, then
     the same student step: what the cache saves.
   Goals: kd_rank <= 1.05 x ce; kd_rank <= 0.55 x online_kd; rank overhead (kd_rank / kd_only - 1) <= 3%.

   How a goal is decided. Each of ``--steps`` rounds runs every variant once on the same batch, in an order rotated
   every round (no variant always runs first or right after another), then times the loss head alone (the LM head
   and the loss, forward and backward, on that batch's hidden states) of kd_rank, kd_only and ce_chunked
   ``--head-repeats`` times each. A figure comes with its 95% interval over the rounds (``bench/_common.py``), and
   a goal is met only when the whole interval is inside it.

   The clock (``--clock cpu --threads 1``, the default on CPU) is the CPU time of one thread. On a shared machine a
   step's wall time also counts the time other processes held the core, which moves single steps by many percent
   and does not cancel within a round; with two threads, CPU time counts the spin-waits of one thread waiting for
   the other, which grow with the machine's load. One thread's CPU time is the work the step does. On a GPU the
   clock is wall time after a device synchronisation.

   KD+rank / CE and the rank overhead sit within a few percent of their goals, and a ratio of whole steps cannot
   resolve that: the steps differ by a small share of their time, and each step's own noise swamps it. But kd_rank,
   kd_only and ce_chunked run the same ``train_step`` and differ only in the loss head, so per round
   ``KD+rank / CE = 1 + (head_kd_rank - head_ce) / step_ce`` and ``overhead = (head_kd_rank - head_kd) / step_kd``:
   the head's noise enters scaled down by its share of the step. These two are means over the rounds with a
   t-interval; the whole-step ratios are reported beside them (``steps.whole_step``). The other two figures are far
   from their goals and are whole-step ratios: the geometric mean of the per-round ratios, with a t-interval on
   their logs.
2. **Peak memory** of one step at ``--mem-seq-len`` (4096) positions with the teacher's 49,152-token vocabulary, each
   variant in its own subprocess: ``naive`` (the whole (T, V) logits, then the same loss), ``chunked`` (KD+rank,
   :func:`chunked_distill_loss` as the trainer calls it), ``chunked_ce`` (CE only, chunked) and a ``model_only``
   floor (the same layers, no LM head); ``--mem-modes`` adds ``chunked_eager`` (``grad_in_forward``) and
   ``naive_log_softmax`` (full logits, an explicit log_softmax, then the loss, as most KD code does).
   The figure is the peak of live tensor bytes (:class:`LiveTensorBytes` on CPU, ``max_memory_allocated`` on GPU):
   parameters + gradients + optimizer state (``--mem-optimizer``: an AdamW step, measured on the second step) +
   activations + the head's tensors. It is exact, so it needs no interval. Process peak RSS is reported beside it,
   but it adds the interpreter, the libraries and glibc's unreturned heap to every variant alike, which pulls every
   ratio towards 1.
   Goals: chunked <= 0.5 x naive and <= 1.2 x chunked CE-only, without and with gradient checkpointing of the
   student's layers (``--mem-gradient-checkpointing off|on|both``, default both; the headline is the worse).
   ``--chunk-size`` sets the positions per chunk: the head's tensors grow with chunk_size x V.
3. **Reader rate**: positions/s the CacheReader decodes and :func:`rlkd.core.targets.collate` pads into batches vs
   positions/s the trainer consumes, paired per round (one pass over the cache after the round's steps). Goal >= 20x.

Inputs: the SmolLM2-135M-Instruct teacher (``rlkd convert-teacher``), a student made from it by keeping 6 of its 30
layers (``--student``, or made here with :func:`rlkd.models.make_student_from_layers`), and databricks-dolly-15k
rows (``--data train.jsonl``, or ``$RLKD_BENCH_DATA/train.jsonl``), scored here with a plain transformers forward of
the teacher into a q8 cache (k=20) so the benchmark does not need vLLM. ``--smoke``: the tests' tiny teacher and the
packaged Dolly sample, a few rounds of tiny steps, the memory variants in this process; seconds, figures meaningless.

Run: ``OMP_NUM_THREADS=2 python bench/stage2.py --data train.jsonl [--only steps|memory] [--mem-modes ...]``
(writes ``--json``, default ``--out``/stage2-ONLY.json).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import (data_file, default_teacher, format_interval, mean_interval, ratio_interval,  # noqa: E402
                     smoke_teacher)
from rlkd.cache import (CacheReader, CacheWriter, TeacherRow, make_row_id, read_manifest,  # noqa: E402
                        tokenizer_identity)
from rlkd.trainer import loop  # noqa: E402
from rlkd.trainer.chunked import chunked_distill_loss  # noqa: E402
from rlkd.trainer.config import build_train_config  # noqa: E402
from rlkd.core.targets import ModelBatch, TeacherTargets, collate  # noqa: E402
from rlkd.trainer.config import LossConfig  # noqa: E402
from rlkd.trainer.losses import DistillLoss  # noqa: E402

STUDENT_LAYERS = "0,6,12,18,24,29"
"""6 of the teacher's 30 layers, spread over its depth."""
SMOKE_STUDENT_LAYERS = "0"
"""--smoke: one of the tiny teacher's two layers."""


# ---- inputs -----------------------------------------------------------------------------------------------------

def get_student(teacher: Path, student: Path | None, work: Path, layers: str = STUDENT_LAYERS) -> Path:
    if student is not None:
        return student
    path = work / f"student-{layers.replace(',', '-')}"
    if (path / "config.json").is_file():
        return path
    from rlkd.models import make_student_from_layers

    return make_student_from_layers(teacher, layers, path, overwrite=True)


def dolly_sequences(tokenizer, data: Path, n_rows: int, seq_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input_ids (T,), loss_mask (T-1,)) per row: chat-formatted, trained on the assistant's reply only."""
    out = []
    with open(data) as f:
        for line in f:
            ex = json.loads(line)
            user = ex["instruction"] + (f"\n\n{ex['context']}" if ex.get("context") else "")
            msgs = [{"role": "user", "content": user}]
            prompt_text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            full_text = tokenizer.apply_chat_template(
                msgs + [{"role": "assistant", "content": ex["response"]}], tokenize=False)
            prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
            full = tokenizer(full_text, add_special_tokens=False)["input_ids"][:seq_len]
            if len(full) - len(prompt) < 8:
                continue
            loss_mask = np.arange(len(full) - 1) + 1 >= len(prompt)
            out.append((np.asarray(full, dtype=np.int32), loss_mask))
            if len(out) == n_rows:
                break
    return out


def teacher_targets_from_logits(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """Top-k ids/log-probs and tail log-mass of (P, V) logits, as stage 1 caches them."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (P, V)
    top = torch.topk(logp, k, dim=-1)  # (P, k)
    tail = torch.log1p(-top.values.exp().sum(-1).clamp(max=1.0))  # (P,)
    return top.indices, top.values, tail, logp


def build_cache(teacher_dir: Path, data: Path, out: Path, n_rows: int, seq_len: int, k: int) -> Path:
    if (out / "manifest.json").is_file() and read_manifest(out).get("rows"):
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    meta = {"teacher": {"name_or_path": str(teacher_dir), "vocab_size": teacher.config.vocab_size},
            "tokenizer": tokenizer_identity(tok), "dataset": {"path": str(data), "rows": n_rows},
            "config": {"seq_len": seq_len, "source": "bench/stage2.py"}, "logprobs_mode": "raw_logprobs",
            "temperature": 1.0, "engine": "transformers"}
    with CacheWriter(out, meta, k=k, codec="q8", row_group_rows=16) as w, torch.no_grad():
        for i, (ids, loss_mask) in enumerate(dolly_sequences(tok, data, n_rows, seq_len)):
            logits = teacher(torch.as_tensor(ids[None], dtype=torch.long)).logits[0, :-1]  # (P, V)
            top_ids, top_lp, tail, logp = teacher_targets_from_logits(logits, k)
            nxt = torch.as_tensor(ids[1:], dtype=torch.long)
            target_lp = logp.gather(1, nxt[:, None]).squeeze(1)
            P = len(ids) - 1
            w.write(TeacherRow(
                row_id=make_row_id(ids, i), source_index=i, input_ids=ids, loss_mask=loss_mask,
                topk_count=np.full(P, k, np.int32), topk_ids=top_ids.numpy().astype(np.int32).ravel(),
                topk_logprobs=top_lp.numpy().ravel(), tail_logmass=tail.numpy(),
                target_logprob=target_lp.numpy(), target_rank=((logp > target_lp[:, None]).sum(1) + 1).numpy(),
            ))
    return out


# ---- step time --------------------------------------------------------------------------------------------------

def make_run(model, loss_cfg: LossConfig, device: torch.device, lr: float = 1e-5) -> loop.Run:
    """The minimal :class:`loop.Run` that :func:`loop.train_step` needs, around a shared model."""
    cfg = build_train_config({}, dict(student="-", cache="-", out="-", max_steps=1000, lr=lr,
                                      **{f.name: getattr(loss_cfg, f.name)
                                         for f in loss_cfg.__dataclass_fields__.values()}))
    optimizer = loop.make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return loop.Run(cfg=cfg, out=Path("."), device=device, model=model, tokenizer=None,
                    loss_fn=DistillLoss(loss_cfg), optimizer=optimizer, scheduler=scheduler, stream=None,
                    total_steps=1000, eval_reader=None)


def hf_ce_step(run: loop.Run, window: list[ModelBatch]) -> None:
    """Plain fine-tuning: full logits and transformers' own shifted cross-entropy."""
    for b in window:
        mb = b.to(run.device)
        trained = mb.target_mask[:, :-1]  # (B, T - 1): position t trains token t+1
        labels = torch.full_like(mb.input_ids, -100)
        labels[:, 1:][trained] = mb.input_ids[:, 1:][trained]  # token t+1 at t+1
        with autocast(run.device):
            out = run.model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, labels=labels)
        (out.loss / len(window)).backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), 1.0)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)


def online_kd_step(run: loop.Run, teacher, window: list[ModelBatch], k: int) -> None:
    """Online KD: run the teacher on the batch, take its top-k and tail on the fly, then the same student step."""
    fresh = []
    for b in window:
        with torch.no_grad(), autocast(run.device):
            logits = teacher(input_ids=b.input_ids.to(run.device),
                             attention_mask=b.attention_mask.to(run.device)).logits  # (B, T, V)
        ids, lp, tail, _ = teacher_targets_from_logits(logits[b.target_mask.to(run.device)], k)  # (N, k), (N,)
        targets = TeacherTargets(ids.cpu(), lp.cpu(), torch.ones(len(ids), k, dtype=torch.bool), tail.cpu(),
                                 b.targets.target_ids)
        fresh.append(dataclasses.replace(b, targets=targets))
    loop.train_step(run, fresh)


def autocast(device: torch.device):
    """The trainer's precision: bf16 autocast on GPU, plain fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()  # a CPU-GPU sync point, on purpose: time the work, not the launch


RATIOS = {
    "kd_rank_over_ce_chunked": ("kd_rank", "ce_chunked", 0.0),
    "kd_rank_over_ce_hf": ("kd_rank", "ce_hf", 0.0),
    "kd_rank_over_online_kd": ("kd_rank", "online_kd", 0.0),
    "rank_overhead": ("kd_rank", "kd_only", 1.0),
}
"""Whole-step figures: name -> (numerator variant, denominator variant, offset subtracted from the ratio)."""

HEAD_VARIANTS = ("kd_rank", "kd_only", "ce_chunked")
"""The variants that run the same train_step and differ only in the loss head."""
HEAD_FIGURES = {"kd_rank_over_ce_chunked": ("kd_rank", "ce_chunked", 1.0), "rank_overhead": ("kd_rank", "kd_only", 0.0)}
"""Figures from the loss head alone: name -> (variant a, variant b, c): per round ``c + (head_a - head_b) / step_b``.
The three variants run the same ``train_step`` and differ only in the loss head's work, so that is the step ratio
(minus 1 for the overhead) with the noise of the difference scaled down by the head's share of the step."""


def head_timers(runs: dict, model, batch: ModelBatch, device: torch.device) -> dict:
    """Per variant, a function running the step's LM head + loss forward and backward alone
    (:func:`chunked_distill_loss` as ``train_step`` calls it) on the student's hidden states of ``batch``, computed
    once. Gradients go to detached copies, so the model's own gradients stay untouched."""
    mb = batch.to(device)
    head = model.get_output_embeddings()
    with torch.no_grad(), autocast(device):
        hidden = model.get_decoder()(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                                     use_cache=False).last_hidden_state[mb.target_mask]  # (N, H)
    hidden = hidden.detach().requires_grad_()
    weight = head.weight.detach().requires_grad_()  # (V, H)

    def timer(run):
        def go():
            with autocast(device):
                out = chunked_distill_loss(hidden, weight, mb.targets, run.loss_fn, chunk_size=run.cfg.loss.chunk_size,
                                           lm_head_bias=head.bias)
            out["total"].backward()
            hidden.grad = weight.grad = None
        return go

    return {name: timer(runs[name]) for name in HEAD_VARIANTS}


def reader_pass(cache: Path, batch_size: int) -> tuple[int, float]:
    """(scored positions, seconds) of one shuffled pass of the CacheReader over the whole cache, into padded
    batches as the trainer gets them."""
    positions = 0
    t0 = time.perf_counter()
    reader = CacheReader(cache, batch_size=batch_size, shuffle=True, seed=0)
    for rows in reader:  # read, decode and pad: what the trainer gets per batch
        b = collate(rows, reader.k)
        positions += b.tokens - b.input_ids.shape[0]
    return positions, time.perf_counter() - t0


def time_steps(student_dir: Path, teacher_dir: Path, cache: Path, device: torch.device, batch_size: int,
               steps: int, k: int, clock: str, head_repeats: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(student_dir), dtype=torch.float32).to(device).train()
    model.config.use_cache = False
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).to(device).eval()
    reader = CacheReader(cache, batch_size=batch_size, shuffle=True, seed=0)
    available = [collate(rows, reader.k) for rows in reader]
    batches = [available[i % len(available)] for i in range(steps + 1)]  # reuse batches of a small cache
    runs = {
        "kd_rank": make_run(model, LossConfig(), device),
        "kd_only": make_run(model, LossConfig(rank_weight=0.0), device),
        "ce_chunked": make_run(model, LossConfig(kd="none", rank_weight=0.0, ce_weight=1.0), device),
        "ce_hf": make_run(model, LossConfig(kd="none", rank_weight=0.0, ce_weight=1.0), device),
    }
    variants = {
        "kd_rank": lambda w: loop.train_step(runs["kd_rank"], w),
        "kd_only": lambda w: loop.train_step(runs["kd_only"], w),
        "ce_chunked": lambda w: loop.train_step(runs["ce_chunked"], w),
        "ce_hf": lambda w: hf_ce_step(runs["ce_hf"], w),
        "online_kd": lambda w: online_kd_step(runs["kd_rank"], teacher, w, k),
    }

    def timed(fn) -> tuple[float, float]:
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        return time.perf_counter() - t0, time.process_time() - c0

    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}  # process CPU time, all threads
    head_wall: dict[str, list[float]] = {name: [] for name in HEAD_VARIANTS}  # the round's median
    head_cpu: dict[str, list[float]] = {name: [] for name in head_wall}
    reads: list[tuple[int, float]] = []
    names = list(variants)
    for i, batch in enumerate(batches):  # batch 0 warms every variant up and is not timed
        # Rotate the order every round, so no variant always runs first (cold caches) or right after another.
        for name in names[i % len(names):] + names[: i % len(names)]:
            w, c = timed(lambda: variants[name]([batch]))
            if i > 0:
                wall[name].append(w)
                cpu[name].append(c)
        heads = head_timers(runs, model, batch, device)
        hn = list(heads)
        samples = {name: [] for name in hn}
        for r in range(head_repeats):
            for name in hn[(i + r) % len(hn):] + hn[:(i + r) % len(hn)]:
                samples[name].append(timed(heads[name]))
        if i > 0:
            for name, v in samples.items():  # the round's median of each clock
                head_wall[name].append(statistics.median(x for x, _ in v))
                head_cpu[name].append(statistics.median(x for _, x in v))
            reads.append(reader_pass(cache, batch_size))
            print(f"  round {i}/{steps}: " + ", ".join(f"{n} {wall[n][-1]:.2f}/{cpu[n][-1]:.2f}s" for n in names)
                  + "; head " + ", ".join(f"{n} {head_wall[n][-1]:.2f}/{head_cpu[n][-1]:.2f}s" for n in hn)
                  + " (wall/CPU)", file=sys.stderr, flush=True)

    def head_figures(step: dict, head: dict) -> dict:
        return {name: mean_interval([c + (x - y) / s for x, y, s in zip(head[a], head[b], step[b])])
                for name, (a, b, c) in HEAD_FIGURES.items()}

    times, head = (cpu, head_cpu) if clock == "cpu" else (wall, head_wall)
    positions = [b.tokens - b.input_ids.shape[0] for b in batches[1:]]  # per round
    trained = statistics.mean(b.positions for b in batches[1:])
    # Reader rate over trainer rate, per round: (reader positions / reader s) / (batch positions / kd_rank step s).
    # The reader is timed by wall clock in both modes: its prefetch thread's CPU time is not this round's to count.
    reader = ratio_interval([p * t for (p, _), t in zip(reads, wall["kd_rank"])],
                            [s * q for (_, s), q in zip(reads, positions)])
    return {
        "clock": clock,
        "rounds": steps,
        **{name: ratio_interval(times[a], times[b], offset=off) for name, (a, b, off) in RATIOS.items()},
        **head_figures(times, head),  # the two fine figures: from the loss head (see HEAD_FIGURES)
        "whole_step": {c: {name: ratio_interval(t[a], t[b], offset=off) for name, (a, b, off) in RATIOS.items()}
                       for c, t in (("cpu", cpu), ("wall", wall))},
        "from_head": {c: head_figures(t, h) for c, t, h in (("cpu", cpu, head_cpu), ("wall", wall, head_wall))},
        "median_step_s": {name: statistics.median(v) for name, v in wall.items()},
        "median_cpu_s": {name: statistics.median(v) for name, v in cpu.items()},
        "median_head_cpu_s": {name: statistics.median(v) for name, v in head_cpu.items()},
        "all_step_s": wall,
        "all_cpu_s": cpu,
        "all_head_s": head_wall,
        "all_head_cpu_s": head_cpu,
        "scored_positions_per_batch": statistics.mean(positions),
        "trained_positions_per_batch": trained,
        "trainer_positions_per_s": statistics.mean(positions) / statistics.median(wall["kd_rank"]),
        "reader_positions_per_s": sum(p for p, _ in reads) / sum(s for _, s in reads),
        "reader_over_trainer": reader,
    }


# ---- peak memory (one subprocess per variant) -------------------------------------------------------------------

def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def _reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS, where Linux allows it; return the RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_bytes("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_rss() -> int:
    """Peak RSS since :func:`_reset_peak_rss` (VmHWM), else the process's ru_maxrss."""
    return _status_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class LiveTensorBytes:
    """Peak bytes of live tensor storage while active: CPU's counterpart of ``torch.cuda.max_memory_allocated``.

    A ``TorchDispatchMode`` sees every aten op (forward, autograd backward, custom autograd Functions) and records
    the storages of their outputs; a storage counts until it is freed (a weak reference expires). Tensors made
    before entering (parameters, optimizer state, inputs) are added with :meth:`track`. Unlike peak RSS, this is
    neither the interpreter and libraries nor glibc's unreturned heap, so it measures what the step
    itself holds. Scratch buffers inside one kernel are not seen (the same for every variant)."""

    def __init__(self):
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        meter = self
        self._weak, self._refs, self.current, self.peak, self.peak_op = StorageWeakRef, {}, 0, 0, None

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                meter._sweep()
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        meter._add(t)
                if meter.current > meter.peak:
                    meter.peak, meter.peak_op = meter.current, str(func)
                return out

        self.mode = _Mode()

    def track(self, *tensors) -> None:
        """Count tensors that already exist (made outside the mode)."""
        for t in tensors:
            if t is not None:
                self._add(t)
        if self.current > self.peak:
            self.peak, self.peak_op = self.current, "(before the step)"

    def _add(self, t: torch.Tensor) -> None:
        if t.device.type != "cpu":
            return
        storage = t.untyped_storage()
        key, nbytes = storage._cdata, storage.nbytes()  # views and in-place results share a storage: count it once
        if nbytes == 0 or (key in self._refs and not self._refs[key][0].expired()):
            return
        self._refs[key] = (self._weak(storage), nbytes)
        self.current += nbytes

    def _sweep(self) -> None:
        for key, (ref, nbytes) in list(self._refs.items()):
            if ref.expired():
                del self._refs[key]
                self.current -= nbytes


MEMORY_MODES = ("naive", "chunked", "chunked_eager", "chunked_ce", "model_only", "naive_log_softmax")


def memory_child(mode: str, student_dir: str, seq_len: int, k: int, chunk: int, device_name: str,
                 grad_ckpt: bool = False, with_optimizer: bool = False) -> dict:
    """Forward + backward of the student at ``seq_len`` positions (+ an AdamW step with ``with_optimizer``, measured
    on the second step, when the optimizer state exists as it does for the whole of training); report the peak."""
    from transformers import AutoModelForCausalLM

    device = torch.device(device_name)
    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).to(device).train()
    model.config.use_cache = False
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    V = model.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, V, (1, seq_len), generator=g).to(device)
    base = torch.randint(0, V, (seq_len, 1), generator=g)
    lp = torch.log_softmax(torch.randn(seq_len, k + 1, generator=g) * 3, dim=-1)  # k entries + the tail bucket
    top = torch.sort(lp[:, :k], dim=-1, descending=True).values
    targets = TeacherTargets(topk_ids=(base + torch.arange(k) * 977) % V, topk_logprobs=top,
                             topk_valid=torch.ones(seq_len, k, dtype=torch.bool), tail_logmass=lp[:, k],
                             target_ids=torch.randint(0, V, (seq_len,), generator=g)).to(device)
    cfg = LossConfig(chunk_size=chunk) if mode != "chunked_ce" else \
        LossConfig(kd="none", rank_weight=0.0, ce_weight=1.0, chunk_size=chunk)
    loss_fn = DistillLoss(cfg)
    mask = torch.ones(1, seq_len, dtype=torch.bool, device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6) if with_optimizer else None

    def step() -> None:
        with autocast(device):
            hidden = model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state[mask]  # (T, H)
            lm_head = model.get_output_embeddings()
            if mode == "model_only":  # the floor: the student's layers without any LM head or loss
                total = hidden.float().pow(2).sum()
            elif mode == "naive":  # the whole (T, V) logits, then the same (fused, lean) loss on them
                terms = loss_fn(lm_head(hidden), targets)
                total = terms["total"].sum()
            elif mode == "naive_log_softmax":  # as most KD code does: full logits, log_softmax, then the loss
                # DistillLoss normalises its input again; log_softmax(log_softmax(z)) = log_softmax(z), same loss.
                terms = loss_fn(torch.log_softmax(lm_head(hidden).float(), dim=-1), targets)
                total = terms["total"].sum()
            else:
                total = chunked_distill_loss(hidden, lm_head.weight, targets, loss_fn, chunk_size=chunk,
                                             lm_head_bias=lm_head.bias,
                                             grad_in_forward=mode == "chunked_eager")["total"]
        (total / seq_len).backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    if optimizer is not None:
        step()  # the first step creates AdamW's two moments per parameter; the second is measured
    meter = LiveTensorBytes() if device.type == "cpu" else None
    if meter is not None:  # what exists before the step: parameters, buffers, optimizer state, inputs
        meter.track(*model.parameters(), *model.buffers(), input_ids, mask,
                    *(v for v in vars(targets).values() if torch.is_tensor(v)))
        if optimizer is not None:
            meter.track(*(t for st in optimizer.state.values() for t in st.values() if torch.is_tensor(t)))
    before_tensors = meter.current if meter is not None else None
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _reset_peak_rss()  # so loading's transient peak does not hide the step's
    t0 = time.perf_counter()
    if meter is not None:
        with meter.mode:
            step()
    else:
        step()
    sync(device)
    elapsed = time.perf_counter() - t0
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
        tensor_peak, before_tensors = peak, before  # on GPU the allocator counts tensors exactly
    else:
        peak = _peak_rss()
        tensor_peak = meter.peak
    return {"mode": mode, "tensor_peak_bytes": tensor_peak, "tensor_before_bytes": before_tensors,
            "tensor_peak_op": meter.peak_op if meter is not None else None,
            "peak_bytes": peak, "before_step_bytes": before, "step_bytes": peak - before, "seconds": elapsed}


def measure_memory(student_dir: Path, seq_len: int, k: int, chunk: int, device: str, grad_ckpt: bool,
                   with_optimizer: bool = False, modes: tuple[str, ...] = MEMORY_MODES,
                   in_process: bool = False) -> dict:
    """Peak memory of each mode. ``in_process`` (``--smoke``): no subprocess per mode; the live-tensor figures stay
    exact, the RSS figures then include the earlier modes' heap."""
    out = {}
    for mode in modes:  # one subprocess each: no variant inherits another's heap
        if in_process:
            out[mode] = memory_child(mode, str(student_dir), seq_len, k, chunk, device, grad_ckpt, with_optimizer)
        else:
            cmd = [sys.executable, __file__, "--memory-child", mode, "--student", str(student_dir),
                   "--mem-seq-len", str(seq_len), "--k", str(k), "--chunk-size", str(chunk), "--device", device]
            cmd += ["--mem-gradient-checkpointing", "on" if grad_ckpt else "off"]
            cmd += ["--mem-optimizer"] if with_optimizer else []
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                raise RuntimeError(f"memory child {mode} failed:\n{res.stderr[-3000:]}")
            out[mode] = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"  memory {mode}: tensors {out[mode]['tensor_peak_bytes'] / 2**20:.0f} MB, "
              f"RSS {out[mode]['peak_bytes'] / 2**20:.0f} MB", file=sys.stderr, flush=True)
    tensors = {m: v["tensor_peak_bytes"] / 2**20 for m, v in out.items()}
    mb = {m: v["peak_bytes"] / 2**20 for m, v in out.items()}
    step_mb = {m: v["step_bytes"] / 2**20 for m, v in out.items()}
    report = {"tensor_peak_mb": tensors, "tensor_before_mb": {m: v["tensor_before_bytes"] / 2**20
                                                               for m, v in out.items()},
              "tensor_peak_op": {m: v["tensor_peak_op"] for m, v in out.items()},
              "rss_peak_mb": mb, "rss_step_mb": step_mb, "seconds": {m: v["seconds"] for m, v in out.items()},
              "chunk_size": chunk, "gradient_checkpointing": grad_ckpt, "optimizer": with_optimizer}
    for name, fig in (("tensors", tensors), ("rss", mb), ("rss_step", step_mb)):
        if "chunked" in fig and "naive" in fig:
            report[f"{name}_chunked_over_naive"] = _ratio(fig["chunked"], fig["naive"])
        if "chunked" in fig and "chunked_ce" in fig:
            report[f"{name}_chunked_over_chunked_ce"] = _ratio(fig["chunked"], fig["chunked_ce"])
    if "model_only" in tensors:  # the LM head + loss alone: peak above the model-only floor (same layers, no head)
        report["tensors_head_mb"] = {m: v - tensors["model_only"] for m, v in tensors.items() if m != "model_only"}
    return report


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


# ---- main -------------------------------------------------------------------------------------------------------

SMOKE = {"rows": 6, "seq_len": 96, "batch_size": 2, "steps": 2, "head_repeats": 1, "k": 20, "mem_seq_len": 48,
         "chunk_size": 16}
"""--smoke sizes (the tiny teacher: 512-token vocabulary, hidden 128)."""


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", type=Path, default=None, help="HF teacher folder [rlkd convert-teacher's]")
    p.add_argument("--student", type=Path, default=None, help="default: 6 teacher layers, made under --out")
    p.add_argument("--data", type=Path, default=None, help="databricks-dolly-15k train.jsonl [$RLKD_BENCH_DATA/...]")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench-stage2", help="work folder [%(default)s]")
    p.add_argument("--json", type=Path, default=None, help="results file [--out/stage2-ONLY.json]")
    p.add_argument("--rows", type=int, default=24)
    p.add_argument("--seq-len", type=int, default=384)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=12,
                   help="timed rounds, one step per variant each (after one warm-up) [%(default)s]")
    p.add_argument("--head-repeats", type=int, default=3,
                   help="loss-head timings per variant and round; the round's figure is their median [%(default)s]")
    p.add_argument("--clock", choices=["cpu", "wall"], default=None,
                   help="what a step's time is: process CPU time (default on CPU) or wall time (default on GPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads while timing steps [1 with --clock cpu, so CPU time is work, not the spin-waits "
                        "of threads waiting for each other; else torch's default]")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--mem-seq-len", type=int, default=4096)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", choices=["all", "steps", "memory"], default="all")
    p.add_argument("--mem-gradient-checkpointing", nargs="?", const="on", default="both",
                   choices=["off", "on", "both"],
                   help="memory runs without/with gradient checkpointing of the student's layers, or both (default); "
                        "it lowers the layers' share, not the head's. The headline ratios are the worst of those run")
    p.add_argument("--mem-optimizer", action="store_true",
                   help="memory runs include an AdamW step, measured on the second step (its state then exists)")
    p.add_argument("--mem-modes", default="naive,chunked,chunked_ce,model_only",
                   help=f"comma-separated memory variants to run, of {','.join(MEMORY_MODES)}")
    p.add_argument("--smoke", action="store_true",
                   help="seconds on the tests' tiny teacher and the packaged Dolly sample (a check, not a measurement)")
    p.add_argument("--memory-child", choices=MEMORY_MODES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.memory_child:
        res = memory_child(args.memory_child, str(args.student), args.mem_seq_len, args.k, args.chunk_size,
                           args.device, args.mem_gradient_checkpointing == "on", args.mem_optimizer)
        print(json.dumps(res))
        return res

    from _common import dolly_sample

    args.out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
        args.teacher = args.teacher or smoke_teacher(args.out)
        data = args.data or dolly_sample()
    else:
        args.teacher = args.teacher or default_teacher()
        if not (args.teacher / "config.json").is_file():
            p.error(f"--teacher: no model at {args.teacher}; run `rlkd convert-teacher` or pass --teacher DIR")
        data = data_file(args.data, "train.jsonl", p) if args.only != "memory" else None
    torch.manual_seed(0)
    device = torch.device(args.device)
    clock = args.clock or ("cpu" if device.type == "cpu" else "wall")
    t0 = time.perf_counter()
    student = get_student(args.teacher, args.student, args.out,
                          SMOKE_STUDENT_LAYERS if args.smoke else STUDENT_LAYERS)
    cache = None
    if args.only in ("all", "steps"):  # the memory runs make their own inputs
        cache = build_cache(args.teacher, data, args.out / f"cache-{args.rows}x{args.seq_len}-k{args.k}",
                            args.rows, args.seq_len, args.k)
    print(f"inputs ready in {time.perf_counter() - t0:.0f}s: student {student}, cache {cache}", file=sys.stderr)
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
              "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
              "batch_size": args.batch_size, "seq_len": args.seq_len, "k": args.k, "smoke": args.smoke}
    if args.only in ("all", "steps"):
        threads = args.threads or (1 if clock == "cpu" else torch.get_num_threads())
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        report["threads"] = threads
        try:
            report["steps"] = time_steps(student, args.teacher, cache, device, args.batch_size, args.steps, args.k,
                                         clock, args.head_repeats)
        finally:
            torch.set_num_threads(before)
    if args.only in ("all", "memory"):
        modes = tuple(m.strip() for m in args.mem_modes.split(",") if m.strip())
        unknown = sorted(set(modes) - set(MEMORY_MODES))
        if unknown:
            p.error(f"--mem-modes: unknown {unknown}; choose from {','.join(MEMORY_MODES)}")
        ckpts = {"off": [False], "on": [True], "both": [False, True]}[args.mem_gradient_checkpointing]
        runs = {("gradient_checkpointing" if c else "no_checkpointing"):
                measure_memory(student, args.mem_seq_len, args.k, args.chunk_size, args.device, c,
                               args.mem_optimizer, modes, in_process=args.smoke) for c in ckpts}
        report["memory"] = {"runs": runs}
        for key in ("chunked_over_naive", "chunked_over_chunked_ce"):  # the worst config decides pass/fail
            values = [r[f"tensors_{key}"] for r in runs.values() if r.get(f"tensors_{key}") is not None]
            report["memory"][key] = max(values) if values else None
    out_json = args.json or args.out / f"stage2-{args.only}.json"
    out_json.write_text(json.dumps(report, indent=1))

    lines = [f"device: {report['device']} ({report['precision']}), batch {args.batch_size} x <= {args.seq_len} tokens"]
    if "steps" in report:
        lines += step_lines(report)
    if "memory" in report:
        lines += memory_lines(report, args.mem_seq_len)
    print("\n".join(lines))
    return report


def step_lines(report: dict) -> list[str]:
    s = report["steps"]
    whole = s["whole_step"]
    return [
        "median step, wall s: " + ", ".join(f"{k} {v:.3f}" for k, v in s["median_step_s"].items()),
        "median step, CPU s:  " + ", ".join(f"{k} {v:.3f}" for k, v in s["median_cpu_s"].items()),
        "median loss head alone, CPU s: " + ", ".join(f"{k} {v:.3f}" for k, v in s["median_head_cpu_s"].items()),
        f"by {s['clock']} time, {s['rounds']} rounds [95% interval]:",
        "  kd+rank / CE (chunked), from the loss head: "
        f"{format_interval(s['kd_rank_over_ce_chunked'])}  (goal <= 1.05)",
        f"  rank-loss overhead, from the loss head:     {format_interval(s['rank_overhead'], '{:+.1%}')}  (goal <= 3%)",
        f"  kd+rank / CE (HF full logits):              {format_interval(s['kd_rank_over_ce_hf'])}  (goal <= 1.05)",
        f"  kd+rank / online KD:                        {format_interval(s['kd_rank_over_online_kd'])}  (goal <= 0.55)",
        "  the fine two from whole steps, CPU: kd+rank / CE "
        f"{format_interval(whole['cpu']['kd_rank_over_ce_chunked'])}, rank overhead "
        f"{format_interval(whole['cpu']['rank_overhead'], '{:+.1%}')}",
        "  the fine two from whole steps, wall: kd+rank / CE "
        f"{format_interval(whole['wall']['kd_rank_over_ce_chunked'])}, rank overhead "
        f"{format_interval(whole['wall']['rank_overhead'], '{:+.1%}')}",
        f"reader {s['reader_positions_per_s']:.0f} pos/s vs trainer {s['trainer_positions_per_s']:.0f} pos/s: "
        f"{format_interval(s['reader_over_trainer'], '{:.0f}')}x (goal >= 20)",
    ]


def memory_lines(report: dict, seq_len: int) -> list[str]:
    lines = []
    for m in report["memory"]["runs"].values():
        def ratio(key: str) -> str:
            return "n/a" if m.get(key) is None else f"{m[key]:.2f}"

        lines += [f"peak memory of one step at T={seq_len}, chunk {m['chunk_size']}, gradient checkpointing "
                  f"{m['gradient_checkpointing']}, AdamW step {m['optimizer']}:",
                  "  live tensors (params + grads + optimizer + activations + head): "
                  + ", ".join(f"{k} {v:.0f} MB" for k, v in m["tensor_peak_mb"].items())
                  + f"; chunked/naive {ratio('tensors_chunked_over_naive')} (goal <= 0.5), chunked/CE-only "
                    f"{ratio('tensors_chunked_over_chunked_ce')} (goal <= 1.2)",
                  "  process peak RSS (adds the interpreter, the libraries and glibc's unreturned heap): "
                  + ", ".join(f"{k} {v:.0f} MB" for k, v in m["rss_peak_mb"].items())
                  + f"; chunked/naive {ratio('rss_chunked_over_naive')}, chunked/CE-only "
                    f"{ratio('rss_chunked_over_chunked_ce')}"]
        if "tensors_head_mb" in m:
            lines.append("  LM head + loss above the model-only floor (tensors): "
                         + ", ".join(f"{k} {v:.0f} MB" for k, v in m["tensors_head_mb"].items()))
    return lines


if __name__ == "__main__":
    main()
