"""What a cluster, a second terminal or a careless path does to a run: a kill before the first checkpoint, a second
trainer, a full disk, a foreign pickle, weights that do not fit their config, settings that cannot learn."""

import json
import os
import pickle
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llamalite.checkpoint import format as checkpoint_module
from llamalite.checkpoint.format import CHECKSUMS, list_checkpoints, load_checkpoint, prune_checkpoints
from llamalite.cli import main
from llamalite.config import save_config
from llamalite.errors import BusyError, CheckpointError, ConfigError, TrainError
from llamalite.files import folder_lock, read_jsonl, sha256_file
from llamalite.train.trainer import Trainer
from tests.train.test_resume import config_for, events, final_weights, losses

PROJECT_ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}


class Killed(BaseException):
    """Stands for SIGKILL inside a process: nothing catches it, nothing after it runs."""


def train_command(config, config_file: Path) -> list[str]:
    save_config(config, config_file)
    return [sys.executable, "-m", "llamalite", "train", str(config_file)]


def rewrite_checksums(checkpoint: Path) -> None:
    """What someone who tampered with a file would do so that the checksums still pass."""
    checksums = json.loads((checkpoint / CHECKSUMS).read_text())
    (checkpoint / CHECKSUMS).write_text(json.dumps({name: sha256_file(checkpoint / name) for name in checksums}))


# ------------------------------------------------------------------------------------------------ restart
def test_a_run_killed_inside_its_first_checkpoint_write_restarts_with_the_same_command(corpus_dir, prepared_dir,
                                                                                      tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    Trainer(config_for(corpus_dir, prepared_dir, straight, max_steps=6)).fit()

    run_dir = tmp_path / "killed"
    real_save = torch.save

    def die_in_first_write(obj, path, *args, **kwargs):
        if "step_0000002" in str(path):
            Path(path).write_bytes(b"partial")
            raise Killed
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", die_in_first_write)
    with pytest.raises(Killed):
        Trainer(config_for(corpus_dir, prepared_dir, run_dir, max_steps=6)).fit()
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    assert list_checkpoints(run_dir / "checkpoints") == [] and losses(run_dir)  # records, no checkpoint

    Trainer(config_for(corpus_dir, prepared_dir, run_dir, max_steps=6)).fit()
    assert final_weights(run_dir) == final_weights(straight)
    assert losses(run_dir) == losses(straight)
    assert events(run_dir) == ["start", "restart", "start"]
    assert not list((run_dir / "checkpoints").glob(".tmp_*"))


def test_a_run_whose_checkpoints_are_all_damaged_is_still_refused(corpus_dir, prepared_dir, tmp_path):
    run_dir = tmp_path / "run"
    Trainer(config_for(corpus_dir, prepared_dir, run_dir, max_steps=2)).fit()
    (list_checkpoints(run_dir / "checkpoints")[-1] / "model.safetensors").write_bytes(b"damaged")
    with pytest.raises(TrainError, match="holds 1 checkpoint.* and none is usable"):
        Trainer(config_for(corpus_dir, prepared_dir, run_dir, max_steps=4)).fit()


def test_checkpoints_are_written_by_wall_clock_time(corpus_dir, prepared_dir, tmp_path):
    run_dir = tmp_path / "run"
    Trainer(config_for(corpus_dir, prepared_dir, run_dir, max_steps=3, save_interval=0, keep_checkpoints=0,
                       save_interval_minutes=1e-9)).fit()
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == [f"step_000000{i}" for i in (1, 2, 3)]


def test_a_run_stopped_by_sigterm_exits_with_the_requeue_code_and_the_same_command_finishes(corpus_dir, prepared_dir,
                                                                                            tmp_path):
    run_dir = tmp_path / "run"
    command = train_command(config_for(corpus_dir, prepared_dir, run_dir, max_steps=100_000, save_interval=0),
                            tmp_path / "config.yaml")
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + 120
    while len(losses(run_dir)) < 3:
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 75, err  # EX_TEMPFAIL: not finished, requeue me
    assert "stopped by SIGTERM, run the same command to resume" in out
    stopped = read_jsonl(run_dir / "events.jsonl")[-1]
    assert stopped["event"] == "stopped" and stopped["signal"] == "SIGTERM"
    assert list_checkpoints(run_dir / "checkpoints")[-1].name == stopped["checkpoint"]
    finish = subprocess.run([*command, f"train.max_steps={100_000}", f"train.stop_at_step={stopped['step'] + 1}"],
                            cwd=PROJECT_ROOT, env=ENV, capture_output=True, text=True)
    assert finish.returncode == 0, finish.stderr
    assert events(run_dir)[-2:] == ["resume", "stopped"]


# ------------------------------------------------------------------------------------------------ the lock
def test_a_second_trainer_on_a_live_run_is_refused_and_a_kill_leaves_no_stale_lock(corpus_dir, prepared_dir,
                                                                                   tmp_path):
    run_dir = tmp_path / "run"
    command = train_command(config_for(corpus_dir, prepared_dir, run_dir, max_steps=100_000, save_interval=0),
                            tmp_path / "config.yaml")
    first = subprocess.Popen(command, cwd=PROJECT_ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not losses(run_dir):
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read().decode()
            time.sleep(0.05)
        second = subprocess.run(command, cwd=PROJECT_ROOT, env=ENV, capture_output=True, text=True)
        assert second.returncode == 2, second.stderr
        assert f"{run_dir} is being trained by process {first.pid} on host" in second.stderr
        assert second.stderr.count("\n") == 1
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    shorter = train_command(config_for(corpus_dir, prepared_dir, run_dir, max_steps=3), tmp_path / "config.yaml")
    third = subprocess.run(shorter, cwd=PROJECT_ROOT, env=ENV, capture_output=True, text=True)
    assert third.returncode == 0, third.stderr  # the kill -9 released the lock; no checkpoint: the run starts over
    assert events(run_dir)[-2:] == ["restart", "start"]


def test_the_lock_refuses_a_second_holder_until_the_first_lets_go(tmp_path):
    with folder_lock(tmp_path / "out", "prepared"):
        with pytest.raises(BusyError, match=rf"{tmp_path / 'out'} is being prepared by process {os.getpid()}"):
            with folder_lock(tmp_path / "out", "prepared"):
                pass
    with folder_lock(tmp_path / "out", "prepared"):
        pass


def test_prepare_takes_the_lock_too(corpus_dir, tmp_path):
    from llamalite.data.prepare import prepare
    from tests.conftest import small_config

    config = small_config(corpus_dir, tmp_path / "prepared", tmp_path / "run")
    with folder_lock(tmp_path / "prepared", "prepared"):
        with pytest.raises(BusyError, match="is being prepared"):
            prepare(config)
    assert not (tmp_path / "prepared" / "manifest.json").exists()


# ------------------------------------------------------------------------------------------------ one-line errors
@pytest.mark.parametrize("name", ["optimizer.pt", "rng.pt"])
def test_a_foreign_pickle_is_refused_in_one_line_never_run_and_the_previous_checkpoint_used(
        corpus_dir, prepared_dir, tmp_path, name, caplog):
    straight = tmp_path / "straight"
    Trainer(config_for(corpus_dir, prepared_dir, straight, max_steps=6)).fit()
    run_dir = tmp_path / "run"
    Trainer(config_for(corpus_dir, prepared_dir, run_dir, max_steps=6, keep_checkpoints=3)).fit()
    newest = list_checkpoints(run_dir / "checkpoints")[-1]
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (marker, "ran"))

    (newest / name).write_bytes(pickle.dumps(Payload(), protocol=2))
    rewrite_checksums(newest)
    with pytest.raises(CheckpointError, match=rf"refusing to load .*{name}: it holds objects other than tensors"):
        load_checkpoint(newest)

    Trainer(config_for(corpus_dir, prepared_dir, run_dir, max_steps=6, keep_checkpoints=3)).fit()
    assert not marker.exists()
    assert any("refusing to load" in r.message for r in caplog.records)
    resumes = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "resume"]
    assert resumes[-1]["checkpoint"] == "step_0000004"
    assert final_weights(run_dir) == final_weights(straight)


def file_size_limit(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("failing_file", ["model.safetensors", "optimizer.pt"])
def test_a_full_disk_during_a_checkpoint_is_one_line_and_the_previous_checkpoint_stays(
        corpus_dir, prepared_dir, tmp_path, failing_file):
    straight = tmp_path / "straight"
    Trainer(config_for(corpus_dir, prepared_dir, straight, max_steps=6)).fit()
    run_dir = tmp_path / "run"
    command = train_command(config_for(corpus_dir, prepared_dir, run_dir, max_steps=6), tmp_path / "config.yaml")
    first = subprocess.run([*command, "train.stop_at_step=2"], cwd=PROJECT_ROOT, env=ENV, capture_output=True,
                           text=True)
    assert first.returncode == 0, first.stderr
    sizes = {p.name: p.stat().st_size for p in list_checkpoints(run_dir / "checkpoints")[0].iterdir()}
    limit = sizes[failing_file] - 1 if failing_file == "model.safetensors" else sizes["model.safetensors"] + 1
    assert limit < sizes["optimizer.pt"]

    full = subprocess.run(command, cwd=PROJECT_ROOT, env=ENV, capture_output=True, text=True,
                          preexec_fn=file_size_limit(limit))
    assert full.returncode == 2, full.stderr
    assert full.stderr.count("\n") == 1, full.stderr
    assert (f"checkpoint at step 4 not written: a file reached the size limit of this process (ulimit -f: {limit:,} "
            f"bytes) in {run_dir / 'checkpoints'}; ") in full.stderr, full.stderr
    assert "the run stopped at step 4; step 2 (the previous checkpoint) is intact: free space and rerun the same " \
           "command" in full.stderr
    assert [p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir()] == ["step_0000002"]
    assert read_jsonl(run_dir / "events.jsonl")[-1]["event"] == "resume"

    again = subprocess.run(command, cwd=PROJECT_ROOT, env=ENV, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert final_weights(run_dir) == final_weights(straight)
    assert losses(run_dir) == losses(straight)


def test_weights_that_do_not_fit_their_config_are_one_line_from_generate_and_resume(corpus_dir, prepared_dir,
                                                                                   tmp_path, capsys):
    run_dir = tmp_path / "run"
    Trainer(config_for(corpus_dir, prepared_dir, run_dir, max_steps=2)).fit()
    checkpoint = list_checkpoints(run_dir / "checkpoints")[-1]
    tensors = load_file(checkpoint / "model.safetensors")
    tensors["layers.0.mlp.up_proj.weight"] = torch.zeros(80, 32)
    save_file(tensors, checkpoint / "model.safetensors")
    rewrite_checksums(checkpoint)

    assert main(["generate", str(checkpoint), "--prompt", "the king", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert (f"{checkpoint / 'model.safetensors'}: tensor layers.0.mlp.up_proj.weight has shape (80, 32) but the "
            "model of its config expects (64, 32)") in err
    with pytest.raises(CheckpointError, match=r"up_proj.weight has shape \(80, 32\) .* expects \(64, 32\)"):
        Trainer(config_for(corpus_dir, prepared_dir, run_dir, max_steps=4)).fit()


@pytest.mark.parametrize("optim,message", [
    ({"lr": 0.0}, "optim.lr=0.0: a run with a peak LR of 0.0 cannot learn"),
    ({"lr": 1e-3, "min_lr": 2e-3}, r"optim.min_lr=0.002 lies outside \[0, optim.lr=0.001\]: the decay would raise"),
    ({"name": "muon", "muon_lr": -1.0}, "optim.muon_lr=-1.0"),
])
def test_learning_rates_that_cannot_learn_are_refused(corpus_dir, prepared_dir, tmp_path, optim, message):
    config = config_for(corpus_dir, prepared_dir, tmp_path / "run")
    for key, value in optim.items():
        setattr(config.optim, key, value)
    with pytest.raises(ConfigError, match=message):
        Trainer(config)


def test_a_tokenizer_swapped_after_prepare_is_refused(corpus_dir, tmp_path):
    from llamalite.data.prepare import prepare
    from llamalite.tokenizer import Tokenizer
    from tests.conftest import small_config

    config = small_config(corpus_dir, tmp_path / "prepared", tmp_path / "run")
    prepare(config)
    Tokenizer.train(["other words entirely"] * 20, vocab_size=280).save(tmp_path / "prepared" / "tokenizer.json")
    with pytest.raises(TrainError, match="is not the tokenizer the shards of .* were encoded with"):
        Trainer(config)


# ------------------------------------------------------------------------------------------------ retention
def test_pruning_renames_a_checkpoint_away_before_deleting_it(corpus_dir, prepared_dir, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    Trainer(config_for(corpus_dir, prepared_dir, run_dir, max_steps=6, keep_checkpoints=0)).fit()
    checkpoints_dir = run_dir / "checkpoints"
    real_rmtree = checkpoint_module.shutil.rmtree

    def killed_after_one_file(path, *args, **kwargs):
        if not Path(path).exists():
            return real_rmtree(path, *args, **kwargs)
        next(Path(path).iterdir()).unlink()
        raise Killed

    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", killed_after_one_file)
    with pytest.raises(Killed):
        prune_checkpoints(checkpoints_dir, keep_last=1, milestone_interval=0)
    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", real_rmtree)
    for checkpoint in list_checkpoints(checkpoints_dir):  # every one left is complete
        load_checkpoint(checkpoint)
    assert [p.name for p in checkpoints_dir.glob(".tmp_*")] == [".tmp_pruned_step_0000002"]
