from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer

from llamalite.config import TokenizerConfig
from llamalite.errors import DataError
from llamalite.tokenizer import Tokenizer, build_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
GPT2_DIR = SHARED_DATA / "tokenizers" / "gpt2"

TRAINING_TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Café, naïve, façade, über, smørrebrød, jalapeño. " * 3,
    "東京は日本の首都です。北京是中国的首都。 " * 3,
    "Emoji: 😀 🚀 🎉 ❤️ 👩‍👩‍👧. " * 3,
] * 5


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    return Tokenizer.train(TRAINING_TEXTS, vocab_size=300, eos_token="<|endoftext|>")


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox.",
        "Ça coûte 5 € à Zürich — naïve façade.",
        "東京タワー と 北京",
        "😀🚀 👩‍👩‍👧 family",
        "never seen in training: Ελληνικά, हिन्दी, עברית, \x00\x01 \t\r\n  spaces",
        "",
    ],
)
def test_trained_tokenizer_round_trips_any_utf8(trained: Tokenizer, text: str) -> None:
    assert trained.decode(trained.encode(text)) == text


def test_trained_tokenizer_has_one_eos_id_and_fits_its_vocab(trained: Tokenizer) -> None:
    assert trained.size <= 300
    assert trained.decode([trained.eos_id]) == "<|endoftext|>"
    assert max(max(ids) for ids in trained.encode_batch(TRAINING_TEXTS)) < trained.size


def test_eos_text_inside_a_document_is_plain_text(trained: Tokenizer) -> None:
    ids = trained.encode("a<|endoftext|>b")
    assert trained.eos_id not in ids
    assert trained.decode(ids) == "a<|endoftext|>b"


def test_encode_batch_matches_encode(trained: Tokenizer) -> None:
    texts = ["hello world", "café 東京", "😀"]
    assert [ids.tolist() for ids in trained.encode_batch(texts)] == [trained.encode(t) for t in texts]


def test_fingerprint_survives_save_load_and_json_transport(trained: Tokenizer, tmp_path: Path) -> None:
    trained.save(tmp_path / "tokenizer.json")
    for loaded in (
        Tokenizer.load(tmp_path / "tokenizer.json"),
        Tokenizer.load(tmp_path),
        Tokenizer.from_json_str(trained.to_json_str()),
    ):
        assert loaded.fingerprint == trained.fingerprint
        assert loaded.eos_id == trained.eos_id
        assert loaded.encode("Café 😀") == trained.encode("Café 😀")


def test_fingerprint_differs_between_vocabularies(trained: Tokenizer) -> None:
    other = Tokenizer.train(TRAINING_TEXTS, vocab_size=280)
    assert other.fingerprint != trained.fingerprint


def test_padded_vocab_size_rounds_up(trained: Tokenizer) -> None:
    assert trained.padded_vocab_size(64) % 64 == 0
    assert 0 <= trained.padded_vocab_size(64) - trained.size < 64
    assert trained.padded_vocab_size(1) == trained.size


def test_train_rejects_a_vocab_without_room_for_merges() -> None:
    with pytest.raises(DataError, match="vocab_size"):
        Tokenizer.train(["abc"], vocab_size=200)


def test_load_errors_are_clear(trained: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="tokenizer not found"):
        Tokenizer.load(tmp_path / "missing.json")
    with pytest.raises(DataError, match="neither tokenizer.json nor vocab.json"):
        Tokenizer.load(tmp_path)
    trained.save(tmp_path / "tokenizer.json")
    with pytest.raises(DataError, match="'<eot>' is not in the vocabulary"):
        Tokenizer.load(tmp_path / "tokenizer.json", eos_token="<eot>")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        Tokenizer.load(tmp_path / "broken.json")


def test_build_tokenizer_loads_a_path_or_trains(trained: Tokenizer, tmp_path: Path) -> None:
    trained.save(tmp_path / "tokenizer.json")
    never_called = lambda: pytest.fail("texts must not be read when a tokenizer path is set")  # noqa: E731
    loaded = build_tokenizer(TokenizerConfig(path=str(tmp_path / "tokenizer.json")), never_called)
    assert loaded.fingerprint == trained.fingerprint
    fresh = build_tokenizer(TokenizerConfig(vocab_size=300), lambda: iter(TRAINING_TEXTS))
    assert fresh.fingerprint == trained.fingerprint  # BPE training is deterministic


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    if not GPT2_DIR.is_dir():
        pytest.skip("../shared/data not present")
    return Tokenizer.load(GPT2_DIR)


def test_gpt2_files_load_with_the_reference_ids(gpt2: Tokenizer) -> None:
    assert gpt2.encode("Hello, I am a language model,") == [15496, 11, 314, 716, 257, 3303, 2746, 11]
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.eos_id == 50256
    assert gpt2.size == 50257
    assert gpt2.padded_vocab_size(64) == 50304
    assert gpt2.decode(gpt2.encode(" naïve 東京 😀")) == " naïve 東京 😀"


def test_gpt2_saved_as_tokenizer_json_is_the_same_tokenizer(gpt2: Tokenizer, tmp_path: Path) -> None:
    gpt2.save(tmp_path / "tokenizer.json")
    reloaded = Tokenizer.load(tmp_path / "tokenizer.json")
    assert reloaded.fingerprint == gpt2.fingerprint
    assert reloaded.eos_id == 50256
    assert reloaded.encode("Hello, I am a language model,") == gpt2.encode("Hello, I am a language model,")


def test_gpt2_style_folder_without_the_eos_token_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "ab": 2}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(DataError, match="not in .*vocab.json"):
        Tokenizer.load(tmp_path)


def with_bos(tokenizer: Tokenizer, bos: str = "<s>", **kwargs) -> Tokenizer:
    from tests.bos_models import add_bos_rule

    inner = add_bos_rule(HFTokenizer.from_str(tokenizer.to_json_str()), bos)
    return Tokenizer.from_json_str(inner.to_str(), tokenizer.eos_token, **kwargs)


def test_bpe_and_gpt2_style_tokenizers_put_nothing_before_a_text(trained: Tokenizer) -> None:
    assert trained.start_ids == () and not trained.prepends_bos
    assert trained.bos_id == trained.eos_id and trained.bos_token == "<|endoftext|>"
    assert trained.encode_sequence("The fox") == trained.encode("The fox")
    assert trained.encode_sequence("") == [trained.eos_id]  # a model always gets a token to predict from


def test_a_tokenizer_that_adds_bos_starts_every_sequence_with_it(trained: Tokenizer, tmp_path: Path) -> None:
    bos = with_bos(trained)
    bos_id = bos.token_to_id("<s>")
    assert bos.start_ids == (bos_id,) and bos.prepends_bos and bos.bos_id == bos_id and bos.bos_token == "<s>"
    assert bos.encode_sequence("The fox") == [bos_id, *trained.encode("The fox")]
    assert bos.encode_sequence("") == [bos_id]
    assert bos.encode("The fox") == trained.encode("The fox")  # pieces that continue a sequence get no BOS
    assert bos.bos_record() == {"token": "<s>", "id": bos_id, "prepended": True}
    bos.save(tmp_path / "tokenizer.json")  # the rule lives in tokenizer.json: it survives save and load
    assert Tokenizer.load(tmp_path / "tokenizer.json").start_ids == (bos_id,)
    assert bos.fingerprint != trained.fingerprint


def test_a_declared_bos_that_is_not_added_is_the_bos_id_alone(trained: Tokenizer) -> None:
    inner = HFTokenizer.from_str(trained.to_json_str())
    inner.add_special_tokens(["<s>"])
    declared = Tokenizer.from_json_str(inner.to_str(), bos_token="<s>")
    assert declared.start_ids == () and declared.bos_id == inner.token_to_id("<s>")
    assert declared.encode_sequence("The fox") == trained.encode("The fox")
    with pytest.raises(DataError, match="beginning-of-sequence token '<bos>' is not in the vocabulary.*bos_token"):
        Tokenizer.from_json_str(trained.to_json_str(), bos_token="<bos>")


def test_a_tokenizer_that_appends_eos_is_warned_about(trained: Tokenizer, tmp_path: Path, caplog) -> None:
    from tokenizers import processors

    inner = HFTokenizer.from_str(trained.to_json_str())
    inner.post_processor = processors.TemplateProcessing(single="$A <|endoftext|>",
                                                         special_tokens=[("<|endoftext|>", trained.eos_id)])
    inner.save(str(tmp_path / "tokenizer.json"))
    with caplog.at_level("WARNING"):
        loaded = Tokenizer.load(tmp_path / "tokenizer.json")
    assert loaded.start_ids == () and "appends" in caplog.text and "add_eos_token" in caplog.text


VARIED_TEXTS = [
    "Hello, world! It's 2024; they'll've  done   it.", "  leading and trailing  ", "\n\n\ttabs\r\n\n   \n",
    "Ça coûte 5 € à Zürich — naïve façade.", "東京タワー と 北京是中国的首都。", "😀🚀 👩‍👩‍👧 family ❤️",
    "never seen: Ελληνικά, हिन्दी, עברית, ไทย, \x00\x01\x7f", "a literal <|endoftext|> stays text<|endoftext|>",
    "<s></s><unk>", "x" * 3000, "1234567890 3.14159 e=mc^2 #hash @at $5 100% 'quoted' \"double\"",
    "don't DON'T it's IT'S we've WE'VE", "", " ", "ǅungla ﬁ ﬂ Å Å", "\u200b\u200d\ufeff zero widths",
]


def assert_tiktoken_gives_tokenizers_ids(tokenizer: Tokenizer, texts: list[str]) -> None:
    assert tokenizer.batch_encoder.startswith("tiktoken ")
    reference = [e.ids for e in tokenizer._inner.encode_batch_fast(texts, add_special_tokens=False)]
    assert [ids.tolist() for ids in tokenizer.encode_batch(texts)] == reference
    assert [tokenizer.encode(text) for text in texts] == reference


def test_trained_bpe_batches_go_through_tiktoken_with_the_same_ids(trained: Tokenizer) -> None:
    assert_tiktoken_gives_tokenizers_ids(trained, VARIED_TEXTS + TRAINING_TEXTS)


def test_gpt2_batches_go_through_tiktoken_with_the_same_ids(gpt2: Tokenizer) -> None:
    corpus = [SHARED_DATA / "corpus" / name for name in ("wikitext2_valid.txt", "tinyshakespeare.txt")]
    paragraphs = [p for path in corpus for p in path.read_text(encoding="utf-8").split("\n\n")][:4000]
    assert_tiktoken_gives_tokenizers_ids(gpt2, VARIED_TEXTS + paragraphs)
    (ids,) = gpt2.encode_batch(["Hello, I am a language model,"])
    assert ids.tolist() == [15496, 11, 314, 716, 257, 3303, 2746, 11]


def test_other_layouts_and_disagreeing_encodings_keep_tokenizers(trained: Tokenizer, caplog) -> None:
    from llamalite.tiktoken_bpe import tiktoken_bpe

    layout = json.loads(trained.to_json_str())
    assert tiktoken_bpe(layout) is not None
    for change in ({"normalizer": {"type": "NFC"}}, {"pre_tokenizer": {"type": "Metaspace"}},
                   {"model": {**layout["model"], "byte_fallback": True}},
                   {"added_tokens": [*layout["added_tokens"], {"content": "king", "special": False}]},
                   {"model": {**layout["model"], "merges": layout["model"]["merges"][:-1]}}):  # a token no merge makes
        assert tiktoken_bpe({**layout, **change}) is None, change
    with caplog.at_level("WARNING"):
        assert tiktoken_bpe(layout, check=lambda text: [0]) is None
    assert "differs from tokenizers'" in caplog.text


def test_a_pickled_tokenizer_keeps_its_rules(trained: Tokenizer) -> None:
    # Spawned worker processes (macOS, Windows) get the tokenizer pickled: special-token text must stay text, and a
    # declared BOS must survive (the wrapped tokenizer's own pickle drops encode_special_tokens).
    import pickle

    inner = HFTokenizer.from_str(trained.to_json_str())
    inner.add_special_tokens(["<s>"])
    declared = Tokenizer.from_json_str(inner.to_str(), bos_token="<s>")
    copy = pickle.loads(pickle.dumps(declared))
    text = "a literal <|endoftext|> and <s> stay text"
    assert copy.encode(text) == declared.encode(text) and trained.eos_id not in copy.encode(text)
    assert copy.bos_id == declared.bos_id == inner.token_to_id("<s>") and copy.fingerprint == declared.fingerprint
