import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from llamalite.errors import TrainError
from llamalite.files import read_jsonl
from llamalite.train.trainer import Trainer, accumulation_steps
from tests.conftest import small_config


def make_trainer(corpus_dir, prepared_dir, run_dir, **train) -> Trainer:
    return Trainer(small_config(corpus_dir, prepared_dir, run_dir, **train))


def test_gradient_accumulation_equals_one_big_batch(corpus_dir, prepared_dir, tmp_path):
    big = make_trainer(corpus_dir, prepared_dir, tmp_path / "a", micro_batch_size=8, batch_tokens=8 * 16)
    accumulated = make_trainer(corpus_dir, prepared_dir, tmp_path / "b", micro_batch_size=2, batch_tokens=8 * 16)
    assert (big.accum_steps, accumulated.accum_steps) == (1, 4)
    loss_big, norm_big = big.train_step()
    loss_acc, norm_acc = accumulated.train_step()
    assert loss_big == pytest.approx(loss_acc, rel=1e-5)
    assert norm_big == pytest.approx(norm_acc, rel=1e-4)
    for (name, p_big), p_acc in zip(big.model.named_parameters(), accumulated.model.parameters()):
        torch.testing.assert_close(p_big, p_acc, rtol=1e-5, atol=1e-6, msg=name)


def test_short_run_learns_and_writes_the_run_directory(corpus_dir, prepared_dir, tmp_path):
    run_dir = tmp_path / "run"
    trainer = make_trainer(corpus_dir, prepared_dir, run_dir, max_steps=12, eval_interval=6, log_interval=3,
                           sample_interval=12, sample_prompts=["the king"], sample_tokens=5)
    result = trainer.fit()
    assert [step for step, _ in result.val_losses] == [0, 6, 12]
    assert result.val_losses[-1][1] < 0.9 * result.val_losses[0][1]
    assert (run_dir / "config.yaml").exists() and (run_dir / "tb").is_dir()
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    train_rows = [m for m in metrics if "train/loss" in m]
    assert [m["step"] for m in train_rows] == [3, 6, 9, 12]
    assert {"train/lr", "train/grad_norm", "train/tokens", "perf/tokens_per_s"} <= set(train_rows[0])
    assert train_rows[-1]["train/tokens"] == 12 * 64
    samples = read_jsonl(run_dir / "samples.jsonl")
    assert {s["step"] for s in samples} == {0, 12} and all(s["prompt"] == "the king" for s in samples)
    checkpoint = run_dir / "checkpoints" / "step_0000012"
    assert result.checkpoint == checkpoint
    weights = load_file(checkpoint / "model.safetensors")
    torch.testing.assert_close(weights["norm.weight"], trainer.model.norm.weight.detach())
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["step"] == 12 and state["tokens_seen"] == 12 * 64
    assert state["bos"] == {"token": "<|endoftext|>", "id": trainer.tokenizer.eos_id, "prepended": False}


def test_bf16_autocast_trains(corpus_dir, prepared_dir, tmp_path):
    result = make_trainer(corpus_dir, prepared_dir, tmp_path / "bf16", dtype="bf16", max_steps=6, eval_interval=6).fit()
    assert result.val_losses[-1][1] < result.val_losses[0][1]


def test_a_run_whose_checkpoints_were_deleted_is_refused_and_overwrite_deletes_the_run(corpus_dir, prepared_dir,
                                                                                     tmp_path):
    make_trainer(corpus_dir, prepared_dir, tmp_path / "r", max_steps=1).fit()
    shutil.rmtree(tmp_path / "r" / "checkpoints")
    records = {name: (tmp_path / "r" / name).read_bytes() for name in ("metrics.jsonl", "events.jsonl")}
    with pytest.raises(TrainError, match=r"wrote checkpoints \(newest recorded: step_0000001\) but none is left"):
        make_trainer(corpus_dir, prepared_dir, tmp_path / "r", max_steps=1).fit()
    assert {name: (tmp_path / "r" / name).read_bytes() for name in records} == records  # nothing dropped
    make_trainer(corpus_dir, prepared_dir, tmp_path / "r", max_steps=1, overwrite=True).fit()
    assert [e["event"] for e in read_jsonl(tmp_path / "r" / "events.jsonl")] == ["start", "checkpoint"]


def test_overwrite_deletes_every_checkpoint_of_the_run_and_keeps_the_users_files(corpus_dir, prepared_dir, tmp_path):
    run_dir = tmp_path / "r"
    make_trainer(corpus_dir, prepared_dir, run_dir, max_steps=2, save_interval=1, keep_checkpoints=2,
                 eval_interval=0).fit()
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_0000001", "step_0000002"]
    (run_dir / "checkpoints" / "NOTES.txt").write_text("mine")
    make_trainer(corpus_dir, prepared_dir, run_dir, max_steps=1, overwrite=True, eval_interval=0).fit()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["NOTES.txt", "latest", "step_0000001"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000001"  # not the old run's step 2


def test_vocab_smaller_than_the_tokenizer_is_refused(corpus_dir, prepared_dir, tmp_path):
    config = small_config(corpus_dir, prepared_dir, tmp_path / "v")
    config.model.vocab_size = 100
    with pytest.raises(TrainError, match="smaller than the tokenizer"):
        Trainer(config)


def test_batch_tokens_must_divide_into_micro_batches():
    assert accumulation_steps(524288, 8, 1024, world_size=1) == 64
    with pytest.raises(TrainError, match="multiple of 8192"):
        accumulation_steps(10000, 8, 1024)


def test_compiled_step_matches_eager(corpus_dir, prepared_dir, tmp_path):
    eager = make_trainer(corpus_dir, prepared_dir, tmp_path / "e", compile=False)
    compiled = make_trainer(corpus_dir, prepared_dir, tmp_path / "c", compile=True)
    for _ in range(2):
        loss_eager, _ = eager.train_step()
        loss_compiled, _ = compiled.train_step()
        assert loss_compiled == pytest.approx(loss_eager, rel=1e-4)
    # AdamW divides by sqrt(v) + 1e-8, so a rounding-level difference in a gradient near zero moves its weight by a
    # visible fraction of the learning rate (3e-3): one weight in 2,048 differed by 1.2e-5 on a Sapphire Rapids CPU.
    # A wrong compiled gradient would move many weights by about the learning rate itself.
    for p_eager, p_compiled in zip(eager.model.parameters(), compiled.model.parameters()):
        torch.testing.assert_close(p_eager, p_compiled, rtol=1e-4, atol=1e-4)
