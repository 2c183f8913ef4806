"""Keep the terminal for rlkd's own output; send what its dependencies print to a log file.

Starting vLLM prints dozens of INFO lines, a warm-up traceback, NUMA and deprecation warnings (some from C++, which no
Python setting reaches) and weight-loading bars; ``datasets`` adds "Generating train split" bars. Inside
:func:`dependency_output_to` all of that goes to a log file:

- file descriptors 1 and 2 point at the log file, which catches C/C++ writes and every Python handler, warning and
  progress bar bound to ``sys.stdout``/``sys.stderr``;
- rlkd's own progress bar and notes go to :func:`console`, a copy of the terminal's stderr taken before, and
  ``rlkd.*`` log records go there too (and into the log file);
- on exit everything is restored, so click's error messages and Python tracebacks reach the terminal.

Where stdout/stderr are not real files (click's ``CliRunner``), only the Python streams are swapped. ``--verbose``
skips the routing: everything reaches the terminal, as without rlkd.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import sys
from pathlib import Path
from typing import Iterator, TextIO

_console: TextIO | None = None


def console() -> TextIO:
    """Where rlkd's own progress and notes go: the terminal, also while dependency output goes to a log file."""
    return _console if _console is not None else sys.stderr


class _ConsoleHandler(logging.Handler):
    """``rlkd.*`` records to :func:`console`, looked up at each record (it changes inside the routing)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = console()
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never break the run
            self.handleError(record)


@contextlib.contextmanager
def dependency_output_to(path: Path | None, title: str = "rlkd") -> Iterator[Path | None]:
    """Route dependency output to ``path`` (appended, one header per run) for the duration; ``None``: no routing
    (``--verbose``). Either way ``rlkd.*`` records at INFO and above are shown on the terminal as ``rlkd: ...``."""
    global _console
    rlkd_log = logging.getLogger("rlkd")
    handler = _ConsoleHandler(logging.INFO)
    handler.setFormatter(logging.Formatter("rlkd: %(message)s"))
    rlkd_log.addHandler(handler)
    old_level = rlkd_log.level
    rlkd_log.setLevel(logging.INFO)
    if path is None:
        try:
            yield None
        finally:
            rlkd_log.removeHandler(handler)
            rlkd_log.setLevel(old_level)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    log_file = open(path, "a", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115 - closed below
    log_file.write(f"\n==== {title}: pid {os.getpid()}, {_dt.datetime.now().isoformat(timespec='seconds')}, "
                   f"{' '.join(sys.argv)}\n")
    file_handler = logging.StreamHandler(log_file)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    rlkd_log.addHandler(file_handler)
    rlkd_log.propagate = False  # the records are in the log file once, through file_handler
    old_out, old_err = sys.stdout, sys.stderr
    saved: tuple[int, int] | None = None
    try:
        if _real_fd(old_out) == 1 and _real_fd(old_err) == 2:
            old_out.flush()
            old_err.flush()
            saved = (os.dup(1), os.dup(2))
            _console = os.fdopen(os.dup(saved[1]), "w", buffering=1, encoding=old_err.encoding or "utf-8",
                                 errors="replace")
            os.dup2(log_file.fileno(), 1)
            os.dup2(log_file.fileno(), 2)
        else:  # no OS-level streams to redirect (e.g. click's CliRunner): swap the Python ones
            _console = old_err
            sys.stdout = sys.stderr = log_file
        yield path
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()  # what dependencies buffered belongs in the log, not on the restored terminal
        if saved is not None:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            with contextlib.suppress(Exception):
                _console.close()
        sys.stdout, sys.stderr = old_out, old_err
        _console = None
        rlkd_log.removeHandler(handler)
        rlkd_log.removeHandler(file_handler)
        rlkd_log.propagate = True
        rlkd_log.setLevel(old_level)
        log_file.close()


def _real_fd(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None
