"""User-facing errors: one line naming the file, key or value and what to do about it."""

from __future__ import annotations


class PstageError(Exception):
    """A problem with the user's input or environment; the CLI prints it as one line, no traceback."""


class ConfigError(PstageError):
    """An invalid config key or value."""


class DataError(PstageError):
    """A missing, malformed or unreadable data file."""


class RunError(PstageError):
    """A run directory that cannot be used as asked (missing, unfinished, different settings)."""
