"""Issue 28, property 7: a run restarts from scratch only when its own records say it never wrote a checkpoint.

A run directory without checkpoints is either a run stopped before its first (nothing to lose: start over) or a run
whose checkpoints were deleted, moved or never copied along (its records are all that is left: refuse). The
decision reads events.jsonl, which records every checkpoint written and every resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llamalite.checkpoint.format import list_checkpoints
from llamalite.config import save_config

from ..train.test_resume import config_for
from .conftest import assert_clean_outcome, assert_untouched, run_main, tree_snapshot


@pytest.fixture(scope="module")
def finished_run(corpus_dir, prepared_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A 4-step run with checkpoints at steps 2 and 4, and the config file that made it."""
    from llamalite.train.trainer import Trainer

    folder = tmp_path_factory.mktemp("finished")
    config = config_for(corpus_dir, prepared_dir, folder / "run", max_steps=4)
    Trainer(config).fit()
    save_config(config, folder / "config.yaml")
    return folder / "run", folder / "config.yaml"


def lose_every_checkpoint(checkpoints: Path, how: str, elsewhere: Path) -> None:
    if how == "folder deleted":
        shutil.rmtree(checkpoints)
    elif how == "each checkpoint deleted":
        for path in list_checkpoints(checkpoints):
            shutil.rmtree(path)
    elif how == "folder emptied":
        shutil.rmtree(checkpoints)
        checkpoints.mkdir()
    elif how == "moved elsewhere":
        shutil.move(str(checkpoints), str(elsewhere))
    elif how == "only a partial write left":
        shutil.rmtree(checkpoints)
        (checkpoints / ".tmp_step_0000006").mkdir(parents=True)
        (checkpoints / ".tmp_step_0000006" / "model.safetensors").write_bytes(b"partial")


def keep_events(run_dir: Path, keep) -> None:
    """Rewrite events.jsonl as an older llamalite (or a differently stopped run) would have left it."""
    path = run_dir / "events.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    path.write_text("".join(json.dumps(r) + "\n" for r in records if keep(r)))


HISTORIES = {
    "as written": lambda record: True,
    # Runs recorded before checkpoint events existed: a resume names the checkpoint it came from.
    "only a resume names a checkpoint": lambda record: record["event"] != "checkpoint",
}
LOSSES = ["folder deleted", "each checkpoint deleted", "folder emptied", "moved elsewhere", "only a partial write left"]


@pytest.mark.parametrize("history", list(HISTORIES))
@pytest.mark.parametrize("how", LOSSES)
def test_a_run_whose_checkpoints_are_gone_is_refused_and_keeps_its_records(finished_run, tmp_path, capsys, how,
                                                                            history):
    source, config_file = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    if history != "as written":
        with open(run_dir / "events.jsonl", "a") as f:  # the run was resumed once from its step-2 checkpoint
            f.write(json.dumps({"step": 2, "time": 0, "event": "resume", "checkpoint": "step_0000002"}) + "\n")
        keep_events(run_dir, HISTORIES[history])
    lose_every_checkpoint(run_dir / "checkpoints", how, tmp_path / "moved")
    before = tree_snapshot(run_dir)

    outcome = run_main(capsys, ["train", config_file, f"train.run_dir={run_dir}"])

    assert_clean_outcome(outcome, allow_success=False)
    assert "but none is left" in outcome.err and "train.overwrite=true" in outcome.err
    assert_untouched(before, run_dir)


@pytest.mark.parametrize("left", ["metrics and events", "events only", "metrics only"])
def test_a_run_stopped_before_its_first_checkpoint_starts_over(finished_run, tmp_path, capsys, left):
    source, config_file = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    shutil.rmtree(run_dir / "checkpoints")
    keep_events(run_dir, lambda record: record["event"] == "start")  # what a kill before step 2 leaves
    if left == "events only":
        (run_dir / "metrics.jsonl").unlink()
    elif left == "metrics only":
        (run_dir / "events.jsonl").unlink()

    outcome = run_main(capsys, ["train", config_file, f"train.run_dir={run_dir}"])

    assert outcome.code == 0, outcome.err
    events = [json.loads(line)["event"] for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert events[-3:] == ["start", "checkpoint", "checkpoint"]
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step_0000002", "step_0000004"]


def test_overwrite_still_starts_a_run_with_lost_checkpoints_over(finished_run, tmp_path, capsys):
    source, config_file = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    shutil.rmtree(run_dir / "checkpoints")
    outcome = run_main(capsys, ["train", config_file, f"train.run_dir={run_dir}", "train.overwrite=true"])
    assert outcome.code == 0, outcome.err
    assert [json.loads(line)["event"] for line in (run_dir / "events.jsonl").read_text().splitlines()] == [
        "start", "checkpoint", "checkpoint"]
