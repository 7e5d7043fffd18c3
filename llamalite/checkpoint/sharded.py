"""Sharded checkpoints through torch.distributed.checkpoint (DCP), and loading any checkpoint into a plain, DDP or
FSDP2 model.

A sharded checkpoint directory has the same contract as a single-file one (checkpoint/format.py): written under a
temporary name by every rank, completed by rank 0 (RNG, trainer state, checksums) and renamed when whole.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llamalite.checkpoint.format import (
    RNG_FILE,
    SHARDED_DIR,
    begin_checkpoint_dir,
    checkpoint_name,
    commit_checkpoint_dir,
    is_sharded,
    read_state,
    read_tensors_pickle,
    remove_stale_temps,
    restore_rng_state,
    temp_dir_of,
    verify_checkpoint,
    write_checkpoint_dir,
    write_latest,
    write_state_files,
)
from llamalite.config import Config, config_from_dict
from llamalite.errors import CheckpointError
from llamalite.files import claim_output
from llamalite.model.llama import Llama
from llamalite.runtime import barrier, is_main_process

OptimizerFactory = Callable[[nn.Module, Config], torch.optim.Optimizer]


def reshard_all(model: nn.Module) -> None:
    """Free every gathered FSDP2 parameter: the root and the last block keep theirs after a forward, and while they
    do, named_parameters() yields the gathered tensors instead of the sharded ones that the optimizer and DCP use."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


# ------------------------------------------------------------------------------------------------- DCP
def save_sharded(checkpoint_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of the model and optimizer state into checkpoint_dir/dcp (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    reshard_all(model)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(checkpoint_dir / SHARDED_DIR))


def load_sharded(checkpoint_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                 load_model: bool = True) -> None:
    """Load a sharded checkpoint into a model sharded for any world size, or into a plain model (DCP reshards)."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from llamalite.checkpoint.dcp_reader import dcp_load

    reshard_all(model)
    state: dict[str, Any] = {}
    if load_model:
        state["model"] = get_model_state_dict(model)
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    dcp_load(state, checkpoint_dir / SHARDED_DIR)  # the one DCP read: nothing in the files can run code
    if load_model:
        set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    tensors: dict[str, torch.Tensor] | None, optimizer_state: dict[str, Any] | None) -> None:
    """Load a single-file checkpoint's full model and/or torch-format optimizer state into a sharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    reshard_all(model)
    options = StateDictOptions(full_state_dict=True)
    if tensors is not None:
        if getattr(model.config, "tie_embeddings", False):
            tensors = {**tensors, "lm_head.weight": tensors["embed_tokens.weight"]}
        set_model_state_dict(model, tensors, options=options)
    if optimizer is not None and optimizer_state is not None:
        set_optimizer_state_dict(model, optimizer, _optimizer_state_by_name(model, optimizer, optimizer_state),
                                 options=options)


def _optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer,
                             state: dict[str, Any]) -> dict[str, Any]:
    """optimizer.state_dict() keys parameters by position; DCP's state-dict API keys them by name."""
    names = {id(param): name for name, param in model.named_parameters()}
    order = [names[id(param)] for group in optimizer.param_groups for param in group["params"]]
    by_name = {order[index]: value for index, value in state["state"].items()}
    groups = [{**group, "params": [order[index] for index in group["params"]]} for group in state["param_groups"]]
    return {"state": by_name, "param_groups": groups}


# ------------------------------------------------------------------------------------------------- directories
def save_sharded_checkpoint(checkpoints_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                            trainer_state: dict[str, Any]) -> Path:
    """checkpoints/step_XXXXXXX with the DCP shards of every rank (collective): rank 0 prepares the temporary
    directory, adds the trainer state and RNG, and commits it as checkpoint/format.py commits any checkpoint."""
    final = checkpoints_dir / checkpoint_name(step)
    tmp = temp_dir_of(final)
    main = is_main_process()
    if main:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(checkpoints_dir)
        begin_checkpoint_dir(final)
    barrier()
    save_sharded(tmp, model, optimizer)
    barrier()
    if main:
        write_state_files(tmp, trainer_state)
        commit_checkpoint_dir(tmp, final)
        write_latest(checkpoints_dir, final.name)
    barrier()
    return final


def consolidate(checkpoint_dir: Path, out_dir: Path, build_optimizer: OptimizerFactory, force: bool = False) -> Path:
    """A sharded (FSDP) checkpoint -> a single-file checkpoint directory (safetensors weights, optimizer.pt, RNG,
    trainer state) that eval, export, generate and a resume at any world size read. Runs in one process on the CPU.

    `build_optimizer(model, config)` makes the optimizer whose state the shards hold (training owns that choice).
    out_dir must be new or empty unless `force` (files of other names in it are kept)."""
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    if not is_sharded(checkpoint_dir):
        raise CheckpointError(f"{checkpoint_dir} is not a sharded checkpoint (no {SHARDED_DIR}/.metadata): "
                              "pass a checkpoint directory written with train.parallel=fsdp")
    if out_dir.resolve() == checkpoint_dir.resolve():
        raise CheckpointError(f"consolidating {checkpoint_dir} into itself: pass another output directory")
    claim = claim_output(out_dir, "checkpoint", "the consolidated checkpoint", inputs=(checkpoint_dir,), force=force)
    verify_checkpoint(checkpoint_dir)
    state = read_state(checkpoint_dir)
    config = config_from_dict(state["config"])
    model = Llama(config.model)
    optimizer = build_optimizer(model, config)
    load_sharded(checkpoint_dir, model, optimizer)
    rng_file = checkpoint_dir / RNG_FILE
    if rng_file.exists():  # write_checkpoint_dir captures the current RNG: make it the saved one
        restore_rng_state(read_tensors_pickle(rng_file, "cpu"))
    with claim.writing(temporaries=(temp_dir_of(out_dir),)):
        return write_checkpoint_dir(out_dir, model, optimizer, state, keep_other_files=True)

