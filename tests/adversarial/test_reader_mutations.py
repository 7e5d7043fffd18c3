"""Issue 28, item 4: readers that distrust their file.

Every file format a command reads, taken from real artefacts (prepared data, a trained run with its records and
checkpoints, a transformers export, a task file, instruction data), is mutated -- truncated, bytes flipped, a line
torn in the middle, emptied, given the wrong top-level JSON type, made invalid UTF-8, or, for fields that hold paths,
pointed outside its folder -- and every command that reads it must exit 0 or with one `llamalite: error:` line.
Mutations are drawn by hypothesis (derandomized, a bounded number per format).

The artefacts are built once per module; each case mutates one file in place and the tree is restored afterwards
(every file's bytes, and nothing a command added left behind).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamalite.config import Config, save_config
from llamalite.data.prepare import prepare
from tests.adversarial.conftest import assert_clean_outcome, run_main, tree_snapshot
from tests.conftest import small_config
from tests.test_sft import toy_records

PROMPT = "the king"
WORDS = "red green blue cat dog sun moon tree star fish".split()


# ------------------------------------------------------------------------------------------------- artefacts
def _piqa_records(count: int) -> list[dict]:
    rng = random.Random(0)
    phrase = lambda n: " ".join(rng.choice(["the", "king", "queen", "night", "day"]) for _ in range(n))  # noqa: E731
    return [{"goal": phrase(5), "sol1": phrase(3), "sol2": phrase(4), "label": i % 2} for i in range(count)]


@pytest.fixture(scope="module")
def root(corpus_dir, tmp_path_factory) -> Path:
    """A prepared data dir, a run with 2 checkpoints, metrics/events/evals/samples, an HF export with an index, a task
    file, instruction data and the configs of train and sft, all under one folder."""
    root = tmp_path_factory.mktemp("reader_mutations")
    config = small_config(corpus_dir, root / "data", root / "run", max_steps=4, save_interval=2, sample_interval=2,
                          eval_interval=2, sample_prompts=["the king"], sample_tokens=4)
    prepare(config)
    save_config(config, root / "train.yaml")
    assert run_main_plain(["train", root / "train.yaml"]) == 0
    (root / "tasks").mkdir()
    (root / "tasks" / "piqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _piqa_records(8)))
    (root / "tasks" / "piqa.json").write_text(json.dumps(_piqa_records(8), indent=1))
    pyarrow, parquet = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    parquet.write_table(pyarrow.Table.from_pylist(_piqa_records(8)), root / "tasks" / "piqa.parquet")
    assert run_main_plain(["eval", root / "run", "--tasks", "piqa", "--task-file", f"piqa={root / 'tasks/piqa.jsonl'}",
                           "--limit", "4", "--no-val-loss"]) == 0
    assert run_main_plain(["export", checkpoint(root), root / "hf", "--shard-size", "20KB"]) == 0
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_records(60)))
    sft = Config(name="sft")
    sft.sft.base, sft.sft.data, sft.sft.template = str(checkpoint(root)), str(root / "sft.jsonl"), "plain"
    sft.sft.val_fraction, sft.sft.lora.r = 0.1, 2
    for key, value in dict(run_dir=str(root / "sft_run"), dtype="fp32", batch_tokens=64, micro_batch_size=4,
                           seq_len=16, max_steps=1, eval_interval=0, progress=False).items():
        setattr(sft.train, key, value)
    save_config(sft, root / "sft.yaml")
    return root


def run_main_plain(argv: list) -> int:
    from llamalite.cli import main

    return main([str(a) for a in argv])


def checkpoint(root: Path) -> Path:
    return sorted((root / "run" / "checkpoints").glob("step_*"))[-1]


# ------------------------------------------------------------------------------------------------- commands
def command_line(command: str, r: Path) -> list:
    """The command line of each command the table names, on the artefacts under `r`."""
    ckpt = checkpoint(r)
    return {
        "train": ["train", r / "train.yaml", "train.max_steps=6", "train.schedule_change=stretch"],  # a resume
        "eval-val": ["eval", r / "run", "--val-only"],
        "eval-tasks": ["eval", ckpt, "--tasks", "piqa", "--task-file", f"piqa={r / 'tasks/piqa.jsonl'}", "--limit", "3",
                       "--no-val-loss"],
        **{f"eval-tasks-{kind}": ["eval", ckpt, "--tasks", "piqa", "--task-file", f"piqa={r / f'tasks/piqa.{kind}'}",
                                  "--limit", "3", "--no-val-loss"] for kind in ("json", "parquet")},
        "export": ["export", ckpt, r / "out" / "hf"],
        "import": ["import", r / "hf", r / "out" / "imported"],
        "generate": ["generate", ckpt, "--prompt", PROMPT, "--max-new-tokens", "2"],
        "generate-tokenizer": ["generate", ckpt, "--prompt", PROMPT, "--max-new-tokens", "2",
                               "--tokenizer", r / "data" / "tokenizer.json"],
        "report": ["report", r / "run", "--out", r / "out" / "report"],
        "sft": ["sft", r / "sft.yaml"],
    }[command]


# ------------------------------------------------------------------------------------------------- mutations
def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(len(data))] if data else data


def flip_bytes(data: bytes, rng: random.Random) -> bytes:
    if not data:
        return data
    mutated = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        mutated[rng.randrange(len(mutated))] ^= rng.randint(1, 255)
    return bytes(mutated)


def tear_line(data: bytes, rng: random.Random) -> bytes:
    """One line cut short in the middle of the file (a writer killed mid-line, then appended to again); a file of
    one line loses a piece of its middle instead."""
    lines = data.split(b"\n")
    middle = [i for i in range(len(lines) - 1) if len(lines[i]) > 1 and any(line.strip() for line in lines[i + 1:])]
    if middle:
        i = rng.choice(middle)
        lines[i] = lines[i][: rng.randrange(1, len(lines[i]))]
        return b"\n".join(lines)
    start = rng.randrange(len(data) // 2 or 1)
    return data[:start] + data[start + rng.randrange(1, len(data) - start or 2):]


def empty(data: bytes, rng: random.Random) -> bytes:
    return b""


WRONG_VALUES = (b"[]", b"{}", b'"text"', b"3", b"null", b"[1, 2]", b"true")


def wrong_type(data: bytes, rng: random.Random) -> bytes:
    """The top-level JSON value (of the file, or of one line of JSON Lines) replaced by one of another type."""
    lines = data.split(b"\n")
    records = [i for i, line in enumerate(lines) if line.strip()]
    if len(records) > 1:
        lines[rng.choice(records)] = rng.choice(WRONG_VALUES)
        return b"\n".join(lines)
    top = data.lstrip()[:1]
    return rng.choice([v for v in WRONG_VALUES if v[:1] != top])


def invalid_utf8(data: bytes, rng: random.Random) -> bytes:
    at = rng.randrange(len(data) + 1)
    bad = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80\x80", b"\xf8\x88\x80\x80\x80"])
    return data[:at] + bad + data[at:]


BINARY = (truncate, flip_bytes, empty)
TEXT = (truncate, flip_bytes, tear_line, empty, invalid_utf8)
JSON = (*TEXT, wrong_type)


# ------------------------------------------------------------------------------------------------- path escapes
def _outside_copy(root: Path, source: Path) -> Path:
    """A valid copy of `source` outside every artefact folder: following a path to it would 'work'."""
    outside = root / "outside"
    outside.mkdir(exist_ok=True)
    shutil.copy(source, outside / source.name)
    return outside / source.name


def _escaping_name(folder: Path, target: Path, rng: random.Random) -> str:
    """A name, as written in a file of `folder`, that leads to `target` outside it: `..`, absolute, or a symlink."""
    kind = rng.choice(["dotdot", "absolute", "symlink"])
    if kind == "dotdot":
        return os.path.relpath(target, folder)
    if kind == "absolute":
        return str(target)
    link = folder / f"link_{target.name}"
    link.symlink_to(target)
    return link.name


def escape_manifest(root: Path, path: Path, rng: random.Random) -> None:
    manifest = json.loads(path.read_text())
    if rng.random() < 0.5:
        shard = rng.choice(manifest["splits"]["train"]["shards"] + manifest["splits"]["val"]["shards"])
        shard["file"] = _escaping_name(path.parent, _outside_copy(root, path.parent / shard["file"]), rng)
    else:
        tokenizer = manifest["tokenizer"]
        tokenizer["file"] = _escaping_name(path.parent, _outside_copy(root, path.parent / tokenizer["file"]), rng)
    path.write_text(json.dumps(manifest))


def escape_checksums(root: Path, path: Path, rng: random.Random) -> None:
    from llamalite.files import sha256_file

    checksums = json.loads(path.read_text())
    target = _outside_copy(root, root / "train.yaml")
    checksums[_escaping_name(path.parent, target, rng)] = sha256_file(target)
    path.write_text(json.dumps(checksums))


def escape_index(root: Path, path: Path, rng: random.Random) -> None:
    index = json.loads(path.read_text())
    weight_map = index["weight_map"]
    tensor = rng.choice(sorted(weight_map))
    weight_map[tensor] = _escaping_name(path.parent, _outside_copy(root, path.parent / weight_map[tensor]), rng)
    path.write_text(json.dumps(index))


# ------------------------------------------------------------------------------------------------- the table
# name: (file, mutations, commands that read it, those that must refuse any change to it,
#        (how to make its path fields escape, the commands that must refuse that) or None)
FORMATS = {
    "manifest": ("data/manifest.json", JSON, ("train", "eval-val"), (), (escape_manifest, ("train",))),
    "train shard": ("data/train_000000.bin", BINARY, ("train",), ("train",), None),
    "val shard": ("data/val_000000.bin", BINARY, ("train", "eval-val"), ("train",), None),
    "tokenizer.json": ("data/tokenizer.json", JSON, ("train",), (), None),
    "metrics.jsonl": ("run/metrics.jsonl", JSON, ("export", "report", "train"), (), None),
    "events.jsonl": ("run/events.jsonl", JSON, ("report", "train"), (), None),
    "evals.jsonl": ("run/evals.jsonl", JSON, ("export", "report", "eval-tasks"), (), None),
    "samples.jsonl": ("run/samples.jsonl", JSON, ("report",), (), None),
    "run config.yaml": ("run/config.yaml", TEXT, ("report",), (), None),
    "trainer_state.json": ("CKPT/trainer_state.json", JSON, ("generate", "export", "train"), ("generate", "export"),
                           None),
    "trainer_state.json, checksums recomputed": ("CKPT/trainer_state.json", JSON, ("generate", "export", "train"), (),
                                                 None),
    "checksums.json": ("CKPT/checksums.json", JSON, ("generate", "train"), (), (escape_checksums, ("train",))),
    "checkpoint weights": ("CKPT/model.safetensors", BINARY, ("generate",), ("generate",), None),
    "hf config.json": ("hf/config.json", JSON, ("import",), (), None),
    "hf index": ("hf/model.safetensors.index.json", JSON, ("import",), (), (escape_index, ("import",))),
    "hf weights": ("hf/model-00001-of-00007.safetensors", BINARY, ("import",), (), None),
    "hf tokenizer.json": ("hf/tokenizer.json", JSON, ("import",), (), None),
    "hf tokenizer_config.json": ("hf/tokenizer_config.json", JSON, ("import",), (), None),
    "task file": ("tasks/piqa.jsonl", JSON, ("eval-tasks",), (), None),
    "task file (JSON array)": ("tasks/piqa.json", JSON, ("eval-tasks-json",), (), None),
    "task file (Parquet)": ("tasks/piqa.parquet", BINARY, ("eval-tasks-parquet",), (), None),
    "instruction data": ("sft.jsonl", JSON, ("sft",), (), None),
}
CASES = [(name, mutation) for name, (_, mutations, _, _, escape) in FORMATS.items()
         for mutation in [m.__name__ for m in mutations] + (["path_escape"] if escape else [])]
MUTATIONS = {m.__name__: m for m in JSON}
EXAMPLES_PER_CASE = 3


def recompute_checksum(path: Path) -> None:
    from llamalite.files import sha256_file

    checksums_file = path.parent / "checksums.json"
    checksums = json.loads(checksums_file.read_text())
    checksums[path.name] = sha256_file(path)
    checksums_file.write_text(json.dumps(checksums))


def resolve(root: Path, relative: str) -> Path:
    return checkpoint(root) / relative.removeprefix("CKPT/") if relative.startswith("CKPT/") else root / relative


class Snapshot(dict):
    """Relative path -> bytes of every file of a tree (shown briefly in hypothesis's reports)."""

    def __repr__(self) -> str:
        return f"<snapshot of {len(self)} files>"


def snapshot(root: Path) -> Snapshot:
    return Snapshot({str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*")
                     if p.is_file() and not p.is_symlink()})


def restore(root: Path, saved: dict[str, bytes]) -> None:
    """Put the tree back as `saved` holds it: every file's bytes, and nothing else."""
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        name = str(path.relative_to(root))
        if path.is_symlink() or (path.is_file() and name not in saved):
            path.unlink()
        elif path.is_dir() and not any(key.startswith(name + os.sep) for key in saved):
            shutil.rmtree(path)
    for name, data in saved.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file() or path.read_bytes() != data:
            path.write_bytes(data)


@pytest.fixture(scope="module")
def pristine(root) -> dict[str, bytes]:
    return snapshot(root)


@pytest.mark.parametrize("name,mutation", CASES, ids=[f"{n}-{m}" for n, m in CASES])
@settings(max_examples=EXAMPLES_PER_CASE, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1))
def test_a_mutated_file_is_read_or_refused_in_one_line(root, pristine, capsys, monkeypatch, name, mutation, seed):
    relative, _, commands, must_refuse, escape = FORMATS[name]
    if mutation == "path_escape":
        must_refuse = escape[1]
    monkeypatch.setattr("matplotlib.figure.Figure.savefig", lambda self, path, **kw: Path(path).write_bytes(b""))
    rng = random.Random(seed)
    path = resolve(root, relative)
    try:
        if mutation == "path_escape":
            escape[0](root, path, rng)
        else:
            original = path.read_bytes()
            mutated = MUTATIONS[mutation](original, rng)
            if mutated == original:  # nothing to change (an empty file): nothing to try
                return
            path.write_bytes(mutated)
            if "checksums recomputed" in name:  # as a careless editor or an attacker would: past the checksum
                recompute_checksum(path)
        for command in commands:
            outcome = run_main(capsys, command_line(command, root))
            if mutation == "path_escape" and command in must_refuse and outcome.code == 0:
                assert "only files inside" in outcome.err, outcome.err  # refused it, and went on without it
            else:
                assert_clean_outcome(outcome, allow_success=command not in must_refuse)
    finally:
        restore(root, pristine)


# ------------------------------------------------------------------------------------------------- shard integrity
def test_shards_are_hashed_once_per_content_and_a_corrupted_one_names_prepare(root, pristine, monkeypatch):
    from llamalite.data import shards
    from llamalite.data.loader import TokenWindows

    hashed = []
    real_sha256 = shards.sha256_file
    monkeypatch.setattr(shards, "sha256_file", lambda path: hashed.append(Path(path).name) or real_sha256(path))
    new_process(monkeypatch)
    try:
        TokenWindows(root / "data", "train", 16)
        new_process(monkeypatch)  # only the cache file is left
        TokenWindows(root / "data", "train", 16)
        assert hashed.count("train_000000.bin") <= 1  # the cache of the fixture's run may already hold it
        shard = root / "data" / "train_000000.bin"
        data = bytearray(shard.read_bytes())
        data[-1] ^= 0xFF  # one token changed: same size, same header
        shard.write_bytes(bytes(data))
        with pytest.raises(Exception, match="does not match the sha256 its manifest records.*llamalite prepare"):
            TokenWindows(root / "data", "train", 16)
    finally:
        restore(root, pristine)


def test_token_ids_beyond_the_vocabulary_are_refused(root, pristine, monkeypatch):
    from llamalite.data.loader import TokenWindows
    from llamalite.errors import DataError

    manifest_file = root / "data" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["tokenizer"]["padded_vocab_size"] = 100  # the shards hold ids up to ~300
    new_process(monkeypatch)
    try:
        manifest_file.write_text(json.dumps(manifest))
        with pytest.raises(DataError, match="outside the vocabulary of 100 ids"):
            TokenWindows(root / "data", "train", 16)
    finally:
        restore(root, pristine)


def test_a_read_only_cache_folder_verifies_in_memory_and_the_data_folder_is_never_written(root, pristine, tmp_path,
                                                                                          monkeypatch):
    from llamalite.data import shards
    from llamalite.data.loader import TokenWindows

    new_process(monkeypatch)
    monkeypatch.setenv("LLAMALITE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(shards, "atomic_write_text", lambda path, text: (_ for _ in ()).throw(PermissionError(13, "")))
    before = tree_snapshot(root / "data")
    try:
        assert TokenWindows(root / "data", "train", 16).num_windows > 0
        assert not shards.verification_cache_file().exists()
        assert tree_snapshot(root / "data") == before
    finally:
        restore(root, pristine)


def new_process(monkeypatch) -> None:
    """What a new process knows of verified shards: only what the cache file holds."""
    from llamalite.data import shards

    monkeypatch.setattr(shards, "_verified_in_memory", {})
    monkeypatch.setattr(shards, "_cache_loaded", False)


@given(name=st.one_of(st.text(max_size=12), st.sampled_from(["..", "../x", "a/../../x", "/etc/passwd", "./a/../b"]),
                      st.integers(), st.none()))
@settings(max_examples=60, derandomize=True, deadline=None, database=None)
def test_contained_path_never_leaves_its_folder(tmp_path_factory, name):
    from llamalite.errors import DataError
    from llamalite.records import contained_path

    folder = tmp_path_factory.getbasetemp() / "contained"
    folder.mkdir(exist_ok=True)
    try:
        path = contained_path(folder, name, "a test file", "fix it")
    except DataError as exc:
        assert "\n" not in str(exc)
        return
    assert path.resolve().is_relative_to(folder.resolve())


# ------------------------------------------------------------------------------------------------- issue 28 red team
# Every reader of a format goes through records.py: Parquet through parquet_errors, JSON Lines sources through
# parse_json, a run's records through parse_run_record; task records through the task builders' checks; tokenizers
# through Tokenizer's model check and encoding wrapper. Each is tried with drawn damage, at the choke point (many
# cases, cheap) and through the command (a few cases).
CLASS_SETTINGS = dict(derandomize=True, deadline=None, database=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _one_line_error(outcome, name: str | None = None) -> None:
    assert_clean_outcome(outcome)
    if outcome.code and name is not None:
        assert name in outcome.err.splitlines()[-1], outcome.err[-500:]


@st.composite
def parquet_damage(draw, data: bytes) -> bytes:
    """A real Parquet file truncated, with bytes flipped in its footer or body, or with its middle zeroed."""
    kind = draw(st.sampled_from(["truncate", "footer", "body", "zero_middle", "empty_between_magic"]))
    size = len(data)
    if kind == "truncate":
        return data[:draw(st.integers(0, size - 1))]
    if kind == "empty_between_magic":
        return b"PAR1" + b"\0" * draw(st.integers(0, 64)) + b"PAR1"
    mutated = bytearray(data)
    if kind == "zero_middle":
        start = draw(st.integers(4, size // 2))
        end = min(size, start + draw(st.integers(1, size // 2)))
        mutated[start:end] = bytes(end - start)
        return bytes(mutated)
    footer = int.from_bytes(data[-8:-4], "little") + 8
    low, high = (size - footer, size - 1) if kind == "footer" else (4, max(4, size - footer - 1))
    for _ in range(draw(st.integers(1, 4))):
        mutated[draw(st.integers(low, high))] ^= draw(st.integers(1, 255))
    return bytes(mutated)


def _parquet_corpus(folder: Path, rows: int = 40) -> Path:
    pyarrow, parquet = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    folder.mkdir(parents=True, exist_ok=True)
    texts = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(30)) for i in range(rows)]
    parquet.write_table(pyarrow.table({"text": texts}), folder / "a.parquet", row_group_size=10)
    return folder / "a.parquet"


def _prepare_config(root: Path, work: Path, sources: list[dict], read_workers: int = 1) -> Path:
    from llamalite.config import SourceConfig

    config = Config(name="t")
    config.tokenizer.path = str(root / "data" / "tokenizer.json")  # a fixed tokenizer: prepare only reads and encodes
    config.data.sources = [SourceConfig(**source) for source in sources]
    config.data.out_dir, config.data.val_fraction = str(work / "out"), 0.2
    config.data.num_workers, config.data.read_workers = 1, read_workers
    save_config(config, work / "prepare.yaml")
    return work / "prepare.yaml"


@settings(max_examples=14, **CLASS_SETTINGS)
@given(damage=st.data(), read_workers=st.sampled_from([1, 2]))
def test_a_damaged_parquet_source_is_one_line_naming_it(root, tmp_path_factory, capsys, damage, read_workers):
    work = tmp_path_factory.mktemp("parquet_source")
    good = _parquet_corpus(work / "corpus")
    bad = work / "corpus" / "c.parquet"
    bad.write_bytes(damage.draw(parquet_damage(good.read_bytes())))
    config = _prepare_config(root, work, [{"type": "parquet", "path": str(work / "corpus")}], read_workers)
    _one_line_error(run_main(capsys, ["prepare", config]), "c.parquet")


@settings(max_examples=30, **CLASS_SETTINGS)
@given(damage=st.data())
def test_every_parquet_reader_turns_pyarrow_errors_into_one_line(root, tmp_path_factory, damage):
    """The readers themselves, more cases: the layout (metadata), the row-group reader and the task-file reader."""
    from llamalite.config import SourceConfig
    from llamalite.data.sources import ParquetUnit, _forget_open_parquet, parquet_layout, read_parquet_unit
    from llamalite.errors import DataError
    from llamalite.eval.tasks import read_records

    work = tmp_path_factory.mktemp("parquet_readers")
    good = _parquet_corpus(work)
    path = work / "b.parquet"
    path.write_bytes(damage.draw(parquet_damage(good.read_bytes())))
    source = SourceConfig(type="parquet", path=str(path))
    for read in (lambda: parquet_layout(source, ("text",)), lambda: read_records(path),
                 lambda: read_parquet_unit(ParquetUnit(str(path), (0, 1, 2, 3), 0, 40, ("text",), None))):
        try:
            read()
        except DataError as exc:
            assert "\n" not in str(exc) and str(path) in str(exc)
        finally:
            _forget_open_parquet()


@settings(max_examples=6, **CLASS_SETTINGS)
@given(damage=st.data())
def test_a_damaged_parquet_task_file_is_one_line(root, pristine, capsys, damage):
    path = root / "tasks" / "piqa.parquet"
    try:
        path.write_bytes(damage.draw(parquet_damage(pristine["tasks/piqa.parquet"])))
        _one_line_error(run_main(capsys, command_line("eval-tasks-parquet", root)), "piqa.parquet")
    finally:
        restore(root, pristine)


# Lines a corpus or a run's records may hold that no JSON writer of ours produced.
HOSTILE_LINES = st.one_of(
    st.integers(1, 4).map(lambda k: "[" * (10 ** (k + 1)) + "]" * (10 ** (k + 1))),  # deep nesting
    st.integers(1, 3).map(lambda k: '{"x": ' + "{" * 10 ** (k + 2) + "}" * 10 ** (k + 2) + "}"),
    st.integers(4300, 6000).map(lambda n: '{"text": 1' + "0" * n + ', "step": 1' + "0" * n + "}"),  # huge numbers
    st.sampled_from(['{"text": NaN, "step": NaN}', '{"step": Infinity}', '{"step": -Infinity, "text": "x"}',
                     '{"text": 1e999, "step": 1e999}', "[1, 2]", '"text"', "null", "42", "true", '{"text": 5}',
                     '{"text": ["a"]}', '{"text": {"a": 1}}', '{"step": "3"}', '{"step": 1.5}', '{"step": true}',
                     '{"text": "ok", "step": 2', '{"text": "\\ud800"}', "{", "}", "\x00", '{"a": 1}{"b": 2}']),
    st.binary(min_size=1, max_size=40).map(lambda b: b.replace(b"\n", b" ").replace(b"\r", b" ")),  # bytes, not UTF-8
    st.text(min_size=1, max_size=40).map(lambda t: " ".join(t.splitlines()) or "x"),
)


def _as_bytes(line: str | bytes) -> bytes:
    return line if isinstance(line, bytes) else line.encode("utf-8", errors="surrogatepass")


def _insert_lines(data: bytes, lines: list, positions: list[int]) -> bytes:
    rows = data.splitlines(keepends=True)
    for line, position in zip(lines, positions, strict=True):
        rows.insert(position % (len(rows) + 1), _as_bytes(line) + b"\n")
    return b"".join(rows)


@settings(max_examples=60, **CLASS_SETTINGS)
@given(line=HOSTILE_LINES, position=st.integers(0, 100), text_field=st.sampled_from(["text", "body"]))
def test_a_jsonl_source_line_is_read_or_refused_in_one_line(tmp_path_factory, line, position, text_field):
    from llamalite.data.sources import _read_jsonl_file
    from llamalite.errors import DataError

    path = tmp_path_factory.mktemp("jsonl_source") / "a.jsonl"
    good = "".join(json.dumps({text_field: f"{w} {w}"}) + "\n" for w in WORDS).encode()
    path.write_bytes(_insert_lines(good, [line], [position]))
    try:
        documents = list(_read_jsonl_file(path, text_field, None))
    except DataError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
        return
    assert all(isinstance(document.text, str) for document in documents)


@settings(max_examples=5, **CLASS_SETTINGS)
@given(line=HOSTILE_LINES, position=st.integers(0, 100))
def test_a_jsonl_source_with_a_hostile_line_prepares_or_stops_in_one_line(root, tmp_path_factory, capsys, line,
                                                                          position):
    work = tmp_path_factory.mktemp("jsonl_prepare")
    (work / "corpus").mkdir()
    good = "".join(json.dumps({"text": " ".join(WORDS[i:] + WORDS[:i])}) + "\n" for i in range(10)) * 4
    (work / "corpus" / "a.jsonl").write_bytes(_insert_lines(good.encode(), [line], [position]))
    config = _prepare_config(root, work, [{"type": "jsonl", "path": str(work / "corpus")}])
    _one_line_error(run_main(capsys, ["prepare", config]), "a.jsonl")


def _step_records(steps: int) -> list[bytes]:
    return [json.dumps({"step": step, "loss": 1.0 / step, "event": "checkpoint", "checkpoint": f"step_{step:07d}"})
            .encode() + b"\n" for step in range(1, steps + 1)]


@settings(max_examples=60, **CLASS_SETTINGS)
@given(lines=st.lists(HOSTILE_LINES, min_size=1, max_size=3), positions=st.lists(st.integers(0, 20), min_size=3,
                                                                                 max_size=3), keep=st.integers(0, 10))
def test_run_records_skip_hostile_lines_and_truncation_keeps_the_good_ones(tmp_path_factory, lines, positions, keep):
    from llamalite.records import read_run_records
    from llamalite.train.metrics import checkpoints_recorded, last_step, truncate_jsonl_after

    path = tmp_path_factory.mktemp("records") / "metrics.jsonl"
    good = _step_records(8)
    path.write_bytes(_insert_lines(b"".join(good), lines, positions[:len(lines)]))
    records, _ = read_run_records(path)
    assert [r["step"] for r in records if r.get("loss") is not None and isinstance(r["step"], int)][:8] == \
        list(range(1, 9))
    assert set(checkpoints_recorded(path)) >= {f"step_{s:07d}" for s in range(1, 9)}
    assert last_step(path) is not None and last_step(path) >= 8
    truncate_jsonl_after(path, keep)
    kept = [line for line in path.read_bytes().splitlines(keepends=True) if line.strip()]
    assert kept == good[:keep]  # the good lines up to the step, hostile ones gone


RUN_RECORDS = ("metrics.jsonl", "events.jsonl", "evals.jsonl", "samples.jsonl")


@settings(max_examples=4, **CLASS_SETTINGS)
@given(name=st.sampled_from(RUN_RECORDS), lines=st.lists(HOSTILE_LINES, min_size=1, max_size=2),
       positions=st.lists(st.integers(0, 20), min_size=2, max_size=2))
def test_train_resume_and_report_take_hostile_record_lines(root, pristine, capsys, monkeypatch, name, lines,
                                                           positions):
    monkeypatch.setattr("matplotlib.figure.Figure.savefig", lambda self, path, **kw: Path(path).write_bytes(b""))
    path = root / "run" / name
    try:
        path.write_bytes(_insert_lines(pristine[f"run/{name}"], lines, positions[:len(lines)]))
        for command in ("report", "train"):
            assert_clean_outcome(run_main(capsys, command_line(command, root)))
    finally:
        restore(root, pristine)


# One record of each task in its Hugging Face schema; drawn changes replace or remove one field.
TASK_RECORDS = {
    "hellaswag": {"activity_label": "Cooking", "ctx_a": "A woman cuts.", "ctx_b": "she", "endings": ["a", "b", "c"],
                  "label": "1"},
    "arc_easy": {"question": "Which?", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "B"},
    "piqa": {"goal": "a", "sol1": "b", "sol2": "d", "label": 0},
    "winogrande": {"sentence": "He _ it.", "option1": "ate", "option2": "saw", "answer": "2"},
    "boolq": {"passage": "P", "question": "is it", "label": 1},
    "openbookqa": {"question_stem": "Q", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "A"},
    "lambada_openai": {"text": "he said hello"},
}
LABEL_FIELDS = {"hellaswag": "label", "piqa": "label", "boolq": "label", "winogrande": "answer"}
ODD_VALUES = st.one_of(
    st.sampled_from([1.5, "", None, " ", "[x]", 1e308, float("inf"), float("nan"), True, False, -1, 2, 7, 10 ** 30,
                     "1", "2", "A", "E", "-1", "1.0", "１", [], [""], ["a"], ["a", ""], {}, {"text": []},
                     {"text": ["x"], "label": "A"}, {"text": "xy", "label": "AB"}, 0]),
    st.integers(-5, 5), st.text(max_size=5), st.lists(st.one_of(st.text(max_size=3), st.integers()), max_size=3),
)


def _draw_task_record(draw, task: str) -> tuple[dict, str, object]:
    record = json.loads(json.dumps(TASK_RECORDS[task]))
    label = [LABEL_FIELDS[task]] if task in LABEL_FIELDS else []
    field = draw(st.sampled_from(label + sorted(set(record) - set(label)) + ["choices.text", "choices.label"]))
    value = draw(ODD_VALUES)
    if field.startswith("choices."):
        if "choices" not in record:
            return record, field, value
        record["choices"][field.split(".")[1]] = value
    elif draw(st.booleans()) and draw(st.integers(0, 9)) == 0:
        del record[field]
    else:
        record[field] = value
    return record, field, value


@settings(max_examples=150, **CLASS_SETTINGS)
@given(task=st.sampled_from(sorted(TASK_RECORDS)), data=st.data())
def test_task_records_are_examples_fit_to_score_or_one_line(tmp_path_factory, task, data):
    from llamalite.errors import DataError
    from llamalite.eval.tasks import TASKS, load_task

    record, field, value = _draw_task_record(data.draw, task)
    path = tmp_path_factory.mktemp("task") / f"{task}.jsonl"
    path.write_text(json.dumps(record) + "\n")
    try:
        [example], _ = load_task(TASKS[task], path)
    except DataError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
        return
    assert all(isinstance(text, str) for text in example.contexts + example.continuations + example.choices)
    assert all(example.choices) and 0 <= example.gold < len(example.choices)
    if field == LABEL_FIELDS.get(task) and field in record:
        allowed = (int,) if task != "hellaswag" else (int, str)
        assert type(record[field]) in allowed + ((str,) if task == "winogrande" else ()), record


@pytest.mark.parametrize("task", sorted(TASK_RECORDS))
@settings(max_examples=3, **CLASS_SETTINGS)
@given(data=st.data())
def test_eval_on_a_drawn_task_record_scores_or_stops_in_one_line(root, pristine, capsys, tmp_path_factory, task,
                                                                 data):
    record, field, value = _draw_task_record(data.draw, task)
    path = tmp_path_factory.mktemp("task_eval") / f"{task}.jsonl"
    path.write_text(json.dumps(record) + "\n")
    try:
        outcome = run_main(capsys, ["eval", checkpoint(root), "--tasks", task, "--task-file", f"{task}={path}",
                                    "--no-val-loss"])
        _one_line_error(outcome, str(path))
        if field == LABEL_FIELDS.get(task) and field in record and type(value) not in (int, str):
            assert outcome.code == 2, f"a label of {value!r} was accepted"  # never rounded, never taken as a bool
    finally:
        restore(root, pristine)


@st.composite
def tokenizer_model_damage(draw, tokenizer_json: dict) -> dict:
    data = json.loads(json.dumps(tokenizer_json))
    model = data["model"]
    kind = draw(st.sampled_from(["replace", "type", "vocab", "merges", "unk_token"]))
    if kind == "type":
        model["type"] = draw(st.sampled_from(["Unigram", "WordPiece", "WordLevel", "BPE", "bpe", "", 5]))
    elif kind == "vocab":
        tokens = sorted(model["vocab"], key=model["vocab"].get)
        keep = draw(st.integers(0, len(tokens)))
        model["vocab"] = {t: i for i, t in enumerate(tokens[:keep])} if draw(st.booleans()) else \
            draw(st.sampled_from([[], None, "x", [["a", 0.0]], {"a": -1}, {"a": 2 ** 40}]))
    elif kind == "merges":
        model["merges"] = draw(st.sampled_from([[], None, ["a b"], [["Ġ", "zz"]], ["x y z"], "a b",
                                                model["merges"][:3]]))
    elif kind == "unk_token":
        model["unk_token"] = draw(st.sampled_from(["<unk>", "a", "", None, 5]))
        model["byte_fallback"] = draw(st.booleans())
    else:
        data["model"] = draw(st.sampled_from([
            {"type": "Unigram", "vocab": [["a", 0.0]]}, {"type": "Unigram", "vocab": [["a", 0.0], ["<unk>", 0.0]],
                                                         "unk_id": 1},
            {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "<unk>"},
            {"type": "WordPiece", "vocab": {"a": 0, "[UNK]": 1}, "unk_token": "[UNK]"},
            {"type": "BPE", "vocab": {"a": 0}, "merges": [], "unk_token": "<unk>"}]))
    return data


@settings(max_examples=40, **CLASS_SETTINGS)
@given(data=st.data())
def test_a_tokenizer_model_llamalite_cannot_use_is_refused_at_load_or_encodes(root, tmp_path_factory, data):
    from llamalite.errors import DataError
    from llamalite.tokenizer import Tokenizer

    original = json.loads((root / "data" / "tokenizer.json").read_text())
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    path.write_text(json.dumps(data.draw(tokenizer_model_damage(original))))
    try:
        tokenizer = Tokenizer.load(path)
        for texts in (["the king", "ünïcödé ✓ 漢字", "\x00\x01 tab\t"], [""]):
            tokenizer.encode_batch(texts)
            tokenizer.encode_sequences(texts)
            [tokenizer.encode(text) for text in texts]
    except DataError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=10, **CLASS_SETTINGS)
@given(data=st.data())
def test_prepare_with_a_damaged_tokenizer_model_succeeds_or_stops_in_one_line(root, corpus_dir, tmp_path_factory,
                                                                              capsys, data):
    original = json.loads((root / "data" / "tokenizer.json").read_text())
    work = tmp_path_factory.mktemp("tokenizer_prepare")
    (work / "tokenizer.json").write_text(json.dumps(data.draw(tokenizer_model_damage(original))))
    config = _prepare_config(root, work, [{"type": "text", "path": str(corpus_dir)}])
    text = config.read_text().replace(str(root / "data" / "tokenizer.json"), str(work / "tokenizer.json"))
    config.write_text(text)
    outcome = run_main(capsys, ["prepare", config])
    _one_line_error(outcome)
    if outcome.code and str(work / "tokenizer.json") in outcome.err.splitlines()[-1]:
        assert not (work / "out" / "tokenizer.json").exists()  # refused at load: nothing written
