"""The computation of one micro step: the LM loss, compiled together with the model, under autocast."""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

DTYPES = ("bf16", "fp32")


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32; targets of -100 are ignored."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(0, 1), ignore_index=-100)


def build_loss_fn(model: nn.Module, compile: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """tokens, targets -> loss. Compiled as one function with the loss: compiling the model alone was slower on CPU."""

    def loss_fn(tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return lm_loss(model(tokens), targets)

    return torch.compile(loss_fn) if compile else loss_fn


def autocast_context(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if dtype not in DTYPES:
        raise ValueError(f"unknown train.dtype {dtype!r}: use bf16 or fp32")
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
