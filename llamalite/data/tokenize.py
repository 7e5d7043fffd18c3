"""Tokenization, in worker processes: ([eos] + [bos] + document) token streams per split, in document order (a
bos only where the tokenizer puts one before every text).

Workers are forked on Linux and import only this package's light modules (numpy and tokenizers,
never torch): each holds its own copy of the tokenizer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

import numpy as np

from llamalite.data.filters import SPLITS
from llamalite.data.parallel import ordered_map
from llamalite.tokenizer import Tokenizer

# A chunk also closes at this many characters, so that a few long documents (books, plays)
# still spread over the workers instead of landing in one chunk.
CHUNK_MAX_CHARS = 1 << 20


@dataclasses.dataclass
class TokenizedChunk:
    tokens: dict[str, np.ndarray]  # split -> [eos, (bos,) doc..., eos, (bos,) doc...]
    lengths: dict[str, np.ndarray]  # split -> tokens of each document, its eos included


def tokenize_documents(
    tokenizer: Tokenizer, texts: list[str], dtype: type[np.unsignedinteger]
) -> tuple[np.ndarray, np.ndarray]:
    """([eos] + start ids + tokens of each document, concatenated; the length of each): the eos in front separates
    documents, the start ids (a BOS, where the tokenizer puts one before every text) begin each one."""
    encoded = tokenizer.encode_batch(texts) if texts else []
    head = np.array([tokenizer.eos_id, *tokenizer.start_ids], dtype=dtype)
    lengths = np.array([len(head) + len(ids) for ids in encoded], dtype=np.int64)
    out = np.empty(int(lengths.sum()), dtype=dtype)
    if encoded:
        np.concatenate([part for ids in encoded for part in (head, ids)], out=out, casting="unsafe")
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
    """Tokenize chunks in order: in this process (num_workers=1) or in worker processes (each with its own copy of
    the tokenizer; at most 2 chunks per worker in flight, see llamalite.data.parallel)."""
    if num_workers == 1:
        for chunk in chunks:
            yield tokenize_chunk(tokenizer, chunk, dtype)
        return
    _ = tokenizer.batch_encoder  # built here once: forked workers inherit it (spawned ones rebuild it from JSON)
    initargs = (tokenizer, np.dtype(dtype).name)
    yield from ordered_map(_tokenize_chunk_in_worker, chunks, num_workers, initializer=_init_worker, initargs=initargs)


# -- worker processes ------------------------------------------------------------------------------

_worker_tokenizer: Tokenizer | None = None
_worker_dtype: type[np.unsignedinteger] = np.uint32


def _init_worker(tokenizer: Tokenizer, dtype_name: str) -> None:
    global _worker_tokenizer, _worker_dtype
    _worker_tokenizer = tokenizer
    _worker_dtype = np.dtype(dtype_name).type


def _tokenize_chunk_in_worker(chunk: dict[str, list[str]]) -> TokenizedChunk:
    assert _worker_tokenizer is not None, "worker used before _init_worker"
    return tokenize_chunk(_worker_tokenizer, chunk, _worker_dtype)
