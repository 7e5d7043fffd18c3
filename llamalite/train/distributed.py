"""Wrapping a model for training with PyTorch's own stack: DDP or FSDP2, activation checkpointing, per-block compile.
(torchrun's environment and the process group: llamalite/runtime.py; sharded checkpoints: llamalite/checkpoint/.)

The model code knows nothing of this: everything here is applied to a built `Llama` from outside, as torchtitan does.
Parameter names never change (checkpointing and compile patch or wrap instances, not the module tree), so a
checkpoint written under any strategy loads under any other.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from llamalite.checkpoint.sharded import reshard_all
from llamalite.errors import DistributedError
from llamalite.train.step import LanguageModelLoss

PARALLEL_MODES = ("auto", "none", "ddp", "fsdp")
CHECKPOINTING_MODES = ("none", "block", "selective")
COMPILE_SCOPES = ("loss", "block")


def resolve_parallel(mode: str, world_size: int) -> str:
    if mode not in PARALLEL_MODES:
        raise DistributedError(f"unknown train.parallel {mode!r}: choose one of {', '.join(PARALLEL_MODES)}")
    if mode == "auto":
        return "ddp" if world_size > 1 else "none"
    if mode == "none" and world_size > 1:
        raise DistributedError(f"train.parallel=none with {world_size} processes would train {world_size} "
                               "unrelated copies: use train.parallel=ddp or fsdp (or auto)")
    return mode


def require_process_group(parallel: str, command: str = "train") -> None:
    """ddp and fsdp wrap the model in a process group, which only torchrun's processes join (runtime.init_distributed):
    refuse them in one process before anything is written."""
    if parallel in ("ddp", "fsdp") and not dist.is_initialized():
        raise DistributedError(f"train.parallel={parallel} needs several processes started by torchrun "
                               f"(torchrun --nproc_per_node N -m llamalite {command} CONFIG): "
                               "use train.parallel=auto or none for one process")


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


def parallelize(model: nn.Module, parallel: str, device: torch.device, dtype: str, activation_checkpointing: str,
                compile: bool, compile_scope: str, loss_chunk_tokens: int) -> tuple[nn.Module, Any]:
    """Prepare `model` (in place) for training and return (the loss module: tokens, targets -> loss, the module whose
    gradient sync gradient_sync() toggles). Order as torchtitan: checkpointing, then compile, then FSDP or DDP."""
    if compile_scope not in COMPILE_SCOPES:
        raise DistributedError(f"unknown train.compile_scope {compile_scope!r}: "
                               f"choose one of {', '.join(COMPILE_SCOPES)}")
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
