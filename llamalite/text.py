"""Text as users have it: one rule for bytes that are not UTF-8, one for line endings, one for a closed pipe.

- Text that a person wrote or a corpus holds (prompts, system messages, stop strings, chat lines, instruction data,
  text sources): every byte that is not UTF-8 becomes U+FFFD, as Python's errors="replace" does, and one warning per
  input counts them. Python hands over undecodable bytes of argv and stdin as lone surrogates U+DC80..U+DCFF
  (surrogateescape) and JSON can spell lone surrogates ("\\udcff"): `clean_text` gives such a str the same rule.
- Settings (config files, overrides) are never guessed at: a byte that is not UTF-8 there is a one-line error, since
  a replaced byte would silently change a path or a value. File paths are used as given: their bytes name the file.
- Line endings: CRLF and a lone CR read as LF, as Python's universal newlines do (`normalize_newlines`).
- Standard streams (`tolerant_standard_streams`): stdin decodes with surrogateescape (so a bad byte reaches the rule
  above instead of a traceback); stdout writes a surrogate-escaped name back as its original bytes.
"""

from __future__ import annotations

import codecs
import io
import logging
import os
import re
import sys
from typing import Any

logger = logging.getLogger(__name__)

REPLACEMENT = "\ufffd"
_SURROGATE = re.compile("[\ud800-\udfff]")
_LINE_BREAK = re.compile("\r\n?")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
STREAM_ERRORS = "llamalite.escape"  # the error handler of stdout: surrogateescape, else backslashreplace


def replace_invalid(data: bytes) -> tuple[str, int]:
    """(text, bytes replaced): `data` as UTF-8, each byte that is not UTF-8 turned into U+FFFD as errors="replace"
    does (a truncated sequence is one U+FFFD)."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        pass
    escaped = data.decode("utf-8", "surrogateescape")  # one lone surrogate per byte that is not UTF-8
    return data.decode("utf-8", "replace"), len(_SURROGATE.findall(escaped))


def decode_text(data: bytes, what: str) -> str:
    """UTF-8 text of `data` (the contents of `what`); bytes that are not UTF-8 become U+FFFD, with one warning."""
    text, replaced = replace_invalid(data)
    warn_replaced(replaced, what)
    return text


def clean_str(text: str) -> tuple[str, int]:
    """(text, code points replaced) of a str that may hold lone surrogates.

    Surrogate escapes of undecodable bytes (argv, stdin) go back to their bytes and take decode_text's rule; any
    other lone surrogate (JSON's "\\ud800") becomes U+FFFD."""
    try:
        text.encode("utf-8")
        return text, 0
    except UnicodeEncodeError:
        pass
    try:
        return replace_invalid(text.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:  # a surrogate outside the escapes' range: replace each one
        return _SURROGATE.subn(REPLACEMENT, text)


def clean_text(text: str, what: str) -> str:
    """`text` with every undecodable byte and lone surrogate turned into U+FFFD, and one warning naming `what`."""
    cleaned, replaced = clean_str(text)
    warn_replaced(replaced, what)
    return cleaned


def warn_replaced(replaced: int, what: str) -> None:
    if replaced:
        plural = "" if replaced == 1 else "s"
        logger.warning(f"{what}: replaced {replaced} invalid UTF-8 byte{plural} or lone surrogate{plural} with U+FFFD")


def normalize_newlines(text: str) -> str:
    """CRLF and a lone CR as LF, as universal newlines read them."""
    return _LINE_BREAK.sub("\n", text) if "\r" in text else text


def split_lines(text: str) -> list[str]:
    """The lines of `text` at LF, CRLF or a lone CR (and nothing else: unlike str.splitlines, a form feed stays)."""
    return normalize_newlines(text).split("\n")


def _escape_or_backslash(error: UnicodeError) -> tuple[str | bytes, int]:
    """surrogateescape where the code points are escaped bytes (a path's name, written back as it was), else
    backslashreplace: writing text never raises."""
    if not isinstance(error, UnicodeEncodeError):
        raise error
    piece = error.object[error.start:error.end]
    return b"".join(_escaped_byte(char) for char in piece), error.end


def _escaped_byte(char: str) -> bytes:
    if "\udc80" <= char <= "\udcff":
        return bytes([ord(char) - 0xDC00])
    return char.encode("ascii", "backslashreplace")


codecs.register_error(STREAM_ERRORS, _escape_or_backslash)


def tolerant_standard_streams() -> None:
    """stdin reads bytes that are not UTF-8 as surrogate escapes; stdout and stderr (Python's default for stderr)
    never fail on a character. Streams other than text files (a StringIO) are left as they are.

    A stream the command was started without (`<&-`, `>&-`: None in sys) reads or writes /dev/null, and stdout and
    stderr are guarded: a failure to write them (a full disk, an I/O error) is a StandardStreamError, which
    cli.main turns into one line and exit 2 (restore_standard_streams undoes the guard)."""
    for name, mode in (("stdin", "r"), ("stdout", "w"), ("stderr", "w")):  # in descriptor order: /dev/null takes it
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, mode, encoding="utf-8"))  # noqa: SIM115 (open for the process's life)
    streams = ((sys.stdin, "surrogateescape"), (sys.stdout, STREAM_ERRORS), (sys.stderr, "backslashreplace"))
    for stream, errors in streams:
        if isinstance(stream, io.TextIOWrapper) and stream.errors in ("strict", "surrogateescape"):
            try:
                stream.reconfigure(errors=errors)
            except (io.UnsupportedOperation, ValueError):  # e.g. a stream already read from, or closed
                pass
    for name in ("stdout", "stderr"):
        if not isinstance(getattr(sys, name), GuardedStream):
            setattr(sys, name, GuardedStream(getattr(sys, name), name))


def restore_standard_streams() -> None:
    """sys.stdout and sys.stderr without tolerant_standard_streams' guard (cli.main may run again in one process)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if isinstance(stream, GuardedStream):
            setattr(sys, name, stream.wrapped)


class StandardStreamError(BaseException):
    """Writing the standard output or error failed (ENOSPC, EIO, EBADF...): the command can no longer say anything,
    so it ends. A BaseException, as KeyboardInterrupt, so that no `except Exception` (logging's own) hides it."""

    def __init__(self, name: str, error: OSError):
        super().__init__(name, error)
        self.name, self.error = name, error

    def __str__(self) -> str:
        stream = "output" if self.name == "stdout" else "error"
        return f"cannot write to standard {stream} ({self.error.strerror or self.error})"


class GuardedStream:
    """A standard stream whose write errors say which stream failed (StandardStreamError); a closed pipe stays a
    BrokenPipeError (exit 141). Everything else is the wrapped stream's."""

    def __init__(self, wrapped: Any, name: str):
        self.wrapped, self.name = wrapped, name

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self.wrapped, attribute)

    def write(self, text: str) -> int:
        return self._guarded(self.wrapped.write, text)

    def writelines(self, lines: Any) -> None:
        self._guarded(self.wrapped.writelines, lines)

    def flush(self) -> None:
        self._guarded(self.wrapped.flush)

    def _guarded(self, operation: Any, *args: Any) -> Any:
        try:
            return operation(*args)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise StandardStreamError(self.name, exc) from exc


def report_stream_error(error: StandardStreamError) -> None:
    """One line on stderr (where it can still be written), then the failed stream points at /dev/null, so that the
    interpreter's flush at exit does not fail again."""
    try:
        print(f"llamalite: error: {error}", file=sys.stderr, flush=True)
    except (OSError, StandardStreamError):
        pass
    failed = getattr(sys, error.name)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, failed.fileno())
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):  # not a descriptor (a test's capture)
        pass
    finally:
        os.close(devnull)


# A command whose reader went away (`llamalite generate ... | head -c 10`) ends as a shell sees a program killed by
# SIGPIPE: 128 + 13.
EXIT_BROKEN_PIPE = 141


def silence_closed_streams() -> None:
    """Point stdout and stderr, where closed, at /dev/null, so that the interpreter's own flush at exit does not fail a
    second time (the recipe of the signal module's documentation)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except OSError:  # BrokenPipeError, or a stream already closed
                try:
                    os.dup2(devnull, stream.fileno())
                except (OSError, ValueError):  # not a file descriptor (a test's capture)
                    pass
            except ValueError:  # I/O on a closed file object
                pass
    finally:
        os.close(devnull)


def may_hold_surrogates(json_text: str) -> bool:
    """Whether JSON text spells a surrogate escape ("\\ud800"): without one, its parsed strings are valid."""
    return _SURROGATE_ESCAPE.search(json_text) is not None


def clean_strings(value: Any) -> tuple[Any, int]:
    """(value, code points replaced): every str inside a parsed JSON value (keys too) under clean_str's rule."""
    if isinstance(value, str):
        return clean_str(value)
    if isinstance(value, list):
        items = [clean_strings(item) for item in value]
        return [item for item, _ in items], sum(count for _, count in items)
    if isinstance(value, dict):
        replaced, cleaned = 0, {}
        for key, item in value.items():
            (key, key_count), (item, item_count) = clean_strings(key), clean_strings(item)
            cleaned[key] = item
            replaced += key_count + item_count
        return cleaned, replaced
    return value, 0
