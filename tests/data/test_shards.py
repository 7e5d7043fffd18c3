from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from llamalite.config import SourceConfig
from llamalite.data.prepare import prepare
from llamalite.data.shards import HEADER_SIZE, read_shard, token_dtype, write_shard
from llamalite.errors import DataError
from llamalite.files import sha256_file


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_write_read_round_trip(tmp_path: Path, dtype: type) -> None:
    tokens = np.array([0, 1, 2, np.iinfo(dtype).max, 12345], dtype=dtype)
    path = tmp_path / "shard.bin"
    digest = write_shard(path, tokens)
    loaded = read_shard(path)
    assert isinstance(loaded, np.memmap)
    assert loaded.dtype.itemsize == np.dtype(dtype).itemsize
    np.testing.assert_array_equal(loaded, tokens)
    assert digest == sha256_file(path)
    assert path.stat().st_size == HEADER_SIZE + tokens.nbytes
    assert [p.name for p in tmp_path.iterdir()] == ["shard.bin"]  # no temp file left behind


def test_header_layout(tmp_path: Path) -> None:
    write_shard(tmp_path / "s.bin", np.arange(7, dtype=np.uint32))
    raw = (tmp_path / "s.bin").read_bytes()
    assert raw[:8] == b"LLTOKENS"
    assert struct.unpack_from("<IIQ", raw, 8) == (1, 4, 7)
    assert raw[24:64] == bytes(40)
    assert np.frombuffer(raw[64:], dtype="<u4").tolist() == list(range(7))


def test_empty_shard_round_trips(tmp_path: Path) -> None:
    write_shard(tmp_path / "s.bin", np.empty(0, dtype=np.uint16))
    assert len(read_shard(tmp_path / "s.bin")) == 0


def test_write_rejects_signed_or_wide_dtypes(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_shard(tmp_path / "s.bin", np.arange(4, dtype=np.int64))


def _valid_shard(tmp_path: Path) -> Path:
    path = tmp_path / "train_000000.bin"
    write_shard(path, np.arange(100, dtype=np.uint16))
    return path


def test_truncated_shard_is_detected(tmp_path: Path) -> None:
    path = _valid_shard(tmp_path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"train_000000\.bin.*truncated"):
        read_shard(path)


def test_truncated_header_is_detected(tmp_path: Path) -> None:
    path = _valid_shard(tmp_path)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(DataError, match=r"train_000000\.bin is not a llamalite token shard"):
        read_shard(path)


@pytest.mark.parametrize(
    "offset, value, message",
    [
        (0, b"NOTTOKEN", "not a llamalite token shard"),
        (8, struct.pack("<I", 9), "version 9"),
        (12, struct.pack("<I", 3), "3 bytes per token"),
    ],
)
def test_corrupted_header_is_detected(tmp_path: Path, offset: int, value: bytes, message: str) -> None:
    path = _valid_shard(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(value)] = value
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=message):
        read_shard(path)


def test_missing_shard_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="shard not found"):
        read_shard(tmp_path / "nope.bin")


def test_token_dtype() -> None:
    assert token_dtype(50304) is np.uint16
    assert token_dtype(65536) is np.uint16
    assert token_dtype(65537) is np.uint32
    assert token_dtype(128256, "uint32") is np.uint32
    assert token_dtype(1000, "uint32") is np.uint32
    with pytest.raises(DataError, match="cannot hold a vocabulary of 128,256"):
        token_dtype(128256, "uint16")
    with pytest.raises(DataError, match="not a token dtype"):
        token_dtype(1000, "int8")


def test_manifest_checksums_match_the_files(text_folder: Path, make_config) -> None:
    config = make_config([SourceConfig(type="text", path=str(text_folder))], shard_tokens=1000)
    manifest = prepare(config)
    out_dir = Path(config.data.out_dir)
    shards = manifest["splits"]["train"]["shards"] + manifest["splits"]["val"]["shards"]
    assert len(manifest["splits"]["train"]["shards"]) > 1
    for shard in shards:
        assert sha256_file(out_dir / shard["file"]) == shard["sha256"]
        assert len(read_shard(out_dir / shard["file"])) == shard["tokens"]
