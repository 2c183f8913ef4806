"""The `rlkd` command line. Thin on purpose: parse flags, build a config, call the stage.

Stage modules are imported inside each command so that `rlkd --help` is instant and the trainer never imports vLLM.
"""

from __future__ import annotations

import sys

import click

from rlkd import __version__
from rlkd.config import ConfigError


class _Group(click.Group):
    """Lists commands in the order of the pipeline, and turns config errors into clean messages."""

    def list_commands(self, ctx):
        order = ["cache-teacher", "cache-merge", "train-student", "inspect", "verify", "make-student", "convert-teacher"]
        return sorted(self.commands, key=lambda c: order.index(c) if c in order else len(order))

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
    Viewer:               rlkd inspect        shows the cached peak distributions and a student's agreement.
    """


# ---- stage 1: cache-teacher, cache-merge (rlkd/pipeline) -------------------------------------------------------

# ---- stage 2: train-student (rlkd/trainer) ---------------------------------------------------------------------

# ---- viewer: inspect --------------------------------------------------------------------------------------------

# ---- cache tools: verify ----------------------------------------------------------------------------------------

# ---- models: make-student, convert-teacher ----------------------------------------------------------------------


if __name__ == "__main__":
    sys.exit(main())
