import dataclasses

import pytest
import torch

from llamalite.errors import ConfigError
from llamalite.model.llama import Llama, ModelConfig, apply_rope, rope_tables
from llamalite.model.presets import PRESETS, count_parameters, get_preset, training_flops_per_token


def small_config(**overrides) -> ModelConfig:
    base = ModelConfig(vocab_size=97, n_layer=2, d_model=32, n_head=4, n_kv_head=2, ffn_hidden=64, max_seq_len=16)
    return dataclasses.replace(base, **overrides)


def test_logits_shape():
    model = Llama(small_config())
    tokens = torch.randint(0, 97, (3, 11))
    assert model(tokens).shape == (3, 11, 97)


def test_causal_a_later_token_does_not_change_earlier_logits():
    torch.manual_seed(0)
    model = Llama(small_config()).eval()
    tokens = torch.randint(0, 97, (1, 12))
    changed = tokens.clone()
    changed[0, 8] = (changed[0, 8] + 1) % 97
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=0)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_gqa_equals_mha_with_repeated_kv_heads():
    """A GQA model equals the MHA model whose K/V projections repeat each KV head n_head / n_kv_head times."""
    torch.manual_seed(0)
    gqa = Llama(small_config(n_kv_head=2)).eval()
    mha = Llama(small_config(n_kv_head=4)).eval()
    state = gqa.state_dict()
    head_dim, repeats = 32 // 4, 2
    for name in list(state):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            heads = state[name].view(2, head_dim, 32)
            state[name] = heads.repeat_interleave(repeats, dim=0).reshape(4 * head_dim, 32)
    mha.load_state_dict(state)
    tokens = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(gqa(tokens), mha(tokens), rtol=1e-5, atol=1e-5)


def test_rope_matches_complex_reference():
    head_dim, seq, theta = 8, 6, 500000.0
    x = torch.randn(1, 2, seq, head_dim, dtype=torch.float64)
    cos, sin = rope_tables(head_dim, seq, theta)
    ours = apply_rope(x.float(), cos, sin).double()
    # Reference: pair i with i + head_dim/2 as one complex number and multiply by exp(i * pos * theta^(-2i/d)).
    half = head_dim // 2
    z = torch.complex(x[..., :half], x[..., half:])
    freqs = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / head_dim)
    rotation = torch.polar(torch.ones(seq, half, dtype=torch.float64), torch.arange(seq)[:, None] * freqs)
    rotated = z * rotation
    reference = torch.cat([rotated.real, rotated.imag], dim=-1)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_rope_preserves_relative_positions():
    head_dim, seq = 16, 10
    cos, sin = rope_tables(head_dim, seq, 10000.0)
    q, k = torch.randn(head_dim), torch.randn(head_dim)
    def rotated(vec, pos):
        return apply_rope(vec.view(1, 1, 1, -1).expand(1, 1, seq, -1), cos, sin)[0, 0, pos]
    torch.testing.assert_close(rotated(q, 5) @ rotated(k, 3), rotated(q, 7) @ rotated(k, 5), rtol=1e-4, atol=1e-4)


def test_rmsnorm_computed_in_fp32_under_bf16_inputs():
    from llamalite.model.llama import RMSNorm

    norm = RMSNorm(8, eps=1e-5)
    x = torch.randn(4, 8) * 1000
    out = norm(x.bfloat16())
    assert out.dtype == torch.float32  # fp32 gain times the normalised input
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


def test_tied_embeddings_share_one_tensor():
    model = Llama(small_config(tie_embeddings=True))
    assert model.lm_head.weight is model.embed_tokens.weight
    assert model.num_parameters() == count_parameters(model.config)


def test_no_biases_and_init_std():
    config = small_config(n_layer=8, d_model=128, ffn_hidden=256, vocab_size=512)
    model = Llama(config)
    assert all(module.bias is None for module in model.modules() if isinstance(module, torch.nn.Linear))
    assert abs(model.layers[0].mlp.up_proj.weight.std().item() - 0.02) < 0.002
    residual_std = 0.02 / (2 * 8) ** 0.5
    assert abs(model.layers[0].mlp.down_proj.weight.std().item() - residual_std) < 0.001


@pytest.mark.parametrize("name", ["tiny", "30m", "124m"])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_parameter_count_formula_matches_the_module(name, qk_norm):
    config = dataclasses.replace(get_preset(name), qk_norm=qk_norm)
    assert Llama(config).num_parameters() == count_parameters(config)


def test_dmas_preset_is_the_papers_model():
    config = get_preset("dmas-1.7b")
    assert count_parameters(config) == 1_716_144_128
    assert (config.n_layer, config.d_model, config.n_head, config.n_kv_head,
            config.ffn_hidden) == (36, 2048, 32, 8, 5120)
    assert config.rope_theta == 500000.0 and not config.tie_embeddings and config.vocab_size == 50304


def test_flops_per_token_grows_with_sequence_length():
    config = PRESETS["124m"]
    assert training_flops_per_token(config, 2048) > training_flops_per_token(config, 1024) > 6 * 85_000_000


def test_invalid_shapes_are_reported():
    with pytest.raises(ConfigError, match="n_kv_head"):
        Llama(small_config(n_kv_head=3))
    with pytest.raises(ValueError, match="max_seq_len"):
        Llama(small_config())(torch.zeros(1, 17, dtype=torch.long))


def test_zero_init_residual_makes_every_block_start_as_the_identity():
    model = Llama(small_config(zero_init_residual=True))
    for layer in model.layers:
        assert not layer.self_attn.o_proj.weight.any() and not layer.mlp.down_proj.weight.any()
        assert layer.self_attn.q_proj.weight.std() > 0.01
    tokens = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    hidden = model(tokens, head=False)
    assert torch.allclose(hidden, model.norm(model.embed_tokens(tokens)))


def test_qk_norm_normalises_each_heads_queries_and_keys():
    plain, normed = Llama(small_config()), Llama(small_config(qk_norm=True))
    extra = {k for k in normed.state_dict()} - set(plain.state_dict())
    assert extra == {f"layers.{i}.self_attn.{n}_norm.weight" for i in range(2) for n in "qk"}
    assert normed.num_parameters() - plain.num_parameters() == 2 * 2 * 8  # two head_dim gains per layer
    normed.load_state_dict({**plain.state_dict(), **{k: normed.state_dict()[k] for k in extra}})
    with torch.no_grad():  # a query 100x larger gives the same attention once normalised
        tokens = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
        before = normed(tokens)
        for layer in normed.layers:
            layer.self_attn.q_proj.weight.mul_(100)
        assert torch.allclose(normed(tokens), before, atol=1e-4)
        assert not torch.allclose(plain(tokens), normed(tokens), atol=1e-3)


def test_logit_softcap_bounds_the_logits_and_the_chunked_loss_applies_it():
    from llamalite.train.step import chunked_lm_loss, lm_loss

    model = Llama(small_config(logit_softcap=2.0, init_std=0.3))
    tokens = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    logits = model(tokens)
    uncapped = Llama(small_config(init_std=0.3))
    uncapped.load_state_dict(model.state_dict())
    assert uncapped(tokens).abs().max() > 3.0  # the cap has something to bound
    assert logits.abs().max() <= 2.0
    assert torch.allclose(logits, 2.0 * torch.tanh(uncapped(tokens) / 2.0))
    targets = tokens.roll(-1, dims=1)
    chunked = chunked_lm_loss(model(tokens, head=False), model.lm_head.weight, targets, 5, model.config.logit_softcap)
    assert torch.allclose(chunked, lm_loss(logits, targets), atol=1e-6)
    with pytest.raises(ConfigError, match="logit_softcap must be positive"):
        Llama(small_config(logit_softcap=0.0))


def test_output_positions_give_the_full_logits_there_causal_masked_and_cached():
    """The last layer computes only the read positions; the logits there are the full forward's."""
    from llamalite.model.kv_cache import KVCache

    torch.manual_seed(0)
    model = Llama(small_config(qk_norm=True)).eval()
    tokens = torch.randint(0, 97, (2, 10))
    reads = torch.tensor([[0, 4, 9], [3, 3, 7]])
    with torch.no_grad():
        full = model(tokens)
        expected = full.gather(1, reads[..., None].expand(-1, -1, 97))
        torch.testing.assert_close(model(tokens, output_positions=reads), expected)

        positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]] * 2)  # two packed sequences of 5
        block = torch.block_diag(*[torch.ones(5, 5, dtype=torch.bool).tril()] * 2)[None, None].expand(2, 1, -1, -1)
        packed = model(tokens, positions=positions, attn_mask=block)
        torch.testing.assert_close(model(tokens, positions=positions, attn_mask=block, output_positions=reads),
                                   packed.gather(1, reads[..., None].expand(-1, -1, 97)))

        cache, reference = KVCache(2, 2, 16), KVCache(2, 2, 16)
        model(tokens[:, :4], cache=cache, output_positions=torch.tensor([[3], [3]]))
        model(tokens[:, :4], cache=reference)
        torch.testing.assert_close(cache.keys, reference.keys)  # every position's key is still cached
        later = model(tokens[:, 4:], cache=cache, output_positions=reads[:, :2].clamp(max=5))
        torch.testing.assert_close(later, full[:, 4:].gather(1, reads[:, :2, None].clamp(max=5).expand(-1, -1, 97)))


@pytest.mark.parametrize("weights,autocast", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)],
                         ids=["fp32", "bf16", "fp32-autocast-bf16"])
def test_inference_without_autograd_gives_the_same_bits_as_with_it(weights, autocast):
    """Without autograd the blocks write into their own temporaries (residual sums, SwiGLU, RoPE, RMSNorm): the
    logits must be exactly those of the path that keeps every temporary for backward."""
    torch.manual_seed(0)
    model = Llama(small_config(max_seq_len=32)).to(weights).eval()
    tokens = torch.randint(0, 97, (3, 20))
    positions = torch.randint(0, 32, (3, 20))
    mask = torch.rand(3, 1, 20, 20) < 0.6
    mask |= torch.eye(20, dtype=torch.bool)
    calls = [{}, {"positions": positions, "attn_mask": mask},
             {"positions": positions, "attn_mask": torch.zeros(mask.shape).masked_fill(~mask, -torch.inf),
              "output_positions": torch.tensor([[0, 7, 19]] * 3)}]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for kwargs in calls:
            with torch.enable_grad():
                tracked = model(tokens, **kwargs)
            assert tracked.requires_grad
            with torch.inference_mode():
                assert torch.equal(model(tokens, **kwargs), tracked.detach())
            with torch.no_grad():
                assert torch.equal(model(tokens, **kwargs), tracked.detach())


def test_an_additive_float_mask_gives_the_bits_of_the_boolean_mask():
    torch.manual_seed(0)
    model = Llama(small_config(max_seq_len=32)).eval()
    tokens = torch.randint(0, 97, (2, 12))
    mask = (torch.rand(2, 1, 12, 12) < 0.5) | torch.eye(12, dtype=torch.bool)
    additive = torch.zeros(mask.shape).masked_fill(~mask, -torch.inf)
    with torch.inference_mode():
        assert torch.equal(model(tokens, attn_mask=mask), model(tokens, attn_mask=additive))
