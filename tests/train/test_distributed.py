"""Several processes on the CPU with gloo: DDP and FSDP2 against one process, elastic resume, rank-0-only writes.

All multi-process work runs in one `torch.multiprocessing.spawn` of 2 workers (starting processes costs seconds on
the 2-core CI machine), on tests/conftest.py's 2-layer `small_config` rather than the tiny preset, which would take
minutes there. Losses must match one process with the same global batch to LOSS_RTOL (fp32; only the order of
floating-point reductions differs).
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from llamalite.files import read_jsonl
from llamalite.train.trainer import Trainer
from tests.conftest import small_config

LOSS_RTOL = 1e-4
STEPS = 10
# 8 windows of 16 tokens per update: 4 accumulation steps of 2 on one process, 2 steps of 2 per rank on two.
BATCH = dict(batch_tokens=8 * 16, micro_batch_size=2, eval_interval=0, log_interval=1)


@pytest.fixture(autouse=True)
def one_thread():
    """Two threads on the 2 shared cores of CI, next to the workers, made steps 100x slower (spin-waiting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_losses(trainer: Trainer, steps: int) -> list[float]:
    return [trainer.train_step()[0] for _ in range(steps)]


def logged_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r}


def worker(rank: int, world_size: int, port: int, corpus, prepared, out) -> None:
    """Every multi-process job of this file, in order; rank 0 writes what the tests compare to out/results.json."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    results = {}
    for name, parallel, optimizer in (("ddp", "ddp", "adamw"), ("fsdp", "fsdp", "adamw"), ("ddp_muon", "ddp", "muon")):
        config = small_config(corpus, prepared, out / f"steps_{name}", parallel=parallel, **BATCH)
        config.optim.name = optimizer
        trainer = Trainer(config)
        results[name] = {"accum_steps": trainer.accum_steps, "losses": step_losses(trainer, STEPS)}
    # Elastic resume: 2 processes -> (1 process, in the test), and 1 process (run by the test) -> 2 processes.
    for name, parallel, stop_at_step in (("from2_ddp", "ddp", 3), ("from2_fsdp", "fsdp", 3), ("from1", "ddp", None),
                                         ("from1_fsdp", "fsdp", None)):
        config = small_config(corpus, prepared, out / name, parallel=parallel, max_steps=6, stop_at_step=stop_at_step,
                              sample_interval=3, sample_prompts=["the king"], sample_tokens=3, **BATCH)
        Trainer(config).fit()
    if rank == 0:
        (out / "results.json").write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(corpus_dir, prepared_dir, tmp_path_factory):
    """Runs the one-process halves first (the run to resume at 2 processes), then the 2-process worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("distributed")
    for name in ("from1", "from1_fsdp"):
        config = small_config(corpus_dir, prepared_dir, out / name, max_steps=6, stop_at_step=3, sample_interval=3,
                              sample_prompts=["the king"], sample_tokens=3, **BATCH)
        Trainer(config).fit()
    mp.spawn(worker, args=(2, free_port(), corpus_dir, prepared_dir, out), nprocs=2, join=True)
    torch.set_num_threads(threads)
    return out, json.loads((out / "results.json").read_text())


def reference_run(corpus_dir, prepared_dir, run_dir) -> Trainer:
    """6 steps uninterrupted on one process, logged every step."""
    trainer = Trainer(small_config(corpus_dir, prepared_dir, run_dir, max_steps=6, **BATCH))
    trainer.fit()
    return trainer


@pytest.mark.parametrize("name", ["ddp", "fsdp", "ddp_muon"])
def test_two_processes_match_one_with_the_same_global_batch(spawned, corpus_dir, prepared_dir, tmp_path, name):
    _, results = spawned
    config = small_config(corpus_dir, prepared_dir, tmp_path / "one", **BATCH)
    config.optim.name = "muon" if name.endswith("muon") else "adamw"
    single = Trainer(config)
    expected = step_losses(single, STEPS)
    assert (single.accum_steps, results[name]["accum_steps"]) == (4, 2)
    assert results[name]["losses"] == pytest.approx(expected, rel=LOSS_RTOL)
    assert expected[-1] < expected[0]  # it trained


@pytest.mark.parametrize("name", ["from2_ddp", "from2_fsdp"])
def test_a_run_saved_at_two_processes_resumes_at_one(spawned, corpus_dir, prepared_dir, tmp_path, name):
    out, _ = spawned
    run_dir = out / name
    state = json.loads((run_dir / "checkpoints" / "step_0000003" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    assert (run_dir / "checkpoints" / "step_0000003" / "dcp").is_dir() == (name == "from2_fsdp")
    resumed = Trainer(small_config(corpus_dir, prepared_dir, run_dir, max_steps=6, **BATCH))
    assert resumed.accum_steps == 4
    resumed.fit()
    reference = reference_run(corpus_dir, prepared_dir, tmp_path / "reference")
    assert list(logged_losses(run_dir).values()) == pytest.approx(list(logged_losses(tmp_path / "reference").values()),
                                                                 rel=LOSS_RTOL)
    assert resumed.loader.state_dict() == reference.loader.state_dict()  # the same windows were consumed
    changes = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "world_size_change"]
    assert [(e["step"], e["previous_world_size"], e["world_size"]) for e in changes] == [(3, 2, 1)]


@pytest.mark.parametrize("name", ["from1", "from1_fsdp"])
def test_a_run_saved_at_one_process_resumes_at_two(spawned, corpus_dir, prepared_dir, tmp_path, name):
    out, _ = spawned
    reference_run(corpus_dir, prepared_dir, tmp_path / "reference")
    assert list(logged_losses(out / name).values()) == pytest.approx(
        list(logged_losses(tmp_path / "reference").values()), rel=LOSS_RTOL)
    state = json.loads((out / name / "checkpoints" / "step_0000006" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 6
    assert state["parallel"] == ("fsdp" if name == "from1_fsdp" else "ddp")
    changes = [e for e in read_jsonl(out / name / "events.jsonl") if e["event"] == "world_size_change"]
    assert [(e["previous_world_size"], e["world_size"], e["accumulation_steps"]) for e in changes] == [(1, 2, 2)]


def test_only_rank_zero_writes_the_run_files(spawned):
    out, _ = spawned
    run_dir = out / "from1"  # steps 1-3 by one process, 4-6 by two
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in read_jsonl(run_dir / "samples.jsonl")] == [0, 3, 6]
    assert [e["event"] for e in read_jsonl(run_dir / "events.jsonl")] == [
        "start", "checkpoint", "stopped", "resume", "world_size_change", "checkpoint"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_0000003", "step_0000006"]


def test_consolidate_turns_a_sharded_checkpoint_into_a_single_file_one(spawned, tmp_path):
    from llamalite.checkpoint.format import load_checkpoint
    from llamalite.checkpoint.inference import load_for_inference
    from llamalite.cli import main

    out, _ = spawned
    sharded = out / "from2_fsdp" / "checkpoints" / "step_0000003"
    assert main(["consolidate", str(sharded), str(tmp_path / "single")]) == 0
    single = load_checkpoint(tmp_path / "single")
    assert single.state["step"] == 3 and single.state["world_size"] == 2
    assert set(single.model) == set(load_for_inference(sharded).model.state_dict())
    for name, tensor in load_for_inference(sharded).model.state_dict().items():  # read straight from the shards
        torch.testing.assert_close(single.model[name], tensor, rtol=0, atol=0, msg=name)
    moments = single.optimizer["state"]
    assert len(moments) == len(single.model) and all(s["step"] == 3 for s in moments.values())
    assert main(["consolidate", str(tmp_path / "single"), str(tmp_path / "again")]) == 2  # not sharded: refused


def test_activation_checkpointing_keeps_the_loss_and_gradients(corpus_dir, prepared_dir, tmp_path):
    def first_step(mode):
        trainer = Trainer(small_config(corpus_dir, prepared_dir, tmp_path / mode, activation_checkpointing=mode,
                                       **BATCH))
        loss, grad_norm = trainer.train_step()
        return loss, grad_norm, [p.detach().clone() for p in trainer.model.parameters()]

    plain = first_step("none")
    for mode in ("block", "selective"):
        loss, grad_norm, params = first_step(mode)
        assert loss == pytest.approx(plain[0], rel=1e-6) and grad_norm == pytest.approx(plain[1], rel=1e-5)
        for expected, got in zip(plain[2], params):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_unknown_strategies_are_refused_with_the_choices(corpus_dir, prepared_dir, tmp_path):
    from llamalite.errors import DistributedError

    with pytest.raises(DistributedError, match="none, ddp, fsdp"):
        Trainer(small_config(corpus_dir, prepared_dir, tmp_path / "a", parallel="zero3"))
    with pytest.raises(DistributedError, match="block, selective"):
        Trainer(small_config(corpus_dir, prepared_dir, tmp_path / "b", activation_checkpointing="full"))
