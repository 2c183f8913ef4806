"""The error of the model tools."""

from __future__ import annotations

from rlkd.errors import UserError


class ModelToolError(UserError, ValueError):
    """A model folder, layer list or student config that cannot be used; the message says how to fix it."""
