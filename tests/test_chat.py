import io
import json

import pytest
import torch

from llamalite.chat import ChatSession, template_from_state
from llamalite.cli import main
from llamalite.data.sft import encode_prompt, get_template
from llamalite.errors import ConfigError
from llamalite.generate import SamplingOptions
from llamalite.model.llama import Llama, ModelConfig
from llamalite.tokenizer import Tokenizer
from llamalite.train.trainer import Trainer
from tests.conftest import small_config, synthetic_documents

PLAIN = get_template("plain")


def test_template_is_the_fine_tuned_one_else_plain():
    tuned = {"config": {"sft": {"base": "runs/base", "template": "chatml"}}}
    assert template_from_state(tuned) == ("chatml", get_template("chatml"))
    assert template_from_state(tuned, "vicuna_v1.1")[0] == "vicuna_v1.1"  # --template wins
    pretrained = {"config": {"sft": {"template": "vicuna_v1.1"}}}  # every config has the default
    assert template_from_state(pretrained)[0] == "plain"
    assert template_from_state({"config": {}})[0] == "plain"
    with pytest.raises(ConfigError, match="unknown chat template"):
        template_from_state({"config": {}}, "alpaca")


def tiny_session(max_seq_len: int, template: str = "plain", max_new_tokens: int = 4) -> ChatSession:
    tokenizer = Tokenizer.train(synthetic_documents(5), vocab_size=300)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=320, n_layer=1, d_model=32, n_head=4, n_kv_head=2, ffn_hidden=64,
                         max_seq_len=max_seq_len)
    options = SamplingOptions(max_new_tokens=max_new_tokens, temperature=0.0)
    return ChatSession(Llama(config).eval(), tokenizer, get_template(template), options)


def test_the_prompt_is_the_history_encoded_as_in_fine_tuning():
    session = tiny_session(512, "vicuna_v1.1")
    result = session.reply("the king")
    assert result.prompt_tokens == encode_prompt([{"role": "user", "content": "the king"}], session.template,
                                                 session.tokenizer)
    assert "USER:" in session.options.stop and session.tokenizer.eos_token in session.options.stop
    if session.history:
        second = session.reply("the queen")
        assert second.prompt_tokens == encode_prompt(session.history[:-1], session.template, session.tokenizer)
        assert session.tokenizer.eos_id in second.prompt_tokens  # the first answer ended with the EOS id


def test_history_is_kept_and_the_oldest_turns_dropped_at_the_context():
    session = tiny_session(128)
    tokenizer = session.tokenizer
    session.reply("the king")
    second = session.reply("the queen")
    assert [m["role"] for m in session.history] == ["user", "assistant"] * 2
    assert tokenizer.decode(second.prompt_tokens).startswith("the king\n")
    for _ in range(8):
        result = session.reply("speak of war and love, lord")
    prompt = tokenizer.decode(result.prompt_tokens)
    assert len(result.prompt_tokens) + 4 <= 128 and result.prompt_truncated == 0
    assert "the king" not in prompt and prompt.startswith("speak of war")
    assert session.history[0]["role"] == "user" and session.history[-2]["content"] == "speak of war and love, lord"
    session.reset()
    assert session.history == []


@pytest.fixture(scope="module")
def trained_run(corpus_dir, prepared_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("chat") / "run"
    Trainer(small_config(corpus_dir, prepared_dir, run_dir)).fit()
    return run_dir


def test_chat_reads_turns_from_stdin_when_not_a_terminal(trained_run, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("the king\n\n/reset\nthe queen\n/exit\nnever read\n"))
    assert main(["chat", str(trained_run), "--greedy", "--max-new-tokens", "4", "--jsonl"]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [a["user"] for a in answers] == ["the king", "the queen"]

    from llamalite.checkpoint.inference import load_for_inference

    loaded = load_for_inference(trained_run)
    session = ChatSession(loaded.model, loaded.tokenizer, PLAIN, SamplingOptions(max_new_tokens=4, temperature=0.0))
    alone = session.reply("the queen")
    assert answers[1]["assistant"] == alone.text.strip()  # /reset: the second turn saw no history
    assert answers[1]["finish_reason"] == alone.finish_reason

    monkeypatch.setattr("sys.stdin", io.StringIO("the queen\n"))
    assert main(["chat", str(trained_run), "--greedy", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == alone.text.strip() + "\n"

    monkeypatch.setattr("sys.stdin", io.StringIO("the queen\n"))
    assert main(["chat", str(trained_run), "--greedy", "--max-new-tokens", "4", "--compile"]) == 0
    assert capsys.readouterr().out == alone.text.strip() + "\n"  # the compiled step answers the same


def test_interactive_chat_streams_answers_and_obeys_commands(trained_run, monkeypatch):
    from llamalite.chat import run_chat
    from llamalite.checkpoint.inference import load_for_inference

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    lines = iter(["the king", "/reset", "the queen", "/exit", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    out = io.StringIO()
    run_chat(load_for_inference(trained_run), None, SamplingOptions(max_new_tokens=4, temperature=0.0),
             stdin=Terminal(), stdout=out)
    text = out.getvalue()
    assert text.startswith("chatting with") and "template plain" in text
    assert text.count("assistant> ") == 2 and "(history cleared)" in text
