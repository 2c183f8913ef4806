"""The CLI is generated from the config dataclasses: every flag is a field, its shown default is the field's default,
and every flag that the code, the docs or an error message tells a user to type exists."""

from __future__ import annotations

import ast
import dataclasses
import re
import typing
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from rlkd.cli import main
from rlkd.config import build_config, cli_fields, field_docs, flag_of, format_default

ROOT = Path(__file__).resolve().parent.parent
FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)(?![\w{-])")

EXTERNAL_FLAGS = {
    # pip, torchrun, pytest, make, vLLM/HF/chromium and shell tools mentioned in docs and comments
    "no-deps", "force-reinstall", "upgrade", "nproc-per-node", "nnodes", "rdzv-endpoint", "standalone",
    "headless", "no-sandbox", "disable-gpu", "dump-dom", "user-data-dir", "virtual-time-budget", "window-size",
    "disable-quic", "no-first-run", "disable-background-networking", "disable-component-update", "disable-sync",
    "max-model-len", "gpu-memory-utilization", "array", "gpus", "quiet", "ntasks", "help", "version", "prefix",
    "local-dir", "long",
    "timeout", "durations", "extra-index-url", "index-url", "no-cache-dir", "cov", "basetemp", "ignore", "deselect",
}
"""Flags of other tools (and of rlkd's own bench/experiment scripts, which take argparse flags)."""


def _commands() -> dict[str, click.Command]:
    return {name: main.commands[name] for name in main.list_commands(None)}


def _flags(command: click.Command) -> set[str]:
    out = set()
    for p in command.params:
        for opt in getattr(p, "opts", []) + getattr(p, "secondary_opts", []):
            if opt.startswith("--"):
                out.add(opt[2:])
    return out


def _config_classes(command_name: str) -> tuple[type, ...]:
    from rlkd import cli

    decorated = {
        "cache-teacher": (cli.CacheTeacherConfig,), "cache-merge": (cli.MergeOptions,),
        "train-student": tuple(cli.TRAIN_SECTIONS.values()), "inspect": (cli.InspectOptions,),
        "verify": (cli.VerifyOptions,), "make-student": (cli.MakeStudentOptions,),
        "convert-teacher": (cli.ConvertTeacherOptions,), "eval": (cli.EvalConfig,),
    }
    return decorated[command_name]


@pytest.mark.parametrize("name", list(_commands()))
def test_every_option_is_a_documented_config_field_with_its_default_shown(name):
    command = _commands()[name]
    fields = {f.name: (cls, f) for cls, f in cli_fields(*_config_classes(name))}
    params = {p.name: p for p in command.params}
    assert set(params) - {"config_file"} == set(fields), f"{name}: options and config fields differ"
    for pname, param in params.items():
        if pname == "config_file":
            continue
        cls, f = fields[pname]
        assert field_docs(cls).get(f.name), f"{cls.__name__}.{f.name} has no docstring, so no --help"
        if isinstance(param, click.Argument):
            continue
        assert param.default is None, f"--{pname}: flags must default to unset so YAML values are not overridden"
        shown = re.search(r"\[default: (.*?)\]$", param.help or "")
        expected = format_default(dataclasses.MISSING if f.default is dataclasses.MISSING and
                                  f.default_factory is dataclasses.MISSING else
                                  (f.default if f.default is not dataclasses.MISSING else f.default_factory()))
        assert (shown.group(1) if shown else None) == expected, f"{name} {flag_of(f)}: help default differs"


def test_help_of_every_command_shows_defaults_from_the_dataclasses():
    runner = CliRunner()

    def option_text(command: str, flag: str) -> str:
        out = runner.invoke(main, [command, "--help"]).output
        m = re.search(rf"\n  {flag} (.*?)(?=\n  -)", out, flags=re.S)
        assert m, f"{flag} not in `rlkd {command} --help`"
        return " ".join(m.group(1).split())

    assert option_text("train-student", "--rank-k").startswith("INTEGER")
    assert option_text("train-student", "--rank-k").endswith("[default: 5]")
    assert option_text("train-student", "--loss").startswith("[forward_kl|reverse_kl|tvd|none]")
    assert option_text("cache-teacher", "--top-k").endswith("[default: 20]")
    assert option_text("cache-teacher", "--enforce-eager").endswith("[default: off]")
    for name in _commands():
        result = runner.invoke(main, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)


def _strings_in_python(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            out.append(node.value)
        elif isinstance(node, ast.JoinedStr):
            out.append("".join(v.value for v in node.values if isinstance(v, ast.Constant)))
    return out


def test_every_flag_named_in_code_messages_docstrings_and_docs_exists():
    from rlkd.demo import DemoConfig

    known = set().union(*(_flags(c) for c in _commands().values()))
    known |= {f.name.replace("_", "-") for f in dataclasses.fields(DemoConfig)}  # `python -m rlkd.demo --...`
    for script in [*(ROOT / "bench").glob("*.py"), *(ROOT / "experiments").glob("*.py")]:  # their argparse flags
        known |= set(re.findall(r"add_argument\(\s*\"--([a-z0-9-]+)\"", script.read_text()))
    texts: list[tuple[str, str]] = []
    for path in sorted((ROOT / "rlkd").rglob("*.py")):
        texts += [(str(path.relative_to(ROOT)), s) for s in _strings_in_python(path)]
        texts += [(str(path.relative_to(ROOT)), line) for line in path.read_text().splitlines()
                  if line.lstrip().startswith("#")]
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        if doc.is_file():
            texts.append((doc.name, doc.read_text()))
    def exists(flag: str) -> bool:
        return flag in known or (flag.startswith("no-") and flag[3:] in known) or flag in EXTERNAL_FLAGS

    unknown = sorted({(where, m.group(1)) for where, text in texts for m in FLAG.finditer(text)
                      if not exists(m.group(1))})
    assert not unknown, f"flags that no rlkd command has: {unknown}"


def _readme_commands(text: str) -> list[str]:
    """Every rlkd command line in the README: lines of fenced code blocks, and inline `rlkd ...` code spans."""
    lines = []
    for i, block in enumerate(re.split(r"^```.*$", text, flags=re.M)):
        if i % 2:  # inside a fence
            joined = re.sub(r"\\\n\s*", " ", block)  # backslash-continued lines
            lines += [re.sub(r"^\$ ", "", line.strip()) for line in joined.splitlines()]
        else:
            lines += re.findall(r"`(rlkd [^`]+)`", block)
    return [line.split("#")[0] for line in lines if line.startswith("rlkd ")]


def test_readme_commands_use_each_commands_own_flags():
    commands = _commands()
    checked = 0
    for line in _readme_commands((ROOT / "README.md").read_text()):
        name = line.split()[1]
        if name not in commands:
            continue
        own = _flags(commands[name]) | {"help"}
        bad = [f for f in FLAG.findall(line) if f not in own]
        assert not bad, f"README: `rlkd {name}` has no {bad}: {line}"
        checked += 1
    assert checked >= 10


def test_yaml_can_set_every_option_including_ray_and_nproc(tmp_path):
    from rlkd.pipeline.config import CacheTeacherConfig
    from rlkd.trainer.config import build_train_config

    cfg = build_config(CacheTeacherConfig, yaml.safe_load(
        "teacher: t\ndataset: d\nout: o\nray: true\nreplicas: 3\nray-address: auto\nprogress: false\n"))
    assert (cfg.ray, cfg.replicas, cfg.ray_address, cfg.progress) == (True, 3, "auto", False)
    tc = build_train_config(yaml.safe_load("run: {student: s, out: o, nproc: 4}\ndata: {cache: c}\nmax_steps: 3\n"))
    assert tc.run.nproc == 4
    # flags win over the file; unset flags (None) leave the file's value
    tc = build_train_config({"student": "s", "out": "o", "cache": "c", "max_steps": 3, "lr": 0.5},
                            {"lr": None, "max_steps": 7})
    assert (tc.optim.lr, tc.optim.max_steps) == (0.5, 7)


@pytest.mark.parametrize("cls_path", ["rlkd.pipeline.config:CacheTeacherConfig", "rlkd.trainer.config:RunConfig",
                                      "rlkd.trainer.config:DataConfig", "rlkd.trainer.config:OptimConfig",
                                      "rlkd.trainer.config:LossConfig"])
def test_non_finite_numbers_are_refused_for_every_float_option(cls_path):
    import importlib

    module, name = cls_path.split(":")
    cls = getattr(importlib.import_module(module), name)
    hints = typing.get_type_hints(cls)
    floats = [f.name for f in dataclasses.fields(cls) if float in (hints[f.name], *typing.get_args(hints[f.name]))]
    assert floats or name == "RunConfig"
    from rlkd.config import ConfigError

    for fname in floats:
        for bad in ("nan", "inf", "-inf"):
            with pytest.raises(ConfigError, match=rf"{fname} \(--[a-z0-9-]+\): expected a finite number"):
                build_config(cls, {"teacher": "t", "dataset": "d", "out": "o", "student": "s", "cache": "c",
                                   "max_steps": 3}, {fname: bad})


def test_lr_nan_on_the_command_line_is_one_usage_error():
    result = CliRunner().invoke(main, ["train-student", "--student", "s", "--cache", "c", "--out", "o",
                                       "--max-steps", "2", "--lr", "nan"])
    assert result.exit_code == 2 and "lr (--lr): expected a finite number" in result.output
    assert "Traceback" not in result.output
