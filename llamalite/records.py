"""The one reader of each structured file format llamalite reads: JSON, JSON Lines, and paths named inside them.

Every reader distrusts its file. A file that is missing, not UTF-8, not valid JSON or of the wrong shape is a
one-line error of the caller's class (DataError, CheckpointError, ExportError, ...) naming the file and what is wrong
with it. JSON Lines follow one rule, the same everywhere:

- a run's own append-only records (metrics.jsonl, events.jsonl, evals.jsonl, samples.jsonl: `read_run_records`) are
  written one flushed line at a time, so a crash, a full disk or a concurrent writer can leave a torn line anywhere:
  such a line is skipped, counted, and logged once per file with its line numbers;
- a file the user gives (task files: `read_jsonl`) is never guessed at: its first malformed record is an error naming
  the file and the line. Instruction data is the one documented exception: `llamalite sft` counts its malformed
  records (invalid JSON lines among them) and reports them in its data summary, since public instruction sets
  routinely hold a few.

Parquet files (prepare's sources and its reader processes, task files) are read inside `parquet_errors`: whatever
pyarrow raises on a damaged or foreign file is one line naming the file and, where known, the row groups.

A path read from a file (a manifest's shard, an index's weight file, a checksums entry) goes through
`contained_path`: it must stay inside the folder of the file that names it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llamalite.errors import DataError, LlamaliteError

logger = logging.getLogger(__name__)

ErrorClass = type[LlamaliteError]
_TYPE_NAMES = {dict: "a JSON object", list: "a JSON array", str: "a string", int: "an integer",
               float: "a number", bool: "true or false"}


def _type_name(expect: type | tuple[type, ...]) -> str:
    kinds = expect if isinstance(expect, tuple) else (expect,)
    return " or ".join(_TYPE_NAMES.get(kind, kind.__name__) for kind in kinds)


def _found_name(value: Any) -> str:
    if value is None:
        return "null"
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def parse_json(data: bytes | str, where: str, fix: str, error: ErrorClass = DataError) -> Any:
    """JSON from bytes (UTF-8) or text; anything unreadable is `error` naming `where` (a file, or 'file line N')."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(f"{where} is not valid JSON: it is not UTF-8 text (byte {exc.start}): {fix}") from None
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise error(f"{where} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}): {fix}") from None
    except (ValueError, RecursionError) as exc:  # an integer of too many digits, nesting deeper than Python's stack
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise error(f"{where} is not valid JSON ({reason[:120]}): {fix}") from None


def read_bytes(path: str | Path, what: str, fix: str, error: ErrorClass = DataError) -> bytes:
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise error(f"{what} {path} is missing: {fix}") from None
    except IsADirectoryError:
        raise error(f"{what} {path} is a folder, not a file: {fix}") from None
    except OSError as exc:
        raise error(f"{what} {path} cannot be read ({exc.strerror or type(exc).__name__}): {fix}") from None


def read_json(path: str | Path, what: str, fix: str, expect: type | tuple[type, ...] = dict,
              error: ErrorClass = DataError) -> Any:
    """The JSON value of `path` (`what` it is, e.g. "the manifest"), which must be of type `expect`."""
    value = parse_json(read_bytes(path, what, fix, error), f"{what} {path}", fix, error)
    return expect_type(value, expect, f"{what} {path}", fix, error)


def expect_type(value: Any, expect: type | tuple[type, ...], where: str, fix: str,
                error: ErrorClass = DataError) -> Any:
    kinds = expect if isinstance(expect, tuple) else (expect,)
    if isinstance(value, bool) and bool not in kinds and (int in kinds or float in kinds):  # true is no number
        ok = False
    else:
        ok = isinstance(value, kinds)
    if not ok:
        raise error(f"{where} is {_found_name(value)}, expected {_type_name(expect)}: {fix}")
    return value


def _lines(raw: bytes) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, line) of JSON Lines, blank lines left out. Bytes split at \\n, \\r\\n and \\r only (never
    at U+2028, which JSON allows raw inside strings); JSON escapes both in strings, so no record spans two."""
    for number, line in enumerate(raw.splitlines(), 1):
        if line.strip():
            yield number, line


def read_jsonl(path: str | Path, what: str, fix: str, expect: type | tuple[type, ...] = dict,
               error: ErrorClass = DataError, limit: int | None = None) -> tuple[list[Any], int]:
    """A user's JSON Lines file, strictly: (its first `limit` records (all with None), how many lines it holds).
    The first line that is not valid JSON, or not of type `expect`, is an error naming the file and the line."""
    return parse_jsonl(read_bytes(path, what, fix, error), f"{what} {path}", fix, expect, error, limit)


def parse_jsonl(raw: bytes, where: str, fix: str, expect: type | tuple[type, ...] = dict,
                error: ErrorClass = DataError, limit: int | None = None) -> tuple[list[Any], int]:
    """read_jsonl of bytes already read (`where` names their file); lines past `limit` are counted, not parsed."""
    lines = list(_lines(raw))
    records = []
    for number, line in lines[:limit]:
        line_where = f"{where} line {number}"
        records.append(expect_type(parse_json(line, line_where, fix, error), expect, line_where, fix, error))
    return records, len(lines)


def read_run_records(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """A run's own append-only JSON Lines (metrics, events, evals, samples): (the records, how many lines were
    skipped). A line that is torn, not UTF-8 or not a JSON object is skipped and counted, and the skips are logged
    once, naming the file and the first lines; a missing file holds no records."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return [], 0
    except OSError as exc:
        raise DataError(f"{path} cannot be read ({exc.strerror or type(exc).__name__}): "
                        "check the run directory's permissions") from None
    records, skipped = [], []
    for number, line in _lines(raw):
        record = parse_run_record(line)
        if record is not None:
            records.append(record)
        else:
            skipped.append(number)
    if skipped:
        shown = ", ".join(map(str, skipped[:5])) + (", ..." if len(skipped) > 5 else "")
        logger.warning(f"{path}: skipped {len(skipped)} torn or malformed line(s) (line {shown}); "
                       "the other records are used")
    return records, len(skipped)


def parse_run_record(line: bytes | str) -> dict[str, Any] | None:
    """One line of a run's own records as a JSON object, or None when it is torn, not UTF-8, not JSON (too deep, a
    number of too many digits) or not an object: the one rule every reader of a run's records applies."""
    try:
        record = json.loads(line.decode("utf-8") if isinstance(line, bytes) else line)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


@contextmanager
def parquet_errors(path: str | Path, fix: str, error: ErrorClass = DataError, row_groups: Any = None) -> Iterator[None]:
    """Turn what pyarrow raises on a damaged or foreign Parquet file (ArrowException and its subclasses, OSError:
    a bad footer, truncated pages, undecodable thrift) into one `error` line naming the file (and row groups)."""
    import pyarrow

    try:
        yield
    except (pyarrow.ArrowException, OSError) as exc:
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        groups = list(row_groups or ())
        place = f" (row group{'s' if len(groups) > 1 else ''} {', '.join(map(str, groups))})" if groups else ""
        raise error(f"{path}{place} is not a readable Parquet file ({reason}): {fix}") from None


def contained_path(folder: str | Path, name: Any, where: str, fix: str, error: ErrorClass = DataError) -> Path:
    """folder/name for a `name` read from a file (`where` names that file and field): a relative path that stays
    inside `folder` once every symlink is resolved; anything else (not a string, absolute, `..` out of the folder, a
    link pointing out) is `error`."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise error(f"{where} names {_shown(name)}, not a file name: {fix}")
    if os.path.isabs(name):
        raise error(f"{where} names the absolute path {name!r}; only files inside {folder} are read: {fix}")
    folder = Path(folder)
    path = folder / name
    try:
        inside = path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a name the OS refuses
        inside = False
    if not inside:
        raise error(f"{where} names {name!r}, which leads outside {folder}; only files inside it are read: {fix}")
    return path


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@contextmanager
def fields_of(where: str, fix: str, error: ErrorClass = DataError) -> Iterator[None]:
    """Turn a missing key or a value of the wrong type met while taking a parsed file apart into one `error` line
    naming the file (`where`). Wrap only the code that reads the file's fields."""
    try:
        yield
    except KeyError as exc:
        raise error(f"{where} lacks the field {exc.args[0]!r}: {fix}") from None
    except (TypeError, ValueError, IndexError, AttributeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise error(f"{where} has a field of the wrong type or value ({reason[:120]}): {fix}") from None
