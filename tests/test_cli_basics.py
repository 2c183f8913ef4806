"""The `rlkd` entry point: `--help` lists the pipeline's commands, `--version` prints the package version, both
through click's runner and through the installed console script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import rlkd
from rlkd.cli import main

COMMANDS = ["cache-teacher", "train-student", "inspect", "verify", "make-student", "convert-teacher"]


def _listed_commands(help_text: str) -> list[str]:
    """Command names from the 'Commands:' block of click's help."""
    lines = help_text.split("Commands:", 1)[1].splitlines()
    return [line.split()[0] for line in lines if line.startswith("  ") and line.split()]


def test_help_lists_every_command():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0, result.output
    listed = _listed_commands(result.output)
    missing = [c for c in COMMANDS if c not in listed]
    assert not missing, f"`rlkd --help` does not list {missing}; it lists {listed}"
    # pipeline order: stage 1 before stage 2 before the viewer
    assert listed.index("cache-teacher") < listed.index("train-student") < listed.index("inspect")


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(command):
    result = CliRunner().invoke(main, [command, "--help"], prog_name="rlkd")
    assert result.exit_code == 0, result.output
    assert f"rlkd {command}" in result.output and "Options:" in result.output


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"rlkd, version {rlkd.__version__}"


def test_unknown_command_is_a_usage_error():
    result = CliRunner().invoke(main, ["cache-techer"])
    assert result.exit_code == 2 and "No such command" in result.output


def _console_script() -> str:
    """The `rlkd` script installed beside this interpreter (the venv's bin/), else the one on PATH."""
    beside = Path(sys.executable).parent / "rlkd"
    found = str(beside) if beside.is_file() else shutil.which("rlkd")
    assert found, "the console script `rlkd` is not installed: run `pip install -e .` (or `make setup`)"
    return found


def test_installed_console_script():
    script = _console_script()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    help_run = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert help_run.returncode == 0, help_run.stderr
    listed = _listed_commands(help_run.stdout)
    assert [c for c in COMMANDS if c not in listed] == []
    version_run = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=120, env=env)
    assert version_run.returncode == 0 and version_run.stdout.strip() == f"rlkd, version {rlkd.__version__}"


def test_help_does_not_import_heavy_dependencies():
    """`rlkd --help` must stay instant: stage modules, vLLM and torch load only inside the commands."""
    code = ("import sys; from rlkd.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('vllm', 'torch', 'transformers') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "HEAVY []" in run.stdout, run.stdout
