"""Checkpoint directories: written under a temporary name, fsynced, then renamed when complete.

Layout of `checkpoints/step_XXXXXXX/`:
  model.safetensors    the weights (or dcp/, the shards of a train.parallel=fsdp run: checkpoint/sharded.py)
  optimizer.pt         optimizer state (absent when a run chose not to keep it), read with torch.load(weights_only=True)
  rng.pt               python, numpy, torch CPU and CUDA generator states, read the same way
  trainer_state.json   step, tokens seen, loader position, world size, config, tokenizer fingerprint, code version
  tokenizer.json       in checkpoints that carry their tokenizer (llamalite import, llamalite merge)
  checksums.json       sha256 of every other file, written last inside the directory
`checkpoints/latest` names the newest complete checkpoint and is replaced only after the rename.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llamalite.errors import CheckpointError
from llamalite.files import atomic_write_text, fsync, sha256_file

CHECKSUMS = "checksums.json"
LATEST = "latest"
STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
TOKENIZER_FILE = "tokenizer.json"
SHARDED_DIR = "dcp"  # the DCP folder inside a sharded checkpoint directory
CHECKPOINT_NAME = re.compile(r"^step_(\d{7,})$")
TEMP_PREFIX = ".tmp_"


@dataclass
class Checkpoint:
    """Everything a resume needs, read once and verified."""

    path: Path
    model: dict[str, torch.Tensor] | None  # None for a sharded (FSDP) checkpoint: its weights are in dcp/
    optimizer: dict[str, Any] | None
    rng: dict[str, Any] | None
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])


# ------------------------------------------------------------------------------------------------- names
def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def checkpoint_step(path: Path) -> int:
    return int(CHECKPOINT_NAME.match(path.name).group(1))


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoint directories (renamed into place), oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    found = [p for p in checkpoints_dir.iterdir() if p.is_dir() and CHECKPOINT_NAME.match(p.name)]
    return sorted(found, key=checkpoint_step)


def is_checkpoint_dir(path: Path) -> bool:
    return (path / STATE_FILE).is_file()


def resolve_checkpoint_dir(path: Path) -> Path:
    """A checkpoint directory as given, or the newest checkpoint of a run directory."""
    path = Path(path)
    if is_checkpoint_dir(path):
        return path
    checkpoints = list_checkpoints(path / "checkpoints")
    if checkpoints:
        return checkpoints[-1]
    raise CheckpointError(f"checkpoint not found: {path} has no {STATE_FILE} (pass a checkpoint directory such as "
                          "runs/<name>/checkpoints/step_0000150, or a run directory)")


def is_sharded(checkpoint_dir: Path) -> bool:
    return (checkpoint_dir / SHARDED_DIR / ".metadata").is_file()


# ------------------------------------------------------------------------------------------------- reading
def read_state(checkpoint_dir: Path) -> dict[str, Any]:
    """trainer_state.json of a checkpoint directory: the one reader of that file."""
    path = Path(checkpoint_dir) / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: pass a complete checkpoint directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is not valid JSON (a damaged checkpoint): use another checkpoint") from None
    if not isinstance(state, dict) or "step" not in state or "config" not in state:
        raise CheckpointError(f"{path} lacks step or config (not a llamalite checkpoint): use another checkpoint")
    return state


def verify_checkpoint(path: Path, wanted: Callable[[str], bool] | None = None) -> list[str]:
    """Check the sha256 of the files listed in checksums.json (those `wanted` accepts, or all); return their names.

    Raises CheckpointError for an incomplete write, a missing file or a damaged one, naming the file."""
    checksums_file = path / CHECKSUMS
    if not checksums_file.is_file():
        raise CheckpointError(f"{path} has no {CHECKSUMS} (an incomplete write): use another checkpoint")
    try:
        checksums = json.loads(checksums_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{checksums_file} is not valid JSON (a damaged checkpoint): use another checkpoint") \
            from None
    weights = f"{SHARDED_DIR}/.metadata" if f"{SHARDED_DIR}/.metadata" in checksums else WEIGHTS_FILE
    for name in (weights, STATE_FILE):
        if name not in checksums:
            raise CheckpointError(f"{path} lacks {name} (an incomplete checkpoint): use another checkpoint")
    verified = [name for name in checksums if wanted is None or wanted(name)]
    for name in verified:
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing: the checkpoint is incomplete, use another one")
        if sha256_file(file) != checksums[name]:
            raise CheckpointError(f"{file} does not match its checksum (corrupted or truncated): "
                                  "use another checkpoint")
    return verified


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Everything of a checkpoint for a resume (weights, optimizer, RNG, state), after verifying every file."""
    verify_checkpoint(path)
    optimizer_file, rng_file, weights_file = path / OPTIMIZER_FILE, path / RNG_FILE, path / WEIGHTS_FILE
    return Checkpoint(
        path=path,
        model=load_file(weights_file) if weights_file.exists() else None,
        optimizer=torch.load(optimizer_file, map_location=map_location, weights_only=True)
        if optimizer_file.exists() else None,
        rng=torch.load(rng_file, weights_only=True) if rng_file.exists() else None,
        state=read_state(path),
    )


def newest_valid_checkpoint(checkpoints_dir: Path, on_corrupt=None) -> Checkpoint | None:
    """The newest checkpoint that passes its checksums; each one that fails is reported through
    on_corrupt(path, why)."""
    for path in reversed(list_checkpoints(checkpoints_dir)):
        try:
            return load_checkpoint(path)
        except CheckpointError as exc:
            if on_corrupt is not None:
                on_corrupt(path, str(exc))
    return None


# ------------------------------------------------------------------------------------------------- tensors
def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without a tied output head (safetensors stores each tensor once)."""
    state = model.state_dict()
    if getattr(model.config, "tie_embeddings", False):
        state.pop("lm_head.weight", None)
    return {name: tensor.detach().contiguous().cpu() for name, tensor in state.items()}


def load_model_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], assign: bool = False) -> None:
    """Load tensors saved by model_tensors. assign=True takes the tensors themselves (a model built on the meta
    device), and ties the output head to the embeddings again."""
    tied = getattr(model.config, "tie_embeddings", False)
    tensors = dict(tensors)
    if tied:
        tensors["lm_head.weight"] = tensors["embed_tokens.weight"]
    model.load_state_dict(tensors, assign=assign)
    if tied and assign:
        model.lm_head.weight = model.embed_tokens.weight


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


# ------------------------------------------------------------------------------------------------- writing
def remove_stale_temps(checkpoints_dir: Path) -> None:
    """Temporary directories left by a write that crashed; never a valid checkpoint."""
    for stale in checkpoints_dir.glob(f"{TEMP_PREFIX}step_*"):
        shutil.rmtree(stale, ignore_errors=True)


def temp_dir_of(final: Path) -> Path:
    return final.parent / f"{TEMP_PREFIX}{final.name}"


def begin_checkpoint_dir(final: Path) -> Path:
    """The empty temporary sibling that a checkpoint directory is written into before commit_checkpoint_dir."""
    tmp = temp_dir_of(final)
    if tmp.exists():  # left by a write that crashed
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_checkpoint_dir(tmp: Path, final: Path) -> Path:
    """The one atomic commit: checksums of every file in `tmp` (relative paths), fsync of files and folders, then
    the rename to `final`. Readers see either no checkpoint at `final` or a complete one."""
    files = sorted(f for f in tmp.rglob("*") if f.is_file())
    checksums = {f.relative_to(tmp).as_posix(): sha256_file(f) for f in files}
    (tmp / CHECKSUMS).write_text(json.dumps(checksums, indent=2))
    folders = sorted({f.parent for f in files} | {tmp}, key=lambda p: len(p.parts), reverse=True)
    for path in [*files, tmp / CHECKSUMS, *folders]:
        fsync(path)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync(final.parent)
    return final


def write_state_files(tmp: Path, trainer_state: dict[str, Any]) -> None:
    """The RNG (the caller's, captured now) and trainer_state.json of a checkpoint being written."""
    torch.save(capture_rng_state(), tmp / RNG_FILE)
    (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))


def write_checkpoint_dir(
    final: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    trainer_state: dict[str, Any],
    extra_files: dict[str, Path] | None = None,
) -> Path:
    """Write one single-file checkpoint directory at `final`, atomically.

    `extra_files` (name -> source) are copied in before the checksums, which then cover them too.
    """
    tmp = begin_checkpoint_dir(final)
    save_file(model_tensors(model), tmp / WEIGHTS_FILE)
    for name, source in (extra_files or {}).items():
        shutil.copyfile(source, tmp / name)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
    write_state_files(tmp, trainer_state)
    return commit_checkpoint_dir(tmp, final)


def save_checkpoint(
    checkpoints_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    trainer_state: dict[str, Any],
) -> Path:
    """Write checkpoints/step_XXXXXXX atomically and point `latest` at it. The caller's RNG is captured here."""
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(checkpoints_dir)
    final = write_checkpoint_dir(checkpoints_dir / checkpoint_name(step), model, optimizer, trainer_state)
    write_latest(checkpoints_dir, final.name)
    return final


def write_latest(checkpoints_dir: Path, name: str) -> None:
    atomic_write_text(checkpoints_dir / LATEST, name + "\n")


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
