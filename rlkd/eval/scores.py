"""Per-row scores of generations against the reference answers.

- ``rougeL``: ROUGE-L F-measure from the ``rouge-score`` package (Google's, as in the RLKD/MiniLLM setup) with
  ``use_stemmer=True``. Its tokenizer lower-cases, replaces every character outside ``a-z0-9`` by a space and
  Porter-stems tokens longer than 3 characters, so text in other scripts scores 0. ``score(target=reference,
  prediction=generation)``. Reported as a fraction (the paper's tables show it x100).
- ``exact``: 1 when the normalised generation equals the normalised reference.
- ``contains``: 1 when the normalised reference (non-empty) occurs in the normalised generation as whole words.
- ``tokens``: the generation's length in the student's own tokens, without the stop token.
- ``hit_limit``: 1 when it reached ``max_new_tokens`` without the stop token (cut off).

Normalisation (:func:`normalize`) for ``exact`` and ``contains``: Unicode NFKC; ``str.casefold``; every character of
a Unicode punctuation category (``P*``: ``.,!?;:'"()[]{}-_/`` and the like, curly quotes, dashes) is *removed*
(``"U.S."`` -> ``"us"``, ``"don't"`` -> ``"dont"``), while symbols (``$ + = < > ^ ` | ~``, category ``S*``) stay; every run of whitespace becomes one space; leading and
trailing spaces go. Articles are *kept* (unlike SQuAD's normalisation). "As whole words" means
``" " + reference + " "`` is a substring of ``" " + generation + " "``, so ``"5"`` is not found in ``"150"``.

With several samples per prompt, each row's score is the mean over its samples.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

import numpy as np

from rlkd.errors import MissingPackageError

GENERATION_METRICS = ("rougeL", "exact", "contains", "tokens", "hit_limit")
"""Keys of :func:`score_rows`, in display order."""

_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """The normalised form used by ``exact`` and ``contains`` (see the module docstring)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))
    return _SPACE.sub(" ", text).strip()


def exact_match(generation: str, reference: str) -> float:
    return float(normalize(generation) == normalize(reference))


def contains(generation: str, reference: str) -> float:
    ref = normalize(reference)
    return float(bool(ref) and f" {ref} " in f" {normalize(generation)} ")


class RougeL:
    """ROUGE-L F with stemming, from ``rouge-score``."""

    def __init__(self):
        try:
            from rouge_score import rouge_scorer
        except ImportError:
            raise MissingPackageError("ROUGE-L needs the rouge-score package: pip install 'rlkd[eval]' "
                              "(or pip install rouge-score)") from None
        self._scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def __call__(self, generation: str, reference: str) -> float:
        return float(self._scorer.score(reference, generation)["rougeL"].fmeasure)


def score_rows(rows: Sequence[list[dict]], rouge: RougeL | None = None) -> dict[str, np.ndarray]:
    """``{metric: (R,) float64}`` for R rows, each row a list of generation lines (see :mod:`rlkd.eval.store`)."""
    rouge = rouge or RougeL()
    out = {m: np.zeros(len(rows), dtype=np.float64) for m in GENERATION_METRICS}
    for i, samples in enumerate(rows):
        vals = {m: [] for m in GENERATION_METRICS}
        for g in samples:
            gen, ref = g["completion"], g["reference"]
            vals["rougeL"].append(rouge(gen, ref))
            vals["exact"].append(exact_match(gen, ref))
            vals["contains"].append(contains(gen, ref))
            vals["tokens"].append(float(g["tokens"]))
            vals["hit_limit"].append(float(g["hit_limit"]))
        for m in GENERATION_METRICS:
            out[m][i] = float(np.mean(vals[m]))
    return out
