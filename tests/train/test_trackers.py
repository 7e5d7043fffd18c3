"""TensorBoard and Weights & Biases tracking: the same names, steps and values as metrics.jsonl, each step once after
a resume that redoes steps, one W&B run id per run directory (W&B runs offline here: nothing leaves the machine)."""

import json
import struct
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from llamalite.errors import ConfigError, TrainError
from llamalite.files import read_jsonl
from llamalite.train.trackers import PriorRun, check_logging, last_step_held, resume_arguments
from llamalite.train.trainer import Trainer
from tests.conftest import small_config

TIMINGS = ("perf/tokens_per_s", "val/seconds")  # measured, so a redone step differs there


def config_for(corpus_dir, prepared_dir, run_dir, wandb=False, rewind=False, **train):
    defaults = dict(log_interval=1, eval_interval=2, save_interval=4, keep_checkpoints=2, max_steps=8)
    config = small_config(corpus_dir, prepared_dir, run_dir, **{**defaults, **train})
    config.logging.wandb, config.logging.wandb_rewind = wandb, rewind
    return config


def crash_after_step(trainer: Trainer, step: int, monkeypatch) -> None:
    """The run dies after logging `step` (a kill after the checkpoint, with more steps logged since)."""
    original = trainer.train_step

    def step_or_crash():
        if trainer.step == step:
            raise RuntimeError("killed")
        return original()

    monkeypatch.setattr(trainer, "train_step", step_or_crash)


def jsonl_by_step(run_dir: Path) -> dict[int, dict[str, float]]:
    """metrics.jsonl as {step: every metric logged at that step}."""
    merged: dict[int, dict[str, float]] = defaultdict(dict)
    for record in read_jsonl(run_dir / "metrics.jsonl"):
        merged[record["step"]].update({k: v for k, v in record.items() if k not in ("step", "time")})
    return dict(merged)


def without(records: dict[int, dict[str, float]], names) -> dict[int, dict[str, float]]:
    return {step: {k: v for k, v in values.items() if k not in names} for step, values in records.items()}


# ----------------------------------------------------------------------------------------------- TensorBoard
def tensorboard_scalars(log_dir: Path, purge: bool = True) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0}, purge_orphaned_data=purge)
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


@pytest.mark.parametrize("crash", [6, 3], ids=["resumed_at_4", "started_over"])
def test_tensorboard_shows_each_step_once_after_a_resume_that_redoes_steps(corpus_dir, prepared_dir, tmp_path,
                                                                            monkeypatch, crash):
    run_dir = tmp_path / "run"
    trainer = Trainer(config_for(corpus_dir, prepared_dir, run_dir))
    crash_after_step(trainer, crash, monkeypatch)  # checkpoints every 4 steps: 5-6 (or 0-3, no checkpoint) redone
    with pytest.raises(RuntimeError, match="killed"):
        trainer.fit()
    Trainer(config_for(corpus_dir, prepared_dir, run_dir)).fit()

    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 2
    records = read_jsonl(run_dir / "metrics.jsonl")
    scalars = tensorboard_scalars(run_dir / "tb")
    assert set(scalars) == {name for record in records for name in record} - {"step", "time"}
    for tag, points in scalars.items():  # each record's value once, in float32 (train/tokens is in two per val step)
        assert points == [(r["step"], pytest.approx(float(np.float32(r[tag])), rel=1e-7)) for r in records if tag in r]
    assert [step for step, _ in scalars["train/loss"]] == list(range(1, 9))
    unpurged = [step for step, _ in tensorboard_scalars(run_dir / "tb", purge=False)["train/loss"]]
    redone = [5, 6] if crash == 6 else [1, 2, 3]
    assert [unpurged.count(step) for step in redone] == [2] * len(redone)  # in the files, hidden


def test_tensorboard_can_be_turned_off(corpus_dir, prepared_dir, tmp_path):
    config = config_for(corpus_dir, prepared_dir, tmp_path / "run", max_steps=2)
    config.logging.tensorboard = False
    Trainer(config).fit()
    assert not (tmp_path / "run" / "tb").exists() and (tmp_path / "run" / "metrics.jsonl").is_file()


# ----------------------------------------------------------------------------------------------- W&B
@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B in offline mode with its settings and caches in tmp_path and no reachable server.

    wandb reads the environment once per process (wandb.setup), so the fixture tears that down after each test."""
    wandb = pytest.importorskip("wandb")
    home = tmp_path / "wandb-home"
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(home / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # the discard port: any upload would fail at once
    for name in ("WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)
    yield
    wandb.teardown()


def wandb_records(path: Path):
    """The records of a .wandb file (W&B's transaction log: LevelDB's log format of wandb_internal.proto Records)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    position, pending = 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:
            break
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def offline_runs(run_dir: Path) -> list[dict]:
    """Each offline W&B run segment under the run directory, oldest first: its id, run record and history."""
    import wandb

    wandb.teardown()  # W&B's service completes the .wandb files when it stops (at the latest when the process ends)
    segments = []
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        (file,) = folder.glob("run-*.wandb")
        segment = {"folder": folder, "history": {}, "exited": False}
        for record in wandb_records(file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                segment["run"] = record.run
            elif kind == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                segment["history"][items.pop("_step")] = {k: v for k, v in items.items() if not k.startswith("_")}
            elif kind == "exit":
                segment["exited"] = True
        segments.append(segment)
    return segments


def run_config(segment: dict) -> dict:
    return {item.key: json.loads(item.value_json) for item in segment["run"].config.update}


def test_wandb_offline_logs_what_metrics_jsonl_holds_and_a_resume_continues_the_run(
        corpus_dir, prepared_dir, tmp_path, wandb_offline):
    run_dir = tmp_path / "run"
    Trainer(config_for(corpus_dir, prepared_dir, run_dir, wandb=True, stop_at_step=4)).fit()
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    (first,) = offline_runs(run_dir)
    assert first["folder"].name.endswith(f"-{run_id}") and first["run"].run_id == run_id and first["exited"]
    assert first["history"] == jsonl_by_step(run_dir)  # same names, steps and values
    assert sorted(first["history"]) == [0, 1, 2, 3, 4]
    assert run_config(first)["train"]["stop_at_step"] == 4 and run_config(first)["logging"]["wandb"] is True

    Trainer(config_for(corpus_dir, prepared_dir, run_dir, wandb=True)).fit()
    first, second = offline_runs(run_dir)
    assert second["run"].run_id == run_id and second["run"].resume and second["exited"]
    assert sorted(second["history"]) == [5, 6, 7, 8]
    assert {**first["history"], **second["history"]} == jsonl_by_step(run_dir)
    assert not list((run_dir / "wandb").glob("run-*"))  # no online run folder: nothing was meant for a server


def test_wandb_gets_the_in_loop_benchmark_scalars_of_evals_jsonl(corpus_dir, prepared_dir, tmp_path, wandb_offline):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    words = "the king queen lord lady speak night day love war crown sword".split()
    piqa = [{"goal": " ".join(words[i:i + 4]), "sol1": words[i], "sol2": words[-i], "label": i % 2} for i in range(8)]
    (tasks / "piqa_validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in piqa))
    run_dir = tmp_path / "run"
    config = config_for(corpus_dir, prepared_dir, run_dir, wandb=True, max_steps=4)
    config.eval.tasks, config.eval.data_dir, config.eval.interval = ["piqa"], str(tasks), 2
    Trainer(config).fit()

    (segment,) = offline_runs(run_dir)
    evals = read_jsonl(run_dir / "evals.jsonl")
    assert [r["step"] for r in evals] == [0, 2, 4]
    for record in evals:
        logged = segment["history"][record["step"]]
        assert {k: logged[k] for k in record["metrics"]} == record["metrics"]
        assert logged["eval/tokens"] == record["tokens"] and logged["eval/seconds"] > 0


@pytest.mark.parametrize("rewind", [False, True])
def test_wandb_gets_each_step_once_after_a_resume_that_redoes_steps(corpus_dir, prepared_dir, tmp_path,
                                                                     wandb_offline, monkeypatch, rewind):
    run_dir = tmp_path / "run"
    trainer = Trainer(config_for(corpus_dir, prepared_dir, run_dir, wandb=True, rewind=rewind))
    crash_after_step(trainer, 6, monkeypatch)  # checkpoint at 4; steps 5 and 6 logged, then redone
    with pytest.raises(RuntimeError, match="killed"):
        trainer.fit()
    Trainer(config_for(corpus_dir, prepared_dir, run_dir, wandb=True, rewind=rewind)).fit()

    first, second = offline_runs(run_dir)
    assert first["run"].run_id == second["run"].run_id
    assert sorted(first["history"]) == [0, 1, 2, 3, 4, 5, 6]
    expected = jsonl_by_step(run_dir)
    if rewind:  # W&B's history is cut after step 4 when synced; the redone steps replace the first attempt's
        assert (second["run"].branch_point.run, second["run"].branch_point.value) == (first["run"].run_id, 4)
        assert sorted(second["history"]) == [5, 6, 7, 8]
        assert {**{s: v for s, v in first["history"].items() if s <= 4}, **second["history"]} == expected
    else:  # W&B keeps the first attempt's steps 5 and 6 and gets only the later ones
        assert not second["run"].HasField("branch_point") and second["run"].resume
        assert sorted(second["history"]) == [7, 8]
        merged = {**first["history"], **second["history"]}
        assert without(merged, TIMINGS) == without(expected, TIMINGS)  # resume is exact: only timings differ


def test_resume_arguments_rewind_or_skip_what_wandb_has():
    assert resume_arguments("abc", None, rewind=True) == ({"id": "abc", "resume": "allow"}, None)
    assert resume_arguments("abc", PriorRun(4, None), rewind=True) == ({"id": "abc", "resume": "allow"}, None)
    assert resume_arguments("abc", PriorRun(4, 6), rewind=False) == ({"id": "abc", "resume": "allow"}, 6)
    assert resume_arguments("abc", PriorRun(4, 6), rewind=True) == ({"resume_from": "abc?_step=4"}, 4)
    assert resume_arguments("abc", PriorRun(4, 4), rewind=True) == ({"id": "abc", "resume": "allow"}, 4)
    assert resume_arguments("abc", PriorRun(-1, 3), rewind=True) == ({"resume_from": "abc?_step=0"}, 0)


def test_an_online_resume_sends_what_the_wandb_server_lacks():
    online = SimpleNamespace(resumed=True, starting_step=5)  # the server's history ends at step 4
    assert last_step_held(online, 6) == 4
    assert last_step_held(SimpleNamespace(resumed=True, starting_step=0), None) is None  # an empty run
    assert last_step_held(SimpleNamespace(resumed=False, starting_step=0), 6) == 6  # offline: metrics.jsonl says


def test_logging_settings_fail_before_training_in_one_line(corpus_dir, prepared_dir, tmp_path, monkeypatch):
    config = config_for(corpus_dir, prepared_dir, tmp_path / "run", wandb=True)
    config.logging.wandb_mode = "ofline"
    with pytest.raises(ConfigError, match="unknown logging.wandb_mode 'ofline': did you mean 'offline'"):
        Trainer(config)
    config.logging.wandb_mode = None
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"^logging.wandb=true needs the wandb package: "
                                          r"pip install 'llamalite\[wandb\]'$"):
        check_logging(config.logging)


def test_wandb_that_cannot_start_stops_the_run_in_one_line(corpus_dir, prepared_dir, tmp_path, wandb_offline,
                                                           monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")  # and no API key
    run_dir = tmp_path / "run"
    with pytest.raises(TrainError, match=r"^W&B did not start the run: No API key configured.*wandb_mode=offline"):
        Trainer(config_for(corpus_dir, prepared_dir, run_dir, wandb=True, max_steps=2)).fit()
    assert not (run_dir / "wandb_run_id").exists() and not (run_dir / "checkpoints").exists()
    assert not (run_dir / "tb").exists() and not (run_dir / "metrics.jsonl").exists()
