"""Deterministic batches of token windows from prepared shards, for any (rank, world size).

A sample is a window of seq_len + 1 tokens; windows do not overlap (stride seq_len) and never
cross a shard boundary. The windows of all epochs form one global stream, each epoch a
permutation drawn from `np.random.default_rng([seed, epoch])`. A global step takes the next
batch_size * world_size windows of that stream and rank r keeps its own slice of batch_size, so
ranks never read the same stream position, and the stream (hence the data seen) does not depend
on the world size: a run can resume on a different number of GPUs from the same `state_dict`.
Epochs are not padded or cut to whole global batches (that would make the stream depend on the
world size), so a global batch that straddles an epoch boundary can hold one window twice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llamalite.data.shards import read_shard, verify_shard
from llamalite.errors import DataError
from llamalite.records import contained_path, expect_type, read_json

MANIFEST_FILE = "manifest.json"
MANIFEST_FIX = "rerun `llamalite prepare CONFIG`"


def read_manifest(data_dir: str | Path, need_tokenizer: bool = True) -> dict[str, Any]:
    """manifest.json of prepared data, after checking the fields the loader (and, with `need_tokenizer`, the
    trainer) read."""
    path = Path(data_dir) / MANIFEST_FILE
    if not path.is_file():
        raise DataError(f"no {MANIFEST_FILE} in {data_dir}: run `llamalite prepare CONFIG` first")
    manifest = read_json(path, "the manifest", MANIFEST_FIX)
    check_manifest(manifest, path, need_tokenizer)
    return manifest


def check_manifest(manifest: dict[str, Any], path: Path, need_tokenizer: bool = True) -> None:
    """Every field read from a manifest has its type, and every file it names lies inside its folder."""
    def need(value: Any, kind: type | tuple[type, ...], field: str) -> Any:
        return expect_type(value, kind, f"{path} field {field}", MANIFEST_FIX)

    for field in ("splits", "tokenizer") if need_tokenizer else ("splits",):
        if field not in manifest:
            raise DataError(f"{path} lacks the field {field!r}: {MANIFEST_FIX}")
    if "tokenizer" in manifest:
        tokenizer = need(manifest["tokenizer"], dict, "tokenizer")
        contained_path(path.parent, tokenizer.get("file"), f"{path} field tokenizer.file", MANIFEST_FIX)
    for name, split in need(manifest["splits"], dict, "splits").items():
        need(split, dict, f"splits.{name}")
        need(split.get("tokens"), int, f"splits.{name}.tokens")
        for number, shard in enumerate(need(split.get("shards"), list, f"splits.{name}.shards")):
            where = f"splits.{name}.shards[{number}]"
            need(shard, dict, where)
            contained_path(path.parent, shard.get("file"), f"{path} field {where}.file", MANIFEST_FIX)
            need(shard.get("tokens"), int, f"{where}.tokens")
            need(shard.get("sha256"), str, f"{where}.sha256")


def manifest_vocab_size(manifest: dict[str, Any]) -> int | None:
    """The number of token ids the data may hold: the model vocabulary the manifest records (None if it has none)."""
    tokenizer = manifest.get("tokenizer", {})
    size = tokenizer.get("padded_vocab_size", tokenizer.get("size"))
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


class TokenWindows:
    """The windows of seq_len + 1 tokens of one split, addressable by a global window index."""

    def __init__(self, data_dir: str | Path, split: str, seq_len: int) -> None:
        if seq_len <= 0:
            raise DataError(f"seq_len={seq_len} must be positive")
        self.data_dir = Path(data_dir)
        self.split = split
        self.seq_len = seq_len
        manifest = read_manifest(data_dir, need_tokenizer=False)
        splits = manifest["splits"]
        if split not in splits:
            raise DataError(f"{data_dir} has no {split!r} split (it has {', '.join(splits) or 'none'}): "
                            "rerun `llamalite prepare CONFIG`")
        shards = splits[split]["shards"]
        self.vocab_size = manifest_vocab_size(manifest)
        self.shards = [self._open(shard) for shard in shards]
        windows_per_shard = np.array([max(0, (len(tokens) - 1) // seq_len) for tokens in self.shards], dtype=np.int64)
        self._first_window = np.concatenate([[0], np.cumsum(windows_per_shard)])
        self.num_windows = int(self._first_window[-1])
        # Content, not paths or times: the same tokens give the same fingerprint wherever they live.
        self.fingerprint = hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()
        self.tokens = int(splits[split]["tokens"])

    def _open(self, shard: dict[str, Any]) -> np.ndarray:
        path = contained_path(self.data_dir, shard["file"], f"{self.data_dir / MANIFEST_FILE}", MANIFEST_FIX)
        tokens = read_shard(path)
        if len(tokens) != shard["tokens"]:
            raise DataError(
                f"{path} holds {len(tokens):,} tokens, the manifest says {shard['tokens']:,}: "
                "rerun `llamalite prepare CONFIG`"
            )
        verify_shard(path, tokens, shard["sha256"], self.vocab_size)
        return tokens

    def window(self, index: int) -> np.ndarray:
        shard = int(np.searchsorted(self._first_window, index, side="right")) - 1
        start = (index - int(self._first_window[shard])) * self.seq_len
        return self.shards[shard][start : start + self.seq_len + 1]

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), int64 tensors of shape (len(indices), seq_len); targets are inputs shifted by one."""
        windows = np.stack([self.window(int(i)) for i in indices]).astype(np.int64)
        return torch.from_numpy(windows[:, :-1].copy()), torch.from_numpy(windows[:, 1:].copy())


class TokenLoader:
    """Endless, resumable batches of one split for one rank."""

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        if batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size:
            raise DataError(f"invalid loader layout: batch_size={batch_size}, rank={rank}, world_size={world_size}")
        self.windows = TokenWindows(data_dir, split, seq_len)
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        global_batch = batch_size * world_size
        if self.windows.num_windows < global_batch:
            raise DataError(
                f"the {split} split of {data_dir} has {self.windows.num_windows:,} windows of {seq_len + 1} tokens "
                f"({self.windows.tokens:,} tokens), fewer than one global batch of {global_batch}: "
                "add data, or lower seq_len or the batch size"
            )
        self.epoch = 0
        self.position = 0  # index of the next window within the epoch's order
        self._order = self._epoch_order(0)

    @property
    def num_windows(self) -> int:
        return self.windows.num_windows

    @property
    def tokens_per_epoch(self) -> int:
        """Target tokens in one pass over the split's windows."""
        return self.windows.num_windows * self.seq_len

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_windows, dtype=np.int64)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)

    def _next_global_windows(self, count: int) -> np.ndarray:
        taken: list[np.ndarray] = []
        while count > 0:
            if self.position == self.num_windows:
                self.epoch += 1
                self.position = 0
                self._order = self._epoch_order(self.epoch)
            take = min(count, self.num_windows - self.position)
            taken.append(self._order[self.position : self.position + take])
            self.position += take
            count -= take
        return np.concatenate(taken)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        global_windows = self._next_global_windows(self.batch_size * self.world_size)
        mine = global_windows[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return self.windows.batch(mine)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        # Positions count global windows, so the state is the same on every rank and for any world size.
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "seq_len": self.seq_len,
            "num_windows": self.num_windows,
            "split": self.windows.split,
            "data_fingerprint": self.windows.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, current in (("split", self.windows.split), ("seq_len", self.seq_len),
                             ("num_windows", self.num_windows)):
            if state[key] != current:
                raise DataError(
                    f"loader state was saved with {key}={state[key]!r} but this loader has {current!r}: "
                    "resume with the data and seq_len of the saved run"
                )
        if state["data_fingerprint"] != self.windows.fingerprint:
            raise DataError(
                f"loader state belongs to different {self.windows.split} shards than those in {self.windows.data_dir}: "
                "resume with the prepared data of the saved run"
            )
        if not 0 <= state["position"] <= self.num_windows:
            raise DataError(f"loader state position {state['position']} is outside 0..{self.num_windows}")
        self.seed, self.shuffle = int(state["seed"]), bool(state["shuffle"])
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order(self.epoch)


def validation_batches(data_dir: str | Path, batch_size: int, seq_len: int,
                       max_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed list of batches from the start of the val split (in order): the same every call.

    Only full batches are used, except when the split holds fewer windows than one batch: then a
    single smaller batch, so that a tiny corpus still gets a validation loss.
    """
    windows = TokenWindows(data_dir, "val", seq_len)
    if windows.num_windows == 0:
        raise DataError(
            f"the val split of {data_dir} has no window of {seq_len + 1} tokens ({windows.tokens:,} tokens): "
            "raise data.val_fraction and rerun `llamalite prepare`, or lower seq_len"
        )
    full_batches = windows.num_windows // batch_size
    if full_batches == 0:
        return [windows.batch(np.arange(windows.num_windows))]
    return [
        windows.batch(np.arange(start * batch_size, (start + 1) * batch_size))
        for start in range(min(max_batches, full_batches))
    ]
