"""Files written so that a crash never leaves a half-written one behind, their checksums, JSON Lines, and the
folders a command writes: locked against a second writer, never overwritten unasked."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from llamalite.errors import BusyError, ConfigError

logger = logging.getLogger(__name__)


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


# ------------------------------------------------------------------------------------------------- folders
LOCK_FILE = ".lock"


@contextmanager
def folder_lock(folder: str | Path, activity: str) -> Iterator[None]:
    """Hold an exclusive lock on `folder` while the block runs, doing `activity` ("trained", "prepared"): a second
    process asking for it gets BusyError, naming the holder and what it does.

    The lock is an flock on folder/.lock, so the kernel releases it when the process ends, however it ends (a kill -9
    leaves no stale lock). The file itself stays: it names the last holder, for the message."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BusyError(f"{folder} is being {_lock_holder(fd)}: wait for it to end or stop it "
                            "(two processes writing one folder corrupt each other's files)") from None
        except OSError as exc:  # a filesystem without flock (some network mounts): go on unprotected
            logger.warning(f"cannot lock {folder / LOCK_FILE} ({exc.strerror}): nothing stops a second process "
                           "from writing the same folder")
        holder = {"activity": activity, "pid": os.getpid(), "host": socket.gethostname(),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode("utf-8"), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _lock_holder(fd: int) -> str:
    """'<activity> by process P on host H (since T)', from what the holder wrote into the lock file."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return (f"{holder['activity']} by process {holder['pid']} on host {holder['host']} "
                f"(since {holder['since']})")
    except (OSError, ValueError, KeyError, TypeError):
        return "written by another process"


def check_output_dir(out_dir: str | Path, force: bool, what: str) -> None:
    """An output folder must be new or empty, unless `force`: then the command's files replace those of the same
    names, and nothing else in the folder is touched."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir} is a file: pass a folder for {what}")
    entries = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if entries and not force:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise ConfigError(f"{out_dir} is not empty ({shown}): choose a new folder for {what}, or pass --force to "
                          "write into it (files of the same names are replaced; nothing else is deleted)")


def move_into(source: Path, out_dir: Path, last: str | None = None, weights: tuple[str, ...] = ()) -> None:
    """Move the files of the folder `source` into `out_dir` (created if needed), replacing files of the same relative
    paths and leaving every other file of out_dir alone; `source` is removed. `last`, a file name of `source`, moves
    after all others (a checksums file: readers see the folder incomplete until then).

    `weights` are glob patterns of files that readers take for the folder's weights: one in out_dir that `source`
    would not replace (an old single file beside new shards, say) is refused rather than left to be loaded."""
    if not out_dir.exists() or not any(out_dir.iterdir()):
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, out_dir)  # rename(2) replaces an empty folder
        fsync_dir(out_dir.parent)
        return
    stale = sorted({p.name for pattern in weights for p in out_dir.glob(pattern)}
                   - {p.name for pattern in weights for p in source.glob(pattern)})
    if stale:
        shutil.rmtree(source)
        raise ConfigError(f"{out_dir} holds {', '.join(stale)}, which this command would not replace and which "
                          "loaders would take for the new weights: remove it, or choose a new folder")
    if last is not None:
        (out_dir / last).unlink(missing_ok=True)
    files = sorted((f for f in source.rglob("*") if f.is_file()), key=lambda f: f.name == last)
    for file in files:
        target = out_dir / file.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(file, target)
    fsync_dir(out_dir)
    shutil.rmtree(source)
