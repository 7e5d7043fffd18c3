"""The one family of user errors.

A `LlamaliteError` is a problem the user can fix (a bad setting, missing data, a damaged checkpoint), worded as one
line that names the problem and the fix. The CLI prints it as such and exits with code 2. Any other exception is a
bug: it keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LlamaliteError(Exception):
    """A problem the user can fix, worded as one line that names the problem and the fix."""


class ConfigError(LlamaliteError):
    """A configuration or command-line setting that cannot work."""


class DataError(LlamaliteError):
    """Input data (corpus, shards, instruction records, task files) that cannot be read or used."""


class CheckpointError(LlamaliteError):
    """A checkpoint that is incomplete, corrupted or unusable."""


class TrainError(LlamaliteError):
    """A training run whose set-up or state cannot go on."""


class BusyError(LlamaliteError):
    """A run directory or output folder that another live process is writing."""


class DistributedError(LlamaliteError):
    """A multi-process set-up problem (torchrun environment, parallelism settings)."""


class EvalError(LlamaliteError):
    """A benchmark that cannot be scored with this model."""


class ExportError(LlamaliteError):
    """A checkpoint or transformers folder that cannot be converted."""


class ReportError(LlamaliteError):
    """Run directories that cannot be reported on."""


def did_you_mean(name: str, choices: Iterable[str], prefix: str = "", otherwise: str = "choose one of") -> str:
    """'did you mean 'x'?' for the closest of `choices`, else '<otherwise> a, b, c' (each prefixed by `prefix`)."""
    choices = list(choices)
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    if close:
        return f"did you mean '{prefix}{close[0]}'?"
    return f"{otherwise} {', '.join(prefix + choice for choice in choices)}"
