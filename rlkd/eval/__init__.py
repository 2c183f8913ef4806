"""``rlkd eval``: generate answers with one or more students and score them against references (ROUGE-L, exact match,
contains, length), with bootstrap intervals and paired differences; optionally also their peak agreement with a
teacher cache.

Modules, in the order a run uses them: :mod:`~rlkd.eval.config` (the options), :mod:`~rlkd.eval.prompts` (stage 1's
dataset loading and formatting, cut at the answer), :mod:`~rlkd.eval.generate` (vLLM or transformers),
:mod:`~rlkd.eval.store` (the resumable generations JSONL), :mod:`~rlkd.eval.scores` (per-row scores),
:mod:`~rlkd.eval.agreement` (the adapter onto the shared peak metrics), :mod:`~rlkd.eval.stats` (bootstrap and paired
differences), :mod:`~rlkd.eval.report` (JSON, text and Markdown), :mod:`~rlkd.eval.run` (the whole command).
"""
