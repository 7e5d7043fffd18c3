"""GPT-2-style byte-level BPE through tiktoken: the ids of `tokenizers`, several times faster.

The paper's data script encoded FineWeb-Edu with tiktoken. Its encoding is built here from the tokenizer's own
vocabulary and merges (tokenizer.json, or GPT-2's vocab.json + merges.txt read into one): nothing is downloaded.

tiktoken merges the adjacent pair whose merged bytes have the lowest rank; `tokenizers` merges the pair whose merge
rule comes first. Ranks here follow the merge list, so the two agree on a vocabulary that BPE training produced:
every multi-byte token made by exactly one merge, as in GPT-2's and in those llamalite trains. Only the plain layout
is taken (a BPE model with GPT-2's ByteLevel pre-tokenizer, no normalizer, no dropout, special tokens that are never
matched in text: llamalite encodes their text as text), and the encoding is checked on a probe text against
`tokenizers` when it is built; anything else keeps `tokenizers`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# GPT-2's pre-tokenization regex, which `tokenizers`' ByteLevel(use_regex=True) applies too.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Text that exercises the regex and byte-level corner cases: contractions, digits, runs of spaces and newlines,
# punctuation, accents, CJK, emoji (multi-codepoint), control bytes and the text of a special token.
PROBE = ("Hello, world! It's 2024; they'll've  done   it.\n\n\tTabs\r\n  trailing   \n"
         "Café naïve façade Zürich — «quotes» ¿qué? Ελληνικά हिन्दी עברית 東京タワー 北京是中国的首都。 "
         "😀🚀 👩‍👩‍👧 family \x00\x01\x7f <|endoftext|> 1234567890 3.14159 e=mc^2 #hash @at $5 100%")


@lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level characters -> the byte each stands for (printable bytes are themselves, the rest shifted
    past 255)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + shifted)] = byte
            shifted += 1
    return chars


class TiktokenBPE:
    """A tiktoken encoding of a byte-level BPE vocabulary, giving that vocabulary's ids."""

    def __init__(self, encoding: Any, rank_to_id: list[int]) -> None:
        self._encoding = encoding
        self._identity = all(rank == index for rank, index in enumerate(rank_to_id))
        self._rank_to_id = np.asarray(rank_to_id, dtype=np.uint32)

    def encode_array(self, text: str) -> np.ndarray:
        """The ids of `text` as uint32. (encode_ordinary and a conversion: tiktoken 0.14's encode_to_numpy, through
        its special-token path, took 1.5x as long on prepare's documents.)"""
        ranks = np.array(self._encoding.encode_ordinary(text), dtype=np.uint32)
        return ranks if self._identity else self._rank_to_id[ranks]

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encode in this thread: prepare's worker processes are the parallelism."""
        return [self.encode_array(text) for text in texts]


def tiktoken_bpe(tokenizer_json: dict[str, Any], check: Any = None) -> TiktokenBPE | None:
    """The tiktoken form of a tokenizer.json, or None when its layout is not plain byte-level BPE, tiktoken is not
    installed, or the probe text encodes differently. `check(text) -> ids` is the reference encoder."""
    if not is_plain_byte_level_bpe(tokenizer_json):
        return None
    try:
        import tiktoken
    except ImportError:
        return None
    added = {token["content"] for token in tokenizer_json.get("added_tokens") or []}
    ranks = merge_ranks(tokenizer_json["model"], added)
    if ranks is None:
        return None
    mergeable, rank_to_id = ranks
    encoding = tiktoken.Encoding("llamalite-byte-level-bpe", pat_str=GPT2_PATTERN, mergeable_ranks=mergeable,
                                 special_tokens={})
    fast = TiktokenBPE(encoding, rank_to_id)
    if check is not None and fast.encode(PROBE) != check(PROBE):
        logger.warning("tiktoken's encoding of this vocabulary differs from tokenizers' on the probe text: "
                       "tokenizing with tokenizers")
        return None
    return fast


def is_plain_byte_level_bpe(tokenizer_json: dict[str, Any]) -> bool:
    model, pre = tokenizer_json.get("model") or {}, tokenizer_json.get("pre_tokenizer") or {}
    return (model.get("type") == "BPE" and not model.get("dropout") and not model.get("continuing_subword_prefix")
            and not model.get("end_of_word_suffix") and not model.get("byte_fallback")
            and not model.get("ignore_merges") and tokenizer_json.get("normalizer") is None
            and pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")
            and all(token.get("special") for token in tokenizer_json.get("added_tokens") or []))


def merge_ranks(model: dict[str, Any], special: set[str]) -> tuple[dict[bytes, int], list[int]] | None:
    """(bytes -> rank, rank -> vocabulary id): the 256 bytes first (in id order), then each merge's product in merge
    order. None when a vocabulary token (other than the `special` ones) is not a byte, not made by a merge, or made by
    two."""
    alphabet = byte_level_alphabet()
    vocab: dict[str, int] = model["vocab"]
    ordinary = {token: index for token, index in vocab.items() if token not in special}
    if not set("".join(ordinary)) <= alphabet.keys():
        return None
    to_latin1 = str.maketrans({char: chr(byte) for char, byte in alphabet.items()})

    def spelled(token: str) -> bytes:  # the bytes a byte-level token stands for
        return token.translate(to_latin1).encode("latin-1")

    single = sorted((index, char) for char, index in ordinary.items() if len(char) == 1)
    if len(single) != 256:
        return None
    mergeable = {spelled(char): rank for rank, (_, char) in enumerate(single)}
    rank_to_id = [index for index, _ in single]  # ranks = ids where the vocabulary allows (GPT-2's does)
    for merge in model["merges"]:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        product = left + right
        index = ordinary.get(product)
        key = spelled(product)
        if index is None or key in mergeable:
            return None
        mergeable[key] = len(rank_to_id)
        rank_to_id.append(index)
    if len(rank_to_id) != len(ordinary):  # a token no merge makes
        return None
    return mergeable, rank_to_id
