"""Byte-level BPE tokenizers: train one on the corpus, or load GPT-2 / Llama style files.

`Tokenizer` wraps a `tokenizers.Tokenizer` and adds what the rest of llamalite needs: the
end-of-text id that separates documents, a fingerprint that pins the exact vocabulary, and the
model's (padded) vocabulary size.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from llamalite.errors import DataError
from llamalite.files import atomic_write_text

if TYPE_CHECKING:  # config imports the model (torch); tokenizer worker processes must stay light
    from llamalite.config import TokenizerConfig

DEFAULT_EOS = "<|endoftext|>"
BYTE_ALPHABET_SIZE = 256


class Tokenizer:
    """A byte-level BPE tokenizer with a designated end-of-text (document separator) token."""

    def __init__(self, inner: HFTokenizer, eos_token: str = DEFAULT_EOS, source: str = "tokenizer") -> None:
        eos_id = inner.token_to_id(eos_token)
        if eos_id is None:
            raise DataError(
                f"end-of-text token {eos_token!r} is not in the vocabulary of {source}: "
                f"set tokenizer.eos_token to one of its special tokens ({_special_tokens_hint(inner)})"
            )
        # Text is text: a document that happens to contain "<|endoftext|>" must not gain a fake
        # separator (tiktoken's encode_ordinary behaves the same way). Not stored in the JSON.
        inner.encode_special_tokens = True
        self._inner = inner
        self._eos_token = eos_token
        self._eos_id = eos_id

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path, eos_token: str = DEFAULT_EOS) -> Tokenizer:
        """Load tokenizer.json, a folder holding one, or a folder with GPT-2's vocab.json + merges.txt."""
        path = Path(path)
        if path.is_file():
            return cls(_read_tokenizer_json(path), eos_token, source=str(path))
        if path.is_dir():
            if (path / "tokenizer.json").is_file():
                return cls(_read_tokenizer_json(path / "tokenizer.json"), eos_token,
                           source=str(path / "tokenizer.json"))
            if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
                return cls(_gpt2_style_from_files(path, eos_token), eos_token, source=str(path / "vocab.json"))
            raise DataError(
                f"{path} holds neither tokenizer.json nor vocab.json + merges.txt: "
                "point tokenizer.path at a tokenizer.json file or such a folder"
            )
        raise DataError(f"tokenizer not found: {path} "
                        "(set tokenizer.path to an existing file or folder, or unset it to train one)")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, eos_token: str = DEFAULT_EOS) -> Tokenizer:
        """Train a byte-level BPE on `texts`; every byte is in the alphabet, so any UTF-8 text round-trips."""
        if vocab_size <= BYTE_ALPHABET_SIZE:
            raise DataError(
                f"tokenizer.vocab_size={vocab_size} leaves no room for merges: "
                f"set it above {BYTE_ALPHABET_SIZE} (e.g. 4096)"
            )
        inner = HFTokenizer(models.BPE())
        inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        inner.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[eos_token],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        inner.train_from_iterator(texts, trainer)
        return cls(inner, eos_token, source="the trained tokenizer")

    @classmethod
    def from_json_str(cls, text: str, eos_token: str = DEFAULT_EOS) -> Tokenizer:
        return cls(HFTokenizer.from_str(text), eos_token)

    def to_json_str(self) -> str:
        return self._inner.to_str()

    def save(self, path: str | Path) -> None:
        text = self._inner.to_str(pretty=True)
        atomic_write_text(path, text)

    # -- use ---------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self._inner.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        encodings = self._inner.encode_batch_fast(texts, add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self._inner.decode(list(ids), skip_special_tokens=False)

    def token_byte_lengths(self) -> list[int]:
        """UTF-8 bytes each id stands for (0 for special tokens): the denominator of bits per byte."""
        special = {token.content for token in self._inner.get_added_tokens_decoder().values() if token.special}
        vocab = self._inner.get_vocab(with_added_tokens=True)
        byte_level = json.loads(self._inner.to_str()).get("decoder", {}) or {}
        lengths = [0] * self.size
        for token, index in vocab.items():
            if token in special or index >= len(lengths):
                continue
            if byte_level.get("type") == "ByteLevel":
                lengths[index] = len(token)  # byte-level BPE spells each byte as one character
            else:
                lengths[index] = len(self._inner.decode([index], skip_special_tokens=False).encode("utf-8"))
        return lengths

    def token_to_id(self, token: str) -> int | None:
        return self._inner.token_to_id(token)

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def eos_token(self) -> str:
        return self._eos_token

    @property
    def size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self._inner.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> str:
        """sha256 of the canonical JSON: equal fingerprints mean identical tokenization."""
        canonical = json.dumps(json.loads(self._inner.to_str()), sort_keys=True, separators=(",", ":"),
                               ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def padded_vocab_size(self, multiple: int) -> int:
        """The model's vocabulary: `size` rounded up to a multiple (64 keeps matmuls fast)."""
        if multiple <= 1:
            return self.size
        return -(-self.size // multiple) * multiple

    def __repr__(self) -> str:
        return (f"Tokenizer(size={self.size}, eos={self._eos_token!r}:{self._eos_id}, "
                f"fingerprint={self.fingerprint[:12]})")


def build_tokenizer(cfg: TokenizerConfig, texts_factory: Callable[[], Iterable[str]]) -> Tokenizer:
    """Load `cfg.path` when set, otherwise train a BPE of `cfg.vocab_size` on `texts_factory()`."""
    if cfg.path:
        return Tokenizer.load(cfg.path, cfg.eos_token)
    return Tokenizer.train(texts_factory(), cfg.vocab_size, cfg.eos_token)


def _read_tokenizer_json(path: Path) -> HFTokenizer:
    try:
        return HFTokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception with the serde message
        raise DataError(f"{path} is not a valid tokenizer.json ({str(exc).splitlines()[0]}): "
                        "point tokenizer.path at a Hugging Face tokenizer.json") from None


def _gpt2_style_from_files(folder: Path, eos_token: str) -> HFTokenizer:
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    with open(vocab_file, encoding="utf-8") as f:
        if eos_token not in json.load(f):
            raise DataError(
                f"end-of-text token {eos_token!r} is not in {vocab_file}: "
                "set tokenizer.eos_token to the vocabulary's separator"
            )
    inner = HFTokenizer(models.BPE.from_file(str(vocab_file), str(merges_file)))
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    # As a special token it is matched whole instead of being split by BPE; its id is the vocab's (50256 in GPT-2).
    inner.add_special_tokens([eos_token])
    return inner


def _special_tokens_hint(inner: HFTokenizer) -> str:
    specials = [token.content for token in inner.get_added_tokens_decoder().values() if token.special]
    return ", ".join(repr(s) for s in specials[:5]) or "it has none"
