import dataclasses

import pytest
import torch

from llamalite.model.kv_cache import KVCache
from llamalite.model.llama import Llama, ModelConfig, causal_mask

VOCAB = 97


def gqa_config(**overrides) -> ModelConfig:
    base = ModelConfig(vocab_size=VOCAB, n_layer=2, d_model=32, n_head=4, n_kv_head=2, ffn_hidden=64, max_seq_len=32)
    return dataclasses.replace(base, **overrides)


@pytest.fixture(scope="module")
def model() -> Llama:
    torch.manual_seed(0)
    return Llama(gqa_config()).eval()


@torch.no_grad()
def test_cached_logits_equal_full_recompute_at_every_step(model):
    tokens = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    full = model(tokens)
    cache = KVCache(model.config.n_layer, batch_size=2, max_len=20)
    prefill = model(tokens[:, :7], cache=cache)
    torch.testing.assert_close(prefill, full[:, :7], rtol=1e-5, atol=1e-5)
    for t in range(7, 20):
        step = model(tokens[:, t:t + 1], cache=cache)
        torch.testing.assert_close(step[:, 0], full[:, t], rtol=1e-5, atol=1e-5)
    assert cache.length == 20


@torch.no_grad()
def test_several_new_positions_at_once_use_an_offset_causal_mask(model):
    tokens = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    cache = KVCache(model.config.n_layer, 1, 12)
    model(tokens[:, :5], cache=cache)
    chunk = model(tokens[:, 5:12], cache=cache)
    torch.testing.assert_close(chunk, model(tokens)[:, 5:12], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_kv_heads_are_stored_once(model):
    cache = KVCache(model.config.n_layer, batch_size=3, max_len=10)
    model(torch.zeros(3, 4, dtype=torch.long), cache=cache)
    config = model.config
    assert config.n_kv_head < config.n_head
    for keys, values in zip(cache.keys, cache.values):
        assert keys.shape == values.shape == (3, config.n_kv_head, 10, config.head_dim)


@torch.no_grad()
def test_cache_overflow_and_positions_beyond_the_context_are_errors(model):
    cache = KVCache(model.config.n_layer, 1, 4)
    model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="KV cache overflow"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=cache)
    long_cache = KVCache(model.config.n_layer, 1, 64)
    model(torch.zeros(1, 32, dtype=torch.long), cache=long_cache)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=long_cache)


@torch.no_grad()
def test_positions_and_mask_reproduce_a_left_padded_row(model):
    """A row left-padded by 3 with shifted positions and a padding mask equals the unpadded row."""
    tokens = torch.randint(1, VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    pad = 3
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), tokens], dim=1)
    positions = (torch.arange(12) - pad).clamp(min=0)[None]
    mask = causal_mask(12, 12) & (torch.arange(12) >= pad)[None, :]
    mask |= torch.eye(12, dtype=torch.bool)
    out = model(padded, positions=positions, attn_mask=mask[None, None])
    torch.testing.assert_close(out[:, pad:], model(tokens), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_block_diagonal_mask_with_restarting_positions_equals_separate_sequences(model):
    """Packed sequences (the SFT use): positions restart at 0 and the mask is block-diagonal causal."""
    a = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(4))
    b = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(5))
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None]
    segment = torch.tensor([0] * 5 + [1] * 7)
    mask = causal_mask(12, 12) & (segment[:, None] == segment[None, :])
    out = model(packed, positions=positions, attn_mask=mask[None, None])
    torch.testing.assert_close(out[:, :5], model(a), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 5:], model(b), rtol=1e-5, atol=1e-5)


def test_training_path_is_unchanged_by_the_new_arguments(model):
    """model(tokens) and model(tokens, positions=arange) agree; the default path still backpropagates."""
    tokens = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        explicit = model(tokens, positions=torch.arange(10).expand(2, 10))
        torch.testing.assert_close(explicit, model(tokens), rtol=1e-5, atol=1e-5)
    trained = Llama(gqa_config())
    trained(tokens).sum().backward()
    assert trained.layers[0].self_attn.k_proj.weight.grad is not None
