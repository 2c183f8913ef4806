"""Dependencies run one way: cli -> stages (pipeline, trainer, inspect) -> core -> cache. Checked on the source
(every import statement, lazy ones inside functions included) and by importing `rlkd inspect`'s modules in a fresh
interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

RLKD = Path(__file__).resolve().parents[1] / "rlkd"

FORBIDDEN = {
    "inspect": ("rlkd.trainer", "rlkd.pipeline"),
    "core": ("rlkd.trainer", "rlkd.pipeline", "rlkd.inspect", "rlkd.cli", "vllm"),
    "cache": ("rlkd.trainer", "rlkd.pipeline", "rlkd.inspect", "rlkd.core", "rlkd.cli"),
    "trainer": ("rlkd.pipeline", "rlkd.inspect", "rlkd.eval", "vllm"),
    "pipeline": ("rlkd.trainer", "rlkd.inspect", "rlkd.eval", "rlkd.cli"),
    "eval": ("rlkd.trainer", "rlkd.cli"),
    "models": ("rlkd.trainer", "rlkd.pipeline", "rlkd.inspect", "rlkd.eval", "rlkd.core", "rlkd.cache", "vllm"),
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in ``path``, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_against_the_flow(package):
    bad = []
    for path in sorted((RLKD / package).rglob("*.py")):
        for line, module in imported_modules(path):
            if any(module == f or module.startswith(f + ".") for f in FORBIDDEN[package]):
                bad.append(f"{path.relative_to(RLKD.parent)}:{line} imports {module}")
    assert not bad, "\n".join(bad)


def test_the_check_can_fail(tmp_path):
    (tmp_path / "m.py").write_text("def f():\n    from rlkd.trainer.losses import DistillLoss\n")
    assert (2, "rlkd.trainer.losses") in imported_modules(tmp_path / "m.py")


def test_inspect_loads_no_trainer_module():
    code = ("import sys\n"
            "import rlkd.inspect, rlkd.inspect.run, rlkd.inspect.student, rlkd.inspect.view, rlkd.inspect.report\n"
            "import rlkd.core.metrics, rlkd.core.targets, rlkd.core.sparse\n"
            "print(sorted(m for m in sys.modules if m.startswith(('rlkd.trainer', 'rlkd.pipeline', 'vllm'))))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=RLKD.parent, env={"PYTHONPATH": str(RLKD.parent), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
