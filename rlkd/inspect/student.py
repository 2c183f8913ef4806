"""A student's peak agreement with the cached teacher: the RLKD paper's CR@k and MOR@k (the mean of the per-position
overlap OR@k), set@k, top-1 agreement, the sparse KL and CE, all from :func:`rlkd.core.metrics.score`, the function
the trainer's evaluation calls too, so for the same student, cache and ``--tail`` both report the same numbers.

The student runs in float32 on the CPU (``AutoModelForCausalLM``), one row at a time: row ``r``'s logits at
position ``t`` (after reading ``input_ids[0..t]``) are compared with the cached teacher top-k at the same ``t``.
Metrics whose k exceeds the cache's k are left out, with the reason (``left_out`` in the JSON).
"""

from __future__ import annotations

import time

import numpy as np

from rlkd.errors import UserError


class AgreementError(UserError, ValueError):
    """The student cannot be compared with this cache (another vocabulary, no such model)."""


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
    """The student model (float32, CPU, eval) after checking that it shares the teacher's vocabulary and that its
    embedding covers every cached id (the same check as ``rlkd train-student``)."""
    from pathlib import Path

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from rlkd.cache.identity import TokenizerMismatchError, check_tokenizer_compatible
    from rlkd.core.targets import vocab_problem

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
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except Exception as e:  # noqa: BLE001
        raise AgreementError(f"--student {path}: cannot read its config ({type(e).__name__}: {e})") from None
    problem = vocab_problem(int(config.vocab_size), cache_dir, manifest, who=f"--student {path}",
                            where=f"the cache {cache_dir}")
    if problem:
        raise AgreementError(problem)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001
        raise AgreementError(f"--student {path}: cannot load the model ({type(e).__name__}: {e})") from None
    return model.to("cpu").eval()


def agreement_from_logits(pairs, k: int, tail: str = "bucket") -> dict:
    """Metrics from ``(row, student_logits (P, V))`` pairs: ``{"all": ..., "response": ...}`` (None if empty).

    ``k`` is the cache's k. The seam the tests drive with crafted logits; :func:`student_agreement` feeds it a real
    model's logits.
    """
    import torch

    from rlkd.core.metrics import PeakMetrics
    from rlkd.core.targets import collate

    acc = {"all": PeakMetrics(k, tail), "response": PeakMetrics(k, tail)}
    for row, logits in pairs:
        mb = collate([row], k, all_positions=True)  # targets at every scored position
        scores = acc["all"].update(torch.as_tensor(logits, dtype=torch.float32), mb.targets)  # (P,) each
        acc["response"].add(scores, mask=mb.trained)
    return {g: (m.compute() if m.positions else None) for g, m in acc.items()}


class StudentScorer:
    """A loaded student (float32, CPU) that scores cached rows: agreement metrics over many rows, and per-position
    details of a few rows for the HTML report. Loads the model once for both.

    ``tail``: the tail mode of the sparse KL (``bucket`` or ``renormalize``, as ``train-student --tail``).
    """

    def __init__(self, student_path, cache_dir, tail: str = "bucket"):
        from rlkd.cache import read_manifest

        self.path = str(student_path)
        self.cache_dir = cache_dir
        self.tail = tail
        manifest = read_manifest(cache_dir)
        self.k = int(manifest["k"])
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
        from rlkd.core.metrics import left_out

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

        metrics = agreement_from_logits(pairs(), self.k, self.tail)
        seconds = time.perf_counter() - t0
        return {
            "student": self.path,
            "rows": scored["rows"],
            "positions": scored["positions"],
            "sample": {"requested": sample, "seed": seed},
            "tail": self.tail,
            "cache_k": self.k,
            "metrics": metrics,
            "left_out": left_out(self.k),
            "timing": {"seconds": seconds, "positions_per_s": scored["positions"] / max(seconds, 1e-9)},
        }

    def details(self, row) -> dict[str, np.ndarray]:
        """Per position of one row, for the report: the student's probabilities of the teacher's cached ids
        (``probs``, flat like ``row.topk_ids``), of everything else (``tail``), its argmax (``top1``), the sparse KL
        (``kd``, with this scorer's tail mode) and the overlap ``or@k`` at the largest overlap k the cache allows
        (``overlap``, None when it allows none), each from the same code as the metrics."""
        import torch

        from rlkd.core.metrics import PeakMetrics
        from rlkd.core.sparse import sparse_view
        from rlkd.core.targets import collate

        logits = self.logits(row)  # (P, V)
        targets = collate([row], self.k, all_positions=True).targets
        peaks = PeakMetrics(self.k, self.tail)
        scores = peaks.score(logits, targets)
        with torch.no_grad():
            view = sparse_view(logits, targets)  # the student's own probabilities: always the bucket view
        valid = targets.topk_valid.numpy()  # (P, k); valid entries first, in cache order
        overlap_k = max(peaks.overlap_ks, default=None)
        return {
            "probs": view.student_topk.exp().numpy()[valid],  # (sum counts,) same layout as row.topk_ids
            "tail": view.student_tail.exp().numpy(),  # (P,)
            "top1": logits.argmax(dim=-1).numpy(),  # (P,)
            "kd": scores["kd"].numpy(),  # (P,)
            "overlap_k": overlap_k,
            "overlap": scores[f"or@{overlap_k}"].numpy() if overlap_k else None,  # (P,)
        }


def student_agreement(cache_dir, student_path, *, sample: int | None = None, seed: int = 0, tail: str = "bucket",
                      progress: bool = False) -> dict:
    """The ``student`` JSON object (schema in :mod:`rlkd.inspect`) for a student over the cache's rows."""
    return StudentScorer(student_path, cache_dir, tail).agreement(sample=sample, seed=seed, progress=progress)

