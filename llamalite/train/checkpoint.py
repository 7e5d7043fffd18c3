"""Checkpoint directories: written under a temporary name, fsynced, then renamed when complete.

Layout of `checkpoints/step_XXXXXXX/`:
  model.safetensors    the weights
  optimizer.pt         AdamW state (absent when a run chose not to keep it), read with torch.load(weights_only=True)
  rng.pt               python, numpy, torch CPU and CUDA generator states, read the same way
  trainer_state.json   step, tokens seen, loader position, world size, config, tokenizer fingerprint, code version
  tokenizer.json       only in checkpoints imported from transformers (llamalite import): their tokenizer
  checksums.json       sha256 of every other file, written last inside the directory
`checkpoints/latest` names the newest complete checkpoint and is replaced only after the rename.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llamalite.config import config_from_dict
from llamalite.data.shards import sha256_file
from llamalite.model.llama import Llama
from llamalite.tokenizer import Tokenizer

CHECKSUMS = "checksums.json"
LATEST = "latest"
CHECKPOINT_NAME = re.compile(r"^step_(\d{7,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete, corrupted or unusable, worded for the user."""


@dataclass
class Checkpoint:
    path: Path
    model: dict[str, torch.Tensor] | None  # None for a sharded (FSDP) checkpoint: its weights are in dcp/
    optimizer: dict[str, Any] | None
    rng: dict[str, Any] | None
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without a tied output head (safetensors stores each tensor once)."""
    state = model.state_dict()
    if getattr(model.config, "tie_embeddings", False):
        state.pop("lm_head.weight", None)
    return {name: tensor.detach().contiguous().cpu() for name, tensor in state.items()}


def load_model_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    tensors = dict(tensors)
    if getattr(model.config, "tie_embeddings", False):
        tensors["lm_head.weight"] = tensors["embed_tokens.weight"]
    model.load_state_dict(tensors)


def load_model_weights(checkpoint_dir: Path, model: nn.Module) -> None:
    from llamalite.train.distributed import is_sharded, load_sharded_model_weights

    if is_sharded(checkpoint_dir):  # written with train.parallel=fsdp: gathered here in one process
        load_sharded_model_weights(checkpoint_dir, model)
        return
    load_model_tensors(model, load_file(checkpoint_dir / "model.safetensors"))


# ------------------------------------------------------------------------------------------------- RNG
def capture_rng_state() -> dict[str, Any]:
    version, mt_state, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [version, list(mt_state), gauss],
        "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_kind, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------- save
def save_checkpoint(
    checkpoints_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    trainer_state: dict[str, Any],
) -> Path:
    """Write checkpoints/step_XXXXXXX atomically and point `latest` at it. The caller's RNG is captured here."""
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    for stale in checkpoints_dir.glob(".tmp_step_*"):  # left by a write that crashed; never a valid checkpoint
        shutil.rmtree(stale, ignore_errors=True)
    final = write_checkpoint_dir(checkpoints_dir / checkpoint_name(step), model, optimizer, trainer_state)
    _write_latest(checkpoints_dir, final.name)
    return final


def write_checkpoint_dir(
    final: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    trainer_state: dict[str, Any],
    extra_files: dict[str, Path] | None = None,
) -> Path:
    """Write one checkpoint directory at `final` through a temporary sibling renamed when complete.

    `extra_files` (name -> source) are copied in before the checksums, which then cover them too.
    """
    tmp = final.parent / f".tmp_{final.name}"
    if tmp.exists():  # left by a write that crashed
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(model_tensors(model), tmp / "model.safetensors")
    for name, source in (extra_files or {}).items():
        shutil.copyfile(source, tmp / name)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(capture_rng_state(), tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    checksums = {f.name: sha256_file(f) for f in sorted(tmp.iterdir())}
    (tmp / CHECKSUMS).write_text(json.dumps(checksums, indent=2))
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(final.parent)
    return final


def _write_latest(checkpoints_dir: Path, name: str) -> None:
    tmp = checkpoints_dir / f".{LATEST}.tmp"
    tmp.write_text(name + "\n")
    _fsync(tmp)
    os.replace(tmp, checkpoints_dir / LATEST)
    _fsync(checkpoints_dir)


def prune_checkpoints(checkpoints_dir: Path, keep_last: int, milestone_interval: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints and the milestones (steps divisible by the interval)."""
    checkpoints = list_checkpoints(checkpoints_dir)
    newest = set(checkpoints[-keep_last:]) if keep_last > 0 else set(checkpoints)
    removed = []
    for path in checkpoints:
        step = checkpoint_step(path)
        is_milestone = milestone_interval > 0 and step % milestone_interval == 0
        if path not in newest and not is_milestone:
            shutil.rmtree(path)
            removed.append(path)
    return removed


# ------------------------------------------------------------------------------------------------- load
def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoint directories (renamed into place), oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    found = [p for p in checkpoints_dir.iterdir() if p.is_dir() and CHECKPOINT_NAME.match(p.name)]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    return int(CHECKPOINT_NAME.match(path.name).group(1))


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError unless every file listed in checksums.json is present with its sha256."""
    checksums_file = path / CHECKSUMS
    if not checksums_file.is_file():
        raise CheckpointError(f"{path} has no {CHECKSUMS} (an incomplete write)")
    try:
        checksums = json.loads(checksums_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}/{CHECKSUMS} is not valid JSON") from None
    weights = "dcp/.metadata" if "dcp/.metadata" in checksums else "model.safetensors"  # sharded (FSDP) or single file
    for name in (weights, "trainer_state.json"):
        if name not in checksums:
            raise CheckpointError(f"{path} lacks {name}")
    for name, expected in checksums.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        if sha256_file(file) != expected:
            raise CheckpointError(f"{file} does not match its checksum (corrupted or truncated)")


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    verify_checkpoint(path)
    optimizer_file, rng_file = path / "optimizer.pt", path / "rng.pt"
    return Checkpoint(
        path=path,
        model=load_file(path / "model.safetensors") if (path / "model.safetensors").exists() else None,  # None: sharded
        optimizer=torch.load(optimizer_file, map_location=map_location, weights_only=True)
        if optimizer_file.exists()
        else None,
        rng=torch.load(rng_file, weights_only=True) if rng_file.exists() else None,
        state=json.loads((path / "trainer_state.json").read_text()),
    )


def load_model_from_checkpoint(path: Path) -> Llama:
    """The model of a checkpoint directory, built from its saved config, in fp32 on the CPU (optimizer state unread)."""
    verify_checkpoint(path)
    state = json.loads((path / "trainer_state.json").read_text())
    model = Llama(config_from_dict(state["config"]).model)
    load_model_weights(path, model)
    return model


def resolve_checkpoint_dir(path: Path) -> Path:
    if (path / "trainer_state.json").is_file():
        return path
    checkpoints = list_checkpoints(path / "checkpoints")
    if checkpoints:
        return checkpoints[-1]
    raise CheckpointError(f"checkpoint not found: {path} has no trainer_state.json "
                      "(pass a checkpoint directory such as runs/<name>/checkpoints/step_0000150, or a run directory)")


def find_tokenizer(checkpoint: Path, state: dict[str, Any], override: Path | None) -> Tokenizer:
    """The run's tokenizer: --tokenizer, else tokenizer.json in the checkpoint, else <data.out_dir>/tokenizer.json."""
    config = state["config"]
    candidates = [override] if override else [checkpoint / "tokenizer.json", Path(config["data"]["out_dir"]) / "tokenizer.json"]
    found = next((path for path in candidates if path.exists()), None)
    if found is None:
        raise CheckpointError(f"tokenizer not found at {' or '.join(map(str, candidates))}: "
                          "pass --tokenizer PATH with the tokenizer.json the checkpoint was trained with")
    tokenizer = Tokenizer.load(found, config["tokenizer"]["eos_token"])
    expected = state.get("tokenizer_fingerprint")
    if expected and tokenizer.fingerprint != expected:
        raise CheckpointError(f"{found} is not the tokenizer {checkpoint} was trained with (its fingerprint differs): "
                          "pass --tokenizer PATH with the run's tokenizer.json")
    return tokenizer


@dataclass
class InferenceModel:
    """A checkpoint's model (eval mode), its tokenizer and trainer state: what eval, generate and chat need."""

    path: Path
    model: Llama
    tokenizer: Tokenizer
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def tokens_seen(self) -> int:
        return int(self.state.get("tokens_seen", 0))


def load_for_inference(path: Path, tokenizer_path: Path | None = None) -> InferenceModel:
    """Load a checkpoint directory (or a run directory: its newest checkpoint) with its tokenizer, checked to match."""
    checkpoint = resolve_checkpoint_dir(Path(path))
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    tokenizer = find_tokenizer(checkpoint, state, tokenizer_path)
    model = _inference_model(checkpoint)
    if tokenizer.size > model.config.vocab_size:
        raise CheckpointError(f"the tokenizer has {tokenizer.size} tokens but the model only {model.config.vocab_size} "
                              "embedding rows: pass the tokenizer.json this checkpoint was trained with")
    return InferenceModel(checkpoint, model.eval(), tokenizer, state)


def _inference_model(checkpoint: Path) -> nn.Module:
    """The checkpoint's model; a LoRA fine-tuning checkpoint (llamalite sft) comes with its adapters applied."""
    from safetensors import safe_open

    verify_checkpoint(checkpoint)
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
        is_lora = any(".lora_A." in name for name in f.keys())
    if is_lora:
        from llamalite.sft import load_sft_model

        return load_sft_model(checkpoint)[3]
    return load_model_from_checkpoint(checkpoint)


def newest_valid_checkpoint(checkpoints_dir: Path, on_corrupt=None) -> Checkpoint | None:
    """The newest checkpoint that passes its checksums; each one that fails is reported through on_corrupt(path, why)."""
    for path in reversed(list_checkpoints(checkpoints_dir)):
        try:
            return load_checkpoint(path)
        except CheckpointError as exc:
            if on_corrupt is not None:
                on_corrupt(path, str(exc))
    return None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
