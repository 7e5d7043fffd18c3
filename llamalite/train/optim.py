"""Parameter groups, AdamW and learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from llamalite.config import OptimConfig
from llamalite.errors import ConfigError

SCHEDULES = ("cosine", "wsd", "constant")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (projections and embeddings) only; norms' gains and any vectors are not decayed."""
    decay, no_decay = [], []
    for param in model.parameters():  # a tied weight appears once
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.AdamW:
    fused = cfg.fused if cfg.fused is not None else device_type in ("cuda", "cpu")
    return torch.optim.AdamW(
        parameter_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        fused=fused,
    )


def learning_rate(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """The LR at optimizer step `step` (0-based): a pure function of the step, so resuming never stretches it."""
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"unknown optim.schedule {cfg.schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        span = max(1, max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
    # Warmup-stable-decay: hold the peak, then decay linearly to min_lr over the last decay_fraction of steps.
    decay_steps = max(1, round(cfg.decay_fraction * max_steps))
    decay_start = max_steps - decay_steps
    if step < decay_start:
        return cfg.lr
    progress = min(1.0, (step - decay_start) / decay_steps)
    return cfg.lr + progress * (cfg.min_lr - cfg.lr)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
