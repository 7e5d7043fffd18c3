"""The computation of one micro step: the LM loss, compiled together with the model, under autocast."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from llamalite.model.llama import soft_cap


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32; targets of -100 are ignored."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(0, 1), ignore_index=-100)


def chunked_lm_loss(hidden: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor,
                    chunk_tokens: int, logit_softcap: float | None = None) -> torch.Tensor:
    """lm_loss from the final hidden states (B, T, d), a chunk of tokens at a time: each chunk's logits are
    recomputed in backward instead of kept, so the fp32 logits of the whole batch never exist at once."""
    from torch.utils.checkpoint import checkpoint

    hidden, targets = hidden.flatten(0, 1), targets.flatten(0, 1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        end = start + chunk_tokens
        total = total + checkpoint(_summed_chunk_loss, hidden[start:end], head_weight, targets[start:end],
                                   logit_softcap, use_reentrant=False)
    return total / (targets != -100).sum().clamp(min=1)


def _summed_chunk_loss(hidden: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor,
                       logit_softcap: float | None) -> torch.Tensor:
    logits = soft_cap(F.linear(hidden, head_weight), logit_softcap)
    return F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum")


class LanguageModelLoss(nn.Module):
    """tokens, targets -> mean loss, as a module: the unit that DDP wraps and that torch.compile sees whole.

    chunk_tokens > 0 takes the chunked path (chunked_lm_loss); 0 computes the logits in one piece.
    """

    def __init__(self, model: nn.Module, chunk_tokens: int = 0):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.chunk_tokens <= 0:
            return lm_loss(self.model(tokens), targets)
        hidden = self.model(tokens, head=False)
        # Read after the forward: under FSDP2 the root's parameters stay gathered from its forward to its backward.
        return chunked_lm_loss(hidden, self.model.lm_head.weight, targets, self.chunk_tokens,
                               self.model.config.logit_softcap)


def build_loss_fn(model: nn.Module, compile: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """tokens, targets -> loss. Compiled as one function with the loss: compiling the model alone was slower on CPU."""

    def loss_fn(tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return lm_loss(model(tokens), targets)

    return torch.compile(loss_fn) if compile else loss_fn
