"""Issue 28, item 1: the trust boundary. No file a user receives can run code when any llamalite command reads it.

Real artefacts are built once (a trained run, the same checkpoint sharded by DCP, its transformers export); each case
copies one, plants a code-running pickle in one file that could be unpickled, recomputes checksums.json (so the
checksums are not what stops it), runs one command in-process and asserts that the canary file was never created and
that the command either refused in one line (when it reads the planted file) or succeeded without reading it.

Choke points: checkpoint/safe_pickle.py (RestrictedUnpickler for dcp/.metadata, load_weights_only for optimizer.pt,
rng.pt and the non-tensor entries of the shards) and checkpoint/dcp_reader.py (SafeFileSystemReader, dcp_load).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamalite.checkpoint.format import (
    CHECKSUMS,
    list_checkpoints,
    load_checkpoint,
    load_model_tensors,
    read_tensors_pickle,
)
from llamalite.checkpoint.safe_pickle import ALLOWED_GLOBALS, load_weights_only, read_dcp_metadata, restricted_loads
from llamalite.checkpoint.sharded import save_sharded_checkpoint
from llamalite.config import Config, config_from_dict, save_config
from llamalite.errors import CheckpointError
from llamalite.export.hf import export_checkpoint
from llamalite.files import sha256_file
from llamalite.model.llama import Llama
from llamalite.train.optim import build_optimizer
from llamalite.train.trainer import Trainer
from tests.adversarial.conftest import CodeRunningPickle, assert_clean_outcome, run_main
from tests.conftest import small_config

DISTCP = "__0_0.distcp"  # the one shard file of a DCP save by one process


# ================================================================================================= artefacts
@dataclass
class Artefacts:
    single_run: Path  # a trained run directory with one single-file checkpoint
    sharded_run: Path  # the same run, its checkpoint written by DCP (dcp/.metadata + dcp/__0_0.distcp)
    hf: Path  # the transformers export of the single-file checkpoint
    prepared: Path
    corpus: Path


@pytest.fixture(scope="module")
def artefacts(corpus_dir, prepared_dir, tmp_path_factory) -> Artefacts:
    root = tmp_path_factory.mktemp("trust")
    single_run = root / "single_run"
    Trainer(small_config(corpus_dir, prepared_dir, single_run, max_steps=2, eval_interval=0, save_interval=0,
                         keep_checkpoints=1)).fit()
    checkpoint = load_checkpoint(list_checkpoints(single_run / "checkpoints")[-1])

    sharded_run = root / "sharded_run"
    shutil.copytree(single_run, sharded_run, ignore=shutil.ignore_patterns("checkpoints"))
    config = config_from_dict(checkpoint.state["config"])
    model = Llama(config.model)
    load_model_tensors(model, checkpoint.model)
    optimizer = build_optimizer(model, config.optim, "cpu")
    optimizer.load_state_dict(checkpoint.optimizer)
    save_sharded_checkpoint(sharded_run / "checkpoints", checkpoint.step, model, optimizer, checkpoint.state)

    hf = export_checkpoint(checkpoint.path, root / "hf")
    return Artefacts(single_run, sharded_run, hf, prepared_dir, corpus_dir)


def newest_checkpoint(run_dir: Path) -> Path:
    return list_checkpoints(run_dir / "checkpoints")[-1]


def rewrite_checksums(checkpoint: Path) -> None:
    """What someone who tampered with a file would do so that the checksums still pass."""
    listed = json.loads((checkpoint / CHECKSUMS).read_text())
    (checkpoint / CHECKSUMS).write_text(json.dumps({name: sha256_file(checkpoint / name) for name in listed}))


# ================================================================================================= plants
def torch_saved(payload: object) -> bytes:
    """`payload` as torch.save writes it (a zip holding data.pkl): what optimizer.pt, rng.pt and shards look like."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def plant_file(checkpoint: Path, name: str, canary: Path) -> None:
    (checkpoint / name).write_bytes(torch_saved(CodeRunningPickle(canary)))


def plant_metadata(checkpoint: Path, canary: Path) -> None:
    """dcp/.metadata replaced by a plain pickle that runs code: the hole issue 28 reported."""
    (checkpoint / "dcp" / ".metadata").write_bytes(pickle.dumps(CodeRunningPickle(canary), protocol=4))


def plant_shards(checkpoint: Path, canary: Path, declare_bytes: bool) -> None:
    """The shard file replaced by a torch.save'd code-running pickle that every entry of the metadata now points at.

    The metadata stays made of DCP's own classes (the restricted unpickler admits it). declare_bytes: every entry is
    also declared a non-tensor (BytesStorageMetadata), which PyTorch's planner reads with torch.load(weights_only=
    False) -- even the model's weights, so commands that read no optimizer state reach it too."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    dcp_dir = checkpoint / "dcp"
    payload = torch_saved(CodeRunningPickle(canary))
    (dcp_dir / DISTCP).write_bytes(payload)
    metadata = pickle.loads((dcp_dir / ".metadata").read_bytes())  # our own legitimate file: safe to unpickle here
    if declare_bytes:
        metadata.state_dict_metadata = {fqn: BytesStorageMetadata() for fqn in metadata.state_dict_metadata}
        metadata.storage_data = {MetadataIndex(fqn): _StorageInfo(DISTCP, 0, len(payload))
                                 for fqn in metadata.state_dict_metadata}
    else:
        metadata.storage_data = {index: _StorageInfo(DISTCP, 0, len(payload)) for index in metadata.storage_data}
    (dcp_dir / ".metadata").write_bytes(pickle.dumps(metadata))


@dataclass(frozen=True)
class Plant:
    artefact: str  # "single" or "sharded"
    files: frozenset[str]  # the files of the checkpoint it changes
    plant: Callable[[Path, Path], None]  # (checkpoint directory, canary)
    read_by: frozenset[str]  # the commands that read those files: they must refuse, in one line


INFERENCE = {"generate", "chat", "eval", "export", "merge", "sft"}  # load_for_inference: weights, state, tokenizer
EVERY_READER = frozenset(INFERENCE | {"consolidate", "train"})
PLANTS = {
    "optimizer.pt": Plant("single", frozenset({"optimizer.pt"}),
                          lambda ckpt, canary: plant_file(ckpt, "optimizer.pt", canary), frozenset({"train"})),
    "rng.pt": Plant("single", frozenset({"rng.pt"}), lambda ckpt, canary: plant_file(ckpt, "rng.pt", canary),
                    frozenset({"train"})),
    "dcp-metadata": Plant("sharded", frozenset({"dcp/.metadata"}), plant_metadata, EVERY_READER),
    "dcp-metadata-declaring-bytes": Plant("sharded", frozenset({"dcp/.metadata", f"dcp/{DISTCP}"}),
                                          lambda ckpt, canary: plant_shards(ckpt, canary, True), EVERY_READER),
    "dcp-distcp": Plant("sharded", frozenset({"dcp/.metadata", f"dcp/{DISTCP}"}),
                        lambda ckpt, canary: plant_shards(ckpt, canary, False), EVERY_READER),
    "sharded-rng.pt": Plant("sharded", frozenset({"rng.pt"}), lambda ckpt, canary: plant_file(ckpt, "rng.pt", canary),
                            frozenset({"consolidate", "train"})),
}
# The files of a checkpoint that no reader unpickles (safetensors, JSON); every other file must be planted above.
NEVER_UNPICKLED = {"model.safetensors", "trainer_state.json", CHECKSUMS, "tokenizer.json"}
COMMANDS = ["generate", "chat", "eval", "export", "merge", "consolidate", "train", "sft"]
CASES = [(name, command) for name, plant in PLANTS.items() for command in COMMANDS
         if not (command == "consolidate" and plant.artefact == "single")  # refused as not sharded before any read
         and not (command == "sft" and command not in plant.read_by)]  # it would train; its read is generate's


def command_argv(command: str, run_dir: Path, checkpoint: Path, artefacts: Artefacts, tmp_path: Path) -> list:
    if command == "generate":
        return ["generate", checkpoint, "--prompt", "hi", "--max-new-tokens", "2", "--seed", "0"]
    if command == "chat":
        return ["chat", checkpoint, "--jsonl", "--max-new-tokens", "2", "--seed", "0"]
    if command == "eval":
        return ["eval", checkpoint, "--val-only"]
    if command in ("export", "merge", "consolidate"):
        return [command, checkpoint, tmp_path / "out"]
    if command == "train":
        config = small_config(artefacts.corpus, artefacts.prepared, run_dir, max_steps=2, eval_interval=0,
                              save_interval=0, keep_checkpoints=1)
        save_config(config, tmp_path / "train.yaml")
        return ["train", tmp_path / "train.yaml"]
    if command == "sft":
        data = tmp_path / "sft.jsonl"
        data.write_text("".join(json.dumps({"instruction": f"say {i}", "output": f"{i}"}) + "\n" for i in range(20)))
        config = Config(name="sft")
        config.sft.base, config.sft.data, config.sft.method = str(checkpoint), str(data), "full"
        config.train.run_dir, config.train.max_steps = str(tmp_path / "sft_run"), 1
        save_config(config, tmp_path / "sft.yaml")
        return ["sft", tmp_path / "sft.yaml"]
    raise AssertionError(command)


# ================================================================================================= the table
@pytest.mark.parametrize(("plant", "command"), CASES, ids=[f"{command}-{plant}" for plant, command in CASES])
def test_a_planted_pickle_never_runs_and_a_command_that_reads_it_refuses_in_one_line(
        artefacts, plant, command, tmp_path, canary, capsys, monkeypatch):
    planted = PLANTS[plant]
    run_dir = tmp_path / "run"
    shutil.copytree(artefacts.single_run if planted.artefact == "single" else artefacts.sharded_run, run_dir)
    checkpoint = newest_checkpoint(run_dir)
    planted.plant(checkpoint, canary)
    rewrite_checksums(checkpoint)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"hi\n"), encoding="utf-8"))

    outcome = run_main(capsys, command_argv(command, run_dir, checkpoint, artefacts, tmp_path))

    assert not canary.exists(), f"{command} ran code planted in {plant}"
    assert_clean_outcome(outcome, allow_success=command not in planted.read_by)


@pytest.mark.parametrize("beside_safetensors", [False, True], ids=["alone", "beside-model.safetensors"])
def test_import_never_unpickles_a_pytorch_model_bin(artefacts, beside_safetensors, tmp_path, canary, capsys):
    """transformers' pickle weight format is refused (or ignored beside safetensors), never unpickled."""
    hf = tmp_path / "hf"
    shutil.copytree(artefacts.hf, hf)
    if not beside_safetensors:
        for weights in hf.glob("model*.safetensors*"):
            weights.unlink()
    (hf / "pytorch_model.bin").write_bytes(torch_saved(CodeRunningPickle(canary)))

    outcome = run_main(capsys, ["import", hf, tmp_path / "imported"])

    assert not canary.exists()
    assert_clean_outcome(outcome, allow_success=beside_safetensors)
    if not beside_safetensors:
        assert "holds only pickle weights (pytorch_model*.bin), which llamalite never loads" in outcome.err


def test_a_peft_adapter_folder_is_read_from_safetensors_only(tmp_path, canary):
    from llamalite.model.lora import load_adapter

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                              "target_modules": ["q_proj"]}))
    (tmp_path / "adapter_model.bin").write_bytes(torch_saved(CodeRunningPickle(canary)))
    with pytest.raises(CheckpointError, match="adapter_model.safetensors not found"):
        load_adapter(torch.nn.Linear(2, 2), tmp_path)
    assert not canary.exists()


def test_the_table_covers_every_file_of_each_artefact(artefacts):
    """A checkpoint that gains a kind of file must join the table: each file is planted, or is never unpickled."""
    for artefact, run_dir in (("single", artefacts.single_run), ("sharded", artefacts.sharded_run)):
        checkpoint = newest_checkpoint(run_dir)
        files = {f.relative_to(checkpoint).as_posix() for f in checkpoint.rglob("*") if f.is_file()}
        planted = set().union(*(plant.files for plant in PLANTS.values() if plant.artefact == artefact))
        assert files - NEVER_UNPICKLED == planted, artefact


def test_the_plants_do_run_code_through_pytorchs_own_reader(artefacts, tmp_path, canary):
    """The DCP plants are real: PyTorch's stock FileSystemReader runs them (so the table above can fail)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    for name in ("dcp-metadata", "dcp-metadata-declaring-bytes"):
        run_dir = tmp_path / name
        shutil.copytree(artefacts.sharded_run, run_dir)
        checkpoint = newest_checkpoint(run_dir)
        PLANTS[name].plant(checkpoint, canary)
        config = config_from_dict(json.loads((checkpoint / "trainer_state.json").read_text())["config"])
        with contextlib.suppress(Exception, CheckpointException):  # what the payload's return value breaks later
            dcp.load({"model": Llama(config.model).state_dict()},
                     storage_reader=dcp.FileSystemReader(str(checkpoint / "dcp")))
        assert canary.exists(), f"PyTorch's reader no longer runs the {name} plant: renew the plant"
        canary.unlink()


def test_a_legitimate_sharded_checkpoint_still_loads_through_the_safe_reader(artefacts, capsys):
    checkpoint = newest_checkpoint(artefacts.sharded_run)
    outcome = run_main(capsys, ["generate", checkpoint, "--prompt", "hi", "--max-new-tokens", "2", "--seed", "0"])
    assert outcome.code == 0, outcome.err
    metadata = read_dcp_metadata(checkpoint / "dcp" / ".metadata")
    assert set(metadata.state_dict_metadata) >= {"model.embed_tokens.weight"}


# ================================================================================================= generated
def global_pickle(module: str, name: str, protocol: int) -> bytes:
    """A pickle whose whole content is one global: GLOBAL (protocol 0-3) or STACK_GLOBAL (4-5)."""
    if protocol < 4:
        return f"c{module}\n{name}\n.".encode()
    encoded = [text.encode() for text in (module, name)]
    return (b"\x80\x04" + b"".join(b"\x8c" + bytes([len(part)]) + part for part in encoded) + b"\x93.")


CANDIDATE_MODULES = ["os", "posix", "subprocess", "builtins", "torch", "torch.serialization", "pathlib", "shutil",
                     "sys", "importlib", "pickle", "io", "codecs", "runpy", "functools", "operator", "collections",
                     "numpy", "torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                     "torch._utils", "webbrowser"]


@st.composite
def module_globals(draw) -> tuple[str, str]:
    """A (module, name) pair: any public or private attribute of a dangerous-to-harmless module, or an allowed one."""
    if draw(st.booleans()):
        return draw(st.sampled_from(sorted(ALLOWED_GLOBALS)))
    module = draw(st.sampled_from(CANDIDATE_MODULES))
    names = sorted(vars(__import__(module, fromlist=["_"])))
    return module, draw(st.sampled_from(names))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair=module_globals(), protocol=st.integers(0, 5))
def test_the_restricted_unpickler_resolves_exactly_the_allow_list(pair, protocol):
    module, name = pair
    data = global_pickle(module, name, protocol)
    if pair in ALLOWED_GLOBALS:
        found = restricted_loads(data, "x/.metadata")
        assert found is getattr(__import__(module, fromlist=["_"]), name)
    else:
        with pytest.raises(CheckpointError, match=r"refusing to load x/\.metadata: it references") as raised:
            restricted_loads(data, "x/.metadata")
        assert "\n" not in str(raised.value)


class Call:
    """Unpickling this calls function(argument)."""

    def __init__(self, function: Callable, argument: str):
        self.function, self.argument = function, argument

    def __reduce__(self):
        return (self.function, (self.argument,))


def code_runners(canary: Path) -> list[Call]:
    """Calls that create the canary: a file opened for writing, a shell, Python source."""
    source = f"open({str(canary)!r}, 'w')"
    return [Call(open, str(canary)), Call(io.open, str(canary)), Call(os.system, f"touch {canary}"),
            Call(exec, source), Call(eval, source), Call(subprocess.getoutput, f"touch {canary}")]


@settings(max_examples=60, deadline=None)
@given(which=st.integers(0, 5), torch_zip=st.booleans(), protocol=st.integers(0, 5))
def test_no_loader_runs_a_reduce_payload(which, torch_zip, protocol, tmp_path_factory):
    """Calls that would create the canary reach neither the restricted unpickler nor the weights-only loader,
    whatever the pickle protocol or container (torch.save's zip, or a plain pickle)."""
    canary = tmp_path_factory.mktemp("canary") / "CODE_RAN"
    payload = code_runners(canary)[which]
    data = torch_saved(payload) if torch_zip else pickle.dumps(payload, protocol=protocol)
    for load in (lambda: restricted_loads(data, "x/.metadata"),
                 lambda: load_weights_only(io.BytesIO(data), "x/optimizer.pt")):
        with pytest.raises(CheckpointError) as raised:
            load()
        assert "\n" not in str(raised.value)
    assert not canary.exists()


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_a_damaged_optimizer_pt_is_one_line_whatever_the_damage(data, tmp_path_factory):
    """read_tensors_pickle over truncations and byte flips of a real optimizer.pt: a one-line CheckpointError (or the
    state, when the damage misses everything torch reads), never another exception."""
    folder = tmp_path_factory.mktemp("optimizer")
    good = torch_saved(torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))]).state_dict())
    cut = data.draw(st.integers(0, len(good)))
    damaged = bytearray(good[:cut] if data.draw(st.booleans()) else good)
    for _ in range(data.draw(st.integers(0, 4))):
        if damaged:
            damaged[data.draw(st.integers(0, len(damaged) - 1))] = data.draw(st.integers(0, 255))
    path = folder / "optimizer.pt"
    path.write_bytes(bytes(damaged))
    try:
        read_tensors_pickle(path, "cpu")
    except CheckpointError as exc:
        assert "\n" not in str(exc) and "optimizer.pt" in str(exc)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.one_of(st.sampled_from(["", ".", "..", "../model.safetensors", "/etc/passwd", "a/b", "..\\x",
                                        DISTCP, "__1_0.distcp"]),
                      st.text(st.sampled_from("._/\\ab"), max_size=6)))
def test_shard_files_named_in_the_metadata_stay_in_its_folder(artefacts, name, tmp_path):
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    metadata_file = newest_checkpoint(artefacts.sharded_run) / "dcp" / ".metadata"
    metadata = pickle.loads(metadata_file.read_bytes())
    index = next(iter(metadata.storage_data))
    metadata.storage_data[index] = _StorageInfo(name, 0, 1)
    path = tmp_path / ".metadata"
    path.write_bytes(pickle.dumps(metadata))
    if name in ("", ".", "..") or "/" in name or "\\" in name:
        with pytest.raises(CheckpointError, match="is not a file of its folder"):
            read_dcp_metadata(path)
    else:
        assert read_dcp_metadata(path).storage_data[index].relative_path == name


def test_the_issues_example_a_shell_command_in_dcp_metadata_is_refused_by_generate(artefacts, tmp_path, capsys):
    """Issue 28's report: a pickle running a shell command planted in dcp/.metadata, checksums recomputed, then
    `llamalite generate CKPT --prompt hi`."""
    run_dir = tmp_path / "run"
    shutil.copytree(artefacts.sharded_run, run_dir)
    checkpoint = newest_checkpoint(run_dir)
    canary = tmp_path / "SHELL_RAN"
    (checkpoint / "dcp" / ".metadata").write_bytes(pickle.dumps(Call(os.system, f"touch {canary}")))
    rewrite_checksums(checkpoint)

    outcome = run_main(capsys, ["generate", checkpoint, "--prompt", "hi"])

    assert not canary.exists()
    assert_clean_outcome(outcome, allow_success=False)
    metadata = checkpoint / "dcp" / ".metadata"
    assert f"refusing to load {metadata}: it references {os.system.__module__}.system" in outcome.err
