"""Training on several processes with PyTorch's own stack: torchrun's environment, DDP or FSDP2, activation
checkpointing, per-block compile, and sharded checkpoints through torch.distributed.checkpoint (DCP).

The model code knows nothing of this: everything here is applied to a built `Llama` from outside, as torchtitan does.
Parameter names never change (checkpointing and compile patch or wrap instances, not the module tree), so a
checkpoint written under any strategy loads under any other.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

PARALLEL_MODES = ("auto", "none", "ddp", "fsdp")
CHECKPOINTING_MODES = ("none", "block", "selective")
COMPILE_SCOPES = ("loss", "block")
SHARDED_DIR = "dcp"  # the DCP folder inside a sharded checkpoint directory


class DistributedError(ValueError):
    """A distributed set-up problem, worded for the user."""


# ------------------------------------------------------------------------------------------------- processes
@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistInfo:
    """Rank and world size from torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE); joins the process group
    (NCCL on GPUs, gloo on CPUs) when there are several processes. One process without torchrun: rank 0 of 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world_size)
    if info.active and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise DistributedError("WORLD_SIZE is set but MASTER_ADDR is not: launch with torchrun "
                                   "(torchrun --nproc_per_node N -m llamalite train CONFIG)")
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=int(os.environ.get("LLAMALITE_DIST_TIMEOUT_MIN", "30"))))
    return info


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def mean_across_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar tensor over all ranks (itself with one process)."""
    if not dist.is_initialized():
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / dist.get_world_size()


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's value of a picklable object, on every rank."""
    if not dist.is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def resolve_parallel(mode: str, world_size: int) -> str:
    if mode not in PARALLEL_MODES:
        raise DistributedError(f"unknown train.parallel {mode!r}: choose one of {', '.join(PARALLEL_MODES)}")
    if mode == "auto":
        return "ddp" if world_size > 1 else "none"
    if mode == "none" and world_size > 1:
        raise DistributedError(f"train.parallel=none with {world_size} processes would train {world_size} "
                               "unrelated copies: use train.parallel=ddp or fsdp (or auto)")
    return mode


class NullLogger:
    """The MetricsLogger of ranks other than 0: they compute everything and write nothing."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def scalars(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def event(self, step: int, kind: str, **details: Any) -> None:
        pass

    def write(self, record: dict[str, Any]) -> None:  # also stands in for the samples JsonlWriter
        pass

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------------------- wrapping
def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Recompute each block in backward (`block`), or keep its matmul and attention outputs and recompute only the
    cheap element-wise ops (`selective`). Patches each block's forward, so parameter names stay the same."""
    if mode not in CHECKPOINTING_MODES:
        raise DistributedError(f"unknown train.activation_checkpointing {mode!r}: "
                               f"choose one of {', '.join(CHECKPOINTING_MODES)}")
    if mode == "none":
        return
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    context_fn = None
    if mode == "selective":
        context_fn = functools.partial(create_selective_checkpoint_contexts, _ops_worth_saving())
    for block in model.layers:
        forward = block.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            extra = {"context_fn": context_fn} if context_fn is not None else {}
            return checkpoint(_forward, *args, use_reentrant=False, **extra, **kwargs)

        block.forward = checkpointed


def _ops_worth_saving() -> list:
    """Matmuls and attention: expensive to recompute, so `selective` keeps their outputs (torchtitan's op policy)."""
    aten = torch.ops.aten
    names = ["mm", "addmm", "bmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"]
    return [getattr(aten, name).default for name in names if hasattr(aten, name)]


def compile_blocks(model: nn.Module) -> None:
    """torch.compile each block on its own (in place: names unchanged). Small graphs compile fast and compose with
    FSDP2's per-block hooks and with activation checkpointing."""
    for block in model.layers:
        block.compile()


def fsdp_shard(model: nn.Module, device: torch.device, dtype: str) -> nn.Module:
    """FSDP2: each block is one all-gather unit, the root (embeddings, final norm, output head) another. With bf16
    the parameters are gathered in bf16 and gradients reduced in fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if dtype == "bf16"
              else MixedPrecisionPolicy())
    last = len(model.layers) - 1
    for index, block in enumerate(model.layers):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=index < last)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    # FSDP2 allocates its all-gather buffers on the first forward. Were that the step-0 evaluation, which runs under
    # torch.inference_mode, they would be inference tensors that training may not write: allocate them now.
    with torch.no_grad():
        model(torch.zeros((1, 1), dtype=torch.long, device=device))
    reshard_all(model)  # the optimizer must see the sharded parameters
    return model


def reshard_all(model: nn.Module) -> None:
    """Free every gathered FSDP2 parameter: the root and the last block keep theirs after a forward, and while they
    do, named_parameters() yields the gathered tensors instead of the sharded ones that the optimizer and DCP use."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def ddp_wrap(module: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def gradient_sync(wrapped: Any, parallel: str, sync: bool) -> contextlib.AbstractContextManager:
    """Context of one micro step: gradients are reduced across ranks only on the last micro step of an update."""
    if parallel == "ddp" and not sync:
        return wrapped.no_sync()
    if parallel == "fsdp":
        wrapped.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def clip_grad_norm(parameters: list[nn.Parameter], max_norm: float) -> float:
    """The global gradient norm before clipping (sharded gradients included)."""
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
        norm = norm.full_tensor()
    return float(norm)


# ------------------------------------------------------------------------------------------------- state dicts
def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded model state on the CPU (every rank calls this under FSDP; all get the tensors)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    tensors: dict[str, torch.Tensor] | None, optimizer_state: dict[str, Any] | None) -> None:
    """Load a single-file checkpoint's full model and/or torch-format optimizer state into a sharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    reshard_all(model)
    options = StateDictOptions(full_state_dict=True)
    if tensors is not None:
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
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    reshard_all(model)
    state: dict[str, Any] = {}
    if load_model:
        state["model"] = get_model_state_dict(model)
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    dcp.load(state, checkpoint_id=str(checkpoint_dir / SHARDED_DIR))
    if load_model:
        set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


def save_sharded_checkpoint(checkpoints_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                            trainer_state: dict[str, Any], info: DistInfo) -> Path:
    """checkpoints/step_XXXXXXX with the DCP shards of every rank, written under a temporary name; rank 0 adds the
    trainer state, RNG and checksums, renames it and points `latest` at it (the same contract as a single file)."""
    from llamalite.train.checkpoint import CHECKSUMS, _fsync, _write_latest, capture_rng_state, checkpoint_name
    from llamalite.data.shards import sha256_file

    final = checkpoints_dir / checkpoint_name(step)
    tmp = checkpoints_dir / f".tmp_{final.name}"
    if info.is_main:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        for stale in checkpoints_dir.glob(".tmp_step_*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier()
    save_sharded(tmp, model, optimizer)
    barrier()
    if info.is_main:
        torch.save(capture_rng_state(), tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        files = sorted(f for f in tmp.rglob("*") if f.is_file())
        checksums = {f.relative_to(tmp).as_posix(): sha256_file(f) for f in files}
        (tmp / CHECKSUMS).write_text(json.dumps(checksums, indent=2))
        for f in [*files, tmp / CHECKSUMS, tmp / SHARDED_DIR, tmp]:
            _fsync(f)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(checkpoints_dir)
        _write_latest(checkpoints_dir, final.name)
    barrier()
    return final


def is_sharded(checkpoint_dir: Path) -> bool:
    return (checkpoint_dir / SHARDED_DIR / ".metadata").is_file()


def consolidate(checkpoint_dir: Path, out_dir: Path) -> Path:
    """A sharded (FSDP) checkpoint -> a single-file checkpoint directory (safetensors weights, optimizer.pt, RNG,
    trainer state) that eval, export, generate and a resume at any world size read. Runs in one process on the CPU."""
    from llamalite.config import config_from_dict
    from llamalite.model.llama import Llama
    from llamalite.train.checkpoint import CheckpointError, restore_rng_state, verify_checkpoint, write_checkpoint_dir
    from llamalite.train.optim import build_optimizer

    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    if not is_sharded(checkpoint_dir):
        raise CheckpointError(f"{checkpoint_dir} is not a sharded checkpoint (no {SHARDED_DIR}/.metadata): "
                              "pass a checkpoint directory written with train.parallel=fsdp")
    if out_dir.resolve() == checkpoint_dir.resolve():
        raise CheckpointError(f"consolidating {checkpoint_dir} into itself: pass another output directory")
    verify_checkpoint(checkpoint_dir)
    state = json.loads((checkpoint_dir / "trainer_state.json").read_text())
    config = config_from_dict(state["config"])
    model = Llama(config.model)
    optimizer = build_optimizer(model, config.optim, "cpu")
    load_sharded(checkpoint_dir, model, optimizer)
    rng_file = checkpoint_dir / "rng.pt"
    if rng_file.exists():  # write_checkpoint_dir captures the current RNG: make it the saved one
        restore_rng_state(torch.load(rng_file, weights_only=True))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return write_checkpoint_dir(out_dir, model, optimizer, state)


def load_sharded_model_weights(checkpoint_dir: Path, model: nn.Module) -> None:
    """The weights of a sharded checkpoint into a plain model, in this process (for eval, export, generate)."""
    load_sharded(checkpoint_dir, model, None)


def parallelize(model: nn.Module, parallel: str, device: torch.device, dtype: str, activation_checkpointing: str,
                compile: bool, compile_scope: str, loss_chunk_tokens: int) -> tuple[nn.Module, Any]:
    """Prepare `model` (in place) for training and return (the loss module: tokens, targets -> loss, the module whose
    gradient sync gradient_sync() toggles). Order as torchtitan: checkpointing, then compile, then FSDP or DDP."""
    from llamalite.train.step import LanguageModelLoss

    if compile_scope not in COMPILE_SCOPES:
        raise DistributedError(f"unknown train.compile_scope {compile_scope!r}: choose one of {', '.join(COMPILE_SCOPES)}")
    apply_activation_checkpointing(model, activation_checkpointing)
    per_block = compile and (compile_scope == "block" or parallel == "fsdp")
    if per_block:
        compile_blocks(model)
    if parallel == "fsdp":
        fsdp_shard(model, device, dtype)
    loss_module = LanguageModelLoss(model, loss_chunk_tokens)
    wrapped = ddp_wrap(loss_module, device) if parallel == "ddp" else loss_module
    loss_fn = torch.compile(wrapped) if compile and not per_block else wrapped
    return loss_fn, {"ddp": wrapped, "fsdp": model}.get(parallel)
