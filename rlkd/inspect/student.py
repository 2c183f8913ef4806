"""Peak agreement of a student with the cached teacher: the RLKD paper's CR@k, OR@k, MOR@k, top-1 agreement and
the sparse KL, computed by the trainer's shared :class:`rlkd.trainer.metrics.PeakMetrics` (never re-implemented
here), so ``rlkd inspect --student`` and the trainer's evaluation report the same numbers.

The student runs in float32 on the CPU (``AutoModelForCausalLM``), one row at a time: row ``r``'s logits at
position ``t`` (after reading ``input_ids[0..t]``) are compared with the cached teacher top-k at the same ``t``. The
sparse KL is the trainer's forward KL with the tail bucket (:class:`rlkd.trainer.losses.SparseForwardKL`).
"""

from __future__ import annotations

import time

import numpy as np

from rlkd.errors import UserError

METRIC_KEYS = ("cr@1", "cr@2", "cr@5", "or@5", "or@10", "mor@5", "mor@10", "top1_agreement", "kd")
"""The metrics reported, in display order (keys of :meth:`PeakMetrics.compute`)."""

METRIC_TEACHER_K = {"cr@1": 1, "cr@2": 2, "cr@5": 5, "or@5": 5, "or@10": 10, "mor@5": 5, "mor@10": 10,
                    "top1_agreement": 1}
"""How many teacher entries each metric compares: a cache with a smaller k cannot give it."""


class AgreementError(UserError, ValueError):
    """The student cannot be compared with this cache (k too small, another vocabulary, no such model)."""


def required_k() -> int:
    return max(METRIC_TEACHER_K.values())


def check_cache_k(cache_k: int, cache_dir="the cache") -> None:
    """Raise :class:`AgreementError` when the cache keeps fewer teacher entries than the metrics compare."""
    need = {m: k for m, k in METRIC_TEACHER_K.items() if k > cache_k}
    if need:
        raise AgreementError(
            f"{cache_dir} keeps the teacher's top-{cache_k} only, but "
            + ", ".join(f"{m} compares the top-{k}" for m, k in need.items())
            + f": the teacher's ranks beyond {cache_k} are unknown, so these metrics cannot be computed. Write the "
            f"cache with k >= {required_k()} (`rlkd cache-teacher --top-k {required_k()}` or more).")


def row_targets(row, k: int):
    """The row's cached teacher as (P, k) padded tensors: a :class:`~rlkd.trainer.losses.TeacherTargets`."""
    import torch

    from rlkd.cache import collate
    from rlkd.trainer.losses import TeacherTargets

    b = collate([row], k)
    P = row.num_positions
    ids = torch.tensor(np.asarray(row.input_ids), dtype=torch.int64)  # copy: reader arrays are read-only
    return TeacherTargets(
        topk_ids=b["topk_ids"][0, :P],  # (P, k)
        topk_logprobs=b["topk_logprobs"][0, :P].float(),  # (P, k)
        topk_valid=b["topk_valid"][0, :P],  # (P, k)
        tail_logmass=b["tail_logmass"][0, :P].float(),  # (P,)
        target_ids=ids[1:],  # (P,)
    )


def choose_rows(reader, sample: int | None, seed: int) -> set[int] | None:
    """Row indices (file order) to score: None for all; else whole rows in a seeded random order until they hold
    at least ``sample`` scored positions (one extra pass over the cache to learn the row lengths)."""
    if sample is None:
        return None
    lengths = np.array([r.num_positions for r in reader.iter_rows()], dtype=np.int64)  # (R,)
    if sample >= lengths.sum():
        return None
    order = np.random.default_rng(seed).permutation(lengths.shape[0])
    upto = int(np.searchsorted(np.cumsum(lengths[order]), sample)) + 1
    return {int(i) for i in order[:upto]}


def load_student(path, manifest: dict, cache_dir):
    """The student model (float32, CPU, eval) after checking that it shares the teacher's vocabulary."""
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from rlkd.cache.identity import TokenizerMismatchError, check_tokenizer_compatible

    if not Path(path).is_dir():
        raise AgreementError(f"--student {path}: no such folder. Give a local model folder (config.json, weights "
                             "and the tokenizer), e.g. one written by `rlkd train-student` or `rlkd make-student`.")
    hf_logging.disable_progress_bar()  # keep stderr for our own messages
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - any failure means we cannot verify the vocabulary
        raise AgreementError(
            f"--student {path}: cannot load its tokenizer ({type(e).__name__}: {e}). The student must share the "
            "teacher's tokenizer for cached ids to mean the same tokens; save it beside the model "
            "(`rlkd make-student` does).") from None
    try:
        check_tokenizer_compatible(tok, manifest.get("tokenizer") or {}, where=str(cache_dir))
    except TokenizerMismatchError as e:
        raise AgreementError(str(e)) from None
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001
        raise AgreementError(f"--student {path}: cannot load the model ({type(e).__name__}: {e})") from None
    return model.to("cpu").eval()


def agreement_from_logits(pairs, k: int) -> dict:
    """Metrics from ``(row, student_logits (P, V))`` pairs: ``{"all": ..., "response": ...}`` (None if empty).

    The seam the tests drive with crafted logits; :func:`student_agreement` feeds it a real model's logits.
    """
    import torch

    from rlkd.trainer.losses import SparseForwardKL, sparse_view
    from rlkd.trainer.metrics import PeakMetrics

    acc = {"all": PeakMetrics(), "response": PeakMetrics()}
    kl = SparseForwardKL()
    for row, logits in pairs:
        targets = row_targets(row, k)
        logits = torch.as_tensor(logits, dtype=torch.float32)  # (P, V)
        with torch.no_grad():
            kd = kl(sparse_view(logits, targets))  # (P,)
        mask = torch.tensor(np.asarray(row.loss_mask, dtype=bool))  # (P,)
        acc["all"].update(logits, targets.topk_ids, targets.topk_valid, kd)
        if mask.any():
            acc["response"].update(logits[mask], targets.topk_ids[mask], targets.topk_valid[mask], kd[mask])
    return {g: (m.compute() if m.positions else None) for g, m in acc.items()}


class StudentScorer:
    """A loaded student (float32, CPU) that scores cached rows: agreement metrics over many rows, and per-position
    details of a few rows for the HTML report. Loads the model once for both."""

    def __init__(self, student_path, cache_dir):
        from rlkd.cache import read_manifest

        self.path = str(student_path)
        self.cache_dir = cache_dir
        manifest = read_manifest(cache_dir)
        self.k = int(manifest["k"])
        check_cache_k(self.k, cache_dir)
        self.model = load_student(student_path, manifest, cache_dir)

    def logits(self, row):
        """(P, V) float32 student logits aligned with the row's positions (position t predicts token t+1)."""
        import torch

        ids = torch.tensor(np.asarray(row.input_ids), dtype=torch.int64)[None]  # (1, T); a copy
        with torch.no_grad():
            return self.model(input_ids=ids).logits[0, :-1].float()  # (P, V)

    def agreement(self, *, sample: int | None = None, seed: int = 0, progress: bool = False) -> dict:
        """The ``student`` JSON object (schema in :mod:`rlkd.inspect`) over the cache's rows (or a sample)."""
        from rlkd.cache import CacheReader

        reader = CacheReader(self.cache_dir, shuffle=False)
        chosen = choose_rows(reader, sample, seed)
        t0 = time.perf_counter()
        scored = {"rows": 0, "positions": 0}

        def pairs():
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=len(chosen) if chosen is not None else reader.total_rows, unit="row",
                           desc="student", leave=False)
            for i, row in enumerate(reader.iter_rows()):
                if chosen is not None and i not in chosen:
                    continue
                logits = self.logits(row)
                scored["rows"] += 1
                scored["positions"] += row.num_positions
                if bar is not None:
                    bar.update(1)
                yield row, logits
            if bar is not None:
                bar.close()

        metrics = agreement_from_logits(pairs(), self.k)
        seconds = time.perf_counter() - t0
        return {
            "student": self.path,
            "rows": scored["rows"],
            "positions": scored["positions"],
            "sample": {"requested": sample, "seed": seed},
            "metrics": metrics,
            "timing": {"seconds": seconds, "positions_per_s": scored["positions"] / max(seconds, 1e-9)},
        }

    def details(self, row) -> dict[str, np.ndarray]:
        """Per position of one row, for the report: the student's probabilities of the teacher's cached ids
        (``probs``, flat like ``row.topk_ids``), of everything else (``tail``), its argmax (``top1``) and the sparse
        KL (``kd``), each from the same code as the metrics."""
        import torch

        from rlkd.trainer.losses import SparseForwardKL, sparse_view

        logits = self.logits(row)  # (P, V)
        targets = row_targets(row, self.k)
        with torch.no_grad():
            view = sparse_view(logits, targets)
            kd = SparseForwardKL()(view)  # (P,)
        valid = targets.topk_valid.numpy()  # (P, k); valid entries first, in cache order
        return {
            "probs": view.student_topk.exp().numpy()[valid],  # (sum counts,) same layout as row.topk_ids
            "tail": view.student_tail.exp().numpy(),  # (P,)
            "top1": logits.argmax(dim=-1).numpy(),  # (P,)
            "kd": kd.numpy(),  # (P,)
        }


def student_agreement(cache_dir, student_path, *, sample: int | None = None, seed: int = 0,
                      progress: bool = False) -> dict:
    """The ``student`` JSON object (schema in :mod:`rlkd.inspect`) for a student over the cache's rows."""
    return StudentScorer(student_path, cache_dir).agreement(sample=sample, seed=seed, progress=progress)
