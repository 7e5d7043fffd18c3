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

import errno
import json
import os
import random
import re
import resource
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from llamalite.checkpoint.safe_pickle import load_weights_only
from llamalite.errors import CheckpointError
from llamalite.files import atomic_write_text, fsync, move_into, sha256_file
from llamalite.model.weights_file import read_safetensors, safetensors_names, shown
from llamalite.records import contained_path, read_json

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
LOW_SPACE_BYTES = 64 << 20  # a failed write with less free space than this is taken for a full disk


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
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: pass a complete checkpoint directory")
    state = read_json(path, "the checkpoint state", "use another checkpoint", error=CheckpointError)
    if "step" not in state or "config" not in state:
        raise CheckpointError(f"{path} lacks step or config (not a llamalite checkpoint): use another checkpoint")
    if isinstance(state["step"], bool) or not isinstance(state["step"], int) or state["step"] < 0:
        raise CheckpointError(f"{path} has step {state['step']!r}, not a count of steps: use another checkpoint")
    if not isinstance(state["config"], dict):
        raise CheckpointError(f"{path} has a config that is not a JSON object: use another checkpoint")
    return state


def verify_checkpoint(path: Path, wanted: Callable[[str], bool] | None = None) -> list[str]:
    """Check the sha256 of the files listed in checksums.json (those `wanted` accepts, or all); return their names.

    Raises CheckpointError for an incomplete write, a missing file or a damaged one, naming the file."""
    checksums_file = path / CHECKSUMS
    if not checksums_file.is_file():
        raise CheckpointError(f"{path} has no {CHECKSUMS} (an incomplete write): use another checkpoint")
    checksums = read_json(checksums_file, "the checksums file", "use another checkpoint", error=CheckpointError)
    weights = f"{SHARDED_DIR}/.metadata" if f"{SHARDED_DIR}/.metadata" in checksums else WEIGHTS_FILE
    for name in (weights, STATE_FILE):
        if name not in checksums:
            raise CheckpointError(f"{path} lacks {name} (an incomplete checkpoint): use another checkpoint")
    verified = [name for name in checksums if wanted is None or wanted(name)]
    for name in verified:
        file = contained_path(path, name, f"{checksums_file}", "use another checkpoint", error=CheckpointError)
        if not isinstance(checksums[name], str):
            raise CheckpointError(f"{checksums_file} gives {name} no sha256 string: use another checkpoint")
        if not file.is_file():
            raise CheckpointError(f"{file} is missing: the checkpoint is incomplete, use another one")
        if sha256_file(file) != checksums[name]:
            raise CheckpointError(f"{file} does not match its checksum (corrupted or truncated): "
                                  "use another checkpoint")
    return verified


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Everything of a checkpoint for a resume (weights, optimizer, RNG, state), after verifying every file.

    Only files listed in checksums.json are read: a stray optimizer.pt that the checkpoint did not write is not its."""
    listed = set(verify_checkpoint(path))
    return Checkpoint(
        path=path,
        model=read_weights(path / WEIGHTS_FILE) if WEIGHTS_FILE in listed else None,
        optimizer=read_tensors_pickle(path / OPTIMIZER_FILE, map_location) if OPTIMIZER_FILE in listed else None,
        rng=read_tensors_pickle(path / RNG_FILE, "cpu") if RNG_FILE in listed else None,
        state=read_state(path),
    )


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's model.safetensors, through the one safetensors reader (model/weights_file.py)."""
    return read_safetensors(path, CheckpointError, "use another checkpoint")


def weight_names(path: Path) -> list[str]:
    """The tensor names of a checkpoint's model.safetensors (its header only)."""
    return safetensors_names(path, CheckpointError, "use another checkpoint")


def read_tensors_pickle(path: Path, map_location: str | torch.device) -> Any:
    """optimizer.pt or rng.pt, unpickled with torch's weights_only loader: tensors and plain containers only; any
    other content, or a file torch cannot read, is a one-line CheckpointError (checkpoint/safe_pickle.py)."""
    return load_weights_only(path, path, map_location)


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


def load_model_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], assign: bool = False,
                       source: Path | str = "the checkpoint") -> None:
    """Load tensors saved by model_tensors. assign=True takes the tensors themselves (a model built on the meta
    device), and ties the output head to the embeddings again. Tensors that do not fit the model are a
    CheckpointError naming the tensor and `source`."""
    tied = getattr(model.config, "tie_embeddings", False)
    tensors = dict(tensors)
    if tied:
        tensors["lm_head.weight"] = tensors.get("embed_tokens.weight")
    check_tensors_fit(model, tensors, source)
    expected = model.state_dict()  # half-precision weights (an import) take the model's dtype
    tensors = {name: tensor.to(expected[name].dtype) for name, tensor in tensors.items()}
    model.load_state_dict(tensors, assign=assign)
    if tied and assign:
        model.lm_head.weight = model.embed_tokens.weight


def check_tensors_fit(model: nn.Module, tensors: dict[str, torch.Tensor | None], source: Path | str) -> None:
    expected = model.state_dict()
    missing = [name for name in expected if tensors.get(name) is None]
    if missing:
        raise CheckpointError(f"{source} lacks tensor {shown(missing[0])} that the model of its config needs"
                              f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: "
                              "the weights and the config disagree; use another checkpoint")
    unexpected = [name for name in tensors if name not in expected]
    if unexpected:
        raise CheckpointError(f"{source} holds tensor {shown(unexpected[0])} that the model of its config does not "
                              "have: the weights and the config disagree; use another checkpoint")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{source}: tensor {shown(name)} has shape {tuple(tensor.shape)} but the model of "
                                  f"its config expects {tuple(expected[name].shape)}: the weights and the config "
                                  "disagree; use another checkpoint")


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
    """Temporary directories left by a write or a pruning that crashed; never a valid checkpoint."""
    for stale in checkpoints_dir.glob(f"{TEMP_PREFIX}*step_*"):
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


def commit_checkpoint_dir(tmp: Path, final: Path, keep_other_files: bool = False) -> Path:
    """The one atomic commit: checksums of every file in `tmp` (relative paths), fsync of files and folders, then
    the rename to `final`. Readers see either no checkpoint at `final` or a complete one.

    A `final` that exists is replaced, unless keep_other_files (a user's folder, written with --force): then the
    files move in one by one, checksums.json last, and files of other names stay."""
    files = sorted(f for f in tmp.rglob("*") if f.is_file())
    checksums = {f.relative_to(tmp).as_posix(): sha256_file(f) for f in files}
    (tmp / CHECKSUMS).write_text(json.dumps(checksums, indent=2))
    folders = sorted({f.parent for f in files} | {tmp}, key=lambda p: len(p.parts), reverse=True)
    for path in [*files, tmp / CHECKSUMS, *folders]:
        fsync(path)
    if keep_other_files:
        move_into(tmp, final, last=CHECKSUMS, weights=(WEIGHTS_FILE, SHARDED_DIR))
        return final
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
    keep_other_files: bool = False,
) -> Path:
    """Write one single-file checkpoint directory at `final`, atomically.

    `extra_files` (name -> source) are copied in before the checksums, which then cover them too. keep_other_files:
    see commit_checkpoint_dir.
    """
    tmp = begin_checkpoint_dir(final)
    save_file(model_tensors(model), tmp / WEIGHTS_FILE)
    for name, source in (extra_files or {}).items():
        shutil.copyfile(source, tmp / name)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
    write_state_files(tmp, trainer_state)
    return commit_checkpoint_dir(tmp, final, keep_other_files)


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


def describe_write_failure(exc: BaseException, folder: Path) -> str | None:
    """Why a checkpoint write failed, when the cause is space (a full disk, a quota, a file-size limit); None for any
    other failure, which is a bug to show with its traceback. torch.save and safetensors wrap the OSError in their own
    exceptions, so their text is read too."""
    code = exc.errno if isinstance(exc, OSError) else None
    text = str(exc).lower()
    size_limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    too_large = (f"a file reached the size limit of this process (ulimit -f: {size_limit:,} bytes) in {folder}"
                 if size_limit != resource.RLIM_INFINITY else f"a file reached the filesystem's size limit in {folder}")
    if code in (errno.ENOSPC, errno.EDQUOT) or "no space left" in text or "quota" in text:
        return f"no space left on {folder}"
    if code == errno.EFBIG or "file too large" in text:
        return too_large
    if "file write failed" in text or "inline_container" in text:  # torch.save does not say why: look
        if size_limit != resource.RLIM_INFINITY:
            return too_large
        if shutil.disk_usage(folder).free < LOW_SPACE_BYTES:
            return f"no space left on {folder}"
        return f"a write in {folder} failed (a full disk, a quota or a file-size limit)"
    return None


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
            # Renamed away first: a kill during the deletion leaves a temporary directory, never a partial checkpoint
            doomed = path.with_name(f"{TEMP_PREFIX}pruned_{path.name}")
            shutil.rmtree(doomed, ignore_errors=True)
            os.replace(path, doomed)
            shutil.rmtree(doomed)
            removed.append(path)
    return removed
