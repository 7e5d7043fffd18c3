"""Shared pieces of the adversarial suite (issue 28): every property is tried over every command and file format.

A case passes when the command exits 0, or exits 2 with exactly one line on stderr that starts with
`llamalite: error:` -- never a traceback, never a hang, never a lost file, never code run from a file.
"""

from __future__ import annotations

import hashlib
import os
import signal
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from llamalite.cli import main

ERROR_PREFIX = "llamalite: error:"


@dataclass
class Outcome:
    code: int
    out: str
    err: str


def run_main(capsys, argv: list[str]) -> Outcome:
    """llamalite's main() in this process; a traceback fails the test by propagating."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return Outcome(code, captured.out, captured.err)


def assert_clean_outcome(outcome: Outcome, allow_success: bool = True) -> None:
    """Exit 0 (when allowed), or exit 2 with one `llamalite: error:` line on stderr (log lines before it are fine)."""
    if outcome.code == 0 and allow_success:
        return
    assert outcome.code == 2, f"exit {outcome.code}, stderr: {outcome.err[-2000:]}"
    lines = [line for line in outcome.err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith(ERROR_PREFIX), outcome.err[-2000:]
    assert "Traceback" not in outcome.err, outcome.err[-2000:]


def tree_snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `folder` (the .lock file of a locked folder aside)."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    if folder.is_file():
        return {".": hashlib.sha256(folder.read_bytes()).hexdigest()}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def assert_untouched(before: dict[str, str], folder: Path) -> None:
    after = tree_snapshot(folder)
    lost = {name for name in before if name not in after}
    changed = {name for name in before if name in after and after[name] != before[name]}
    assert not lost and not changed, f"lost: {sorted(lost)}, changed: {sorted(changed)}"


@pytest.fixture
def canary(tmp_path, monkeypatch) -> Path:
    """A path that a planted pickle would create if it ever ran; the tests assert it never exists."""
    path = tmp_path / "CODE_RAN"
    monkeypatch.setenv("LLAMALITE_CANARY", str(path))
    return path


class CodeRunningPickle:
    """Unpickling this runs `open(<canary>, 'w')`: the proof of code execution the trust-boundary tests look for."""

    def __init__(self, canary_path: str | os.PathLike):
        self.canary_path = str(canary_path)

    def __reduce__(self):
        return (open, (self.canary_path, "w"))


class Hung(AssertionError):
    """A command that did not finish in time: a failure, never an OSError (as TimeoutError is) that the code under
    test might catch."""


@contextmanager
def fails_after(seconds: int):
    """A hang fails the test instead of hanging the suite."""
    def expired(signum, frame):
        raise Hung(f"no answer in {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
