"""Issue 28, red-team items 5, 6 and 14: weights files are distrusted.

- A damaged model.safetensors (its header mutated by hypothesis: header length, offsets, dtype strings, shapes, extra
  and missing entries, metadata types, a header that is not a JSON object, huge integers), checksums recomputed, is
  read or refused in one line by every command that loads it (generate, export, eval --val-only, a train resume),
  through the one reader, model/weights_file.read_safetensors.
- Weights holding NaN or infinity (a diverged run) are refused by generate and export; non-finite logits in sampling
  are one line, never torch's RuntimeError.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from llamalite.config import save_config
from llamalite.data.prepare import prepare
from llamalite.errors import CheckpointError, ExportError
from llamalite.generate import pick_tokens
from llamalite.model.weights_file import read_safetensors
from tests.adversarial.conftest import assert_clean_outcome, run_main
from tests.adversarial.test_reader_mutations import recompute_checksum, restore, run_main_plain, snapshot
from tests.conftest import small_config

SLOW = dict(derandomize=True, deadline=None, database=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def root(corpus_dir, tmp_path_factory) -> Path:
    """Prepared data and a run with one checkpoint (step 2), under one folder."""
    root = tmp_path_factory.mktemp("weights")
    config = small_config(corpus_dir, root / "data", root / "run", max_steps=2, save_interval=2, eval_interval=0)
    prepare(config)
    save_config(config, root / "train.yaml")
    assert run_main_plain(["train", root / "train.yaml"]) == 0
    return root


@pytest.fixture(scope="module")
def pristine(root) -> dict[str, bytes]:
    return snapshot(root)


def weights_of(root: Path) -> Path:
    return sorted((root / "run" / "checkpoints").glob("step_*"))[-1] / "model.safetensors"


def command_line(command: str, root: Path) -> list:
    checkpoint = weights_of(root).parent
    return {
        "generate": ["generate", checkpoint, "--prompt", "the king", "--max-new-tokens", "2", "--temperature", "1"],
        "export": ["export", checkpoint, root / "out" / "hf"],
        "eval-val": ["eval", root / "run", "--val-only"],
        "train": ["train", root / "train.yaml", "train.max_steps=3"],  # a resume
    }[command]


# ------------------------------------------------------------------------------------------------- header mutations
def split(raw: bytes) -> tuple[dict, bytes]:
    length = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + length]), raw[8 + length:]


class Mutated(bytes):
    """A mutated file, shown in hypothesis's reports by its first bytes only."""

    def __repr__(self) -> str:
        return f"<{len(self)} bytes: {bytes(self[:300])!r}...>"


def joined(header: bytes, body: bytes) -> Mutated:
    return Mutated(struct.pack("<Q", len(header)) + header + body)


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                           | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
DTYPES = st.sampled_from(["F32", "F16", "BF16", "F64", "I32", "I64", "U8", "I8", "BOOL", "F8_E4M3", "Q7", "", "f32"])


def sizes(body: bytes) -> st.SearchStrategy[int]:
    return st.one_of(st.integers(0, len(body) + 8), st.integers(-2**70, 2**70),
                     st.sampled_from([-1, 2**62, 2**63, 2**64 - 1, 2**64]))


@st.composite
def mutated_file(draw, raw: bytes) -> Mutated:
    """raw (a real safetensors file) with one part of its header changed."""
    header, body = split(raw)
    names = sorted(name for name in header if name != "__metadata__")
    name = draw(st.sampled_from(names))
    kind = draw(st.sampled_from(["length", "offsets", "swap", "dtype", "shape", "drop", "extra", "metadata",
                                 "not_object", "huge_int"]))
    if kind == "length":
        return Mutated(struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + raw[8:])
    if kind == "offsets":
        header[name]["data_offsets"] = [draw(sizes(body)), draw(sizes(body))]
    elif kind == "swap":  # reversed, or another tensor's (overlapping)
        other = draw(st.sampled_from(names))
        header[name]["data_offsets"] = list(reversed(header[other]["data_offsets"]))[::draw(st.sampled_from([1, -1]))]
    elif kind == "dtype":
        header[name]["dtype"] = draw(DTYPES | st.text(max_size=6))
    elif kind == "shape":
        header[name]["shape"] = draw(st.lists(sizes(body), max_size=4))
    elif kind == "drop":
        del header[name]
    elif kind == "extra":
        header[draw(st.text(min_size=1, max_size=30))] = {
            "dtype": draw(DTYPES), "shape": draw(st.lists(st.integers(0, 4), max_size=3)),
            "data_offsets": draw(st.sampled_from([[0, 0], [len(body), len(body)], header[name]["data_offsets"]]))}
    elif kind == "metadata":
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=3) | JSON_VALUES)
    elif kind == "not_object":
        value = draw(JSON_VALUES.filter(lambda v: not isinstance(v, dict)))
        return joined(json.dumps(value).encode(), body)
    text = json.dumps(header)
    if kind == "huge_int":  # a 5000-digit integer where a number stands
        numbers = list(re.finditer(r"\d+", text))
        match = numbers[draw(st.integers(0, len(numbers) - 1))]
        text = text[:match.start()] + "9" * 5000 + text[match.end():]
    return joined(text.encode(), body)


@pytest.mark.parametrize("command", ["generate", "export", "eval-val", "train"])
@settings(max_examples=12, **SLOW)
@given(data=st.data())
def test_a_damaged_weights_file_is_refused_in_one_line(root, pristine, capsys, command, data):
    path = weights_of(root)
    raw = pristine[str(path.relative_to(root))]
    mutated = data.draw(mutated_file(raw))
    try:
        path.write_bytes(mutated)
        recompute_checksum(path)  # past the checksum, as an attacker or a careless editor would
        assert_clean_outcome(run_main(capsys, command_line(command, root)))
    finally:
        restore(root, pristine)


@settings(max_examples=300, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_the_reader_returns_weights_or_raises_one_line(root, pristine, tmp_path, data):
    """Many more mutations straight through the reader: weights of a weight dtype, or the caller's error."""
    raw = pristine[str(weights_of(root).relative_to(root))]
    path = tmp_path / "model.safetensors"
    path.write_bytes(data.draw(mutated_file(raw)))
    try:
        tensors = read_safetensors(path, ExportError, "fix it")
    except ExportError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc) and str(exc).endswith("fix it")
    else:
        assert all(t.dtype in (torch.float32, torch.float16, torch.bfloat16) for t in tensors.values())


# ------------------------------------------------------------------------------------------------- non-finite weights
@pytest.mark.parametrize("command", ["generate", "export"])
@settings(max_examples=6, **SLOW)
@given(data=st.data(), value=st.sampled_from([float("nan"), float("inf"), float("-inf")]))
def test_non_finite_weights_are_refused_by_inference_and_export(root, pristine, capsys, command, data, value):
    path = weights_of(root)
    tensors = load_file(path)
    name = data.draw(st.sampled_from(sorted(tensors)))
    index = data.draw(st.integers(0, tensors[name].numel() - 1))
    tensors[name].view(-1)[index] = value
    try:
        save_file(tensors, path, metadata={"format": "pt"})
        recompute_checksum(path)
        outcome = run_main(capsys, command_line(command, root))
        assert_clean_outcome(outcome, allow_success=False)
        assert "non-finite weights" in outcome.err and name in outcome.err
        assert not (root / "out").exists()
    finally:
        restore(root, pristine)


@settings(max_examples=60, deadline=None, database=None, derandomize=True)
@given(data=st.data(), value=st.sampled_from([float("nan"), float("inf")]),
       temperature=st.floats(0.1, 2), top_k=st.none() | st.integers(1, 8), top_p=st.none() | st.floats(0.1, 1))
def test_sampling_non_finite_logits_is_one_line(data, value, temperature, top_k, top_p):
    rows, vocab = data.draw(st.integers(1, 3)), data.draw(st.integers(2, 16))
    logits = torch.randn(rows, vocab)
    logits[data.draw(st.integers(0, rows - 1)), data.draw(st.integers(0, vocab - 1))] = value
    with pytest.raises(CheckpointError, match="NaN or infinite logits"):
        pick_tokens(logits, temperature, top_k, top_p)


# ------------------------------------------------------------------------------------------------- import config
@pytest.fixture(scope="module")
def hf(root, pristine, tmp_path_factory) -> Path:
    """A transformers export of the run's checkpoint (outside `root`, which the other tests restore)."""
    folder = tmp_path_factory.mktemp("hf") / "hf"
    assert run_main_plain(["export", weights_of(root).parent, folder]) == 0
    return folder


HF_KEYS = ["vocab_size", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
           "intermediate_size", "max_position_embeddings", "rope_theta", "rms_norm_eps", "tie_word_embeddings",
           "initializer_range"]
HOSTILE = st.sampled_from([10**12, 2**64, 10**400, -1, 0, float("inf"), float("-inf"), float("nan"), "no", "12",
                           True, None, [], {}, 1.5, 1e-300, 1e300]) | JSON_VALUES


@settings(max_examples=40, **SLOW)
@given(key=st.sampled_from(HF_KEYS), value=HOSTILE)
def test_every_imported_config_value_is_range_checked(hf, tmp_path_factory, capsys, key, value):
    folder = tmp_path_factory.mktemp("hf_case")
    shutil.copytree(hf, folder / "hf")
    config = json.loads((hf / "config.json").read_text())
    config[key] = value
    (folder / "hf" / "config.json").write_text(json.dumps(config))
    outcome = run_main(capsys, ["import", folder / "hf", folder / "out"])
    assert_clean_outcome(outcome)
    if outcome.code == 0:
        return
    assert not (folder / "out").exists()


@pytest.mark.parametrize("key,value", [("max_position_embeddings", 10**12), ("rope_theta", float("inf")),
                                       ("tie_word_embeddings", "no"), ("hidden_size", 2**40)])
def test_the_red_teams_import_values_name_their_key(hf, tmp_path, capsys, key, value):
    shutil.copytree(hf, tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    config[key] = value
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    outcome = run_main(capsys, ["import", tmp_path / "hf", tmp_path / "out"])
    assert_clean_outcome(outcome, allow_success=False)
    assert key in outcome.err


def test_an_imported_tokenizer_that_is_a_folder_is_one_line(hf, tmp_path, capsys):
    shutil.copytree(hf, tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").unlink()
    (tmp_path / "hf" / "tokenizer.json").mkdir()
    outcome = run_main(capsys, ["import", tmp_path / "hf", tmp_path / "out"])
    assert_clean_outcome(outcome, allow_success=False)
    assert "tokenizer.json is not a file" in outcome.err and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------- too large to build
@pytest.mark.skipif(Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1",
                    reason="the kernel promises any allocation (vm.overcommit_memory=1)")
@settings(max_examples=4, **SLOW)
@given(d_model=st.integers(2**12, 2**14).map(lambda k: 64 * k), ffn_hidden=st.integers(2**19, 2**20))
def test_a_model_too_large_to_allocate_is_one_line(root, pristine, tmp_path_factory, capsys, d_model, ffn_hidden):
    run_dir = tmp_path_factory.mktemp("big") / "run"
    outcome = run_main(capsys, ["train", root / "train.yaml", f"model.d_model={d_model}",
                                f"model.ffn_hidden={ffn_hidden}", f"train.run_dir={run_dir}"])
    assert_clean_outcome(outcome, allow_success=False)
    assert "cannot be allocated" in outcome.err and "llamalite plan" in outcome.err


@pytest.mark.parametrize("message,refused", [
    ("DefaultCPUAllocator: can't allocate memory: you tried to allocate 3298534883328 bytes", True),
    ("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory", True),
    ("CUDA out of memory. Tried to allocate 20.00 GiB", True),
    ("mat1 and mat2 shapes cannot be multiplied", False),
])
def test_only_a_refused_allocation_becomes_one_line(monkeypatch, message, refused):
    from llamalite.errors import ConfigError
    from llamalite.model.config import ModelConfig
    from llamalite.model.llama import Llama

    def fail(*args, **kwargs):
        raise RuntimeError(message)

    monkeypatch.setattr("llamalite.model.llama.RMSNorm.__init__", fail)
    config = ModelConfig(vocab_size=64, n_layer=1, d_model=32, n_head=4, n_kv_head=2, ffn_hidden=64, max_seq_len=16)
    with pytest.raises(ConfigError if refused else RuntimeError) as caught:
        Llama(config)
    assert isinstance(caught.value, ConfigError) == refused


# ------------------------------------------------------------------------------------------------- tokenizer advice
@pytest.mark.parametrize("cwd", ["elsewhere", "root", "checkpoint"])
@pytest.mark.parametrize("tokenizer_at", ["data", "checkpoint", "nowhere"])
def test_a_relative_data_dir_is_found_from_any_folder_and_the_advice_fits_generate(root, pristine, tmp_path, capsys,
                                                                                 monkeypatch, cwd, tokenizer_at):
    """A run trained with a relative data.out_dir, used from another folder: its tokenizer is found above the
    checkpoint (fingerprint checked), or copied into it; when it is nowhere the error names fixes generate has."""
    checkpoint = weights_of(root).parent
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    state["config"]["data"]["out_dir"] = "data"
    try:
        (checkpoint / "trainer_state.json").write_text(json.dumps(state))
        recompute_checksum(checkpoint / "trainer_state.json")
        if tokenizer_at == "checkpoint":
            shutil.copy(root / "data" / "tokenizer.json", checkpoint / "tokenizer.json")
        if tokenizer_at != "data":
            (root / "data" / "tokenizer.json").rename(tmp_path / "moved.json")
        monkeypatch.chdir({"elsewhere": tmp_path, "root": root, "checkpoint": checkpoint}[cwd])
        outcome = run_main(capsys, command_line("generate", root))
        if tokenizer_at == "nowhere":
            assert_clean_outcome(outcome, allow_success=False)
            assert "copy the run's tokenizer.json" in outcome.err and "pass --tokenizer" not in outcome.err
        else:
            assert outcome.code == 0, outcome.err
    finally:
        restore(root, pristine)
