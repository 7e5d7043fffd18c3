"""The console's logging: llamalite's log lines through tqdm.write, from rank 0 only. Free of torch, so that a
command that never builds a model (prepare, report, plan's help) starts in a fraction of a second."""

from __future__ import annotations

import logging
import os
import sys
import warnings

LOGGER_NAME = "llamalite"


def is_rank_zero() -> bool:
    """Rank 0 of an initialised process group (torch.distributed, if some command imported it), else of torchrun's
    environment; True on one process."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


class MainProcessFilter(logging.Filter):
    """Keeps the records of rank 0; other ranks compute the same things and would repeat every line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return is_rank_zero()


class _ConsoleHandler(logging.Handler):
    """Writes each message through tqdm.write, so that a live progress bar is redrawn below it rather than torn.

    The stream is looked up at each record (sys.stdout below WARNING, sys.stderr from it, or always sys.stderr for
    a command whose stdout is its output), so redirections made after set-up (pytest's capture,
    contextlib.redirect_stdout) are honoured."""

    def __init__(self, all_to_stderr: bool = False):
        super().__init__()
        self.all_to_stderr = all_to_stderr

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            stream = sys.stderr if self.all_to_stderr or record.levelno >= logging.WARNING else sys.stdout
            tqdm.write(self.format(record), file=stream)
            stream.flush()
        except BrokenPipeError:  # the reader went away: cli.main ends the command quietly, as SIGPIPE would
            raise
        except Exception:  # logging must never take the program down
            self.handleError(record)


def setup_logging(level: int = logging.INFO, all_to_stderr: bool = False) -> None:
    """Show llamalite's log lines on the console (called once by the console script; idempotent).

    all_to_stderr: every line on stderr, for commands whose stdout is their output (generate, chat)."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        if isinstance(handler, _ConsoleHandler):
            logger.removeHandler(handler)
    handler = _ConsoleHandler(all_to_stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(MainProcessFilter())
    logger.addHandler(handler)
    logger.setLevel(level)
    warnings.formatwarning = _warning_line


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """A warning on the console as one line, without the source file and line it came from (not the user's code)."""
    return f"{category.__name__}: {message}\n"
