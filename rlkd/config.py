"""Typed run configs: load a YAML file, apply command-line overrides, and report every problem at once.

Each stage defines one dataclass per concern with a docstring under every field; this module turns a YAML mapping
plus flags into an instance, rejecting unknown keys and wrong types together in one :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import json
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
            merged[name] = _coerce(value, hints[name], name, problems)
    missing = [
        n for n, f in fields.items()
        if n not in merged and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    problems += [f"{n}: required (give --{n.replace('_', '-')} or set it in the config file)" for n in missing]
    if problems:
        raise ConfigError(problems, source)
    cfg = cls(**merged)
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        problems = list(validate())
        if problems:
            raise ConfigError(problems, source)
    return cfg


def config_to_dict(cfg: Any) -> dict:
    """A JSON-safe dict of a config dataclass (paths as strings)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
