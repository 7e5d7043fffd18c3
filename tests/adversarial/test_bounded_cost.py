"""Issue 28, property 6: BPE training is linear in its input, however the text is laid out.

Training cost grows with the length of every pre-token a merge touches; one long run without a space (DNA, base64,
minified code) made it quadratic. The trainer cuts such runs into pieces of TRAINING_PIECE_CHARS characters."""

from __future__ import annotations

import glob
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from llamalite.tokenizer import TRAINING_PIECE_CHARS, Tokenizer, _capped_pieces

from ..conftest import synthetic_documents
from .conftest import fails_after


def test_a_two_megabyte_run_without_spaces_trains_in_linear_time():
    rng = random.Random(0)
    dna = "".join(rng.choice("ACGT") for _ in range(2_000_000))  # quadratic before: 200k letters took 13 s
    with fails_after(60):
        tokenizer = Tokenizer.train([dna, "some ordinary text between the runs"], vocab_size=512)
    assert tokenizer.size == 512
    assert tokenizer.decode(tokenizer.encode(dna[:5000])) == dna[:5000]  # encoding never cuts a run


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.sampled_from("ACGT xy\n\t.é"), max_size=3 * TRAINING_PIECE_CHARS),
       st.integers(min_value=1, max_value=4 * TRAINING_PIECE_CHARS))
def test_training_pieces_are_bounded_and_lose_no_character(text, run_length):
    text = text + "G" * run_length + text
    capped = _capped_pieces(pre_tokenizers.ByteLevel(add_prefix_space=False)).pre_tokenize_str(text)
    plain = pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(text)
    assert "".join(piece for piece, _ in capped) == "".join(piece for piece, _ in plain)  # the same bytes, only cut
    spans = [text[start:end] for _, (start, end) in capped]
    assert all(sum(not char.isspace() for char in span) <= TRAINING_PIECE_CHARS for span in spans)


def train_uncapped(texts: list[str], vocab_size: int) -> str:
    inner = HFTokenizer(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    inner.train_from_iterator(texts, trainer)
    return inner.to_str()


@pytest.mark.parametrize("seed", [0, 1])
def test_text_without_long_runs_trains_exactly_as_before(seed):
    texts = synthetic_documents(30, seed=seed)
    capped = Tokenizer.train(texts, vocab_size=400)
    assert capped.to_json_str() == train_uncapped(texts, 400)


@settings(max_examples=40, deadline=None)
@given(names=st.lists(st.from_regex(r"\.?[a-z]{1,3}(/[a-z]{1,3}){0,2}\.(txt|md)", fullmatch=True), min_size=1,
                      max_size=8),
       pattern=st.sampled_from(["src/**/*.txt", "src/**", "src/*", "src/*/*.md", "src/**/.*", "src/?*.txt"]))
def test_a_glob_source_matches_what_glob_matches(tmp_path_factory, names, pattern):
    from llamalite.data.sources import _glob_files

    root = tmp_path_factory.mktemp("glob")
    for name in names:
        (root / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "src" / name).write_text("x")
    pattern = str(root / pattern)
    expected = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    assert _glob_files(pattern) == expected


@pytest.mark.parametrize("links", [1, 2, 3])
def test_a_glob_over_folders_linked_to_themselves_ends(tmp_path, links):
    from llamalite.data.sources import _glob_files

    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    for i in range(3):
        (docs / f"{i}.txt").write_text("x")
    for i in range(links):  # glob.glob's ** follows each link: 2 links took longer than 60 s
        (docs / f"loop{i}").symlink_to(docs if i % 2 else Path(".."), target_is_directory=True)
    with fails_after(20):
        assert [p.name for p in _glob_files(str(docs / "**" / "*.txt"))] == ["0.txt", "1.txt", "2.txt"]
