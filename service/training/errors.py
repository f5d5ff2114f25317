"""The training commands' expected failures (standard library only, so the CLI can catch them without peft)."""

from __future__ import annotations


class DataError(ValueError):
    """A data file cannot be used. The message names the file and every bad line (up to a limit)."""


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; nothing was saved."""
