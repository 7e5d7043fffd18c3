"""Files written so that a crash never leaves a half-written one behind, their checksums, and JSON Lines."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO


def sha256_file(path: str | Path, block_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(block_size):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write a file through `write(f)` so that readers see either the old file or the complete new one."""
    path = Path(path)
    with _temp_file_beside(path) as (f, temp_path):
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp_path, path)
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


@contextmanager
def _temp_file_beside(path: Path) -> Iterator[tuple[BinaryIO, Path]]:
    # Same folder, so that the rename is atomic (one filesystem); mode 0o666 & ~umask like any new file.
    temp_path = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f, temp_path
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise


def fsync(path: str | Path) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: str | Path) -> None:
    """fsync a folder where the platform allows it (the rename before it is atomic either way)."""
    try:
        fsync(folder)
    except OSError:
        pass


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON Lines file; a torn last line (a writer killed mid-line, or still writing) is skipped."""
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    records = []
    for number, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines) - 1:
                raise
    return records


class JsonlWriter:
    """Appends one JSON record per line, flushed at once (readers and a crash see whole records)."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
