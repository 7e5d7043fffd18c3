"""Parquet sources in FineWeb-Edu's schema: parallel reading, seeded hash samples, score filters, resume, progress."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llamalite.config import SourceConfig
from llamalite.data import sources
from llamalite.data.prepare import prepare
from llamalite.errors import DataError
from tests.data.test_prepare import clean_prepare, interrupted_prepare, split_documents, without_timings

# FineWeb-Edu's columns and types (HuggingFaceFW/fineweb-edu, every configuration).
FINEWEB_EDU_SCHEMA = pa.schema([
    ("text", pa.string()),
    ("id", pa.string()),
    ("dump", pa.string()),
    ("url", pa.string()),
    ("file_path", pa.string()),
    ("language", pa.string()),
    ("language_score", pa.float64()),
    ("token_count", pa.int64()),
    ("score", pa.float64()),
    ("int_score", pa.int64()),
])


def fineweb_edu_table(texts: list[str], first: int = 0) -> pa.Table:
    rows = range(first, first + len(texts))
    return pa.table({
        "text": texts,
        "id": [f"<urn:uuid:{i:08d}>" for i in rows],
        "dump": ["CC-MAIN-2024-10"] * len(texts),
        "url": [f"https://example.org/{i}" for i in rows],
        "file_path": ["s3://commoncrawl/crawl-data/CC-MAIN-2024-10/segments/0.warc.gz"] * len(texts),
        "language": ["en"] * len(texts),
        "language_score": [0.9] * len(texts),
        "token_count": [len(text.split()) for text in texts],
        "score": [(i % 6) + 0.25 for i in rows],
        "int_score": [i % 6 for i in rows],
    }, schema=FINEWEB_EDU_SCHEMA)


def write_fineweb_edu(folder: Path, texts: list[str], files: int = 3, row_group_size: int = 20) -> Path:
    """`texts` over `files` parquet files (in name order) of several row groups; document i has int_score i % 6."""
    folder.mkdir(parents=True, exist_ok=True)
    per_file = -(-len(texts) // files)
    for index in range(files):
        start = index * per_file
        table = fineweb_edu_table(texts[start : start + per_file], first=start)
        pq.write_table(table, folder / f"{index:03d}_00000.parquet", row_group_size=row_group_size)
    return folder


@pytest.fixture
def small_units(monkeypatch) -> None:
    """A task of at most two row groups (20 rows each), so that every file is several tasks."""
    monkeypatch.setattr(sources, "PARQUET_UNIT_ROWS", 40)


@pytest.fixture
def corpus(tmp_path: Path, make_documents) -> tuple[Path, list[str]]:
    texts = make_documents(600, words=12)
    return write_fineweb_edu(tmp_path / "fineweb-edu", texts), texts


def shard_bytes(out_dir: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out_dir.glob("*.bin"))}


def kept_documents(out_dir: Path) -> set[str]:
    return set(split_documents(out_dir, "train")) | set(split_documents(out_dir, "val"))


def test_the_files_have_several_row_groups_and_units(corpus, small_units) -> None:
    folder, texts = corpus
    layout = sources.parquet_layout(SourceConfig(type="parquet", path=str(folder)), ["text", "int_score"])
    assert [len(groups) for _, groups in layout] == [10, 10, 10]
    units = sources._parquet_units(layout, ("text",), None)
    assert len(units) == 15 and sum(unit.rows for unit in units) == len(texts)


@pytest.mark.parametrize(("read_workers", "num_workers"), [(2, 1), (2, 2), (3, 2)])
def test_parallel_reading_gives_byte_identical_shards(
    corpus, small_units, make_config, tmp_path: Path, read_workers: int, num_workers: int
) -> None:
    folder, texts = corpus
    config = make_config([SourceConfig(type="parquet", path=str(folder))], val_fraction=0.0, shard_tokens=2000,
                         read_workers=1)
    serial = prepare(config)
    serial_dir = Path(config.data.out_dir)
    assert split_documents(serial_dir, "train") == texts, "in file, row group and row order"
    assert len(serial["splits"]["train"]["shards"]) > 3

    parallel_config = copy.deepcopy(config)
    parallel_config.data.read_workers, parallel_config.data.num_workers = read_workers, num_workers
    parallel_config.data.out_dir = str(tmp_path / "parallel")
    parallel = prepare(parallel_config)
    assert shard_bytes(Path(parallel_config.data.out_dir)) == shard_bytes(serial_dir)
    assert without_timings(parallel) == without_timings(serial)


def test_int_score_filter_with_parallel_reading(corpus, small_units, make_config) -> None:
    folder, texts = corpus
    config = make_config([SourceConfig(type="parquet", path=str(folder))], score_field="int_score", min_score=3,
                         read_workers=2)
    manifest = prepare(config)
    expected = {text for i, text in enumerate(texts) if i % 6 >= 3}
    assert kept_documents(Path(config.data.out_dir)) == expected
    assert manifest["documents"]["dropped"]["low_score"] == len(texts) - len(expected) == 300
    assert manifest["documents"]["kept"] == 300


def sample_config(make_config, folder: Path, out_dir: Path, seed: int = 0, read_workers: int = 1, **source):
    config = make_config([SourceConfig(type="parquet", path=str(folder), **source)], read_workers=read_workers,
                         sample_seed=seed)
    config.data.out_dir = str(out_dir)
    return config


def test_sample_is_a_function_of_seed_and_document(corpus, small_units, make_config, tmp_path: Path) -> None:
    folder, texts = corpus
    first = prepare(sample_config(make_config, folder, tmp_path / "a", sample_fraction=0.3))
    again = prepare(sample_config(make_config, folder, tmp_path / "b", sample_fraction=0.3, read_workers=2))
    prepare(sample_config(make_config, folder, tmp_path / "c", seed=1, sample_fraction=0.3))

    kept = kept_documents(tmp_path / "a")
    assert kept == kept_documents(tmp_path / "b")
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    assert without_timings(again) == without_timings(first)
    other = kept_documents(tmp_path / "c")
    assert other != kept and len(kept & other) < 0.6 * len(kept), "another seed draws another sample"
    # 600 documents at 0.3: 180 expected, standard deviation 11
    assert 180 - 45 < len(kept) < 180 + 45 and 180 - 45 < len(other) < 180 + 45
    assert first["sample"] == {"seed": 0, "sources": [{"fraction": 0.3, "rows": 600, "read": 600, "kept": len(kept)}]}
    assert first["documents"]["seen"] == len(kept)


def test_sample_does_not_depend_on_how_the_documents_are_filed(
    corpus, small_units, make_config, tmp_path: Path
) -> None:
    folder, texts = corpus
    prepare(sample_config(make_config, folder, tmp_path / "a", sample_fraction=0.25))
    shuffled = texts[::-1]  # other files, other row groups, another order
    refiled = write_fineweb_edu(tmp_path / "refiled", shuffled, files=4, row_group_size=7)
    prepare(sample_config(make_config, refiled, tmp_path / "b", sample_fraction=0.25, read_workers=2))
    assert kept_documents(tmp_path / "a") == kept_documents(tmp_path / "b")


def test_sample_docs_derives_the_fraction_from_the_row_counts(corpus, make_config, tmp_path: Path) -> None:
    folder, _ = corpus
    manifest = prepare(sample_config(make_config, folder, tmp_path / "a", sample_docs=150))
    (count,) = manifest["sample"]["sources"]
    assert count["fraction"] == pytest.approx(0.25) and count["rows"] == 600 and count["read"] == 600
    assert 150 - 40 < count["kept"] < 150 + 40
    same = prepare(sample_config(make_config, folder, tmp_path / "b", sample_fraction=0.25))
    assert kept_documents(tmp_path / "a") == kept_documents(tmp_path / "b")
    assert same["sample"]["sources"][0]["kept"] == count["kept"]


def test_max_docs_takes_the_first_documents_of_the_sample(corpus, small_units, make_config, tmp_path: Path) -> None:
    folder, _ = corpus
    config = sample_config(make_config, folder, tmp_path / "all", sample_fraction=0.5)
    config.data.val_fraction = 0.0
    prepare(config)
    sampled = split_documents(tmp_path / "all", "train")
    capped = sample_config(make_config, folder, tmp_path / "capped", sample_fraction=0.5, max_docs=40, read_workers=2)
    capped.data.val_fraction = 0.0
    manifest = prepare(capped)
    assert split_documents(tmp_path / "capped", "train") == sampled[:40]
    assert manifest["sample"]["sources"][0]["kept"] == 40


def test_a_sample_of_a_text_source(tmp_path: Path, make_config, make_documents) -> None:
    docs = make_documents(400)
    (tmp_path / "corpus.txt").write_text("\n\n".join(docs))
    source = SourceConfig(type="text", path=str(tmp_path / "corpus.txt"), sample_fraction=0.5)
    config = make_config([source], sample_seed=7)
    manifest = prepare(config)
    (count,) = manifest["sample"]["sources"]
    assert count["fraction"] == 0.5 and count["rows"] is None and count["read"] == 400
    assert 200 - 50 < count["kept"] < 200 + 50
    assert kept_documents(Path(config.data.out_dir)) < set(docs)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (dict(sample_fraction=0.0), r"sample_fraction=0.0 must be in \(0, 1\]"),
        (dict(sample_fraction=1.5), r"sample_fraction=1.5 must be in \(0, 1\]"),
        (dict(sample_fraction=0.5, sample_docs=10), "sets both sample_fraction and sample_docs"),
        (dict(sample_docs=0), "sample_docs=0 must be positive"),
        (dict(type="jsonl", sample_docs=10), "sample_docs needs a parquet source .* set sample_fraction instead"),
    ],
)
def test_bad_sample_settings_are_one_clear_error(corpus, make_config, source: dict, message: str) -> None:
    folder, _ = corpus
    settings = dict(type="parquet", path=str(folder)) | source
    with pytest.raises(DataError, match=message):
        prepare(make_config([SourceConfig(**settings)]))


@pytest.mark.parametrize("read_workers", [1, 2])
def test_a_bad_row_read_by_a_reader_process_is_one_clear_error(
    tmp_path: Path, small_units, make_config, make_documents, read_workers: int
) -> None:
    texts = make_documents(100)
    folder = write_fineweb_edu(tmp_path / "pq", texts, files=2)
    table = fineweb_edu_table(texts[50:], first=50)
    scores = pa.array(list(range(49)) + [None], type=pa.int64())  # row 49 of the second file has no score
    pq.write_table(table.set_column(9, "int_score", scores), folder / "001_00000.parquet", row_group_size=20)
    config = make_config([SourceConfig(type="parquet", path=str(folder))], read_workers=read_workers,
                         score_field="int_score", min_score=3)
    with pytest.raises(DataError, match=r"001_00000\.parquet row 49: score field 'int_score' is null: give every "
                                        "record a score, or unset data.min_score"):
        prepare(config)
    assert not list(Path(config.data.out_dir).glob("*.bin"))


def test_changing_the_seed_rebuilds_only_a_sampled_source(corpus, make_config, caplog) -> None:
    caplog.set_level(logging.INFO, logger="llamalite")
    folder, _ = corpus
    config = make_config([SourceConfig(type="parquet", path=str(folder))])
    prepare(config)
    config.data.sample_seed = 5
    caplog.clear()
    prepare(config)
    assert "up to date" in caplog.text, "no source samples: the seed changes nothing"
    config.data.sources[0].sample_fraction = 0.5
    caplog.clear()
    config.data.overwrite = True  # other inputs: replacing the prepared data needs the opt-in (docs/safety.md)
    prepare(config)
    assert "rebuilding" in caplog.text


@pytest.mark.parametrize("read_workers", [1, 2])
def test_interrupted_parquet_prepare_resumes_to_identical_shards(
    corpus, small_units, make_config, tmp_path: Path, monkeypatch, caplog, read_workers: int
) -> None:
    caplog.set_level(logging.INFO, logger="llamalite")
    folder, _ = corpus
    source = SourceConfig(type="parquet", path=str(folder), sample_fraction=0.6)
    config = make_config([source], shard_tokens=300, docs_per_chunk=7, read_workers=read_workers, num_workers=2,
                         score_field="int_score", min_score=1)
    clean = clean_prepare(config, tmp_path / "clean")
    progress = interrupted_prepare(config, monkeypatch, 4)
    assert sum(len(progress["splits"][split]["shards"]) for split in ("train", "val")) == 4
    caplog.clear()
    resumed = prepare(config)
    assert "keeping 4 of 4 finished shards" in caplog.text
    assert without_timings(resumed) == without_timings(clean)
    assert shard_bytes(Path(config.data.out_dir)) == shard_bytes(tmp_path / "clean")


def test_progress_without_a_terminal_logs_rates_and_an_eta(corpus, make_config, monkeypatch, caplog) -> None:
    caplog.set_level(logging.INFO, logger="llamalite")
    monkeypatch.setattr("llamalite.data.prepare.PROGRESS_LOG_SECONDS", 0.0)
    folder, _ = corpus
    prepare(make_config([SourceConfig(type="parquet", path=str(folder))], docs_per_chunk=100))
    lines = [r.message for r in caplog.records if r.message.startswith("prepare: read ")]
    assert lines, "a progress line per chunk when the interval is 0"
    assert " of 600 documents; tokenized " in lines[-1] and "docs/s" in lines[-1] and "tokens/s" in lines[-1]
    assert "eta " in lines[-1]
    assert any(r.message.startswith("tokenized 600 documents, ") and "tokens/s" in r.message for r in caplog.records)


def test_progress_total_is_unknown_for_text_sources(text_folder: Path, make_config, monkeypatch, caplog) -> None:
    caplog.set_level(logging.INFO, logger="llamalite")
    monkeypatch.setattr("llamalite.data.prepare.PROGRESS_LOG_SECONDS", 0.0)
    prepare(make_config([SourceConfig(type="text", path=str(text_folder))], docs_per_chunk=20))
    lines = [r.message for r in caplog.records if r.message.startswith("prepare: read ")]
    assert lines and all(" of " not in line.split(";")[0] and "eta" not in line for line in lines)
