"""Optimizers (AdamW, or Muon for hidden matrices with AdamW for the rest) and learning-rate schedules."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from llamalite.config import OptimConfig
from llamalite.errors import ConfigError, TrainError
from llamalite.runtime import has_fast_bf16

SCHEDULES = ("cosine", "wsd", "constant")
OPTIMIZERS = ("adamw", "muon")
# Parameters that Muon never takes, even as matrices: a lookup table and the output classifier (Keller Jordan's
# Muon post; Moonlight). They go to AdamW with the norms' gains.
ADAMW_ONLY = ("embed_tokens.weight", "lm_head.weight")


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


def muon_split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(hidden matrices for Muon, everything else for AdamW): Muon takes every trainable 2-D weight but the
    embedding table and the output head."""
    hidden, other = [], []
    for name, param in model.named_parameters():  # a tied weight appears once, under embed_tokens
        if not param.requires_grad:
            continue
        is_hidden = param.dim() == 2 and not any(name.endswith(suffix) for suffix in ADAMW_ONLY)
        (hidden if is_hidden else other).append(param)
    return hidden, other


def check_learning_rates(cfg: OptimConfig) -> None:
    """Learning rates with which a run cannot learn, or whose decay would raise the LR."""
    for key, value in (("lr", cfg.lr), ("muon_lr", cfg.muon_lr)):
        if value is not None and not value > 0:
            raise ConfigError(f"optim.{key}={value}: a run with a peak LR of {value} cannot learn; "
                              f"set optim.{key} to a positive value such as 6e-4")
    if cfg.min_lr < 0 or cfg.min_lr > cfg.lr:
        effect = "raise the LR" if cfg.min_lr > cfg.lr else "turn the LR negative"
        raise ConfigError(f"optim.min_lr={cfg.min_lr} lies outside [0, optim.lr={cfg.lr}]: the decay would {effect}; "
                          f"set optim.min_lr between 0 and optim.lr (e.g. {cfg.lr / 10:g})")


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str, parallel: str = "none"):
    if cfg.name not in OPTIMIZERS:
        raise ConfigError(f"unknown optim.name {cfg.name!r}: choose one of {', '.join(OPTIMIZERS)}")
    check_learning_rates(cfg)
    fused = cfg.fused if cfg.fused is not None else device_type in ("cuda", "cpu")
    if cfg.name == "adamw":
        return _adamw(parameter_groups(model, cfg.weight_decay), cfg, fused)
    if parallel == "fsdp":
        raise ConfigError("optim.name=muon needs whole matrices, and FSDP2 shards them across ranks: "
                          "train Muon with train.parallel=ddp (or one process), or use optim.name=adamw under fsdp")
    hidden, other = muon_split(model)
    adamw = _adamw([{"params": [p for p in other if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                    {"params": [p for p in other if p.dim() < 2], "weight_decay": 0.0}], cfg, fused)
    ns_dtype = torch.bfloat16 if has_fast_bf16(torch.device(device_type)) else torch.float32
    return MuonWithAdamW(_muon(hidden, cfg, ns_dtype), adamw)


def _adamw(groups: list[dict], cfg: OptimConfig, fused: bool) -> torch.optim.AdamW:
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)


def _muon(params: list[nn.Parameter], cfg: OptimConfig, ns_dtype: torch.dtype) -> Muon:
    weight_decay = cfg.weight_decay if cfg.muon_weight_decay is None else cfg.muon_weight_decay
    if cfg.muon_lr is None:  # Moonlight's scaling: the update's RMS matches AdamW's, so AdamW's LR carries over
        lr, lr_ratio, adjust = cfg.lr, 1.0, "match_rms_adamw"
    else:  # Keller Jordan's scaling, with Muon's own LR
        lr, lr_ratio, adjust = cfg.muon_lr, cfg.muon_lr / cfg.lr, "original"
    return Muon([{"params": params, "lr_ratio": lr_ratio}], lr=lr, weight_decay=weight_decay,
                momentum=cfg.muon_momentum, nesterov=True, adjust_lr_fn=adjust, ns_dtype=ns_dtype)


class Muon(torch.optim.Muon):
    """torch.optim.Muon, with the Newton-Schulz iteration in a chosen dtype.

    torch runs it in bf16, which is fast on GPUs and bf16-capable CPUs but 17-50x slower than fp32 on a CPU without
    native bf16 (measured on a 2-core AVX2 CPU for 256x768 and 512x1536 matrices). With ns_dtype=bfloat16 this is
    exactly torch's step; with float32 it computes the same iteration in fp32. The state is torch's Muon's.
    """

    def __init__(self, params, *, ns_dtype: torch.dtype = torch.bfloat16, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        if self.ns_dtype == torch.bfloat16:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group)
        return loss

    def _update(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        grad, momentum = param.grad, group["momentum"]
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
        buffer = state["momentum_buffer"]
        buffer.lerp_(grad, 1 - momentum)
        update = grad.lerp(buffer, momentum) if group["nesterov"] else buffer
        update = orthogonalize(update, group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype)
        param.mul_(1 - group["lr"] * group["weight_decay"])
        param.add_(update.to(param.dtype), alpha=-_muon_lr(group["lr"], group["adjust_lr_fn"], param.shape))


def orthogonalize(matrix: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration towards the nearest semi-orthogonal matrix, computed in `dtype`."""
    a, b, c = coefficients
    x = matrix.to(dtype)
    transposed = matrix.size(0) > matrix.size(1)
    if transposed:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if transposed else x


def _muon_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr * math.sqrt(max(1, rows / cols))


class MuonWithAdamW:
    """Muon for the hidden matrices and AdamW for the rest, stepped together as one optimizer.

    param_groups lists AdamW's groups first (group 0 carries the schedule's LR); state_dict() holds both states,
    each in torch's own format."""

    def __init__(self, muon: Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.adamw.param_groups + self.muon.param_groups

    def step(self) -> None:
        self.adamw.step()
        self.muon.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none=set_to_none)
        self.muon.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"adamw", "muon"}:
            raise TrainError("the checkpoint's optimizer state is not Muon + AdamW: resume with the optim.name it "
                             "was trained with, or pass train.reset_optimizer=true to start a fresh optimizer")
        self.adamw.load_state_dict(state["adamw"])
        self.muon.load_state_dict(state["muon"])


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


SCHEDULE_KEYS = ("lr", "min_lr", "schedule", "warmup_steps", "decay_fraction")  # with train.max_steps: the LR
SCHEDULE_CHANGES = ("decay", "stretch", "keep")


def schedule_of(optim: dict[str, Any], max_steps: int) -> dict[str, Any]:
    """What fixes the LR at every step: the schedule keys of a config's optim section, and max_steps."""
    defaults = dataclasses.asdict(OptimConfig())  # keys added since a checkpoint was written keep their defaults
    return {**{key: optim.get(key, defaults[key]) for key in SCHEDULE_KEYS}, "max_steps": max_steps}


def scheduled_lr(step: int, schedule: dict[str, Any], override: dict[str, Any] | None = None) -> float:
    """The LR at `step` of a run whose schedule is `schedule` (schedule_of), unless a change on resume chose
    otherwise (`override`, from changed_schedule)."""
    if override is None:
        return learning_rate(step, OptimConfig(**{key: schedule[key] for key in SCHEDULE_KEYS}), schedule["max_steps"])
    if override["rule"] == "keep":
        return scheduled_lr(step, override["schedule"], override.get("override"))
    # decay: linear from the LR the run had reached, to min_lr at the new last step
    span = max(1, override["max_steps"] - override["from_step"])
    progress = min(1.0, max(0.0, (step - override["from_step"]) / span))
    return override["from_lr"] + progress * (override["min_lr"] - override["from_lr"])


def changed_schedule(rule: str, step: int, old: dict[str, Any], old_override: dict[str, Any] | None,
                     new: dict[str, Any]) -> dict[str, Any] | None:
    """The override that continues a run resumed at `step` whose schedule changed from `old` to `new`:
    decay (linear from the LR reached to the new min_lr over the remaining steps), stretch (the new schedule as if
    the run always had it: None) or keep (the old schedule, its horizon included)."""
    if rule == "stretch":
        return None
    if rule == "keep":
        return {"rule": "keep", "schedule": old, "override": old_override}
    return {"rule": "decay", "from_step": step, "from_lr": scheduled_lr(step, old, old_override),
            "min_lr": new["min_lr"], "max_steps": new["max_steps"]}


def set_learning_rate(optimizer, lr: float) -> None:
    """The schedule's LR for every group, times the group's lr_ratio (Muon's own LR relative to AdamW's)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)
