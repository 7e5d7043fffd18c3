"""A resume whose config changes the LR schedule (a longer max_steps, another peak) must choose how the LR goes on."""

import pytest

from llamalite.errors import ConfigError, TrainError
from llamalite.files import read_jsonl
from llamalite.train.optim import learning_rate, schedule_of, scheduled_lr
from llamalite.train.trainer import Trainer
from tests.train.test_resume import config_for


def lrs(run_dir) -> dict[int, float]:
    """The LR each optimizer step used, by its 0-based index (a record at step s logs the LR of step s - 1)."""
    return {m["step"] - 1: m["train/lr"] for m in read_jsonl(run_dir / "metrics.jsonl") if "train/lr" in m}


def train(corpus_dir, prepared_dir, run_dir, **train):
    return Trainer(config_for(corpus_dir, prepared_dir, run_dir, save_interval=0, **train)).fit()


def test_a_longer_max_steps_on_resume_is_refused_with_the_options_and_the_lr_jump(corpus_dir, prepared_dir, tmp_path):
    run_dir = tmp_path / "run"
    train(corpus_dir, prepared_dir, run_dir, max_steps=8)
    with pytest.raises(TrainError) as refused:
        train(corpus_dir, prepared_dir, run_dir, max_steps=16)
    message = str(refused.value)
    config = config_for(corpus_dir, prepared_dir, run_dir, max_steps=16).optim
    jump = learning_rate(8, config, 16)
    assert "max_steps 8 -> 16" in message and f"would jump from {config.min_lr:.3g} to {jump:.3g}" in message
    assert all(f"train.schedule_change={rule}" in message or f"={rule}" in message
               for rule in ("decay", "stretch", "keep"))
    assert [e["event"] for e in read_jsonl(run_dir / "events.jsonl")] == ["start", "checkpoint"]


@pytest.mark.parametrize("rule", ["decay", "stretch", "keep"])
def test_each_rule_sets_the_lr_of_the_first_resumed_step_and_is_recorded(corpus_dir, prepared_dir, tmp_path, rule):
    run_dir = tmp_path / "run"
    train(corpus_dir, prepared_dir, run_dir, max_steps=12, stop_at_step=6)  # halfway down the cosine
    train(corpus_dir, prepared_dir, run_dir, max_steps=20, schedule_change=rule, stop_at_step=10)
    train(corpus_dir, prepared_dir, run_dir, max_steps=20, schedule_change=rule)  # a later resume keeps the rule
    optim = config_for(corpus_dir, prepared_dir, run_dir).optim
    old = schedule_of(vars(optim), 12)
    reached = learning_rate(6, optim, 12)
    expected = {
        "decay": [reached + (optim.min_lr - reached) * (step - 6) / 14 for step in range(6, 20)],
        "stretch": [learning_rate(step, optim, 20) for step in range(6, 20)],
        "keep": [scheduled_lr(step, old) for step in range(6, 20)],
    }[rule]
    used = lrs(run_dir)
    assert [used[step] for step in range(6)] == pytest.approx([learning_rate(s, optim, 12) for s in range(6)])
    assert [used[step] for step in range(6, 20)] == pytest.approx(expected, rel=1e-6)
    change = next(e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "schedule_change")
    assert change["rule"] == rule and change["changes"] == "max_steps 12 -> 20" and change["step"] == 6
    assert change["lr_before"] == pytest.approx(reached) and change["lr_after"] == pytest.approx(expected[0])
    assert [e["event"] for e in read_jsonl(run_dir / "events.jsonl")].count("schedule_change") == 1


def test_an_unchanged_schedule_resumes_without_a_choice_and_a_typo_is_refused(corpus_dir, prepared_dir, tmp_path):
    run_dir = tmp_path / "run"
    train(corpus_dir, prepared_dir, run_dir, max_steps=8, stop_at_step=4)
    train(corpus_dir, prepared_dir, run_dir, max_steps=8)
    with pytest.raises(ConfigError, match="unknown train.schedule_change 'decai': did you mean 'decay'"):
        train(corpus_dir, prepared_dir, tmp_path / "other", max_steps=8, schedule_change="decai")
