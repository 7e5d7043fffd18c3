import math

import pytest
import torch

from llamalite.config import OptimConfig
from llamalite.errors import ConfigError, TrainError
from llamalite.model.llama import Llama, ModelConfig
from llamalite.train.optim import Muon, build_optimizer, learning_rate, parameter_groups, set_learning_rate


def test_cosine_schedule_values():
    cfg = OptimConfig(lr=6e-4, min_lr=6e-5, warmup_steps=10, schedule="cosine")
    assert learning_rate(0, cfg, 110) == pytest.approx(6e-5)
    assert learning_rate(9, cfg, 110) == pytest.approx(6e-4)
    assert learning_rate(10, cfg, 110) == pytest.approx(6e-4)
    assert learning_rate(60, cfg, 110) == pytest.approx((6e-4 + 6e-5) / 2)
    assert learning_rate(110, cfg, 110) == pytest.approx(6e-5)
    assert learning_rate(500, cfg, 110) == pytest.approx(6e-5)
    expected = 6e-5 + 0.5 * (1 + math.cos(math.pi * 25 / 100)) * (6e-4 - 6e-5)
    assert learning_rate(35, cfg, 110) == pytest.approx(expected)


def test_wsd_schedule_holds_then_decays_linearly():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=5, schedule="wsd", decay_fraction=0.2)
    assert learning_rate(2, cfg, 100) == pytest.approx(1e-3 * 3 / 5)
    assert learning_rate(50, cfg, 100) == pytest.approx(1e-3)
    assert learning_rate(79, cfg, 100) == pytest.approx(1e-3)
    assert learning_rate(90, cfg, 100) == pytest.approx(1e-3 + 0.5 * (1e-4 - 1e-3))
    assert learning_rate(100, cfg, 100) == pytest.approx(1e-4)


def test_constant_schedule_and_unknown_schedule():
    cfg = OptimConfig(lr=3e-4, warmup_steps=0, schedule="constant")
    assert learning_rate(1234, cfg, 10) == pytest.approx(3e-4)
    with pytest.raises(ConfigError, match="schedule"):
        learning_rate(0, OptimConfig(schedule="linear"), 10)


def test_schedule_is_a_pure_function_of_the_step():
    cfg = OptimConfig(warmup_steps=7)
    assert [learning_rate(s, cfg, 50) for s in range(50)] == [learning_rate(s, cfg, 50) for s in range(50)]


def test_weight_decay_on_matrices_only():
    model = Llama(ModelConfig(vocab_size=64, n_layer=1, d_model=16, n_head=2, n_kv_head=1, ffn_hidden=32,
                              max_seq_len=8))
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])  # RMSNorm gains
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    optimizer = build_optimizer(model, OptimConfig(), "cpu")
    assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["eps"] == 1e-8


def small_model(**options) -> Llama:
    return Llama(ModelConfig(vocab_size=64, n_layer=2, d_model=16, n_head=2, n_kv_head=1, ffn_hidden=32,
                             max_seq_len=8, **options))


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(tie):
    model = small_model(tie_embeddings=tie, qk_norm=True)
    optimizer = build_optimizer(model, OptimConfig(name="muon", weight_decay=0.1), "cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for group in optimizer.muon.param_groups for p in group["params"]}
    adamw_decay, adamw_plain = ({names[id(p)] for p in group["params"]} for group in optimizer.adamw.param_groups)
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert muon == {f"layers.{i}.{part}.{proj}.weight" for i in range(2) for proj in projections
                    for part in (["self_attn"] if proj.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else ["mlp"])}
    assert adamw_decay == ({"embed_tokens.weight"} if tie else {"embed_tokens.weight", "lm_head.weight"})
    assert adamw_plain == {n for n, p in model.named_parameters() if p.dim() == 1}  # norms, q_norm and k_norm too
    assert [g["weight_decay"] for g in optimizer.adamw.param_groups] == [0.1, 0.0]
    assert optimizer.param_groups[0] is optimizer.adamw.param_groups[0]  # the schedule's LR is read from group 0


def test_muon_lr_follows_the_schedule_in_its_own_ratio():
    model = small_model()
    shared = build_optimizer(model, OptimConfig(name="muon", lr=2e-3), "cpu")
    own = build_optimizer(model, OptimConfig(name="muon", lr=2e-3, muon_lr=0.02), "cpu")
    set_learning_rate(shared, 1e-3)
    set_learning_rate(own, 1e-3)
    assert [g["lr"] for g in shared.param_groups] == [1e-3, 1e-3, 1e-3]
    assert [g["lr"] for g in own.param_groups] == pytest.approx([1e-3, 1e-3, 1e-2])
    assert shared.muon.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"
    assert own.muon.param_groups[0]["adjust_lr_fn"] == "original"


def test_fp32_newton_schulz_is_torch_muons_step_computed_in_another_dtype():
    """Our step with the iteration in bf16 is torch's step bit for bit; in fp32 it differs only by bf16 rounding."""
    torch.manual_seed(0)
    weights = [torch.randn(24, 40), torch.randn(40, 24)]
    grads = [torch.randn_like(w) for w in weights]

    def three_steps(optimizer_class, **kwargs):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        optimizer = optimizer_class(params, lr=0.02, weight_decay=0.1, **kwargs)
        for scale in (1.0, -0.5, 2.0):
            for param, grad in zip(params, grads):
                param.grad = grad * scale
            optimizer.step()
        return params, optimizer

    reference, torch_optimizer = three_steps(torch.optim.Muon)
    forced_bf16, _ = three_steps(ForcedManualMuon, ns_dtype=torch.bfloat16)
    fp32, ours = three_steps(Muon, ns_dtype=torch.float32)
    for ref, bf16, full, start in zip(reference, forced_bf16, fp32, weights):
        assert torch.equal(ref, bf16)
        moved = (ref - start).norm()
        assert (full - ref).norm() < 0.02 * moved and not torch.equal(full, ref)
    assert ours.state_dict()["state"][0].keys() == torch_optimizer.state_dict()["state"][0].keys()


class ForcedManualMuon(Muon):
    """Muon's own update path even in bf16, where step() would hand over to torch."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                self._update(param, group)


def test_muon_state_round_trips_and_a_mismatch_is_refused():
    model = small_model()
    optimizer = build_optimizer(model, OptimConfig(name="muon"), "cpu")
    model(torch.randint(0, 64, (2, 8))).sum().backward()
    optimizer.step()
    fresh = build_optimizer(model, OptimConfig(name="muon"), "cpu")
    fresh.load_state_dict(optimizer.state_dict())
    assert str(fresh.state_dict()) == str(optimizer.state_dict())
    with pytest.raises(TrainError, match="not Muon \\+ AdamW.*reset_optimizer"):
        fresh.load_state_dict(build_optimizer(model, OptimConfig(), "cpu").state_dict())


def test_muon_is_refused_under_fsdp_and_unknown_optimizers_name_the_choices():
    with pytest.raises(ConfigError, match="FSDP2 shards them.*parallel=ddp"):
        build_optimizer(small_model(), OptimConfig(name="muon"), "cpu", parallel="fsdp")
    with pytest.raises(ConfigError, match="adamw, muon"):
        build_optimizer(small_model(), OptimConfig(name="lion"), "cpu")
