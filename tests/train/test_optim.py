import math

import pytest

from llamalite.config import OptimConfig
from llamalite.errors import ConfigError
from llamalite.model.llama import Llama, ModelConfig
from llamalite.train.optim import build_optimizer, learning_rate, parameter_groups


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
