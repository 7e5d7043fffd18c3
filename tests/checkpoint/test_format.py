"""The checkpoint directory: names, the one reader of trainer_state.json, the atomic commit, retention, RNG."""

import json
import random

import numpy as np
import pytest
import torch

from llamalite.checkpoint.format import (
    begin_checkpoint_dir,
    capture_rng_state,
    commit_checkpoint_dir,
    list_checkpoints,
    prune_checkpoints,
    read_state,
    restore_rng_state,
    verify_checkpoint,
)
from llamalite.errors import CheckpointError


def test_the_commit_covers_nested_files_and_replaces_a_previous_directory(tmp_path):
    final = tmp_path / "checkpoints" / "step_0000001"
    final.mkdir(parents=True)
    (final / "stale.txt").write_text("an older write")
    tmp = begin_checkpoint_dir(final)
    (tmp / "dcp").mkdir()
    (tmp / "dcp" / ".metadata").write_bytes(b"shards")
    (tmp / "trainer_state.json").write_text(json.dumps({"step": 1, "config": {}}))
    assert commit_checkpoint_dir(tmp, final) == final and not tmp.exists()
    assert sorted(json.loads((final / "checksums.json").read_text())) == ["dcp/.metadata", "trainer_state.json"]
    assert not (final / "stale.txt").exists()
    assert sorted(verify_checkpoint(final)) == ["dcp/.metadata", "trainer_state.json"]
    (final / "dcp" / ".metadata").write_bytes(b"shardz")
    with pytest.raises(CheckpointError, match=r"dcp/\.metadata does not match its checksum"):
        verify_checkpoint(final)


def test_read_state_names_what_is_wrong(tmp_path):
    with pytest.raises(CheckpointError, match="trainer_state.json is missing"):
        read_state(tmp_path)
    (tmp_path / "trainer_state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        read_state(tmp_path)
    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 2}))
    with pytest.raises(CheckpointError, match="lacks step or config"):
        read_state(tmp_path)
    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 2, "config": {}}))
    assert read_state(tmp_path)["step"] == 2


def test_retention_keeps_the_newest_and_the_milestones(tmp_path):
    for step in (1, 2, 3, 4, 5, 6):
        (tmp_path / f"step_{step:07d}").mkdir()
    prune_checkpoints(tmp_path, keep_last=2, milestone_interval=3)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000003", "step_0000005", "step_0000006"]


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(capture_rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
