"""Sampling continuations from a model: greedy, temperature and top-k."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def sample(
    model: nn.Module,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = 50,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Extend `prompt` by up to max_new_tokens sampled tokens (stops after eos_id). Returns the new tokens.

    Recomputes the whole window each step; the context is cut to the model's max_seq_len.
    """
    device = next(model.parameters()).device
    context_limit = model.config.max_seq_len
    tokens = torch.tensor([prompt], dtype=torch.long, device=device)
    new_tokens: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(tokens[:, -context_limit:])[0, -1].float()
        next_token = pick_token(logits, temperature, top_k, generator)
        new_tokens.append(next_token)
        if next_token == eos_id:
            break
        tokens = torch.cat([tokens, torch.tensor([[next_token]], device=device)], dim=1)
    return new_tokens


def pick_token(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
