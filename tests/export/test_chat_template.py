"""A fine-tuned model's export carries its training chat template: transformers' apply_chat_template gives the
token ids of llamalite's SFT data pipeline, with the BOS first where the tokenizer puts one before every text."""

import json

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer

from llamalite.checkpoint.format import save_checkpoint
from llamalite.config import Config, DataConfig
from llamalite.data.sft import encode_conversation, encode_prompt, get_template
from llamalite.export.hf import export_checkpoint
from llamalite.model.llama import Llama, ModelConfig
from llamalite.tokenizer import Tokenizer
from tests.bos_models import add_bos_rule

transformers = pytest.importorskip("transformers")

SENTENCES = ["the king and the queen speak of love and war", "a fair lady walks at night under the crown of stars",
             "USER: ASSISTANT: good lord, the sword is heavy", "<|im_start|>user\ncome now<|im_end|>\n"]
CONVERSATION = [
    {"role": "system", "content": "You answer in short words."},
    {"role": "user", "content": "who speaks of war?"},
    {"role": "assistant", "content": "the king and the queen"},
    {"role": "user", "content": "and at night?"},
]


@pytest.fixture(scope="module", params=["no BOS", "BOS"])
def tokenizer_dir(tmp_path_factory, request):
    folder = tmp_path_factory.mktemp("data")
    tokenizer = Tokenizer.train(SENTENCES * 10, vocab_size=300)
    if request.param == "BOS":
        tokenizer = Tokenizer.from_json_str(add_bos_rule(HFTokenizer.from_str(tokenizer.to_json_str()), "<s>").to_str())
    tokenizer.save(folder / "tokenizer.json")
    return folder


def export_fine_tuned(tmp_path, tokenizer_dir, template: str):
    """The export of a checkpoint whose config says it was fine-tuned with `template`."""
    tokenizer = Tokenizer.load(tokenizer_dir / "tokenizer.json")
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=tokenizer.padded_vocab_size(64), n_layer=1, d_model=16, n_head=2, n_kv_head=2,
                              ffn_hidden=32, max_seq_len=64))
    config = Config(name="sft", model=model.config, data=DataConfig(out_dir=str(tokenizer_dir)))
    config.sft.base, config.sft.data, config.sft.template = "runs/base", "data.jsonl", template
    state = {"step": 1, "tokens_seen": 64, "tokenizer_fingerprint": tokenizer.fingerprint, "config": config.to_dict()}
    checkpoint = save_checkpoint(tmp_path / "run" / "checkpoints", 1, model, None, state)
    return export_checkpoint(checkpoint, tmp_path / "hf"), tokenizer


@pytest.mark.parametrize("name", ["vicuna_v1.1", "chatml", "plain"])
def test_exported_chat_template_gives_the_ids_of_sft_training(tokenizer_dir, tmp_path, name):
    out, ours = export_fine_tuned(tmp_path, tokenizer_dir, name)
    template = get_template(name)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    for messages in (CONVERSATION, CONVERSATION[1:], CONVERSATION[1:2]):  # with and without a system message
        prompt = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert prompt == encode_prompt(messages, template, ours)
    finished = [*CONVERSATION, {"role": "assistant", "content": "the lady"}]
    trained = theirs.apply_chat_template(finished, tokenize=True, return_dict=False)
    assert trained == encode_conversation(finished, template, ours).ids
    assert trained.count(ours.eos_id) == 2 and trained[-1] == ours.eos_id  # the EOS id after each answer
    if ours.prepends_bos:  # one BOS, first, as the tokenizer puts it before a text; never trained on
        assert trained[0] == ours.bos_id and trained.count(ours.bos_id) == 1
        assert encode_conversation(finished, template, ours).mask[0] is False
        assert json.loads((out / "tokenizer_config.json").read_text())["bos_token"] == "<s>"
    else:
        assert trained[0] != ours.bos_id
