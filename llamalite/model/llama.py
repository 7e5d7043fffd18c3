"""The LLaMA decoder: RMSNorm, rotary position embeddings, SwiGLU, grouped-query attention.

A plain nn.Module: no optimizer, no distributed wrapping, no I/O. Parameter names follow
transformers' LlamaForCausalLM so that weights map one to one. Without autograd (evaluation, generation) the
norms, RoPE, SwiGLU and residual sums write into temporaries of their own instead of new tensors: the same
arithmetic, bit for bit, with less memory traffic.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llamalite.errors import ConfigError
from llamalite.model.config import ModelConfig
from llamalite.model.kv_cache import DecodeCache, StaticKVCache


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        if not torch.is_grad_enabled() and x.dtype == self.weight.dtype:
            scale = x32.pow(2).mean(-1, keepdim=True).add_(self.eps).rsqrt_()
            return (x32 * scale).to(x.dtype).mul_(self.weight)
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_tables(head_dim: int, max_seq_len: int, theta: float,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (max_seq_len, head_dim), in the half-split layout (pairs i and i + head_dim/2)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x of shape (B, H, T, head_dim) by position; cos/sin are (T, head_dim)."""
    half = x.shape[-1] // 2
    if not torch.is_grad_enabled():
        out = x * cos  # the same sums, bit for bit, with two full-size temporaries fewer
        out[..., :half] -= x[..., half:] * sin[..., :half]
        out[..., half:] += x[..., :half] * sin[..., half:]
        return out.to(x.dtype)
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        kv_dim = config.n_kv_head * config.head_dim
        self.q_proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.k_proj = nn.Linear(config.d_model, kv_dim, bias=False)
        self.v_proj = nn.Linear(config.d_model, kv_dim, bias=False)
        self.o_proj = nn.Linear(config.d_model, config.d_model, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.norm_eps)
        self.qk_norm = config.qk_norm

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        cache: DecodeCache | None = None,
        layer: int = 0,
        queries: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention output (B, T, d_model); with `queries` (B, K) indices into T, at those positions only (every
        position's key and value are still computed and cached)."""
        batch, seq, _ = x.shape
        k = self.k_proj(x).view(batch, seq, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.n_kv_head, self.head_dim).transpose(1, 2)
        q_cos, q_sin = cos, sin
        if queries is not None:
            x = x.gather(1, queries.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            q_cos, q_sin = rows_at(cos, queries), rows_at(sin, queries)
            cached = cache.length if attn_mask is None and cache is not None else 0  # a static cache has a mask
            attn_mask = query_mask(attn_mask, queries, seq, cached)
        q = self.q_proj(x).view(batch, x.shape[1], self.n_head, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, q_cos, q_sin), apply_rope(k, cos, sin)
        if cache is not None or attn_mask is not None:
            return self._masked_attention(q, k, v, attn_mask, cache, layer)
        if self.n_kv_head != self.n_head:
            # Each KV head serves n_head / n_kv_head query heads.
            repeats = self.n_head // self.n_kv_head
            k = k.repeat_interleave(repeats, dim=1)
            v = v.repeat_interleave(repeats, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))  # every position is a query here

    def _masked_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
        cache: DecodeCache | None, layer: int,
    ) -> torch.Tensor:
        """Attention over cached + new keys (KV heads read once per query group) under an explicit mask.

        attn_mask None means causal: `is_causal` when nothing is cached yet, no mask for a single new
        position (it sees every cached one), and an offset causal mask for several new positions.
        """
        batch, _, seq, _ = q.shape
        is_causal = False
        if attn_mask is None:  # a static cache always comes with a mask: only a growing one has a length
            cached = cache.length if cache is not None else 0
            is_causal = cached == 0
            if cached > 0 and seq > 1:
                attn_mask = causal_mask(seq, cached + seq, q.device)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                             enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


def rows_at(table: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """The RoPE rows (B, 1, K, head_dim) of `queries` (B, K) from cos or sin of shape (T, head_dim) or (B, 1, T, hd)."""
    if table.dim() == 2:
        return table[queries].unsqueeze(1)
    return rows_along(table, queries)


def rows_along(table: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """table (B, 1, T, N) at rows `queries` (B, K): (B, 1, K, N). take_along_dim, without its modulo over every
    element of the broadcast index."""
    return table.gather(2, queries[:, None, :, None].expand(-1, 1, -1, table.shape[-1]))


def query_mask(attn_mask: torch.Tensor | None, queries: torch.Tensor, seq: int, cached: int) -> torch.Tensor:
    """The rows of the attention mask (B, 1, K, S) for `queries` (B, K): of `attn_mask` where given, else causal
    over `cached` earlier keys and the `seq` new ones."""
    if attn_mask is not None:
        return rows_along(attn_mask.expand(queries.shape[0], 1, -1, -1), queries)
    keys = torch.arange(cached + seq, device=queries.device)
    return (keys <= (queries + cached)[:, :, None]).unsqueeze(1)


def causal_mask(queries: int, keys: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean (queries, keys) mask for the last `queries` of `keys` positions: True where a query may attend."""
    offset = keys - queries
    return torch.ones(queries, keys, dtype=torch.bool, device=device).tril(diagonal=offset)


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(config.ffn_hidden, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self.down_proj(F.silu(self.gate_proj(x), inplace=True).mul_(self.up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        cache: DecodeCache | None = None,
        layer: int = 0,
        queries: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The block's output (B, T, d_model); with `queries` (B, K), at those positions only."""
        attended = self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache, layer, queries)
        if queries is not None:
            x = x.gather(1, queries.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = residual_add(attended, x)
        return residual_add(self.mlp(self.post_attention_layernorm(x)), x)


def residual_add(fresh: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """fresh + residual, written into `fresh` (a block's own output) when autograd does not need it and both have
    one dtype: the same sum, without a new activation-sized tensor."""
    if not torch.is_grad_enabled() and fresh.dtype == residual.dtype:
        return fresh.add_(residual)
    return fresh + residual


def soft_cap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(logits / cap): logits bounded smoothly to (-cap, cap); unchanged when cap is None."""
    return logits if cap is None else cap * torch.tanh(logits / cap)


OUT_OF_MEMORY_MESSAGES = ("can't allocate memory", "not enough memory", "out of memory")


def is_out_of_memory(exc: RuntimeError) -> bool:
    """An allocation the machine refused (CPU or GPU), as opposed to any other RuntimeError (a bug: its traceback)."""
    return isinstance(exc, torch.OutOfMemoryError) or any(text in str(exc) for text in OUT_OF_MEMORY_MESSAGES)


def parameter_count(config: ModelConfig) -> int:
    """The parameters of a Llama of this config, from its shape alone (nothing allocated)."""
    d, hd = config.d_model, config.head_dim
    attention = 2 * d * config.n_head * hd + 2 * d * config.n_kv_head * hd + (2 * hd if config.qk_norm else 0)
    block = attention + 3 * d * config.ffn_hidden + 2 * d
    embeddings = config.vocab_size * d * (1 if config.tie_embeddings else 2)
    return embeddings + config.n_layer * block + d


def too_large_message(config: ModelConfig) -> str:
    count = parameter_count(config)
    return (f"the model ({count:,} parameters, {4 * count / 2**30:,.1f} GiB in fp32) cannot be allocated on this "
            "machine: choose a smaller model (model.d_model, model.ffn_hidden, model.n_layer, model.vocab_size); "
            "`llamalite plan CONFIG` shows the memory a run needs")


class Llama(nn.Module):
    """Decoder-only LLaMA. forward(tokens) -> logits of shape (B, T, vocab_size)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        try:
            self._build(config)
        except RuntimeError as exc:  # torch.OutOfMemoryError is one
            if not is_out_of_memory(exc):
                raise
            raise ConfigError(too_large_message(config)) from None

    def _build(self, config: ModelConfig) -> None:
        # A model built on the meta device only waits for loaded weights: no initialisation at all (nn.Embedding's
        # own normal_ on a meta tensor would import torch._dynamo, seconds in a fresh process).
        on_meta = torch.get_default_device().type == "meta"
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model,
                                         _weight=torch.empty(config.vocab_size, config.d_model) if on_meta else None)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # The RoPE tables are buffers that no checkpoint holds: real tensors (on the CPU) even on the meta device.
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta, "cpu" if on_meta else None)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if not on_meta:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layer) if self.config.depth_scaled_init else std
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_residual_out = name.endswith("o_proj") or name.endswith("down_proj")
                if is_residual_out and self.config.zero_init_residual:
                    nn.init.zeros_(module.weight)
                else:
                    nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual_out else std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cache: DecodeCache | None = None,
        output_positions: torch.Tensor | None = None,
        head: bool = True,
    ) -> torch.Tensor:
        """Logits (B, T, vocab_size) for tokens (B, T).

        With no keyword argument this is the training path: positions 0..T-1 and causal attention.
        positions: (B, T) int positions for RoPE, each below max_seq_len (left-padded rows, packed
            sequences that restart at 0). Default: consecutive, starting after what `cache` holds.
        attn_mask: boolean mask broadcastable to (B, 1, T, S), True where query t may attend key s (or the
            float mask SDPA adds to the scores: 0 where allowed, -inf elsewhere, which SDPA does not convert
            again in every layer);
            S is T, or cache.length + T with a cache. It replaces the causal mask, so it must encode
            causality itself (block-diagonal causal for packed sequences). Every query row should
            allow at least one key. Default: causal.
        cache: a KVCache; the new keys/values are written after its `length` positions, which
            then grows by T. Or a StaticKVCache (fixed shapes, for a compiled decode step): written at its
            `write_at` slots, and positions and attn_mask (over all its slots) are then required.
        output_positions: (B, K) indices into T: logits (B, K, vocab_size) at those positions only. The
            vocabulary projection dominates small models, so scoring a few positions is much cheaper; the last
            layer, too, computes its queries, output projection and MLP at those positions only.
        head: False returns the final normalised hidden states (B, T, d_model) instead of logits, for a
            loss that applies `lm_head` itself a chunk at a time.
        """
        seq = tokens.shape[1]
        if isinstance(cache, StaticKVCache) and (positions is None or attn_mask is None):
            raise ValueError("a StaticKVCache needs explicit positions and an attn_mask over its max_len slots")
        if positions is None and attn_mask is None and cache is None:
            if seq > self.config.max_seq_len:
                raise ValueError(f"sequence length {seq} exceeds the model's max_seq_len {self.config.max_seq_len}")
            cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        else:
            cos, sin = self._rope_at(tokens, positions, cache)
        if cache is not None:
            cache.check_room(seq)
        x = self.embed_tokens(tokens)
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            # Only the read positions need the last layer's output: the others feed no later layer.
            x = layer(x, cos, sin, attn_mask, cache, index, output_positions if index == last else None)
        if cache is not None:
            cache.advance(seq)
        x = self.norm(x)
        return self.output_logits(x) if head else x

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (..., vocab_size) from final hidden states (..., d_model), as forward(head=False) returns them."""
        return soft_cap(self.lm_head(hidden), self.config.logit_softcap)

    def _rope_at(
        self, tokens: torch.Tensor, positions: torch.Tensor | None, cache: DecodeCache | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of shape (B, 1, T, head_dim) (or (T, head_dim) for consecutive positions)."""
        if positions is None:
            start = cache.length if cache is not None else 0
            end = start + tokens.shape[1]
            if end > self.config.max_seq_len:
                raise ValueError(f"position {end - 1} is beyond the model's max_seq_len {self.config.max_seq_len}")
            return self.rope_cos[start:end], self.rope_sin[start:end]
        return self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once


# transformers' LlamaForCausalLM (and Qwen3ForCausalLM) holds every module of ours but lm_head under `model.`.
def hf_name(name: str) -> str:
    """transformers' name of one of our modules or tensors: `layers.0.mlp.up_proj` -> `model.layers.0.mlp.up_proj`."""
    return name if name.split(".", 1)[0] == "lm_head" else f"model.{name}"


def name_from_hf(name: str) -> str:
    """Our name of a transformers module or tensor: the inverse of hf_name."""
    return name.removeprefix("model.")
