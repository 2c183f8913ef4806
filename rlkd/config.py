"""Typed run configs: the single source of truth for every command's options, YAML keys, defaults and help.

Each command defines one dataclass per concern with a docstring under every field. This module

* turns a YAML mapping plus flags into an instance (:func:`build_config`), rejecting unknown keys, wrong types and
  non-finite numbers, then running the dataclass's own ``validate()``: every problem is reported together in one
  :class:`ConfigError`;
* generates the click options of a command from the same dataclasses (:func:`config_options`): the flag is the field
  name with dashes, the type and choices come from the annotation, the help is the field's docstring, and the shown
  default is the dataclass default. Flags default to ``None`` (unset), so a YAML file can supply a value and a flag
  given on the command line wins.

Field metadata (``dataclasses.field(metadata=...)``) tunes the generated option: ``flag`` (another flag name, e.g.
``--loss`` for the field ``kd``), ``cli=False`` (not a flag: YAML only, or an argument), ``metavar``.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import math
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """One or more configuration problems, all listed in the message."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in {source}:\n{lines}")


def _coerce(value: Any, annotation: Any, name: str, problems: list[str]) -> Any:
    """Convert YAML/CLI scalars to the field's type where that is unambiguous; record a problem otherwise."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing))  # noqa: S307 - annotations of our own dataclasses
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _coerce(value, non_none[0], name, problems)
        return value
    if origin is typing.Literal:
        if value not in args:
            problems.append(f"{name}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            problems.append(f"{name}: expected a list, got {value!r}")
            return value
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{name}[{i}]", problems) for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        problems.append(f"{name}: expected true or false, got {value!r}")
        return value
    if annotation in (int, float):
        if isinstance(value, bool):
            problems.append(f"{name}: expected a number, got {value!r}")
            return value
        try:
            converted = annotation(value)
        except (TypeError, ValueError):
            problems.append(f"{name}: expected {annotation.__name__}, got {value!r}")
            return value
        if annotation is int and isinstance(value, float) and not value.is_integer():
            problems.append(f"{name}: expected an integer, got {value!r}")
        if annotation is float and not math.isfinite(converted):
            problems.append(f"{name}: expected a finite number, got {value!r}")
        return converted
    if annotation is str:
        return str(value)
    return value


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, naming the file in any error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file {path} does not exist"], source=str(path))
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"{path} is not valid YAML: {e}"], source=str(path)) from e
    if not isinstance(data, dict):
        raise ConfigError([f"{path} must hold a mapping of option: value, got {type(data).__name__}"], str(path))
    return data


def build_config(cls: type[T], *layers: dict | None, source: str = "config") -> T:
    """Build ``cls`` from mappings applied in order (YAML file, then flags); ``None`` values are ignored.

    Unknown keys, type errors, and the dataclass's own ``validate()`` problems are reported together.
    Keys may use dashes or underscores.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    merged: dict[str, Any] = {}
    problems: list[str] = []
    for layer in layers:
        for key, value in (layer or {}).items():
            if value is None:
                continue
            name = key.replace("-", "_")
            if name not in fields:
                close = [f for f in fields if f.startswith(name[:3])]
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                problems.append(f"unknown option {key!r}{hint}")
                continue
            before = len(problems)
            value = _coerce(value, hints[name], f"{name} ({flag_of(fields[name])})", problems)
            if len(problems) == before:
                merged[name] = value
            else:  # reported; the cross-field checks below see the default instead
                merged.pop(name, None)
    missing = [n for n, f in fields.items() if n not in merged and field_default(f) is dataclasses.MISSING]
    if missing:
        # Without a required value there is no config to cross-check; what is known so far is reported now.
        problems += [f"{n}: required (give --{n.replace('_', '-')} or set it in the config file)" for n in missing
                     if not any(p.startswith(f"{n}:") for p in problems)]
        raise ConfigError(problems, source)
    cfg = cls(**merged)
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        problems += list(validate())  # the type problems above and the cross-field ones, together
    if problems:
        raise ConfigError(problems, source)
    return cfg


def config_to_dict(cfg: Any) -> dict:
    """A JSON-safe dict of a config dataclass (paths as strings)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


# ---- the CLI, generated from the same dataclasses ------------------------------------------------------------------

@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal under it in the class body), whitespace-normalised.

    Python keeps no such docstrings at run time, so they are read from the source, as litgpt's and jsonargparse's
    CLIs do. Inherited fields are looked up in the base classes.
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for a, b in zip(body, body[1:]):
            if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                    and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
                docs[a.target.id] = inspect.cleandoc(b.value.value)
    return docs


def flag_of(f: dataclasses.Field) -> str:
    """The command-line flag of a config field: ``metadata["flag"]`` or ``--`` plus the name with dashes."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        non_none = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(non_none) == 1:
            return non_none[0]
    return annotation


def field_default(f: dataclasses.Field) -> Any:
    """The dataclass default of a field (``MISSING`` when it is required)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _rst_to_text(doc: str) -> str:
    """Docstring markup to plain help text: ``code`` -> `code`, paragraphs joined by one space."""
    text = re.sub(r"``(.+?)``", r"`\1`", doc)
    text = re.sub(r":(?:class|func|meth|mod|data|attr):`~?([^`]+)`", r"\1", text)
    return " ".join(text.split())


def format_default(value: Any) -> str | None:
    """How a default is shown in ``--help`` (None: not shown)."""
    if value is dataclasses.MISSING or value is None:
        return None
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def option_help(cls: type, f: dataclasses.Field) -> str:
    """``--help`` text of a field: its docstring (first paragraph) and its dataclass default."""
    doc = field_docs(cls).get(f.name, "")
    first = _rst_to_text(doc.split("\n\n")[0]) if doc else ""
    shown = format_default(field_default(f))
    required = field_default(f) is dataclasses.MISSING
    suffix = " [required]" if required else (f" [default: {shown}]" if shown is not None else "")
    return (first + suffix).replace("%", "%%") if first else suffix.strip()


def click_option(cls: type, f: dataclasses.Field):
    """One click option for one config field; its value is ``None`` when the flag is not given.

    A field with ``metadata["argument"]`` becomes a positional argument instead (a list field takes any number).
    """
    import click

    hints = typing.get_type_hints(cls)
    annotation = _unwrap_optional(hints[f.name])
    if f.metadata.get("argument"):
        many = typing.get_origin(annotation) in (list, tuple)
        required = field_default(f) is dataclasses.MISSING
        return click.argument(f.name, nargs=-1 if many else 1, required=required,
                              metavar=f.metadata.get("metavar", f.name.upper() + ("..." if many else "")))
    flag = flag_of(f)
    kwargs: dict[str, Any] = {"default": None, "help": option_help(cls, f)}
    if "metavar" in f.metadata:
        kwargs["metavar"] = f.metadata["metavar"]
    if annotation is bool:
        return click.option(f"{flag}/--no-{flag[2:]}", f.name, **kwargs)
    if typing.get_origin(annotation) is typing.Literal:
        kwargs["type"] = click.Choice([str(a) for a in typing.get_args(annotation)])
    elif annotation in (int, float):
        kwargs["type"] = annotation
    return click.option(flag, f.name, **kwargs)


def cli_fields(*classes: type) -> list[tuple[type, dataclasses.Field]]:
    """The (class, field) pairs that become flags, in declaration order; ``metadata["cli"] = False`` opts out."""
    out, seen = [], set()
    for cls in classes:
        for f in dataclasses.fields(cls):
            if f.metadata.get("cli", True) is False:
                continue
            if f.name in seen:
                raise TypeError(f"config field {f.name!r} appears in two sections; names must be unique")
            seen.add(f.name)
            out.append((cls, f))
    return out


def config_options(*classes: type, config_file: bool = True):
    """Decorator: add one click option per field of ``classes`` (and ``--config FILE``) to a command.

    The command receives every field by name (``None`` when unset) and ``config_file``. Build the config with
    :func:`build_config` (or a section router) from ``load_yaml(config_file)`` and those flags.
    """
    import click

    def decorate(command):
        for cls, f in reversed(cli_fields(*classes)):
            command = click_option(cls, f)(command)
        if config_file:
            command = click.option(
                "--config", "config_file", type=click.Path(dir_okay=False), default=None,
                help="YAML file with any of these options (keys with underscores or dashes); flags override it.",
            )(command)
        return command

    return decorate
