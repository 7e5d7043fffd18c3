"""Models whose tokenizer puts a BOS token before every text (`add_bos_token: true`), in two real layouts:

- "llama3": byte-level BPE (GPT-2's vocabulary and merges) plus a `<|begin_of_text|>` BOS, as Llama 3 does;
- "tinyllama": a SentencePiece-style BPE (Metaspace, byte fallback, `<unk>` `<s>` `</s>` at ids 0-2) with `<s>`
  before every text, laid out as Llama 2 / TinyLlama's tokenizer.json and tokenizer_config.json.

`bos_transformers_folder` writes a transformers folder with random weights (the way a user downloads one);
`import_hf` turns it into a llamalite checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from tests.conftest import SHARED_DATA

GPT2_DIR = SHARED_DATA / "tokenizers" / "gpt2"
STYLES = ("llama3", "tinyllama")
LLAMA3_BOS = "<|begin_of_text|>"


def add_bos_rule(inner: HFTokenizer, bos_token: str) -> HFTokenizer:
    """`bos_token` added as a special token (if new) and put before every text by the post-processor, as
    transformers' update_post_processor does for add_bos_token=True (a byte-level tokenizer keeps its ByteLevel
    post-processor in front)."""
    inner.add_special_tokens([bos_token])
    bos = processors.TemplateProcessing(single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B",
                                        special_tokens=[(bos_token, inner.token_to_id(bos_token))])
    byte_level = isinstance(inner.pre_tokenizer, pre_tokenizers.ByteLevel)
    inner.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), bos]) if byte_level else bos
    return inner


def llama3_style_tokenizer() -> tuple[HFTokenizer, dict[str, str]]:
    """GPT-2's byte-level BPE with `<|begin_of_text|>` added after it and put before every text."""
    vocab = json.loads((GPT2_DIR / "vocab.json").read_text())
    inner = HFTokenizer(models.BPE.from_file(str(GPT2_DIR / "vocab.json"), str(GPT2_DIR / "merges.txt")))
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    inner.add_special_tokens(["<|endoftext|>"])
    add_bos_rule(inner, LLAMA3_BOS)
    assert inner.token_to_id(LLAMA3_BOS) == len(vocab)
    return inner, {"bos_token": LLAMA3_BOS, "eos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"}


def tinyllama_style_tokenizer(vocab_size: int = 2000) -> tuple[HFTokenizer, dict[str, str]]:
    """A SentencePiece-style BPE trained on WikiText-2, in Llama 2's layout: <unk> <s> </s>, the 256 byte tokens
    <0x00>..<0xFF>, then the merges; Metaspace with a prepended "▁"; `<s>` before every text."""
    specials = ["<unk>", "<s>", "</s>"]
    trainer_model = HFTokenizer(models.BPE(unk_token="<unk>"))
    # Trained on words, as SentencePiece does (no piece spans a space); used unsplit, as Llama 2 does.
    trainer_model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    lines = (SHARED_DATA / "corpus" / "wikitext2_valid.txt").read_text(encoding="utf-8").splitlines()
    trainer_model.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=specials,
                                                                 show_progress=False))
    trained = json.loads(trainer_model.to_str())["model"]
    vocab = {token: index for index, token in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for token in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    inner = HFTokenizer(models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    inner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    inner.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                       decoders.Strip(" ", 1, 0)])
    inner.add_special_tokens(specials)
    add_bos_rule(inner, "<s>")
    return inner, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "tokenizer_class": "LlamaTokenizer",
                   "legacy": False}


def small_bpe_with_bos(texts: list[str], vocab_size: int = 300) -> tuple[HFTokenizer, dict[str, str]]:
    """A byte-level BPE trained on `texts` (no shared data needed) with `<s>` put before every text."""
    from llamalite.tokenizer import Tokenizer

    inner = HFTokenizer.from_str(Tokenizer.train(texts, vocab_size).to_json_str())
    return add_bos_rule(inner, "<s>"), {"bos_token": "<s>", "eos_token": "<|endoftext|>",
                                        "tokenizer_class": "PreTrainedTokenizerFast"}


def bos_transformers_folder(out_dir: Path, style: str | tuple[HFTokenizer, dict[str, str]], max_seq_len: int = 192,
                            seed: int = 0) -> Path:
    """A LlamaForCausalLM with random weights (init std 0.3: O(1) logits, so choices score apart) and a tokenizer of
    `style` (or a given (tokenizer, tokenizer_config entries)) that adds its BOS, saved as transformers saves one."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if isinstance(style, tuple):
        inner, declared = style
    else:
        inner, declared = llama3_style_tokenizer() if style == "llama3" else tinyllama_style_tokenizer()
    bos_id, eos_id = inner.token_to_id(declared["bos_token"]), inner.token_to_id(declared["eos_token"])
    vocab_size = -(-inner.get_vocab_size(with_added_tokens=True) // 64) * 64
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_seq_len,
                         initializer_range=0.3, bos_token_id=bos_id, eos_token_id=eos_id, tie_word_embeddings=False)
    LlamaForCausalLM(config).eval().save_pretrained(out_dir)
    inner.save(str(out_dir / "tokenizer.json"))
    tokenizer_config = {**declared, "add_bos_token": True, "add_eos_token": False, "model_max_length": max_seq_len,
                        "clean_up_tokenization_spaces": False}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return out_dir
