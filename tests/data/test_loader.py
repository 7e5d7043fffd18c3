from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from llamalite.config import SourceConfig
from llamalite.data.loader import TokenLoader, read_manifest, validation_batches
from llamalite.data.prepare import prepare, write_manifest
from llamalite.data.shards import write_shard
from llamalite.errors import DataError

SEQ_LEN = 8
SHARD_OFFSET = 1_000_000  # shard k holds k*SHARD_OFFSET + 0, 1, 2, ...: every token tells where it came from


def make_data_dir(root: Path, shard_sizes: dict[str, list[int]]) -> Path:
    """Shards of consecutive integers, so that a window's first token identifies it."""
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, sizes in shard_sizes.items():
        shards = []
        for k, size in enumerate(sizes):
            name = f"{split}_{k:06d}.bin"
            sha256 = write_shard(root / name, np.arange(size, dtype=np.uint32) + k * SHARD_OFFSET)
            shards.append({"file": name, "tokens": size, "sha256": sha256})
        splits[split] = {"documents": len(sizes), "tokens": sum(sizes), "shards": shards}
    write_manifest(root, {"format_version": 1, "dtype": "uint32", "splits": splits})
    return root


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    # 100 + 12 + 50 = 162 windows of 9 tokens (stride 8) in train; 5 in val.
    return make_data_dir(tmp_path / "data", {"train": [801, 100, 401], "val": [41]})


def first_tokens(inputs: torch.Tensor) -> list[int]:
    return inputs[:, 0].tolist()


def all_window_starts(loader: TokenLoader) -> set[int]:
    starts = set()
    for k, tokens in enumerate(loader.windows.shards):
        starts |= {k * SHARD_OFFSET + i * SEQ_LEN for i in range((len(tokens) - 1) // SEQ_LEN)}
    return starts


def test_batches_are_contiguous_windows_with_shifted_targets(data_dir: Path) -> None:
    loader = TokenLoader(data_dir, "train", batch_size=4, seq_len=SEQ_LEN)
    assert loader.num_windows == 162
    assert loader.tokens_per_epoch == 162 * SEQ_LEN
    for _ in range(50):
        inputs, targets = loader.next_batch()
        assert inputs.shape == targets.shape == (4, SEQ_LEN)
        assert inputs.dtype == targets.dtype == torch.int64
        assert torch.equal(targets[:, :-1], inputs[:, 1:])
        assert torch.equal(targets - inputs, torch.ones_like(inputs))  # never crosses a shard boundary
        assert all(start % SEQ_LEN == 0 for start in (inputs[:, 0] % SHARD_OFFSET).tolist())


def test_each_epoch_visits_every_window_once(data_dir: Path) -> None:
    loader = TokenLoader(data_dir, "train", batch_size=6, seq_len=SEQ_LEN, seed=3)
    epoch_windows = [w for _ in range(162 // 6) for w in first_tokens(loader.next_batch()[0])]
    assert len(epoch_windows) == len(set(epoch_windows)) == 162
    assert set(epoch_windows) == all_window_starts(loader)
    assert loader.state_dict()["epoch"] == 0 and loader.state_dict()["position"] == 162
    second_epoch = [w for _ in range(162 // 6) for w in first_tokens(loader.next_batch()[0])]
    assert set(second_epoch) == set(epoch_windows) and second_epoch != epoch_windows


def test_no_shuffle_reads_in_order(data_dir: Path) -> None:
    loader = TokenLoader(data_dir, "train", batch_size=3, seq_len=SEQ_LEN, shuffle=False)
    assert first_tokens(loader.next_batch()[0]) == [0, 8, 16]


def test_same_seed_same_batches_other_seed_other_batches(data_dir: Path) -> None:
    def take(seed: int) -> list[list[int]]:
        loader = TokenLoader(data_dir, "train", batch_size=4, seq_len=SEQ_LEN, seed=seed)
        return [first_tokens(loader.next_batch()[0]) for _ in range(60)]  # crosses an epoch boundary

    assert take(1) == take(1)
    assert take(1) != take(2)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_are_disjoint_and_cover_the_global_batch(data_dir: Path, world_size: int) -> None:
    batch_size = 4
    single = TokenLoader(data_dir, "train", batch_size=batch_size * world_size, seq_len=SEQ_LEN, seed=5)
    ranks = [
        TokenLoader(data_dir, "train", batch_size, SEQ_LEN, seed=5, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    straddling_steps = 0
    for _ in range(30):  # several epochs at world_size 3
        epoch_before = ranks[0].epoch
        per_rank = [first_tokens(loader.next_batch()[0]) for loader in ranks]
        flat = [w for windows in per_rank for w in windows]
        assert flat == first_tokens(single.next_batch()[0])
        if ranks[0].epoch == epoch_before:
            assert len(set(flat)) == len(flat)
        else:  # the end of one epoch's permutation meets the start of the next: a window may repeat
            straddling_steps += 1
    assert straddling_steps > 0


def test_state_dict_resumes_exactly(data_dir: Path) -> None:
    loader = TokenLoader(data_dir, "train", batch_size=7, seq_len=SEQ_LEN, seed=11)
    for _ in range(5):
        loader.next_batch()
    state = loader.state_dict()
    assert all(isinstance(v, (int, str, bool)) for v in state.values())
    expected = [loader.next_batch() for _ in range(5)]

    resumed = TokenLoader(data_dir, "train", batch_size=7, seq_len=SEQ_LEN, seed=0)  # the seed comes from the state
    resumed.load_state_dict(state)
    batches = [resumed.next_batch() for _ in range(5)]
    for (inputs, targets), (want_inputs, want_targets) in zip(batches, expected, strict=True):
        assert torch.equal(inputs, want_inputs) and torch.equal(targets, want_targets)


def test_state_resumes_on_another_world_size(data_dir: Path) -> None:
    single = TokenLoader(data_dir, "train", batch_size=4, seq_len=SEQ_LEN, seed=2)
    for _ in range(30):
        single.next_batch()
    state = single.state_dict()
    expected = first_tokens(single.next_batch()[0])
    halves = []
    for rank in range(2):
        loader = TokenLoader(data_dir, "train", batch_size=2, seq_len=SEQ_LEN, seed=2, rank=rank, world_size=2)
        loader.load_state_dict(state)
        halves += first_tokens(loader.next_batch()[0])
    assert halves == expected


def test_state_of_other_data_is_refused(data_dir: Path, tmp_path: Path) -> None:
    state = TokenLoader(data_dir, "train", batch_size=4, seq_len=SEQ_LEN).state_dict()
    with pytest.raises(DataError, match="seq_len=8"):
        TokenLoader(data_dir, "train", batch_size=4, seq_len=4).load_state_dict(state)
    other = make_data_dir(tmp_path / "other", {"train": [802, 100, 401]})  # same window count, other tokens
    with pytest.raises(DataError, match="different train shards"):
        TokenLoader(other, "train", batch_size=4, seq_len=SEQ_LEN).load_state_dict(state)


def test_errors_are_clear(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no manifest.json in .*: run `llamalite prepare CONFIG` first"):
        TokenLoader(tmp_path / "nothing", "train", 4, SEQ_LEN)
    with pytest.raises(DataError, match="fewer than one global batch"):
        TokenLoader(data_dir, "val", batch_size=6, seq_len=SEQ_LEN)
    with pytest.raises(DataError, match="has no 'test' split"):
        TokenLoader(data_dir, "test", 4, SEQ_LEN)
    (data_dir / "train_000001.bin").write_bytes(b"garbage")
    with pytest.raises(DataError, match="train_000001.bin is not a llamalite token shard"):
        TokenLoader(data_dir, "train", 4, SEQ_LEN)


def test_validation_batches_are_fixed_and_in_order(data_dir: Path) -> None:
    first = validation_batches(data_dir, batch_size=2, seq_len=SEQ_LEN, max_batches=10)
    second = validation_batches(data_dir, batch_size=2, seq_len=SEQ_LEN, max_batches=10)
    assert len(first) == 2  # 5 windows: two full batches
    assert [first_tokens(x) for x, _ in first] == [[0, 8], [16, 24]]
    for (x1, y1), (x2, y2) in zip(first, second, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert len(validation_batches(data_dir, batch_size=2, seq_len=SEQ_LEN, max_batches=1)) == 1
    (only,) = validation_batches(data_dir, batch_size=16, seq_len=SEQ_LEN, max_batches=4)
    assert only[0].shape == (5, SEQ_LEN)  # fewer windows than a batch: one smaller batch


def test_validation_batches_without_val_data(tmp_path: Path) -> None:
    data_dir = make_data_dir(tmp_path / "d", {"train": [100], "val": []})
    with pytest.raises(DataError, match="val split .* has no window.*raise data.val_fraction"):
        validation_batches(data_dir, 2, SEQ_LEN, 4)


def test_loader_reads_prepared_data(text_folder: Path, make_config) -> None:
    config = make_config([SourceConfig(type="text", path=str(text_folder))], shard_tokens=700)
    manifest = prepare(config)
    loader = TokenLoader(config.data.out_dir, "train", batch_size=4, seq_len=32)
    assert loader.num_windows == sum((s["tokens"] - 1) // 32 for s in manifest["splits"]["train"]["shards"])
    inputs, targets = loader.next_batch()
    assert inputs.max() < manifest["tokenizer"]["size"]
    assert read_manifest(config.data.out_dir) == manifest
    assert validation_batches(config.data.out_dir, 2, 32, 3)
