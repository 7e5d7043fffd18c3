"""Tokenization, in worker processes: ([eos] + document) token streams per split, in document order.

Workers are forked on Linux and import only this package's light modules (numpy and tokenizers,
never torch): each holds its own copy of the tokenizer.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import multiprocessing.context
import os
import signal
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager

import numpy as np

from llamalite.data.filters import SPLITS
from llamalite.tokenizer import Tokenizer

# A chunk also closes at this many characters, so that a few long documents (books, plays)
# still spread over the workers instead of landing in one chunk.
CHUNK_MAX_CHARS = 1 << 20


@dataclasses.dataclass
class TokenizedChunk:
    tokens: dict[str, np.ndarray]  # split -> [eos, doc..., eos, doc...]
    lengths: dict[str, np.ndarray]  # split -> tokens of each document, its eos included


def tokenize_documents(
    tokenizer: Tokenizer, texts: list[str], dtype: type[np.unsignedinteger]
) -> tuple[np.ndarray, np.ndarray]:
    """([eos] + tokens of each document, concatenated; the length of each): the eos in front separates documents."""
    encoded = tokenizer.encode_batch(texts) if texts else []
    lengths = np.array([1 + len(ids) for ids in encoded], dtype=np.int64)
    out = np.empty(int(lengths.sum()), dtype=dtype)
    position = 0
    for ids in encoded:
        out[position] = tokenizer.eos_id
        out[position + 1 : position + 1 + len(ids)] = ids
        position += 1 + len(ids)
    return out, lengths


def tokenize_chunk(
    tokenizer: Tokenizer, chunk: dict[str, list[str]], dtype: type[np.unsignedinteger]
) -> TokenizedChunk:
    tokenized = {split: tokenize_documents(tokenizer, texts, dtype) for split, texts in chunk.items()}
    return TokenizedChunk(
        tokens={split: tokens for split, (tokens, _) in tokenized.items()},
        lengths={split: lengths for split, (_, lengths) in tokenized.items()},
    )


def chunks_by_split(
    documents: Iterable[tuple[str, str]], docs_per_chunk: int, max_chars: int = CHUNK_MAX_CHARS
) -> Iterator[dict[str, list[str]]]:
    """Group (split, text) pairs into chunks of at most docs_per_chunk documents / about max_chars characters."""
    chunk: dict[str, list[str]] = {split: [] for split in SPLITS}
    count = chars = 0
    for split, text in documents:
        chunk[split].append(text)
        count += 1
        chars += len(text)
        if count == docs_per_chunk or chars >= max_chars:
            yield chunk
            chunk, count, chars = {split: [] for split in SPLITS}, 0, 0
    if count:
        yield chunk


def tokenize_chunks(
    chunks: Iterable[dict[str, list[str]]], tokenizer: Tokenizer, dtype: type[np.unsignedinteger], num_workers: int
) -> Iterator[TokenizedChunk]:
    """Tokenize chunks in order: in this process (num_workers=1) or in worker processes.

    Pool.imap would read the whole (possibly streamed, unbounded) corpus ahead into its task
    queue, and a Pool waits forever on a worker killed by the OOM killer. Futures of a
    ProcessPoolExecutor, at most 2 chunks per worker in flight and collected in submission
    order, keep memory bounded, the output deterministic, and fail loudly on a dead worker.
    """
    if num_workers == 1:
        for chunk in chunks:
            yield tokenize_chunk(tokenizer, chunk, dtype)
        return
    initargs = (tokenizer.to_json_str(), tokenizer.eos_token, np.dtype(dtype).name)
    with _tokenizers_parallelism_off(), ProcessPoolExecutor(
        num_workers, mp_context=_worker_context(), initializer=_init_worker, initargs=initargs
    ) as pool:
        in_flight: deque[Future[TokenizedChunk]] = deque()
        for chunk in chunks:
            in_flight.append(pool.submit(_tokenize_chunk_in_worker, chunk))
            if len(in_flight) >= 2 * num_workers:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()


# -- worker processes ------------------------------------------------------------------------------

_worker_tokenizer: Tokenizer | None = None
_worker_dtype: type[np.unsignedinteger] = np.uint32


def _init_worker(tokenizer_json: str, eos_token: str, dtype_name: str) -> None:
    # One process per core already: rayon threads inside each worker would only oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # Ctrl-C signals the whole process group: only the main process should stop, and shut the pool
    # down. A worker interrupted inside the pool's queue locks can leave that shutdown waiting forever.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    global _worker_tokenizer, _worker_dtype
    _worker_tokenizer = Tokenizer.from_json_str(tokenizer_json, eos_token)
    _worker_dtype = np.dtype(dtype_name).type


def _tokenize_chunk_in_worker(chunk: dict[str, list[str]]) -> TokenizedChunk:
    assert _worker_tokenizer is not None, "worker used before _init_worker"
    return tokenize_chunk(_worker_tokenizer, chunk, _worker_dtype)


def _worker_context() -> multiprocessing.context.BaseContext:
    # fork on Linux: spawn and forkserver re-run the caller's __main__ in each worker, which
    # fails for `python -` / notebooks and re-executes scripts without a main guard. The workers
    # only run tokenizers (whose own threads fork disables in the child) and numpy.
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
