"""What `rlkd eval` does, top to bottom: check -> prompts -> generate (resumable) -> score -> statistics -> report.

``run_eval(cfg)`` returns the JSON object of :mod:`rlkd.eval.report` and writes, under ``cfg.out``::

    eval_config.yaml              the resolved config
    NAME/settings.json            what the generations were made with (a resumed run must match it)
    NAME/generations.jsonl        one line per generation (see rlkd.eval.store); a cache-teacher --dataset input
    NAME/scores.jsonl             per row: rougeL, exact, contains, tokens, hit_limit (means over its samples)
    scores.json, report.md        the result, as JSON and as Markdown tables

Everything that can be refused is refused before the first generation: missing models, tokenizers that do not match
the cache, students whose tokenizers keep different rows, a context too short for prompt + answer.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rlkd.errors import UserError
from rlkd.eval.config import EvalConfig
from rlkd.eval.generate import Generator, Settings, build_generator, row_seed, stop_ids, vllm_available
from rlkd.eval.prompts import EvalRow, encode_prompts, load_rows
from rlkd.eval.scores import GENERATION_METRICS, RougeL, score_rows
from rlkd.eval.store import GenerationStore

GENERIC_NAMES = re.compile(r"^(final|checkpoint-\d+|model|student)$")
"""Folder names that say nothing alone: a student called ``runs/kd/final`` is named ``kd-final``."""


class EvalError(UserError, ValueError):
    """`rlkd eval` cannot run as asked; the message names the student, file or option and the fix."""


@dataclass
class Student:
    name: str
    """Label in the tables and the folder name under ``out``."""
    path: str
    """Model folder or hub id."""


# ---- students ---------------------------------------------------------------------------------------------------

def parse_students(specs: list[str]) -> list[Student]:
    """``NAME=PATH`` or ``PATH`` (named after its folder, with the parent for generic names such as ``final``)."""
    students = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or "/" in name:
            name, path = "", spec
        if not name:
            p = Path(path.rstrip("/"))
            name = f"{p.parent.name}-{p.name}" if GENERIC_NAMES.match(p.name) and p.parent.name else p.name
        name = re.sub(r"[^A-Za-z0-9._+-]", "_", name).strip("._") or "student"
        students.append(Student(name, path))
    seen: dict[str, str] = {}
    dup = []
    for s in students:
        if s.name in seen:
            dup.append(f"{seen[s.name]} and {s.path} are both named {s.name!r}")
        seen.setdefault(s.name, s.path)
    if dup:
        raise EvalError("; ".join(dup) + ": name them with NAME=PATH, e.g. `rlkd eval kl=runs/kl/final "
                        "rlkd=runs/rlkd/final ...`")
    return students


def model_fingerprint(path: str) -> dict:
    """What identifies a model's weights without reading them all: config.json's sha256, and per weight file its
    size plus the sha256 of its first and last MiB. A hub id is its own identity."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return {"hub_id": path}
    h = hashlib.sha256((folder / "config.json").read_bytes() if (folder / "config.json").is_file() else b"")
    files = {}
    for f in sorted(folder.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".pt", ".gguf") and f.is_file():
            size = f.stat().st_size
            with open(f, "rb") as fh:
                head = fh.read(1 << 20)
                fh.seek(max(0, size - (1 << 20)))
                tail = fh.read()
            files[f.name] = {"bytes": size, "sha256_ends": hashlib.sha256(head + tail).hexdigest()[:16]}
    return {"config_sha256": h.hexdigest()[:16], "weights": files}


def _load_tokenizer(s: Student, trust_remote_code: bool):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return AutoTokenizer.from_pretrained(s.path, trust_remote_code=trust_remote_code)


def _model_context(s: Student, trust_remote_code: bool) -> int | None:
    from transformers import AutoConfig

    try:
        c = AutoConfig.from_pretrained(s.path, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - the engine will say what is wrong with the model when it loads it
        return None
    c = c.get_text_config() if hasattr(c, "get_text_config") else c
    return getattr(c, "max_position_embeddings", None)


# ---- checks before any generation -------------------------------------------------------------------------------

def _check_students(cfg: EvalConfig, students: list[Student], generators: dict) -> tuple[dict[str, Any], list[str]]:
    """Tokenizers of the students that can be loaded, and the problems with the others."""
    problems, tokenizers = [], {}
    for s in students:
        local = Path(s.path).expanduser()
        if (local.is_dir() and not (local / "config.json").is_file()) or (
                not local.is_dir() and (s.path.startswith((".", "/", "~")) or s.path.count("/") > 1)):
            problems.append(f"student {s.name}: {s.path} is not a model folder (no config.json there); give a "
                            "folder written by `rlkd train-student`/`rlkd make-student`/save_pretrained, or a hub id")
            continue
        try:
            tokenizers[s.name] = _load_tokenizer(s, cfg.trust_remote_code)
        except Exception as e:  # noqa: BLE001 - any failure: the student cannot be evaluated
            problems.append(f"student {s.name}: cannot load the tokenizer of {s.path} ({type(e).__name__}: {e})")
            continue
        need = cfg.max_prompt_length + cfg.max_new_tokens
        gen = generators.get(s.path)
        context = gen.max_model_len if gen is not None else _model_context(s, cfg.trust_remote_code)
        if context is not None and need > context:
            problems.append(f"student {s.name}: --max-prompt-length {cfg.max_prompt_length} + --max-new-tokens "
                            f"{cfg.max_new_tokens} = {need} tokens exceeds its context of {context}; lower one of them")
    return tokenizers, problems


def _check_cache(cfg: EvalConfig, students: list[Student], tokenizers: dict) -> tuple[dict | None, list[str]]:
    """The cache's manifest, and the problems with its k and with each student's tokenizer against it."""
    from rlkd.cache import read_manifest
    from rlkd.cache.identity import TokenizerMismatchError, check_tokenizer_compatible

    if not (Path(cfg.cache) / "manifest.json").is_file():
        return None, [f"--cache {cfg.cache}: not an rlkd cache (no manifest.json there); give a folder written by "
                      "`rlkd cache-teacher`"]
    manifest = read_manifest(cfg.cache)
    problems = []
    if not manifest.get("rows"):
        problems.append(f"--cache {cfg.cache} holds no rows yet (its `rlkd cache-teacher` run has not finished a "
                        "shard): re-run that command to complete it")
    for s in students:
        if s.name not in tokenizers:
            continue
        if not Path(s.path).expanduser().is_dir():
            problems.append(f"student {s.name}: --cache scores local model folders only, and {s.path} is not one; "
                            "download it first (e.g. `huggingface-cli download ID --local-dir DIR`) and pass DIR")
            continue
        try:
            check_tokenizer_compatible(tokenizers[s.name], manifest.get("tokenizer") or {},
                                       where=f"--cache {cfg.cache}")
        except TokenizerMismatchError as e:
            problems.append(f"student {s.name} ({s.path}) and --cache: {e}")
    return manifest, problems


def _check_same_rows(students: list[Student], kept: dict[str, set[int]]) -> None:
    """Paired statistics need every student to answer the same rows: refuse tokenizers that keep different ones."""
    first = students[0]
    bad = []
    for s in students[1:]:
        if kept[s.name] != kept[first.name]:
            only_a = sorted(kept[first.name] - kept[s.name])[:5]
            only_b = sorted(kept[s.name] - kept[first.name])[:5]
            bad.append(f"{s.name} keeps {len(kept[s.name])} rows, {first.name} {len(kept[first.name])} (rows only "
                       f"{first.name} keeps: {only_a}; only {s.name}: {only_b})")
    if bad:
        raise EvalError(
            "the students' tokenizers make different rows fit --max-prompt-length, so their scores would not be on "
            "the same rows: " + "; ".join(bad) + ". Raise --max-prompt-length so every prompt fits, or evaluate "
            "these students in separate runs.")


# ---- generation --------------------------------------------------------------------------------------------------

def _settings(cfg: EvalConfig, s: Student, engine: str, tokenizer, identity: dict, prompt_format: dict) -> dict:
    """Everything that decides the generations of one student (``settings.json``)."""
    from rlkd.cache.identity import tokenizer_identity

    out = {
        "model": str(Path(s.path).expanduser().resolve()) if Path(s.path).expanduser().is_dir() else s.path,
        "model_fingerprint": model_fingerprint(s.path),
        "tokenizer_sha256": tokenizer_identity(tokenizer)["sha256"],
        "dataset": {k: identity.get(k) for k in ("fingerprint", "columns", "split", "subset")},
        "prompt_format": prompt_format,
        "engine": engine,
        "dtype": cfg.dtype,
        "max_new_tokens": cfg.max_new_tokens,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "samples": cfg.samples,
        "seed": cfg.seed,
    }
    if engine == "hf" and cfg.temperature > 0:
        out["batch_size"] = cfg.batch_size  # the hf engine seeds per batch (see rlkd.eval.generate)
    return out


def _generate(cfg: EvalConfig, s: Student, store: GenerationStore, rows: list[EvalRow], prompts: dict,
              tokenizer, engine: str, generator: Generator | None, progress: bool) -> float:
    """Generate the rows the store lacks, batch by batch, saving each batch; returns seconds spent."""
    todo = [r for r in rows if r.source_index not in store.rows]
    if not todo:
        return 0.0
    t0 = time.perf_counter()
    own = generator is None
    if own:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        generator = build_generator(engine, s.path, dtype=cfg.dtype, pad_id=pad,
                                    max_model_len=cfg.max_prompt_length + cfg.max_new_tokens,
                                    tensor_parallel_size=cfg.tensor_parallel_size,
                                    gpu_memory_utilization=cfg.gpu_memory_utilization,
                                    enforce_eager=cfg.enforce_eager, trust_remote_code=cfg.trust_remote_code,
                                    seed=cfg.seed)
    settings = Settings(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.samples, stop_ids(tokenizer, s.path))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(rows), initial=len(rows) - len(todo), unit="row", desc=f"eval {s.name}",
                   dynamic_ncols=True, smoothing=0.1)
    new_tokens = 0
    try:
        for a in range(0, len(todo), cfg.batch_size):
            batch = todo[a: a + cfg.batch_size]
            ids = [prompts[r.source_index] for r in batch]
            gens = generator.generate(ids, [row_seed(cfg.seed, r.source_index) for r in batch], settings)
            lines = []
            for r, p, samples in zip(batch, ids, gens):
                lines.append([{
                    "row": r.source_index, "sample": j, "prompt": r.messages, "reference": r.reference,
                    "completion": tokenizer.decode(g.token_ids, skip_special_tokens=True),
                    "tokens": len(g.token_ids), "prompt_tokens": len(p), "hit_limit": g.hit_limit,
                } for j, g in enumerate(samples)])
                new_tokens += sum(len(g.token_ids) for g in samples)
            store.append(lines)
            if bar is not None:
                bar.update(len(batch))
                bar.set_postfix_str(f"{new_tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s")
    finally:
        if bar is not None:
            bar.close()
        if own:
            generator.close()
    return time.perf_counter() - t0


# ---- the run -------------------------------------------------------------------------------------------------------

@dataclass
class Prepared:
    """What every student is asked: the rows, and each student's prompt ids for them."""

    rows: list[EvalRow]
    """Evaluated rows, in source order (the same for every student)."""
    prompts: dict[str, dict[int, np.ndarray]]
    """student name -> source index -> prompt token ids."""
    tokenizers: dict[str, Any]
    manifest: dict | None
    """The --cache manifest, if any."""
    identity: dict
    """The dataset's identity (stage 1's dataset_identity)."""
    rows_selected: int
    skipped: dict
    """reason -> rows skipped (dataset rows, then the first student's prompt encoding)."""
    cache_rows: list[str] | None = None
    """With --cache: the row_ids of the cache rows to score, in file order."""
    cache_rows_from: str = ""
    """Which cache rows those are, in words."""


def prepare(cfg: EvalConfig, students: list[Student], generators: dict) -> Prepared:
    """Every check that can refuse the run, then the rows and prompts; nothing is generated yet."""
    tokenizers, problems = _check_students(cfg, students, generators)
    manifest = None
    if cfg.cache:
        manifest, more = _check_cache(cfg, students, tokenizers)
        problems += more
    if problems:
        raise EvalError(f"{len(problems)} problem(s) before generating:\n" + "\n".join(f"  - {p}" for p in problems))
    selection, identity = load_rows(cfg)
    prompts, kept, skipped = {}, {}, dict(selection.skipped)
    for s in students:
        prompts[s.name], dropped = encode_prompts(selection.rows, tokenizers[s.name], cfg.prompt_format,
                                                  cfg.max_prompt_length)
        kept[s.name] = set(prompts[s.name])
        if s is students[0]:
            for reason, n in dropped.items():
                skipped[reason] = skipped.get(reason, 0) + n
    _check_same_rows(students, kept)
    rows = [r for r in selection.rows if r.source_index in kept[students[0].name]]
    if not rows:
        raise EvalError(f"no row of {cfg.dataset} can be evaluated ({selection.source_rows} rows considered; "
                        f"skipped: {skipped or 'none'}); check the columns, --limit and --max-prompt-length")
    prep = Prepared(rows, prompts, tokenizers, manifest, identity, selection.source_rows, skipped)
    if cfg.cache:
        from rlkd.eval.agreement import select_cache_rows

        # A cache of the same dataset (same fingerprint) is scored on the evaluated rows; another on all its rows.
        same = (manifest.get("dataset") or {}).get("fingerprint") == identity["fingerprint"]
        prep.cache_rows = select_cache_rows(cfg.cache, {r.source_index for r in rows} if same else None,
                                            cfg.cache_max_rows)
        prep.cache_rows_from = ("the evaluated rows of the same dataset" if same else
                                "all its rows: it was written from another dataset than --dataset")
        if not prep.cache_rows:
            raise EvalError(f"--cache {cfg.cache}: none of its {manifest.get('rows')} rows is among the "
                            f"{len(rows)} rows evaluated from {cfg.dataset} (the cache was written from the same "
                            "dataset, so only those rows are comparable); raise --limit or --max-prompt-length")
    return prep


def generate_and_score(cfg: EvalConfig, s: Student, prep: Prepared, engine: str, generator: Generator | None,
                       rouge: RougeL, progress: bool) -> tuple[GenerationStore, dict[str, np.ndarray], float]:
    """One student: generate what its folder lacks, then score every row (also written to NAME/scores.jsonl)."""
    from rlkd.pipeline.formatting import prompt_format_identity, resolve_prompt_format

    tok = prep.tokenizers[s.name]
    fmt = prompt_format_identity(resolve_prompt_format(cfg.prompt_format, tok), tok)
    settings = _settings(cfg, s, generator.name if generator is not None else engine, tok, prep.identity, fmt)
    store = GenerationStore(Path(cfg.out) / s.name, settings, cfg.samples)
    seconds = _generate(cfg, s, store, prep.rows, prep.prompts[s.name], tok, settings["engine"], generator, progress)
    per_row = score_rows([store.rows[r.source_index] for r in prep.rows], rouge)
    with open(Path(cfg.out) / s.name / "scores.jsonl", "w") as f:
        for i, r in enumerate(prep.rows):
            f.write(json.dumps({"row": r.source_index, **{m: float(per_row[m][i]) for m in GENERATION_METRICS}})
                    + "\n")
    return store, per_row, seconds


def agreement(cfg: EvalConfig, students: list[Student], prep: Prepared, progress: bool):
    """Per student, the chosen cache rows' agreement (:class:`~rlkd.eval.agreement.CacheScores`), and the
    ``cache`` entry of the report."""
    from rlkd.eval.agreement import score_cache_rows

    scored = [score_cache_rows(s.path, cfg.cache, prep.cache_rows, progress=progress, desc=f"agreement {s.name}")
              for s in students]
    from rlkd.cache import read_manifest
    from rlkd.core.metrics import left_out

    k = int(read_manifest(cfg.cache)["k"])
    info = {"path": str(cfg.cache), "rows": len(prep.cache_rows), "positions": scored[0].positions,
            "rows_from": prep.cache_rows_from, "k": k, "metrics": list(scored[0].num), "left_out": left_out(k)}
    return scored, info


def run_eval(cfg: EvalConfig, *, generators: dict[str, Generator] | None = None, progress: bool | None = None,
             log: Callable[[str], None] | None = None) -> dict:
    """Evaluate ``cfg.students`` (see the module docstring). ``generators`` maps a student's path to an engine
    already built (tests pass the session's vLLM engine); others are built, used and freed one at a time."""
    from rlkd.config import config_to_dict
    from rlkd.eval.report import as_json_metrics, render_markdown, summarize

    generators = dict(generators or {})
    log = log or (lambda msg: print(msg, file=sys.stderr))
    progress = cfg.progress if progress is None else progress
    students = parse_students(cfg.students)
    prep = prepare(cfg, students, generators)
    rouge = RougeL()  # fails now, not after the generations, when rouge-score is missing
    engine = cfg.engine
    if engine == "auto":
        engine = "vllm" if vllm_available() else "hf"
        if engine == "hf":
            log("rlkd eval: vLLM is not installed, generating with transformers (--engine hf)")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_config.yaml").write_text(_yaml(config_to_dict(cfg)))

    stores, gen_series, seconds = [], [], 0.0
    for s in students:
        store, per_row, spent = generate_and_score(cfg, s, prep, engine, generators.get(s.path), rouge, progress)
        stores.append(store)
        gen_series.append({m: (per_row[m], np.ones(len(prep.rows))) for m in GENERATION_METRICS})
        seconds += spent
    names = [s.name for s in students]
    stats = dict(compare=cfg.compare, resamples=cfg.bootstrap, seed=cfg.bootstrap_seed)
    per_student, diffs = summarize(gen_series, GENERATION_METRICS, names, **stats)
    agree_student, agree_diffs, cache_info = [None] * len(students), [None] * len(diffs), None
    if cfg.cache:
        scored, cache_info = agreement(cfg, students, prep, progress)
        metrics = list(scored[0].num)  # what the cache's k defines (the rest is left out, as by inspect)
        series = [{m: (c.num[m], c.den[m]) for m in metrics} for c in scored]
        agree_student, agree_diffs = summarize(series, metrics, names, **stats)

    notes = []
    if len({st.settings["tokenizer_sha256"] for st in stores}) > 1:
        notes.append("the students tokenise differently: tokens and the token limit count each student's own tokens")
    report = {
        "schema": "rlkd.eval/1",
        "out": str(out),
        "dataset": {"source": prep.identity["source"], "split": prep.identity["split"],
                    "subset": prep.identity["subset"], "fingerprint": prep.identity["fingerprint"],
                    "rows_selected": prep.rows_selected, "rows_evaluated": len(prep.rows), "skipped": prep.skipped},
        "generation": {"engine": ", ".join(sorted({st.settings["engine"] for st in stores})), "dtype": cfg.dtype,
                       "temperature": cfg.temperature, "top_p": cfg.top_p, "samples": cfg.samples, "seed": cfg.seed,
                       "max_new_tokens": cfg.max_new_tokens, "max_prompt_length": cfg.max_prompt_length,
                       "seconds": round(seconds, 3)},
        "bootstrap": {"resamples": cfg.bootstrap, "seed": cfg.bootstrap_seed, "level": 0.95, "unit": "row",
                      "method": "percentile"},
        "compare": cfg.compare,
        "students": [{"name": s.name, "path": s.path, "generations": str(st.path),
                      "generation": as_json_metrics(per_student[i]),
                      "agreement": as_json_metrics(agree_student[i]) if agree_student[i] is not None else None}
                     for i, (s, st) in enumerate(zip(students, stores))],
        "differences": [{"a": d["a"], "b": d["b"], "generation": as_json_metrics(d["metrics"]),
                         "agreement": as_json_metrics(agree_diffs[j]["metrics"]) if agree_diffs[j] else None}
                        for j, d in enumerate(diffs)],
        "cache": cache_info,
        "notes": notes,
    }
    (out / "scores.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    (out / "report.md").write_text(render_markdown(report))
    return report


def _yaml(obj: dict) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False, allow_unicode=True)
