"""Files written so that a crash never leaves a half-written one behind, their checksums, JSON Lines, and the
folders a command writes: locked against a second writer, never overwritten unasked."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import yaml

from llamalite.errors import BusyError, ConfigError
from llamalite.records import read_run_records
from llamalite.schema import load_yaml

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
    """The records of a run's own JSON Lines file (metrics, events, evals, samples); a torn or malformed line anywhere
    (a writer killed mid-line, a full disk) is skipped, counted and logged: records.read_run_records."""
    return read_run_records(path)[0]


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


# ------------------------------------------------------------------------------------------------- output policy
# One policy for every command that writes (docs/safety.md): it writes only into a folder that is absent, empty, or
# one it made earlier for the same purpose; never into or onto its own inputs, nor into another llamalite artifact;
# --force replaces only the command's own files; a refusal comes before the first byte is written.
OUTPUT_MARKER = ".llamalite-output.json"
ARTIFACT_NAMES = {
    "checkpoint": "a checkpoint directory",
    "run": "a run directory",
    "sft-run": "a fine-tuning run directory",
    "prepared-data": "a prepared data folder",
    "hf-export": "a transformers model folder",
    "adapter": "a PEFT adapter folder",
    "report": "a report folder",
    "eval-results": "an evaluation results file",
}
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_NOT_CONTENT = {OUTPUT_MARKER, LOCK_FILE}  # what an otherwise empty folder may hold
MAX_RECOGNISED_BYTES = 64 << 20  # an output file larger than this is not one llamalite wrote (results are small)


def read_marker(folder: Path) -> str | None:
    """The purpose recorded by the command that made `folder`, or None (no marker, or an unreadable one)."""
    try:
        marker = json.loads((Path(folder) / OUTPUT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    purpose = marker.get("purpose") if isinstance(marker, dict) else None
    return purpose if isinstance(purpose, str) else None


def artifact_kind(folder: Path) -> str | None:
    """What llamalite output `folder` holds: its marker's purpose, else what its files show (folders written before
    the marker existed); None for a folder that is none."""
    folder = Path(folder)
    marked = read_marker(folder)
    if marked is not None:
        return marked
    try:
        names = set(os.listdir(folder))
    except OSError:
        return None
    if names & {"trainer_state.json", "checksums.json"} or (folder / "dcp" / ".metadata").is_file():
        return "checkpoint"
    if names & {"metrics.jsonl", "events.jsonl"} or (folder / "checkpoints" / "latest").exists() or (
            {"config.yaml", LOCK_FILE} <= names):
        return "sft-run" if _is_fine_tuning_run(folder) else "run"
    if ".prepare_progress.json" in names or ("manifest.json" in names and _is_data_manifest(folder / "manifest.json")):
        return "prepared-data"
    if "adapter_config.json" in names:
        return "adapter"
    if "config.json" in names and names & set(_HF_WEIGHTS):
        return "hf-export"
    if {"index.html", "loss.png"} <= names:
        return "report"
    return None


def _is_fine_tuning_run(folder: Path) -> bool:
    """A run directory made before markers existed is a fine-tuning run when its config.yaml names an sft.base."""
    try:
        config = load_yaml((folder / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return False
    sft = config.get("sft") if isinstance(config, dict) else None
    return isinstance(sft, dict) and bool(sft.get("base"))


def _is_data_manifest(path: Path) -> bool:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "splits" in manifest and "format_version" in manifest


@dataclass
class OutputClaim:
    """The right to write `path` for `purpose`, granted by claim_output after every check. Nothing exists on disk
    until create() (or writing()/temp_dir()) makes it."""

    path: Path
    purpose: str
    is_file: bool = False
    _made: list[Path] = field(default_factory=list)  # what this claim created, to remove after a failure

    def create(self) -> Path:
        """Make the folder (and its parents) with the purpose marker; for a file output, its parent folder."""
        folder = self.path.parent if self.is_file else self.path
        try:
            missing = [p for p in [folder, *folder.parents] if not p.exists()]
            if missing:
                folder.mkdir(parents=True, exist_ok=True)
                self._made.append(missing[-1])
            marker = folder / OUTPUT_MARKER
            if not self.is_file and read_marker(folder) != self.purpose:
                atomic_write_text(marker, json.dumps({"purpose": self.purpose}) + "\n")
                self._made.append(marker)
        except OSError as exc:
            raise ConfigError(f"cannot write {folder} ({exc.strerror or exc}): choose a writable folder") from None
        return self.path

    def undo(self) -> None:
        """Remove what this claim created (the folder it made, or the marker it added), nothing else."""
        for path in reversed(self._made):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        self._made.clear()

    @contextmanager
    def writing(self, temporaries: tuple[Path, ...] = (), own_files: tuple[str, ...] = (),
                keep: Callable[[], bool] | None = None) -> Iterator[Path]:
        """create(), then the block; if the block fails, undo() and remove the `temporaries` (folders the block
        writes before its commit) that did not exist before it: an all-or-nothing command leaves nothing behind.

        A resumable command names the files it writes into the folder (`own_files`: those absent before the block
        are removed too, .lock included) and `keep`, asked after a failure: True when the block left work that the
        same command resumes from (then nothing is removed)."""
        new_temporaries = [Path(t) for t in temporaries if not Path(t).exists()]
        folder = self.path.parent if self.is_file else self.path
        new_files = [folder / name for name in own_files if not (folder / name).exists()]
        self.create()
        try:
            yield self.path
        except BaseException:
            if keep is not None and keep():
                raise
            for temporary in new_temporaries:
                shutil.rmtree(temporary, ignore_errors=True)
            for file in new_files:
                file.unlink(missing_ok=True)
            self.undo()
            raise

    @contextmanager
    def temp_dir(self) -> Iterator[Path]:
        """A new temporary folder beside the output (same filesystem: its files move in by rename), removed when
        the block ends, however it ends. Its name is new, so no folder of the user's is ever taken for it."""
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp_{self.path.name}.", dir=self.path.parent))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def claim_output(
    path: str | Path,
    purpose: str,
    what: str,
    *,
    inputs: tuple[str | Path | None, ...] | list[str | Path | None] = (),
    force: bool = False,
    force_hint: str | None = "--force",
    rerun: bool = False,
    same_inputs: Callable[[Path], str | None] | None = None,
    own_slots: tuple[Path, ...] | list[Path] = (),
) -> OutputClaim:
    """Check, before anything is written, that a command may write the folder `path` for `purpose` (one of
    ARTIFACT_NAMES; `what` names it in messages), and return the claim it writes through. Raises ConfigError with
    one line when it may not:

    - `path` is a file, or lies under one; or cannot be written (read-only, no permission);
    - `path` is one of `inputs` (what the command reads), lies inside one, or holds one;
    - `path` lies inside another llamalite artifact (a checkpoint, run directory, prepared data, ...) or is one that
      the command does not make; `own_slots` are folders inside inputs or artifacts that belong to this purpose
      (a run's report/ folder);
    - `path` holds this purpose's earlier output: allowed when `rerun` (the command resumes or updates it) and
      `same_inputs(path)` gives no reason it was made from other inputs, else only with `force`;
    - `path` holds other files: allowed only with `force` (the command then replaces its own files of the same
      names and deletes nothing else). `force_hint` names that opt-in (None: the command has none).
    """
    path = Path(path).expanduser()
    try:
        return _claim(path, purpose, what, inputs, force, force_hint, rerun, same_inputs, own_slots, is_file=False)
    except OSError as exc:  # a folder that cannot be listed or read: one line, not a traceback
        raise ConfigError(f"cannot check {path} for {what} ({exc.strerror or exc}): choose another folder") from None


def claim_output_file(
    path: str | Path,
    purpose: str,
    what: str,
    *,
    inputs: tuple[str | Path | None, ...] | list[str | Path | None] = (),
    recognise: Callable[[Path], bool] = lambda path: False,
) -> OutputClaim:
    """The same policy for a command that writes one file: `path` may be absent, or a file that `recognise` takes for
    this purpose's earlier output (then it is replaced); never a folder, an input, nor inside an artifact. Only a
    regular file of at most MAX_RECOGNISED_BYTES is offered to `recognise` (which should read it with
    read_regular_file): a FIFO, a device or a socket is refused unread, a larger file is not ours."""
    path = Path(path).expanduser()
    try:
        if path.is_dir():
            raise ConfigError(f"{path} is a folder: pass a file path for {what}")
        if path.exists() and not stat.S_ISREG(path.stat().st_mode):  # a FIFO, a device, a socket: never read
            raise ConfigError(f"{path} is not a regular file: pass a new file path for {what}")
        _check_inputs(path, inputs, (), what)
        _check_writable(path.parent, what)
        _check_not_inside_artifact(path, (), what)
        if path.exists() and not (path.stat().st_size <= MAX_RECOGNISED_BYTES and recognise(path)):
            raise ConfigError(f"{path} exists and is not {ARTIFACT_NAMES.get(purpose, purpose)} written by "
                              f"llamalite: choose a new file for {what} (it is never overwritten)")
        return OutputClaim(path, purpose, is_file=True)
    except OSError as exc:
        raise ConfigError(f"cannot check {path} for {what} ({exc.strerror or exc}): choose another path") from None


def read_regular_file(path: str | Path, limit: int | None = None) -> bytes | None:
    """The bytes of `path` when it is a regular file of at most `limit` bytes (MAX_RECOGNISED_BYTES by default), else
    None: a FIFO, a device or a socket is never read (it could block forever or never end), a larger file not at all.
    The type is checked on the opened descriptor (O_NONBLOCK: opening a FIFO does not wait for a writer)."""
    limit = MAX_RECOGNISED_BYTES if limit is None else limit
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
        return data if len(data) <= limit else None
    except OSError:
        return None
    finally:
        os.close(fd)


def remove_own_files(folder: Path, own: re.Pattern[str], empty_folders: tuple[str, ...] = ()) -> list[Path]:
    """Delete, under `folder`, the entries whose path relative to it (POSIX form) fully matches `own`: what the
    command itself writes (a matching folder goes whole). Nothing else is deleted; links are never followed.
    `empty_folders` (relative paths) are removed afterwards if nothing is left in them. Returns what was deleted.

    This is what --force/overwrite may delete (docs/safety.md): a command names its own files exactly, so a user's
    file beside them, or one whose name only resembles theirs, stays."""
    removed: list[Path] = []

    def walk(current: Path) -> None:
        try:
            entries = sorted(os.scandir(current), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            path = Path(entry.path)
            relative = path.relative_to(folder).as_posix()
            if own.fullmatch(relative):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
            elif entry.is_dir(follow_symlinks=False):
                walk(path)

    walk(folder)
    for name in empty_folders:
        path = folder / name
        if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
            path.rmdir()
    return removed


def _claim(path: Path, purpose: str, what: str, inputs, force: bool, force_hint: str | None, rerun: bool,
           same_inputs: Callable[[Path], str | None] | None, own_slots, is_file: bool) -> OutputClaim:
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} is a file: pass a folder for {what}")
    _check_inputs(path, inputs, own_slots, what)
    _check_writable(path, what)
    _check_not_inside_artifact(path, own_slots, what)
    if not path.is_dir():
        return OutputClaim(path, purpose)
    kind = artifact_kind(path)
    if kind is not None and kind != purpose:  # even an empty one: its marker says another command owns it
        raise ConfigError(f"{path} is {ARTIFACT_NAMES.get(kind, kind)}, not {ARTIFACT_NAMES.get(purpose, purpose)}: "
                          f"choose a new folder for {what} (llamalite never writes into another of its outputs)")
    entries = sorted(p.name for p in path.iterdir() if p.name not in _NOT_CONTENT)
    if not entries:
        return OutputClaim(path, purpose)
    opt_in = f", or pass {force_hint} to" if force_hint else ""
    if kind == purpose and rerun:
        reason = same_inputs(path) if same_inputs is not None else None
        if reason is None or force:
            return OutputClaim(path, purpose)
        replace = f"{opt_in} replace it (only the files this command writes)" if force_hint else ""
        raise ConfigError(f"{path} holds {what} made from other inputs ({reason}): choose a new folder{replace}")
    if force:
        return OutputClaim(path, purpose)
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    fix = (f"{opt_in} write into it (files of the same names are replaced; nothing else is deleted)"
           if force_hint else " (or empty it)")
    raise ConfigError(f"{path} is not empty ({shown}): choose a new folder for {what}{fix}")


def _resolved(path: str | Path) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _check_inputs(path: Path, inputs, own_slots, what: str) -> None:
    out = _resolved(path)
    slots = [_resolved(slot) for slot in own_slots]
    if any(_within(out, slot) for slot in slots):
        return
    for given in inputs:
        if given is None or str(given) == "":
            continue
        source = _resolved(given)
        if out == source:
            raise ConfigError(f"{path} is an input of this command: choose another path for {what}")
        if _within(out, source):
            raise ConfigError(f"{path} is inside {given}, an input of this command: choose a path outside it "
                              f"for {what}")
        if _within(source, out):
            raise ConfigError(f"{path} holds {given}, an input of this command: choose another folder for {what}")


def _is_read_only(folder: Path) -> bool:
    """No write permission; for root (whom permissions do not stop), a folder without any write bit counts too."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return True
    return os.geteuid() == 0 and not folder.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)


def _check_writable(path: Path, what: str) -> None:
    """`path`, or the nearest folder above it that exists, must be a folder this process may write."""
    existing = path
    while not existing.exists():
        if existing.is_symlink():
            raise ConfigError(f"{existing} is a broken link: pass another path for {what}")
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{existing} is a file: pass a path under a folder for {what}")
    if _is_read_only(existing):
        raise ConfigError(f"{existing} is read-only: choose a writable folder for {what}")


def _check_not_inside_artifact(path: Path, own_slots, what: str) -> None:
    out, slots = _resolved(path), [_resolved(slot) for slot in own_slots]
    if any(_within(out, slot) for slot in slots):
        return
    for folder in out.parents:
        if not folder.is_dir():
            continue
        kind = artifact_kind(folder)
        if kind is not None:
            raise ConfigError(f"{path} is inside {folder}, {ARTIFACT_NAMES.get(kind, kind)}: choose a path outside "
                              f"it for {what} (llamalite never writes into another of its outputs)")
