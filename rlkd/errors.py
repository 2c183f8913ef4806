"""The one error type the command line shows without a traceback.

Every error a user can fix (a bad file, a cache that cannot be used, a student that does not match) derives from
:class:`UserError`; ``rlkd``'s command group prints its message and exits 1. Configuration problems are
:class:`rlkd.config.ConfigError` (exit 2, like any usage error). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; the message names the file, row or option at fault and says how."""


class MissingPackageError(UserError, ImportError):
    """An optional package a command needs is not installed; the message says what to install."""
