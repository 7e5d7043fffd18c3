"""The on-disk shard format: a 64-byte header, then the token ids, little-endian.

    offset  size  field
    0       8     magic b"LLTOKENS"
    8       4     uint32 format version (1)
    12      4     uint32 bytes per token (2 or 4)
    16      8     uint64 number of tokens
    24      40    zeros
    64      ...   tokens

Shards are written atomically (temp file, fsync, rename) and read back as `np.memmap`, so a
training run maps terabytes without reading them into memory.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np

from llamalite.data import DataError

MAGIC = b"LLTOKENS"
VERSION = 1
HEADER_SIZE = 64
_HEADER = struct.Struct("<8sIIQ")
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
UINT16_MAX_VOCAB = 2**16


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
        raise DataError(f"{path} is {actual:,} bytes but its header promises {expected:,} (truncated or corrupt): {fix}")
    return itemsize, n_tokens


def shard_file_size(n_tokens: int, itemsize: int) -> int:
    return HEADER_SIZE + n_tokens * itemsize


def sha256_file(path: str | Path, block_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(block_size):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write a file through `write(f)` so that readers see either the old file or the complete new one."""
    path = Path(path)
    with _temp_file_beside(path) as (f, temp_path):
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp_path, path)
    _fsync_dir(path.parent)


@contextmanager
def _temp_file_beside(path: Path) -> Iterator[tuple[BinaryIO, Path]]:
    # Same folder, so that the rename is atomic (one filesystem); mode 0o666 & ~umask like any new file.
    temp_path = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f, temp_path
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
