"""Errors a user can cause and fix. Entry points print them as one line without a traceback (exit code 2);
every other exception is a bug and keeps its traceback.

Each subclass also derives from the built-in exception it used to be, so ``except ValueError`` in library code
keeps working.
"""
from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""


class ConfigError(UserError, ValueError):
    """A bad configuration value, yaml file or command-line flag."""


class DataError(UserError, ValueError):
    """The clean data (or a file of it) is missing, corrupt or unusable."""


class DatasetNotFound(UserError, FileNotFoundError):
    """A dataset's files are not where the record or the flags say (the message shows the expected layout)."""


class OutputError(UserError, FileExistsError):
    """An output cannot be written as asked (it exists, it would delete results, its name is unsafe)."""


class TrainingDiverged(UserError, RuntimeError):
    """Training made no step, or its loss / weights became non-finite or exploded; nothing from the run is saved."""
