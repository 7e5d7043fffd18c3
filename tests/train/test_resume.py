import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llamalite.checkpoint import format as checkpoint_module
from llamalite.checkpoint.format import (
    list_checkpoints,
    newest_valid_checkpoint,
    save_checkpoint,
)
from llamalite.config import save_config
from llamalite.errors import TrainError
from llamalite.files import read_jsonl
from llamalite.train.metrics import truncate_jsonl_after
from llamalite.train.trainer import Trainer
from tests.conftest import small_config

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def config_for(corpus_dir, prepared_dir, run_dir, **train):
    defaults = dict(log_interval=1, eval_interval=0, save_interval=2, keep_checkpoints=2)
    return small_config(corpus_dir, prepared_dir, run_dir, **{**defaults, **train})


def final_weights(run_dir: Path) -> bytes:
    return (list_checkpoints(run_dir / "checkpoints")[-1] / "model.safetensors").read_bytes()


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["train/loss"]) for m in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in m]


def events(run_dir: Path) -> list[str]:
    """The run's events, less the bookkeeping record written after each checkpoint."""
    return [e["event"] for e in read_jsonl(run_dir / "events.jsonl") if e["event"] != "checkpoint"]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_sigkill_at_random_steps_then_resume_is_bitwise_identical(corpus_dir, prepared_dir, tmp_path, dtype):
    steps = 40
    straight = tmp_path / "straight"
    Trainer(config_for(corpus_dir, prepared_dir, straight, max_steps=steps, dtype=dtype)).fit()

    killed = tmp_path / "killed"
    config_file = tmp_path / "config.yaml"
    save_config(config_for(corpus_dir, prepared_dir, killed, max_steps=steps, dtype=dtype), config_file)
    command = [sys.executable, "-m", "llamalite", "train", str(config_file)]
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    kills, rng = 0, random.Random(dtype)
    for target in sorted(rng.sample(range(4, steps - 4), 3)):
        process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE)
        while process.poll() is None:
            done = list_checkpoints(killed / "checkpoints")
            if done and int(done[-1].name.split("_")[1]) >= target:
                time.sleep(rng.uniform(0, 0.03))  # land anywhere: mid-step, mid-log or mid-save
                process.send_signal(signal.SIGKILL)
                kills += process.wait() == -signal.SIGKILL
                break
            time.sleep(0.005)
        assert process.returncode in (0, -signal.SIGKILL), process.stderr.read().decode()
    finished = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    assert kills >= 2, "the runs finished before they could be killed"
    assert final_weights(killed) == final_weights(straight)
    assert losses(killed) == losses(straight)
    assert events(killed).count("resume") >= kills


def test_sigterm_saves_and_stops_then_resume_finishes_identically(corpus_dir, prepared_dir, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    Trainer(config_for(corpus_dir, prepared_dir, straight, max_steps=10, save_interval=0)).fit()

    run_dir = tmp_path / "preempted"
    trainer = Trainer(config_for(corpus_dir, prepared_dir, run_dir, max_steps=10, save_interval=0))
    original_step = trainer.train_step

    def step_then_preempt():
        result = original_step()
        if trainer.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(trainer, "train_step", step_then_preempt)
    result = trainer.fit()
    assert result.stopped_by == "SIGTERM" and result.steps == 3
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step_0000003"]
    Trainer(config_for(corpus_dir, prepared_dir, run_dir, max_steps=10, save_interval=0)).fit()
    assert final_weights(run_dir) == final_weights(straight)
    assert events(run_dir) == ["start", "stopped", "resume"]


def test_sigterm_during_the_final_evaluation_completes_the_run(corpus_dir, prepared_dir, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    trainer = Trainer(config_for(corpus_dir, prepared_dir, run_dir, max_steps=4, save_interval=0))
    original_callbacks = trainer._run_callbacks

    def callbacks_then_preempt(force=False):
        original_callbacks(force=force)
        if trainer.step == 4:  # the final evaluation has run
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(trainer, "_run_callbacks", callbacks_then_preempt)
    result = trainer.fit()
    assert result.stopped_by is None and result.steps == 4
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step_0000004"]
    assert events(run_dir) == ["start"]


def test_corrupted_newest_checkpoint_falls_back_to_the_previous(corpus_dir, prepared_dir, tmp_path, caplog):
    straight = tmp_path / "straight"
    Trainer(config_for(corpus_dir, prepared_dir, straight, max_steps=6)).fit()
    run_dir = tmp_path / "run"
    Trainer(config_for(corpus_dir, prepared_dir, run_dir, max_steps=6, keep_checkpoints=3)).fit()
    newest = run_dir / "checkpoints" / "step_0000006" / "model.safetensors"
    data = bytearray(newest.read_bytes())
    data[-10] ^= 0xFF
    newest.write_bytes(bytes(data))

    Trainer(config_for(corpus_dir, prepared_dir, run_dir, max_steps=6, keep_checkpoints=3)).fit()
    assert any(r.levelname == "WARNING" and "checkpoint step_0000006 is unusable" in r.message for r in caplog.records)
    run_events = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] != "checkpoint"]
    assert [e["event"] for e in run_events][-2:] == ["checkpoint_corrupted", "resume"]
    assert run_events[-1]["checkpoint"] == "step_0000004"
    assert final_weights(run_dir) == final_weights(straight)
    assert losses(run_dir) == losses(straight)


def test_checkpoint_interrupted_mid_write_leaves_the_previous_one_loadable(corpus_dir, prepared_dir, tmp_path,
                                                                           monkeypatch):
    run_dir = tmp_path / "run"
    trainer = Trainer(config_for(corpus_dir, prepared_dir, run_dir, max_steps=6))
    real_save = torch.save

    def crash_on_step_4(obj, path, *args, **kwargs):
        if "step_0000004" in str(path):
            Path(path).write_bytes(b"partial")
            raise OSError("disk full")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", crash_on_step_4)
    with pytest.raises(OSError, match="disk full"):
        trainer.fit()
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    checkpoints_dir = run_dir / "checkpoints"
    assert (checkpoints_dir / "latest").read_text().strip() == "step_0000002"
    assert [p.name for p in list_checkpoints(checkpoints_dir)] == ["step_0000002"]
    assert newest_valid_checkpoint(checkpoints_dir).step == 2
    assert (checkpoints_dir / ".tmp_step_0000004").is_dir()
    Trainer(config_for(corpus_dir, prepared_dir, run_dir, max_steps=6)).fit()
    assert (checkpoints_dir / "latest").read_text().strip() == "step_0000006"
    assert not list(checkpoints_dir.glob(".tmp_*"))


def test_missing_optimizer_state_is_refused_unless_reset_is_asked_for(corpus_dir, prepared_dir, tmp_path):
    run_dir = tmp_path / "run"
    trainer = Trainer(config_for(corpus_dir, prepared_dir, run_dir, max_steps=4, save_interval=0))
    trainer.fit()
    # A checkpoint without optimizer state, as the paper's code wrote them.
    state = json.loads((list_checkpoints(run_dir / "checkpoints")[-1] / "trainer_state.json").read_text())
    save_checkpoint(run_dir / "checkpoints", 4, trainer.model, None, state)
    with pytest.raises(TrainError, match="has no optimizer state.*train.reset_optimizer=true"):
        Trainer(config_for(corpus_dir, prepared_dir, run_dir, max_steps=8)).fit()
    resumed = Trainer(config_for(corpus_dir, prepared_dir, run_dir, max_steps=8, reset_optimizer=True,
                                 rewarmup_steps=4, schedule_change="stretch"))
    resumed.fit()
    assert events(run_dir)[-3:] == ["optimizer_reset", "schedule_change", "resume"]
    lrs = {m["step"]: m["train/lr"] for m in read_jsonl(run_dir / "metrics.jsonl") if "train/lr" in m}
    from llamalite.train.optim import learning_rate

    cfg = resumed.config.optim
    assert lrs[5] == pytest.approx(learning_rate(4, cfg, 8) * 1 / 4)
    assert lrs[8] == pytest.approx(learning_rate(7, cfg, 8))


def test_a_different_model_config_is_refused_on_resume(corpus_dir, prepared_dir, tmp_path):
    run_dir = tmp_path / "run"
    Trainer(config_for(corpus_dir, prepared_dir, run_dir, max_steps=2)).fit()
    config = config_for(corpus_dir, prepared_dir, run_dir, max_steps=4)
    config.model.n_layer = 3
    with pytest.raises(TrainError, match="n_layer: 2 -> 3"):
        Trainer(config).fit()


def test_non_finite_loss_never_reaches_the_weights(corpus_dir, prepared_dir, tmp_path, monkeypatch):
    trainer = Trainer(config_for(corpus_dir, prepared_dir, tmp_path / "run", max_steps=3, max_skipped_steps=2))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    real_loss_fn = trainer.loss_fn
    monkeypatch.setattr(trainer, "loss_fn", lambda x, y: real_loss_fn(x, y) * float("nan"))
    with pytest.raises(TrainError, match="2 updates in a row were skipped"):
        trainer.fit()
    for b, p in zip(before, trainer.model.parameters()):
        assert torch.equal(b, p)
    run_events = [e for e in read_jsonl(tmp_path / "run" / "events.jsonl") if e["event"] != "checkpoint"]
    assert [e["event"] for e in run_events] == ["start", "skipped_step", "skipped_step"]
    assert "non-finite loss" in run_events[1]["reason"]
    assert list_checkpoints(tmp_path / "run" / "checkpoints")[-1].name == "step_0000002"


def test_stability_guard_skips_spikes_and_round_trips():
    from llamalite.train.stability import StabilityGuard

    guard = StabilityGuard(spike_zscore=4.0, window=50, max_consecutive=3)
    rng = random.Random(0)
    for _ in range(30):
        assert guard.check(3.0 + rng.gauss(0, 0.01), 1.0) is None
    assert "loss spike" in guard.check(3.5, 1.0)
    assert "non-finite gradient norm" in guard.check(3.0, float("inf"))
    assert guard.consecutive_skips == 2 and not guard.exhausted
    restored = StabilityGuard(4.0, 50, 3)
    restored.load_state_dict(guard.state_dict())
    assert restored.state_dict() == guard.state_dict()
    assert "loss spike" in restored.check(3.5, 1.0) and restored.exhausted


def test_truncate_drops_later_steps_and_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "tr')
    truncate_jsonl_after(path, 2)
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_stop_at_step_then_resume_equals_one_run(corpus_dir, prepared_dir, tmp_path, optimizer):
    def config(run_dir, **train):
        result = config_for(corpus_dir, prepared_dir, run_dir, max_steps=8, save_interval=0, **train)
        result.optim.name = optimizer
        return result

    straight = tmp_path / "straight"
    Trainer(config(straight)).fit()
    run_dir = tmp_path / "run"
    first = Trainer(config(run_dir, stop_at_step=5)).fit()
    assert first.steps == 5 and first.checkpoint.name == "step_0000005"
    Trainer(config(run_dir)).fit()
    assert final_weights(run_dir) == final_weights(straight)
    assert losses(run_dir) == losses(straight)


def test_resuming_with_another_optimizer_is_refused_unless_reset(corpus_dir, prepared_dir, tmp_path):
    run_dir = tmp_path / "run"
    Trainer(config_for(corpus_dir, prepared_dir, run_dir, max_steps=2)).fit()
    config = config_for(corpus_dir, prepared_dir, run_dir, max_steps=4)
    config.optim.name = "muon"
    with pytest.raises(TrainError, match="holds adamw state but the config asks for optim.name=muon"):
        Trainer(config).fit()
    config.train.reset_optimizer, config.train.schedule_change = True, "stretch"
    assert Trainer(config).fit().steps == 4
