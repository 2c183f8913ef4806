"""``rlkd inspect``: look at a cache's teacher distributions, and measure a student's peak agreement with them.

Modules: :mod:`~rlkd.inspect.stats` (vectorised summary statistics and the entropy bounds),
:mod:`~rlkd.inspect.view` (terminal views, tokenizer loading), :mod:`~rlkd.inspect.report` (self-contained HTML),
:mod:`~rlkd.inspect.student` (CR@k, MOR@k, set@k through :mod:`rlkd.core.metrics`, as the trainer's evaluation),
:mod:`~rlkd.inspect.run` (what the command does, form by form).

This module stays import-light (no numpy) so that ``rlkd --help`` can show :data:`JSON_SCHEMA`.

JSON output (``--json``)
------------------------
One object on stdout; which keys appear depends on the form. Probabilities are in [0, 1], entropies in nats, ranks
1-based over the full vocabulary, and a "position" ``t`` is the teacher's prediction of token ``t + 1``.
"""

JSON_SCHEMA = """\
{
  "schema": "rlkd.inspect/1",
  "summary": {                         # plain form and --html
    "cache": str,
    "manifest": {"teacher": {...}, "tokenizer": {"sha256", "vocab_size", "name_or_path"}, "k": int,
                 "codec": str, "dataset": {...}, "rows": int, "positions": int, "tokens": int,
                 "shards": int, "bytes": int, "bytes_per_token": float|null, "complete": bool,
                 "format_version": int},
    "vocab_size": int|null,            # V used by the entropy upper bound
    "peak_threshold": float,
    "sample": {"requested": int|null, "positions": int, "seed": int},
    "stats": {"all"|"prompt"|"response": null | {   # prompt/response split by loss_mask
      "positions": int,
      "top1_prob" | "entropy_lower" | "entropy_upper" | "tail_mass" | "target_prob":
          null | {"mean", "std", "min", "p05", "p25", "p50", "p75", "p95", "max": float,
                  "hist": {"edges": [float] (bins+1), "counts": [int] (bins)}},
      "peaks": {"mean": float, "counts": {"0": int, "1": int, ...}, "multi_peak_share": float,
                "no_peak_share": float, "undercount_share": float},
      "target_rank": {"mean": float, "p50": float, "top1_share": float, "in_topk_share": float,
                      "hist": {"labels": [str], "counts": [int]}}}},
    "timing": {"seconds": float, "positions_per_s": float}},
  "row": {                             # --row
    "index": int, "row_id": str, "source_index": int, "tokens": int,
    "positions_shown": [start, stop], "text": str,
    "positions": [{"t": int, "token_id": int, "next_id": int, "next_token": str, "response": bool,
                   "entropy_lower": float, "entropy_upper": float|null, "peaks": int,
                   "tail_mass": float, "target_prob": float, "target_rank": int,
                   "top": [{"id": int, "token": str, "prob": float, "is_next": bool}]}]},
  "student": {                         # --student
    "student": str, "rows": int, "positions": int,
    "sample": {"requested": int|null, "seed": int},
    "tail": "bucket"|"renormalize",    # tail mode of kd (--tail)
    "cache_k": int,
    "metrics": {"all"|"response": null | {"cr@1", "cr@2", "cr@5", "mor@5", "mor@10", "set@5",
                "set@10", "top1_agreement", "kd", "ce": float|null, "positions": int,
                "eligible@1", "eligible@2", "eligible@5", "eligible@10": int}},
                # rlkd.core.metrics.PeakMetrics.compute(), per position with S_k/T_k the student's/
                # teacher's top k: cr@k S_k == T_k in order; mor@k the mean of or@k = |S_k & T_k| / k
                # (the paper's OR@k is per position, MOR@k its mean); set@k S_k and T_k the same set;
                # kd sparse forward KL, ce cross-entropy, nats/position. A rate is over the positions
                # where the teacher kept >= k entries (eligible@k), null when there is none.
    "left_out": {"mor@10"|...: str},   # metrics whose k exceeds cache_k: absent above, with why
    "timing": {"seconds": float, "positions_per_s": float}},
  "html": {"path": str, "bytes": int, "rows": [int]}   # --html
}"""
"""The ``--json`` output, also shown by ``rlkd inspect --help``."""

__doc__ += "\n::\n\n" + "\n".join("    " + line for line in JSON_SCHEMA.splitlines()) + "\n"
