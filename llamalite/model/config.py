"""The model's shape and recipe options: a plain dataclass, importable without torch (configs, prepare and the
command line read it before any model exists)."""

from __future__ import annotations

from dataclasses import dataclass

from llamalite.errors import ConfigError


@dataclass
class ModelConfig:
    preset: str | None = None  # start from a named preset (llamalite/model/presets.py); keys set here override it
    vocab_size: int | None = None  # None: the tokenizer's size padded up to tokenizer.pad_vocab_multiple
    n_layer: int = 6
    d_model: int = 256
    n_head: int = 8
    n_kv_head: int = 4  # grouped-query attention: n_head must be a multiple; equal to n_head is plain MHA
    ffn_hidden: int = 768  # SwiGLU inner width
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    depth_scaled_init: bool = True  # residual output projections get init_std / sqrt(2 * n_layer)
    # Recipe options (docs/recipes.md). qk_norm: RMSNorm on each head's queries and keys before RoPE (Qwen3, OLMo-2);
    # exported as Qwen3ForCausalLM
    qk_norm: bool = False
    zero_init_residual: bool = False  # o_proj and down_proj start at zero: every block starts as the identity
    # logits = cap * tanh(logits / cap) (Gemma 2, modded-nanogpt); None: raw logits. Such a model is not exportable
    logit_softcap: float | None = None

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def validate(self) -> None:
        problems = []
        if self.vocab_size is None or self.vocab_size <= 0:
            problems.append("vocab_size must be set (a positive integer)")
        if self.d_model % self.n_head:
            problems.append(f"d_model {self.d_model} is not divisible by n_head {self.n_head}")
        elif self.head_dim % 2:
            problems.append(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.n_head % self.n_kv_head:
            problems.append(f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")
        if self.logit_softcap is not None and self.logit_softcap <= 0:
            problems.append(f"logit_softcap must be positive or null, got {self.logit_softcap}")
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))
