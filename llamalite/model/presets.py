"""Named model configurations and their parameter and FLOP counts."""

from __future__ import annotations

import dataclasses

from llamalite.errors import ConfigError, did_you_mean
from llamalite.model.config import ModelConfig

PRESETS: dict[str, ModelConfig] = {
    # A few million parameters: trains on a laptop CPU in minutes (the demo's model).
    "tiny": ModelConfig(
        vocab_size=4096, n_layer=6, d_model=256, n_head=8, n_kv_head=4, ffn_hidden=768,
        max_seq_len=256, rope_theta=10000.0, tie_embeddings=False,
    ),
    # Between tiny and 124m: 29.4M parameters with a 4,096-token vocabulary (the data-efficiency benchmark's 2nd size).
    "30m": ModelConfig(
        vocab_size=4096, n_layer=8, d_model=512, n_head=8, n_kv_head=4, ffn_hidden=1536,
        max_seq_len=256, rope_theta=10000.0, tie_embeddings=False,
    ),
    # GPT-2 small's shape as a LLaMA (tied embeddings, GPT-2 vocab padded to 50304): 123.6M parameters.
    "124m": ModelConfig(
        vocab_size=50304, n_layer=12, d_model=768, n_head=12, n_kv_head=12, ffn_hidden=2048,
        max_seq_len=1024, rope_theta=10000.0, tie_embeddings=True,
    ),
    # GPT-2 medium's shape as a LLaMA (tied embeddings, GPT-2 vocab padded): 359.8M parameters.
    "350m": ModelConfig(
        vocab_size=50304, n_layer=24, d_model=1024, n_head=16, n_kv_head=16, ffn_hidden=2816,
        max_seq_len=1024, rope_theta=10000.0, tie_embeddings=True,
    ),
    # DMaS-LLaMa-Lite (2024): the paper's 1.7B model, 1,716,144,128 parameters.
    "dmas-1.7b": ModelConfig(
        vocab_size=50304, n_layer=36, d_model=2048, n_head=32, n_kv_head=8, ffn_hidden=5120,
        max_seq_len=1024, rope_theta=500000.0, norm_eps=1e-5, tie_embeddings=False,
    ),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}: {did_you_mean(name, PRESETS)}")
    return dataclasses.replace(PRESETS[name], preset=name)


def count_parameters(config: ModelConfig) -> int:
    """Exact parameter count from the config alone (tied embeddings counted once)."""
    d, kv_dim = config.d_model, config.n_kv_head * config.head_dim
    attention = 2 * d * d + 2 * d * kv_dim
    mlp = 3 * d * config.ffn_hidden
    norms = 2 * d + (2 * config.head_dim if config.qk_norm else 0)
    embeddings = config.vocab_size * d * (1 if config.tie_embeddings else 2)
    return config.n_layer * (attention + mlp + norms) + d + embeddings


def matmul_parameters(config: ModelConfig) -> int:
    """Parameters that take part in a matrix multiply per token: all but the embedding lookup and norms."""
    d, kv_dim = config.d_model, config.n_kv_head * config.head_dim
    per_layer = 2 * d * d + 2 * d * kv_dim + 3 * d * config.ffn_hidden
    return config.n_layer * per_layer + config.vocab_size * d  # + the output head


def training_flops_per_token(config: ModelConfig, seq_len: int | None = None) -> int:
    """Forward + backward FLOPs per token: 6 per matmul parameter plus attention scores (PaLM, appendix B)."""
    seq_len = seq_len or config.max_seq_len
    attention = 12 * config.n_layer * config.d_model * seq_len
    return 6 * matmul_parameters(config) + attention
