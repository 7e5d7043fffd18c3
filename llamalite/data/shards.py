"""The on-disk shard format: a 64-byte header, then the token ids, little-endian.

    offset  size  field
    0       8     magic b"LLTOKENS"
    8       4     uint32 format version (1)
    12      4     uint32 bytes per token (2 or 4)
    16      8     uint64 number of tokens
    24      40    zeros
    64      ...   tokens

Shards are written atomically (temp file, fsync, rename) and read back as `np.memmap`, so a
training run maps terabytes without reading them into memory. `ShardWriter` cuts a split's token
stream into such files, named `<split>_<index:06d>.bin`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from llamalite.errors import DataError
from llamalite.files import atomic_write, atomic_write_text, sha256_file

MAGIC = b"LLTOKENS"
VERSION = 1
HEADER_SIZE = 64
_HEADER = struct.Struct("<8sIIQ")
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
UINT16_MAX_VOCAB = 2**16
SHARD_NAME = re.compile(r"^(train|val)_\d{6}\.bin$")


def token_dtype(vocab_size: int, requested: str = "auto") -> type[np.unsignedinteger]:
    """The narrowest dtype that holds ids below `vocab_size` (uint16 up to 65,536), or the one requested."""
    if requested == "auto":
        return np.uint16 if vocab_size <= UINT16_MAX_VOCAB else np.uint32
    if requested == "uint16":
        if vocab_size > UINT16_MAX_VOCAB:
            raise DataError(
                f"data.dtype=uint16 cannot hold a vocabulary of {vocab_size:,} ids (max {UINT16_MAX_VOCAB:,}): "
                "set data.dtype=auto or uint32"
            )
        return np.uint16
    if requested == "uint32":
        return np.uint32
    raise DataError(f"data.dtype={requested!r} is not a token dtype: use auto, uint16 or uint32")


def write_shard(path: str | Path, tokens: np.ndarray) -> str:
    """Write `tokens` (uint16 or uint32) as a shard, atomically; return the sha256 of the file."""
    tokens = np.ascontiguousarray(tokens)
    if tokens.ndim != 1 or tokens.dtype.itemsize not in _DTYPES or tokens.dtype.kind != "u":
        raise ValueError(f"a shard holds a 1-D uint16 or uint32 array, got {tokens.dtype} of shape {tokens.shape}")
    payload = tokens.astype(_DTYPES[tokens.dtype.itemsize], copy=False)
    header = _HEADER.pack(MAGIC, VERSION, payload.dtype.itemsize, payload.size).ljust(HEADER_SIZE, b"\0")
    digest = hashlib.sha256(header)
    digest.update(memoryview(payload).cast("B"))

    def write(f: BinaryIO) -> None:
        f.write(header)
        f.write(memoryview(payload).cast("B"))

    atomic_write(path, write)
    return digest.hexdigest()


def read_shard(path: str | Path) -> np.ndarray:
    """Map a shard's tokens read-only after checking its header and size."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"shard not found: {path} (rerun `llamalite prepare CONFIG` to rebuild the data)")
    itemsize, n_tokens = read_shard_header(path)
    if n_tokens == 0:
        return np.empty(0, dtype=_DTYPES[itemsize])
    return np.memmap(path, dtype=_DTYPES[itemsize], mode="r", offset=HEADER_SIZE, shape=(n_tokens,))


def read_shard_header(path: str | Path) -> tuple[int, int]:
    """(bytes per token, number of tokens) of a shard, after checking magic, version and file size."""
    path = Path(path)
    with open(path, "rb") as f:
        header = f.read(HEADER_SIZE)
    fix = "delete it and rerun `llamalite prepare CONFIG`"
    if len(header) < HEADER_SIZE or header[:8] != MAGIC:
        raise DataError(f"{path} is not a llamalite token shard (bad or truncated header): {fix}")
    _, version, itemsize, n_tokens = _HEADER.unpack_from(header)
    if version != VERSION:
        raise DataError(f"{path} has shard format version {version}, this llamalite reads {VERSION}: {fix}")
    if itemsize not in _DTYPES:
        raise DataError(f"{path} has {itemsize} bytes per token (expected 2 or 4), the header is corrupt: {fix}")
    expected = HEADER_SIZE + itemsize * n_tokens
    actual = path.stat().st_size
    if actual != expected:
        raise DataError(
            f"{path} is {actual:,} bytes but its header promises {expected:,} (truncated or corrupt): {fix}"
        )
    return itemsize, n_tokens


def shard_file_size(n_tokens: int, itemsize: int) -> int:
    return HEADER_SIZE + n_tokens * itemsize


# -- cutting a split's token stream into shards ----------------------------------------------------


@dataclasses.dataclass
class SplitProgress:
    """The finished shards of one split and, after each, where the split's document stream stands:
    (whole documents written, tokens of the next document written), since shards cut documents."""

    shards: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    ends: list[tuple[int, int]] = dataclasses.field(default_factory=list)


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


class ShardWriter:
    """Cuts one split's token stream into files of `shard_tokens` tokens (the last one shorter).

    A writer given the shards kept from an interrupted run continues at the next shard, and drops
    the tokens of the first document it gets that the last kept shard already holds. `on_shard`
    is called after each shard is written.
    """

    def __init__(
        self,
        out_dir: Path,
        split: str,
        shard_tokens: int,
        dtype: type[np.unsignedinteger],
        kept: SplitProgress,
        on_shard: Callable[[], None],
    ) -> None:
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self._buffer = np.empty(shard_tokens, dtype=dtype)  # pages are committed only as they fill
        self._filled = 0
        self._on_shard = on_shard
        self.finished = SplitProgress(list(kept.shards), list(kept.ends))
        self.documents, self._skip = kept.ends[-1] if kept.ends else (0, 0)
        self.tokens = sum(shard["tokens"] for shard in kept.shards)

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append whole documents: `tokens` holds [eos] + tokens of each, `lengths` the length of each."""
        if not len(lengths):
            return
        # Where the documents start and end in the split's token stream (the first may be partly written already).
        bounds = self.tokens - self._skip + np.concatenate([[0], np.cumsum(lengths)])
        documents_before, position = self.documents, self.tokens
        tokens, self._skip = tokens[self._skip :], 0
        self.documents += len(lengths)
        self.tokens += len(tokens)
        start = 0
        while start < len(tokens):
            take = min(self.shard_tokens - self._filled, len(tokens) - start)
            self._buffer[self._filled : self._filled + take] = tokens[start : start + take]
            self._filled += take
            start += take
            if self._filled == self.shard_tokens:
                written = position + start
                whole = int(np.searchsorted(bounds[1:], written, side="right"))
                self._flush(end=(documents_before + whole, written - int(bounds[whole])))

    def close(self) -> dict[str, Any]:
        if self._filled:
            self._flush(end=(self.documents, 0))
        return {"documents": self.documents, "tokens": self.tokens, "shards": self.finished.shards}

    def discard(self) -> None:
        for shard in self.finished.shards:
            (self.out_dir / shard["file"]).unlink(missing_ok=True)
        self.finished = SplitProgress()

    def _flush(self, end: tuple[int, int]) -> None:
        name = shard_name(self.split, len(self.finished.shards))
        sha256 = write_shard(self.out_dir / name, self._buffer[: self._filled])
        self.finished.shards.append({"file": name, "tokens": self._filled, "sha256": sha256})
        self.finished.ends.append(end)
        self._filled = 0
        self._on_shard()


# -- verifying shards against the manifest ---------------------------------------------------------

# What verify_shard found, by shard path, kept in the user's cache folder: a command that only reads prepared data
# (train, eval) never writes into it (docs/safety.md, output policy).
VERIFIED_CACHE = "verified_shards.json"
_verified_in_memory: dict[str, dict[str, Any]] = {}  # the same, for this process (and where the cache is read-only)
_cache_loaded = False


def verification_cache_file() -> Path:
    """$LLAMALITE_CACHE_DIR, else $XDG_CACHE_HOME/llamalite, else ~/.cache/llamalite: verified_shards.json."""
    folder = os.environ.get("LLAMALITE_CACHE_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llamalite"
    return Path(folder) / VERIFIED_CACHE


def verify_shard(path: Path, tokens: np.ndarray, sha256: str, vocab_size: int | None) -> None:
    """Check a shard against the sha256 its manifest records and its token ids against the vocabulary, once per
    content: the result is kept by (size, mtime_ns, sha256) in the user's cache, so a resume of a run reads no shard
    twice. A mismatch is a DataError naming the shard."""
    fix = "rerun `llamalite prepare CONFIG` to rebuild the data"
    stat = path.stat()
    key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}
    cache = _read_verified()
    name = str(path.resolve())
    entry = cache.get(name)
    if not (isinstance(entry, dict) and {k: entry.get(k) for k in key} == key and isinstance(entry.get("max_id"), int)):
        if sha256_file(path) != sha256:
            raise DataError(f"{path} does not match the sha256 its manifest records (corrupted or replaced): {fix}")
        entry = key | {"max_id": int(tokens.max()) if len(tokens) else -1}
        cache[name] = entry
        _write_verified(cache)
    if vocab_size is not None and entry["max_id"] >= vocab_size:
        raise DataError(f"{path} holds token id {entry['max_id']}, outside the vocabulary of {vocab_size} ids its "
                        f"manifest records: {fix}")


def _read_verified() -> dict[str, Any]:
    global _cache_loaded
    if not _cache_loaded:
        _cache_loaded = True
        try:
            found = json.loads(verification_cache_file().read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            found = None  # no cache yet, or a damaged one: shards are verified afresh
        if isinstance(found, dict):
            _verified_in_memory.update({k: v for k, v in found.items() if k not in _verified_in_memory})
    return _verified_in_memory


def _write_verified(cache: dict[str, Any]) -> None:
    cache_file = verification_cache_file()
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache_file, json.dumps(cache, indent=1, sort_keys=True) + "\n")
    except OSError:
        pass  # a read-only cache folder: the result stays in this process's memory
