"""Typed user-facing errors; the CLI maps each family to one exit code and one message.

Exit code 2 is bad input (the user can fix it by editing a file or a flag); exit code 1 is a
check that failed (the compile ran, but a rewrite or the lowered model broke its promise).
"""

from __future__ import annotations


class BertpressError(Exception):
    """Base of every error bertpress reports to a user instead of a traceback."""

    exit_code = 2

    def __init__(self, message: str, *, file: str | None = None, field: str | None = None, fix: str | None = None):
        self.message = message
        self.file = file
        self.field = field
        self.fix = fix
        super().__init__(self.render())

    def render(self) -> str:
        where = ""
        if self.file and self.field:
            where = f"{self.file}: {self.field}: "
        elif self.file:
            where = f"{self.file}: "
        elif self.field:
            where = f"{self.field}: "
        text = where + self.message
        if self.fix:
            text += f" Fix: {self.fix}"
        return text


class RecipeError(BertpressError):
    """The recipe file is malformed, names an unknown pass or field, or has a value out of range."""


class ModelError(BertpressError):
    """The model folder is missing, unsupported, corrupted or does not match its tokenizer."""


class CalibrationError(BertpressError):
    """The calibration text cannot be read or is empty."""


class UnsupportedModelError(ModelError):
    """The structure analysis could not find the BERT structure a pass needs."""


class PassRefused(BertpressError):
    """A pass cannot apply to this graph with this config (its reason is actionable)."""


class CheckFailed(BertpressError):
    """A validation check failed after a pass or after lowering (the compile ran; the result broke a promise)."""

    exit_code = 1
