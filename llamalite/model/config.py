"""The model's shape and recipe options: a plain dataclass, importable without torch (configs, prepare and the
command line read it before any model exists)."""

from __future__ import annotations

from dataclasses import dataclass, field

from llamalite.errors import ConfigError
from llamalite.schema import MAX_COUNT, between, positive

MAX_LAYERS = 1 << 10  # layers, heads: 8x the deepest released model (Llama 3.1 405B: 126 layers, 128 heads)
MAX_WIDTH = 1 << 20  # d_model, ffn_hidden


@dataclass
class ModelConfig:
    preset: str | None = None  # start from a named preset (llamalite/model/presets.py); keys set here override it
    # None: the tokenizer's size padded up to tokenizer.pad_vocab_multiple
    vocab_size: int | None = field(default=None, metadata=positive(high=MAX_COUNT, example="32000"))
    n_layer: int = field(default=6, metadata=positive(high=MAX_LAYERS))
    d_model: int = field(default=256, metadata=positive(high=MAX_WIDTH))
    n_head: int = field(default=8, metadata=positive(high=MAX_LAYERS))
    # grouped-query attention: n_head must be a multiple; equal to n_head is plain MHA
    n_kv_head: int = field(default=4, metadata=positive(high=MAX_LAYERS))
    ffn_hidden: int = field(default=768, metadata=positive(high=MAX_WIDTH))  # SwiGLU inner width
    max_seq_len: int = field(default=256, metadata=positive(high=MAX_COUNT))
    rope_theta: float = field(default=10000.0, metadata=positive(integer=False))
    norm_eps: float = field(default=1e-5, metadata=between(0, 1, low_open=True, high_open=True))
    tie_embeddings: bool = False
    init_std: float = field(default=0.02, metadata=positive(integer=False))
    depth_scaled_init: bool = True  # residual output projections get init_std / sqrt(2 * n_layer)
    # Recipe options (docs/recipes.md). qk_norm: RMSNorm on each head's queries and keys before RoPE (Qwen3, OLMo-2);
    # exported as Qwen3ForCausalLM
    qk_norm: bool = False
    zero_init_residual: bool = False  # o_proj and down_proj start at zero: every block starts as the identity
    # logits = cap * tanh(logits / cap) (Gemma 2, modded-nanogpt); None: raw logits. Such a model is not exportable
    logit_softcap: float | None = field(default=None, metadata=positive(integer=False, example="30.0"))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def validate(self) -> None:
        problems = []
        if self.vocab_size is None or self.vocab_size <= 0:
            problems.append("vocab_size must be set (a positive integer)")
        problems += self.shape_problems()
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))

    def shape_problems(self) -> list[str]:
        """Cross-key constraints of the shape, checked when a config is loaded (vocab_size may still be unset)."""
        problems = []
        if self.n_head <= 0 or self.n_kv_head <= 0:
            return [f"n_head {self.n_head} and n_kv_head {self.n_kv_head} must be positive"]
        if self.d_model % self.n_head:
            problems.append(f"d_model {self.d_model} is not divisible by n_head {self.n_head}")
        elif self.head_dim % 2:
            problems.append(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.n_head % self.n_kv_head:
            problems.append(f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")
        if self.logit_softcap is not None and self.logit_softcap <= 0:
            problems.append(f"logit_softcap must be positive or null, got {self.logit_softcap}")
        return problems
