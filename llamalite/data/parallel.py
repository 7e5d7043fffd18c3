"""Ordered process pools: a function mapped over items in worker processes, results in item order.

Pool.imap would read a (possibly streamed, unbounded) input ahead into its task queue and buffer results without
bound, and a Pool waits forever on a worker killed by the OOM killer. Futures of a ProcessPoolExecutor, a few per
worker in flight and collected in submission order, keep memory bounded, the output deterministic, and fail loudly
on a dead worker. Workers are forked on Linux and import only this package's light modules (numpy, tokenizers,
pyarrow; never torch).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


def resolve_workers(count: int) -> int:
    """A worker-count setting: 0 means one per CPU core."""
    return count or os.cpu_count() or 1


def ordered_map(
    function: Callable[[Item], Result],
    items: Iterable[Item],
    num_workers: int,
    initializer: Callable[..., None] | None = None,
    initargs: tuple[Any, ...] = (),
    in_flight_per_worker: int = 2,
) -> Iterator[Result]:
    """function(item) for each item, in order: in this process (num_workers <= 1) or in worker processes.

    `function` and `initializer` must be module-level functions; the initializer runs once in each worker.
    Closing the iterator early cancels the items not yet started.
    """
    if num_workers <= 1:
        yield from map(function, items)
        return
    with _tokenizers_parallelism_off(), ProcessPoolExecutor(
        num_workers, mp_context=_worker_context(), initializer=_init_worker, initargs=(initializer, initargs)
    ) as pool:
        in_flight: deque[Future[Result]] = deque()
        try:
            for item in items:
                in_flight.append(pool.submit(function, item))
                if len(in_flight) >= in_flight_per_worker * num_workers:
                    yield in_flight.popleft().result()
            while in_flight:
                yield in_flight.popleft().result()
        finally:
            for future in in_flight:
                future.cancel()


def _init_worker(initializer: Callable[..., None] | None, initargs: tuple[Any, ...]) -> None:
    # One process per core already: rayon threads inside each worker would only oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # Ctrl-C signals the whole process group: only the main process should stop, and shut the pool
    # down. A worker interrupted inside the pool's queue locks can leave that shutdown waiting forever.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if initializer is not None:
        initializer(*initargs)


def _worker_context() -> multiprocessing.context.BaseContext:
    # fork on Linux: spawn and forkserver re-run the caller's __main__ in each worker, which
    # fails for `python -` / notebooks and re-executes scripts without a main guard. The workers
    # only run tokenizers (whose own threads fork disables in the child), pyarrow and numpy.
    if sys.platform == "linux":
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


@contextmanager
def _tokenizers_parallelism_off() -> Iterator[None]:
    # Set while workers are forked: silences tokenizers' "process just got forked" warning.
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
