"""Byte-level BPE tokenizers: train one on the corpus, load GPT-2 / Llama style files, or fetch them from the Hub.

`tokenizer.path` names a local tokenizer.json, a folder with one (or with GPT-2's vocab.json + merges.txt), or,
when no such path exists, a Hugging Face Hub repo id such as `gpt2` or `openai-community/gpt2` (optionally
`@revision`), fetched through huggingface_hub's cache (HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE are honoured).

`Tokenizer` wraps a `tokenizers.Tokenizer` and adds what the rest of llamalite needs: the
end-of-text id that separates documents, the BOS rule, a fingerprint that pins the exact vocabulary, and the
model's (padded) vocabulary size.

The BOS rule is the tokenizer's own: a tokenizer.json whose post-processor puts a token before every text it encodes
(Llama 2 and 3, TinyLlama, Mistral: `add_bos_token: true`) gives `start_ids`, and everything that feeds the model a
text from its start (evaluation contexts, prompts, chat and fine-tuning conversations, prepared documents) begins
with them, as transformers and lm-evaluation-harness do. GPT-2-style tokenizers, and those llamalite trains, add
nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from llamalite.errors import DataError
from llamalite.files import atomic_write_text, sha256_file
from llamalite.records import read_json
from llamalite.text import clean_text
from llamalite.tiktoken_bpe import TiktokenBPE, tiktoken_bpe

if TYPE_CHECKING:  # config imports the model (torch); tokenizer worker processes must stay light
    from llamalite.config import TokenizerConfig

DEFAULT_EOS = "<|endoftext|>"
BYTE_ALPHABET_SIZE = 256
HUB_TOKENIZER_FILE = "tokenizer.json"
HUB_GPT2_FILES = ("vocab.json", "merges.txt")  # the fallback for repos without tokenizer.json
# A Hub repo id ("gpt2", "openai-community/gpt2"), optionally pinned: "gpt2@<branch, tag or commit>".
_HUB_ID = re.compile(r"^(?P<repo>(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_PROBE_TEXT = "a"  # encoded with and without special tokens to find what the post-processor adds
# BPE training costs O(length) per merge for every pre-token a merge touches, so one long run without a space (DNA,
# base64, a minified file) made it quadratic (benchmarks/bpe_long_runs.py; docs/safety.md has the figures). While
# training, such runs are cut into pieces of this many characters (a merge never spans more; production trainers cap
# their pieces alike), which keeps training linear; text whose runs are all shorter trains exactly as before.
TRAINING_PIECE_CHARS = 256

logger = logging.getLogger(__name__)


class Tokenizer:
    """A byte-level BPE tokenizer with a designated end-of-text (document separator) token and a BOS rule.

    `bos_token` names the beginning-of-sequence token a model was trained with where the tokenizer does not put it
    before texts itself (an import's tokenizer_config.json); None: the post-processor's token, else end-of-text."""

    def __init__(self, inner: HFTokenizer, eos_token: str = DEFAULT_EOS, source: str = "tokenizer",
                 bos_token: str | None = None) -> None:
        _check_supported(inner, source)
        eos_id = inner.token_to_id(eos_token)
        if eos_id is None:
            raise DataError(
                f"end-of-text token {eos_token!r} is not in the vocabulary of {source}: "
                f"set tokenizer.eos_token to one of its special tokens ({_special_tokens_hint(inner)})"
            )
        declared_bos_id = inner.token_to_id(bos_token) if bos_token else eos_id
        if declared_bos_id is None:
            raise DataError(
                f"beginning-of-sequence token {bos_token!r} is not in the vocabulary of {source}: "
                f"set tokenizer.bos_token to one of its special tokens ({_special_tokens_hint(inner)}), or to null"
            )
        self._start_ids, self._end_ids = _ids_added_around_text(inner)
        self._declared_bos = bos_token
        # Text is text: a document that happens to contain "<|endoftext|>" must not gain a fake
        # separator (tiktoken's encode_ordinary behaves the same way). Not stored in the JSON.
        inner.encode_special_tokens = True
        self._inner = inner
        self._eos_token = eos_token
        self._eos_id = eos_id
        self._bos_id = self._start_ids[0] if self._start_ids else declared_bos_id

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path, eos_token: str = DEFAULT_EOS, bos_token: str | None = None) -> Tokenizer:
        """Load tokenizer.json, a folder holding one, or a folder with GPT-2's vocab.json + merges.txt."""
        path = Path(path)
        if path.is_dir() and (path / "tokenizer.json").is_file():
            path = path / "tokenizer.json"
        if path.is_file():
            tokenizer = cls(_read_tokenizer_json(path), eos_token, source=str(path), bos_token=bos_token)
            if tokenizer._end_ids:
                logger.warning(f"{path} appends {list(tokenizer._end_ids)} to every text it encodes "
                               "(add_eos_token): llamalite honours only the tokens it puts before a text")
            return tokenizer
        if path.is_dir():
            if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
                return cls(_gpt2_style_from_files(path, eos_token), eos_token, source=str(path / "vocab.json"),
                           bos_token=bos_token)
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
        inner.pre_tokenizer = _capped_pieces(pre_tokenizers.ByteLevel(add_prefix_space=False))
        inner.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[eos_token],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        inner.train_from_iterator(texts, trainer)
        inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # encoding never cuts a run
        return cls(inner, eos_token, source="the trained tokenizer")

    @classmethod
    def from_json_str(cls, text: str, eos_token: str = DEFAULT_EOS, bos_token: str | None = None) -> Tokenizer:
        return cls(HFTokenizer.from_str(text), eos_token, bos_token=bos_token)

    def to_json_str(self) -> str:
        return self._json

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled (to a spawned worker) as its JSON: the wrapped tokenizer's own pickle would drop the
        # encode_special_tokens flag set in __init__.
        return Tokenizer.from_json_str, (self._json, self._eos_token, self._declared_bos)

    @functools.cached_property
    def _json(self) -> str:  # the wrapped tokenizer is never changed after __init__
        return self._inner.to_str()

    def save(self, path: str | Path) -> None:
        text = self._inner.to_str(pretty=True)
        atomic_write_text(path, text)

    # -- use ---------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """The ids of `text` alone: for a piece that continues a sequence (a continuation, a chat segment)."""
        with _encoding_errors():
            try:
                return self._inner.encode(text, add_special_tokens=False).ids
            except TypeError:  # a lone surrogate (JSON's "\ud800"), which tokenizers refuses
                return self._inner.encode(_valid_texts([text])[0], add_special_tokens=False).ids

    def encode_sequence(self, text: str) -> list[int]:
        """The ids of `text` as the start of what the model reads: `start_ids` first (the BOS rule); an empty text
        without start ids is the BOS id alone, so a model always has a token to predict from."""
        return self._as_sequence(self.encode(text))

    def encode_sequences(self, texts: list[str]) -> list[list[int]]:
        """encode_sequence() of each text, in one batch (tokenizers' own: building tiktoken's encoding would cost more
        than a few thousand texts take)."""
        with _encoding_errors():
            try:
                encodings = self._inner.encode_batch_fast(texts, add_special_tokens=False)
            except TypeError:  # a lone surrogate, as in encode()
                encodings = self._inner.encode_batch_fast(_valid_texts(texts), add_special_tokens=False)
        return [self._as_sequence(encoding.ids) for encoding in encodings]

    def _as_sequence(self, ids: list[int]) -> list[int]:
        return [*self._start_ids, *ids] or [self._bos_id]

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """encode() of each text as a uint32 array; through tiktoken where it gives the same ids (GPT-2-style
        byte-level BPE), else through tokenizers."""
        if self._tiktoken is not None:
            return self._tiktoken.encode_batch(texts)
        with _encoding_errors():
            encodings = self._inner.encode_batch_fast(texts, add_special_tokens=False)
        return [np.asarray(encoding.ids, dtype=np.uint32) for encoding in encodings]

    @functools.cached_property
    def _tiktoken(self) -> TiktokenBPE | None:
        return tiktoken_bpe(json.loads(self._json), check=self.encode)

    @property
    def batch_encoder(self) -> str:
        """The library behind encode_batch, with its version (for manifests)."""
        from importlib.metadata import version

        name = "tiktoken" if self._tiktoken is not None else "tokenizers"
        return f"{name} {version(name)}"

    def decode(self, ids: Iterable[int]) -> str:
        return self._inner.decode(list(ids), skip_special_tokens=False)

    def token_byte_lengths(self) -> list[int]:
        """UTF-8 bytes each id stands for (0 for special tokens): the denominator of bits per byte."""
        special = {token.content for token in self._inner.get_added_tokens_decoder().values() if token.special}
        vocab = self._inner.get_vocab(with_added_tokens=True)
        byte_level = json.loads(self._json).get("decoder", {}) or {}
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
    def start_ids(self) -> tuple[int, ...]:
        """What the tokenizer puts before every text (its BOS where `add_bos_token` is true; usually nothing)."""
        return self._start_ids

    @property
    def prepends_bos(self) -> bool:
        return bool(self._start_ids)

    @property
    def bos_id(self) -> int:
        """The beginning-of-sequence id: the one put before texts, else the declared BOS, else end-of-text."""
        return self._bos_id

    @property
    def bos_token(self) -> str:
        return self._inner.id_to_token(self._bos_id)

    def bos_record(self) -> dict[str, object]:
        """The BOS rule as checkpoints record it (trainer_state.json `bos`), for people and tools reading them."""
        return {"token": self.bos_token, "id": self._bos_id, "prepended": self.prepends_bos}

    @property
    def eos_token(self) -> str:
        return self._eos_token

    @property
    def size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self._inner.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of the canonical JSON: equal fingerprints mean identical tokenization."""
        canonical = json.dumps(json.loads(self._json), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def padded_vocab_size(self, multiple: int) -> int:
        """The model's vocabulary: `size` rounded up to a multiple (64 keeps matmuls fast)."""
        if multiple <= 1:
            return self.size
        return -(-self.size // multiple) * multiple

    def __repr__(self) -> str:
        return (f"Tokenizer(size={self.size}, eos={self._eos_token!r}:{self._eos_id}, "
                f"bos={self.bos_token!r}:{self._bos_id}{' prepended' if self.prepends_bos else ''}, "
                f"fingerprint={self.fingerprint[:12]})")


def build_tokenizer(
    cfg: TokenizerConfig, texts_factory: Callable[[], Iterable[str]], source: TokenizerSource | None = None
) -> Tokenizer:
    """Load `cfg.path` (a local path or a Hub repo id; `source` when already resolved), otherwise train a BPE of
    `cfg.vocab_size` on `texts_factory()`."""
    if cfg.path:
        return Tokenizer.load((source or resolve_tokenizer_path(cfg.path)).path, cfg.eos_token, cfg.bos_token)
    return Tokenizer.train(texts_factory(), cfg.vocab_size, cfg.eos_token)


# -- tokenizer.path: a local path or a Hugging Face Hub repo ---------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenizerSource:
    """Where tokenizer.path leads: a local file or folder, or files fetched from a Hub repo into the HF cache."""

    path: Path  # what Tokenizer.load reads
    repo_id: str | None = None  # set when the files came from the Hub
    revision: str | None = None  # the commit they were fetched at (None when the cache layout does not say)
    files: tuple[Path, ...] = ()  # the fetched files

    def hub_record(self) -> dict[str, object] | None:
        """What pins a Hub tokenizer (repo, commit, sha256 of each file); None for a local path."""
        if self.repo_id is None:
            return None
        return {"repo_id": self.repo_id, "revision": self.revision,
                "sha256": {path.name: sha256_file(path) for path in self.files}}


def hub_repo_id(path: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `path` reads as a Hub repo id, e.g. gpt2 or openai-community/gpt2@main."""
    match = _HUB_ID.match(path)
    if match is None or ".." in path or "--" in match["repo"] or match["repo"].endswith((".json", ".txt")):
        return None
    return match["repo"], match["revision"]


def resolve_tokenizer_path(path: str) -> TokenizerSource:
    """An existing local path as it is; otherwise a Hub repo id, fetched (or found in the HF cache)."""
    local = Path(path).expanduser()
    if local.exists():
        return TokenizerSource(local)
    repo = hub_repo_id(path)
    if repo is None:
        raise DataError(f"tokenizer not found: {path} (set tokenizer.path to an existing file or folder, "
                        "a Hugging Face Hub repo id such as gpt2, or unset it to train one)")
    return fetch_hub_tokenizer(*repo, given=path)


def fetch_hub_tokenizer(repo_id: str, revision: str | None, given: str) -> TokenizerSource:
    """tokenizer.json of a Hub repo, else its vocab.json + merges.txt, through huggingface_hub's cache."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError:
        raise _hub_error(given, repo_id, revision, "the huggingface_hub package is not installed (pip install "
                         "huggingface_hub)") from None

    def fetch(names: tuple[str, ...], cache_only: bool = False) -> tuple[Path, ...]:
        return tuple(Path(hf_hub_download(repo_id, name, revision=revision, local_files_only=cache_only))
                     for name in names)

    try:
        try:
            files = fetch((HUB_TOKENIZER_FILE,))
        except EntryNotFoundError as missing:
            # Not in the repo, or (offline, no network) not in the cache: GPT-2-style files may be. Without a
            # network only the cache is searched, so the hub client's retries are not waited out twice more.
            offline = isinstance(missing, LocalEntryNotFoundError)
            try:
                files = fetch(HUB_GPT2_FILES, cache_only=offline)
            except EntryNotFoundError:
                raise missing from None
    except Exception as exc:  # the hub client raises HTTP, network, validation and cache errors alike
        raise _hub_error(given, repo_id, revision, _hub_failure_reason(exc, revision)) from None
    folder = files[0].parent
    commit = folder.name if _COMMIT.match(folder.name) else None
    path = files[0] if len(files) == 1 else folder
    return TokenizerSource(path, repo_id=repo_id, revision=commit, files=files)


def _hub_failure_reason(exc: Exception, revision: str | None) -> str:
    from huggingface_hub import constants
    from huggingface_hub.utils import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, LocalEntryNotFoundError):
        cache = constants.HF_HUB_CACHE
        if constants.HF_HUB_OFFLINE:
            return f"HF_HUB_OFFLINE is set and it is not in the Hugging Face cache {cache}"
        return f"the Hub cannot be reached and it is not in the Hugging Face cache {cache}"
    if isinstance(exc, RepositoryNotFoundError):
        return "the Hub has no such repo, or it is private or gated"
    if isinstance(exc, RevisionNotFoundError):
        return f"the repo has no revision {revision!r}"
    if isinstance(exc, EntryNotFoundError):
        return f"the repo holds neither {HUB_TOKENIZER_FILE} nor {' + '.join(HUB_GPT2_FILES)}"
    first_line = (str(exc).splitlines() or [""])[0].strip()
    return f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__


def _hub_error(given: str, repo_id: str, revision: str | None, reason: str) -> DataError:
    folder = f"tokenizers/{repo_id.split('/')[-1]}"
    pinned = f" --revision {revision}" if revision else ""
    return DataError(
        f"tokenizer.path={given!r} is not a local file or folder, and the Hugging Face Hub tokenizer {repo_id!r} "
        f"cannot be fetched ({reason}): download it where there is internet (`hf download {repo_id} "
        f"{HUB_TOKENIZER_FILE}{pinned} --local-dir {folder}`) and set tokenizer.path to that folder, or to a folder "
        f"with {' + '.join(HUB_GPT2_FILES)}"
    )


def _capped_pieces(pre_tokenizer: Any) -> Any:
    """`pre_tokenizer` after runs of more than TRAINING_PIECE_CHARS non-space characters are cut into such pieces."""
    long_run = Regex(rf"\S{{{TRAINING_PIECE_CHARS}}}")
    return pre_tokenizers.Sequence([pre_tokenizers.Split(long_run, behavior="isolated"), pre_tokenizer])


SUPPORTED_MODELS = ("BPE",)  # byte-level BPE (GPT-2, Llama 3) and BPE with byte fallback (Llama 2, Mistral)


def _check_supported(inner: HFTokenizer, source: str) -> None:
    """Refuse, in one line at load, a tokenizer llamalite cannot use: another model than BPE (Unigram, WordPiece,
    WordLevel), or one whose unknown token is missing from its vocabulary (tokenizers fails on the first text)."""
    model = inner.model
    kind = type(model).__name__
    if kind not in SUPPORTED_MODELS:
        raise DataError(f"{source} is a {kind} tokenizer; llamalite reads BPE tokenizers (byte-level, as GPT-2 and "
                        "Llama 3, or with byte fallback, as Llama 2): point tokenizer.path at one, or unset it to "
                        "train one")
    unk = model.unk_token
    if unk is not None and inner.token_to_id(unk) is None:
        raise DataError(f"{source} names the unknown token {unk!r}, which is not in its vocabulary: add it to the "
                        "vocabulary or set model.unk_token to null")


@contextlib.contextmanager
def _encoding_errors() -> Iterator[None]:
    # tokenizers raises a bare Exception for what its model cannot encode; anything else is a bug and keeps its type.
    try:
        yield
    except Exception as exc:
        if type(exc) is not Exception:
            raise
        reason = str(exc).splitlines()[0][:160] if str(exc) else "no reason given"
        raise DataError(f"the tokenizer cannot encode this text ({reason}): use a tokenizer whose vocabulary covers "
                        "every byte (byte-level BPE, or byte fallback)") from None


def _read_tokenizer_json(path: Path) -> HFTokenizer:
    try:
        return HFTokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception with the serde message
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise DataError(f"{path} is not a valid tokenizer.json ({reason}): "
                        "point tokenizer.path at a Hugging Face tokenizer.json") from None


def _gpt2_style_from_files(folder: Path, eos_token: str) -> HFTokenizer:
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    fix = "point tokenizer.path at a folder with GPT-2's vocab.json + merges.txt, or at a tokenizer.json"
    if eos_token not in read_json(vocab_file, "the vocabulary", fix):
        raise DataError(
            f"end-of-text token {eos_token!r} is not in {vocab_file}: "
            "set tokenizer.eos_token to the vocabulary's separator"
        )
    try:
        inner = HFTokenizer(models.BPE.from_file(str(vocab_file), str(merges_file)))
    except Exception as exc:  # tokenizers raises a bare Exception naming what it could not parse
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise DataError(f"{vocab_file} + {merges_file} are not a BPE vocabulary ({reason}): {fix}") from None
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    # As a special token it is matched whole instead of being split by BPE; its id is the vocab's (50256 in GPT-2).
    inner.add_special_tokens([eos_token])
    return inner


def _ids_added_around_text(inner: HFTokenizer) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(ids before, ids after) a text that the tokenizer's post-processor adds when special tokens are asked for."""
    plain = inner.encode(_PROBE_TEXT, add_special_tokens=False).ids
    full = inner.encode(_PROBE_TEXT, add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return tuple(full[:start]), tuple(full[start + len(plain):])
    return (), ()


def _special_tokens_hint(inner: HFTokenizer) -> str:
    specials = [token.content for token in inner.get_added_tokens_decoder().values() if token.special]
    return ", ".join(repr(s) for s in specials[:5]) or "it has none"


def _valid_texts(texts: list[str]) -> list[str]:
    """Texts whose lone surrogates are U+FFFD (llamalite/text.py's rule); what is not a str is left to fail."""
    return [clean_text(text, "text to tokenize") if isinstance(text, str) else text for text in texts]
