"""Checkpoint directories: written under a temporary name, then renamed when complete.

Layout of `checkpoints/step_XXXXXXX/`: `model.safetensors` (weights), `optimizer.pt` (AdamW state, read back
with `torch.load(weights_only=True)`), `trainer_state.json` (step, tokens, loader position, config, tokenizer
fingerprint) and `checksums.json` (sha256 of every other file).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llamalite.data.shards import sha256_file

CHECKSUMS = "checksums.json"


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without a tied output head (safetensors stores each tensor once)."""
    state = model.state_dict()
    if getattr(model.config, "tie_embeddings", False):
        state.pop("lm_head.weight", None)
    return {name: tensor.detach().contiguous().cpu() for name, tensor in state.items()}


def save_checkpoint(
    checkpoints_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
) -> Path:
    final = checkpoints_dir / checkpoint_name(step)
    tmp = checkpoints_dir / f".tmp_{checkpoint_name(step)}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(model_tensors(model), tmp / "model.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    checksums = {f.name: sha256_file(f) for f in sorted(tmp.iterdir())}
    (tmp / CHECKSUMS).write_text(json.dumps(checksums, indent=2))
    for f in tmp.iterdir():
        _fsync(f)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync(checkpoints_dir)
    return final


def load_model_weights(checkpoint_dir: Path, model: nn.Module) -> None:
    tensors = load_file(checkpoint_dir / "model.safetensors")
    if getattr(model.config, "tie_embeddings", False):
        tensors["lm_head.weight"] = tensors["embed_tokens.weight"]
    model.load_state_dict(tensors)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
