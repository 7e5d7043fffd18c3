"""tokenizer.path as a Hugging Face Hub repo id, resolved through a real HF cache folder with HF_HUB_OFFLINE=1.

huggingface_hub reads HF_HOME / HF_HUB_OFFLINE when it is imported, so each case runs in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llamalite.errors import DataError
from llamalite.files import sha256_file
from llamalite.tokenizer import _gpt2_style_from_files, hub_repo_id, resolve_tokenizer_path

pytest.importorskip("huggingface_hub")

REPO_ROOT = Path(__file__).resolve().parents[2]
GPT2_DIR = REPO_ROOT / ".." / "shared" / "data" / "tokenizers" / "gpt2"
COMMIT = "607a30d783dfa663caf39e06633721c8d4cfcd7e"
OTHER_COMMIT = "1" * 40


@pytest.fixture
def gpt2_json() -> str:
    if not (GPT2_DIR / "vocab.json").is_file():
        pytest.skip("../shared/data/tokenizers/gpt2 is not present")
    return _gpt2_style_from_files(GPT2_DIR, "<|endoftext|>").to_str()


def add_snapshot(hf_home: Path, repo: str, commit: str, files: dict[str, str | bytes]) -> Path:
    """The hub cache's layout: hub/models--<org>--<name>/snapshots/<commit>/<file>, refs/main naming the commit."""
    folder = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, content in files.items():
        path = snapshot / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content, encoding="utf-8")
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    return snapshot


def run_offline(hf_home: Path, cwd: Path, code: str) -> dict:
    """Run `code` (which prints one JSON line last) with the cache at hf_home and HF_HUB_OFFLINE=1."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env |= {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    script = textwrap.dedent(code)
    done = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


RESOLVE = """
    import json, sys
    from llamalite.errors import DataError
    from llamalite.tokenizer import Tokenizer, resolve_tokenizer_path
    try:
        source = resolve_tokenizer_path(sys.argv[1] if len(sys.argv) > 1 else {path!r})
    except DataError as exc:
        print(json.dumps({{"error": str(exc)}}))
        raise SystemExit
    tokenizer = Tokenizer.load(source.path)
    print(json.dumps({{"ids": tokenizer.encode("Hello world"), "eos_id": tokenizer.eos_id, "size": tokenizer.size,
                      "hub": source.hub_record(), "path": str(source.path)}}))
"""


@pytest.mark.parametrize("path", ["gpt2", "openai-community/gpt2"])
def test_a_hub_id_resolves_from_the_cache_offline(tmp_path: Path, gpt2_json: str, path: str) -> None:
    snapshot = add_snapshot(tmp_path / "hf", path, COMMIT, {"tokenizer.json": gpt2_json})
    result = run_offline(tmp_path / "hf", tmp_path, RESOLVE.format(path=path))
    assert result["ids"] == [15496, 995] and result["eos_id"] == 50256 and result["size"] == 50257
    assert result["hub"] == {"repo_id": path, "revision": COMMIT,
                             "sha256": {"tokenizer.json": sha256_file(snapshot / "tokenizer.json")}}


def test_a_repo_without_tokenizer_json_falls_back_to_vocab_and_merges(tmp_path: Path, gpt2_json: str) -> None:
    files = {name: (GPT2_DIR / name).read_bytes() for name in ("vocab.json", "merges.txt")}
    add_snapshot(tmp_path / "hf", "someone/gpt2-files", COMMIT, files)
    result = run_offline(tmp_path / "hf", tmp_path, RESOLVE.format(path="someone/gpt2-files"))
    assert result["ids"] == [15496, 995] and result["eos_id"] == 50256
    assert set(result["hub"]["sha256"]) == {"vocab.json", "merges.txt"}
    assert Path(result["path"]).name == COMMIT


def test_offline_with_an_empty_cache_is_one_line_naming_the_fix(tmp_path: Path) -> None:
    (tmp_path / "hf").mkdir()
    error = run_offline(tmp_path / "hf", tmp_path, RESOLVE.format(path="gpt2"))["error"]
    assert "\n" not in error
    assert error.startswith("tokenizer.path='gpt2' is not a local file or folder, and the Hugging Face Hub "
                            "tokenizer 'gpt2' cannot be fetched (HF_HUB_OFFLINE is set and it is not in the "
                            f"Hugging Face cache {tmp_path / 'hf' / 'hub'})")
    assert "`hf download gpt2 tokenizer.json --local-dir tokenizers/gpt2`" in error
    assert error.endswith("set tokenizer.path to that folder, or to a folder with vocab.json + merges.txt")

    pinned = run_offline(tmp_path / "hf", tmp_path, RESOLVE.format(path="openai-community/gpt2@v1.0"))["error"]
    assert "`hf download openai-community/gpt2 tokenizer.json --revision v1.0 --local-dir tokenizers/gpt2`" in pinned


def test_an_existing_local_folder_wins_over_a_hub_id(tmp_path: Path, gpt2_json: str) -> None:
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "tokenizer.json").write_text(gpt2_json)
    (tmp_path / "hf").mkdir()  # an empty cache: the hub would fail
    result = run_offline(tmp_path / "hf", tmp_path, RESOLVE.format(path="gpt2"))
    assert result["ids"] == [15496, 995] and result["hub"] is None and result["path"] == "gpt2"


PREPARE = """
    import json, logging, pathlib, sys
    from llamalite.config import Config, DataConfig, SourceConfig, TokenizerConfig
    from llamalite.data.prepare import prepare
    from tests.data.test_hub_tokenizer import add_snapshot

    logging.basicConfig(level=logging.INFO)
    pathlib.Path("corpus.txt").write_text("\\n\\n".join(f"Document {{i}}: hello, brown fox." for i in range(40)))
    data = DataConfig(sources=[SourceConfig(type="text", path="corpus.txt")], out_dir="prepared", val_fraction=0.1,
                      num_workers=1)
    config = Config(data=data, tokenizer=TokenizerConfig(path="gpt2"))
    runs = [prepare(config), prepare(config)]  # the second: up to date
    # The repo moves on: a new commit with a tokenizer.json of other bytes (the same vocabulary) is a new input.
    moved = json.dumps(json.loads(pathlib.Path({first!r}).read_text()))
    add_snapshot(pathlib.Path({hf_home!r}), "gpt2", {commit!r}, {{"tokenizer.json": moved}})
    config.data.overwrite = True  # other inputs: replacing prepared data needs the opt-in (docs/safety.md)
    runs.append(prepare(config))
    print(json.dumps([run["tokenizer"] | {{"input_fingerprint": run["input_fingerprint"]}} for run in runs]))
"""


def test_prepare_records_the_hub_tokenizer_and_rebuilds_when_it_changes(tmp_path: Path, gpt2_json: str) -> None:
    hf_home = tmp_path / "hf"
    snapshot = add_snapshot(hf_home, "gpt2", COMMIT, {"tokenizer.json": gpt2_json})
    script = PREPARE.format(first=str(snapshot / "tokenizer.json"), hf_home=str(hf_home), commit=OTHER_COMMIT)
    first, again, moved = run_offline(hf_home, tmp_path, script)
    assert first["origin"] == "gpt2" and first["eos_id"] == 50256 and first["padded_vocab_size"] == 50304
    assert first["hub"] == {"repo_id": "gpt2", "revision": COMMIT,
                            "sha256": {"tokenizer.json": sha256_file(snapshot / "tokenizer.json")}}
    assert again == first, "a rerun on the same cache is up to date"
    assert moved["hub"]["revision"] == OTHER_COMMIT
    assert moved["input_fingerprint"] != first["input_fingerprint"], "a new commit's tokenizer rebuilds"
    assert moved["fingerprint"] == first["fingerprint"], "the same vocabulary tokenizes the same"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("gpt2", ("gpt2", None)),
        ("openai-community/gpt2", ("openai-community/gpt2", None)),
        ("org/name@v1.0", ("org/name", "v1.0")),
        ("gpt2@607a30d783dfa663caf39e06633721c8d4cfcd7e", ("gpt2", "607a30d783dfa663caf39e06633721c8d4cfcd7e")),
        ("/abs/tokenizer", None),
        ("./gpt2", None),
        ("../tokenizers/gpt2", None),
        ("~/gpt2", None),
        ("a/b/c", None),
        ("tokenizer.json", None),
        ("org/bad--name", None),
    ],
)
def test_what_reads_as_a_hub_repo_id(path: str, expected) -> None:
    assert hub_repo_id(path) == expected


def test_a_missing_local_path_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"tokenizer not found: .*nope\.json \(set tokenizer.path to an existing"):
        resolve_tokenizer_path(str(tmp_path / "nope.json"))
