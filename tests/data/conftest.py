"""Small synthetic corpora and configs for the data pipeline tests."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

from llamalite.config import Config, DataConfig, SourceConfig, TokenizerConfig

WORDS = (
    "the a of and to in is was he she it they cat dog river stone light night sea king queen über café naïve 東京 ♥"
).split()


def synthetic_documents(count: int, seed: int = 0, words: int = 40) -> list[str]:
    """Distinct pseudo-sentences (a numbered prefix keeps every document unique)."""
    rng = random.Random(seed)
    return [f"doc {seed}-{i}: " + " ".join(rng.choice(WORDS) for _ in range(words)) + "." for i in range(count)]


@pytest.fixture
def make_documents() -> Callable[..., list[str]]:
    return synthetic_documents


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Config]:
    """A config with a small trained tokenizer, in-process tokenization and out_dir under tmp_path."""

    def make(sources: list[SourceConfig], **data_overrides) -> Config:
        out_dir = str(tmp_path / "prepared")
        data = DataConfig(sources=sources, out_dir=out_dir, val_fraction=0.2, num_workers=1, shard_tokens=4096)
        for key, value in data_overrides.items():
            setattr(data, key, value)
        return Config(data=data, tokenizer=TokenizerConfig(vocab_size=320))

    return make


@pytest.fixture
def text_folder(tmp_path: Path) -> Path:
    """A folder of 60 .txt files, one document each."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, text in enumerate(synthetic_documents(60)):
        (folder / f"{i:03d}.txt").write_text(text, encoding="utf-8")
    return folder
