import json

import pytest
import torch

from llamalite.config import ChatTemplate, SFTConfig
from llamalite.data.sft import (
    IGNORE_INDEX,
    Example,
    MalformedRecord,
    SFTLoader,
    build_sft_data,
    check_messages,
    conversation_segments,
    encode_conversation,
    encode_prompt,
    fixed_batches,
    get_template,
    make_rows,
    read_records,
    record_to_messages,
    render_chat,
    stop_strings,
    truncate_example,
)
from llamalite.errors import ConfigError
from llamalite.tokenizer import Tokenizer
from tests.conftest import SHARED_DATA

EOS = "<|endoftext|>"
TEMPLATES = ("vicuna_v1.1", "chatml", "plain")
MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "And another?"},
    {"role": "assistant", "content": "Green, or red."},
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    texts = ["USER: ASSISTANT: name a colour blue green red and another be brief",
             "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n", "the quick brown fox"] * 20
    return Tokenizer.train(texts, vocab_size=400)


def answers_and_prompts(example: Example, tokenizer: Tokenizer) -> tuple[str, str]:
    trained = [t for t, m in zip(example.ids, example.mask) if m]
    untrained = [t for t, m in zip(example.ids, example.mask) if not m]
    return tokenizer.decode(trained), tokenizer.decode(untrained)


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("messages", [MULTI_TURN, MULTI_TURN[1:3]], ids=["multi-turn", "single"])
def test_loss_mask_is_exactly_the_answers_and_their_eos(tokenizer, name, messages):
    template = get_template(name)
    example = encode_conversation(messages, template, tokenizer)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    trained, untrained = answers_and_prompts(example, tokenizer)
    assert trained == "".join(template.assistant_format.replace("{content}", a) + EOS for a in answers)
    assert EOS not in untrained and "Blue" not in untrained
    assert "Name a colour." in untrained and template.assistant_prefix in untrained
    # Each answer ends with the EOS *id* (one token), which is trained on and closes its turn.
    eos_positions = [i for i, t in enumerate(example.ids) if t == tokenizer.eos_id]
    assert eos_positions == [end - 1 for end in example.turn_ends] and len(eos_positions) == len(answers)
    assert all(example.mask[i] for i in eos_positions)
    # The ids spell exactly the template's text, each answer followed by the EOS.
    assert tokenizer.decode(example.ids) == "".join(
        text + (EOS if is_answer else "") for text, is_answer in conversation_segments(messages, template))


def test_vicuna_prompt_is_fastchats_format():
    template = get_template("vicuna_v1.1")
    text = render_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                        {"role": "user", "content": "Who are you?"}], template)
    assert text == ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                    "helpful, detailed, and polite answers to the user's questions. "
                    "USER: Hi ASSISTANT: Hello!<|endoftext|>"
                    "USER: Who are you? ASSISTANT:")
    assert stop_strings(template, EOS) == ["USER:", EOS]
    assert render_chat([{"role": "user", "content": "Q"}], get_template("chatml")) == \
        "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("name", TEMPLATES)
def test_generation_prompt_is_tokenized_as_in_training(tokenizer, name):
    template = get_template(name)
    example = encode_conversation(MULTI_TURN, template, tokenizer)
    second_answer_start = max(i for i, m in enumerate(example.mask) if not m) + 1
    prompt = encode_prompt(MULTI_TURN[:-1], template, tokenizer)
    assert prompt == example.ids[:second_answer_start]


def test_templates_come_from_config_and_unknown_names_are_errors():
    custom = ChatTemplate(user_format="Q: {content}\n", assistant_prefix="A:", assistant_format=" {content}")
    assert get_template("qa", {"qa": custom}) is custom
    replaced = get_template("plain", {"plain": custom})
    assert replaced.user_format == "Q: {content}\n"
    with pytest.raises(ConfigError, match="did you mean 'chatml'"):
        get_template("chatm")


def test_truncation_never_drops_the_eos_of_a_kept_answer(tokenizer):
    template = get_template("plain")
    multi = encode_conversation(MULTI_TURN, template, tokenizer)
    kept, outcome = truncate_example(multi, multi.turn_ends[0] + 2, tokenizer.eos_id)
    assert outcome == "turns" and kept.ids == multi.ids[: multi.turn_ends[0]] and kept.ids[-1] == tokenizer.eos_id
    long_answer = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "blue " * 50}]
    example = encode_conversation(long_answer, template, tokenizer)
    cut, outcome = truncate_example(example, 30, tokenizer.eos_id, min_answer_tokens=4)
    assert outcome == "answer" and len(cut) == 30
    assert cut.ids[-1] == tokenizer.eos_id and cut.mask[-1] and cut.ids[:-1] == example.ids[:29]
    assert cut.mask[:-1] == example.mask[:29]
    prompt_tokens = example.mask.index(True)
    assert truncate_example(example, prompt_tokens + 3, tokenizer.eos_id, min_answer_tokens=4) == (None, "too_long")
    assert truncate_example(example, 30, tokenizer.eos_id, mode="drop") == (None, "too_long")
    assert truncate_example(example, len(example), tokenizer.eos_id) == (example, "kept")


def test_alpaca_and_messages_records():
    assert record_to_messages({"instruction": "Add.", "input": "1 and 2", "output": "3"}) == [
        {"role": "user", "content": "Add.\n\n1 and 2"}, {"role": "assistant", "content": "3"}]
    assert record_to_messages({"instruction": "Say hi.", "input": "", "output": "Hi"})[0]["content"] == "Say hi."
    assert record_to_messages({"messages": MULTI_TURN}) == MULTI_TURN
    with pytest.raises(MalformedRecord, match="alternate"):
        check_messages([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(MalformedRecord, match="end with a user turn"):
        check_messages(MULTI_TURN, for_generation=True)


def test_malformed_records_are_counted_and_reported(tokenizer, tmp_path):
    good = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
    records = [good] * 5 + [
        {"instruction": "Name a colour.", "output": ""},
        {"instruction": "", "output": "Blue."},
        {"instruction": "x", "input": 3, "output": "y"},
        {"messages": [{"role": "assistant", "content": "hi"}]},
        {"text": "neither schema"},
        ["not", "an", "object"],
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "{broken json\n")
    data = build_sft_data(SFTConfig(data=str(path), template="plain", val_fraction=0.0), tokenizer, seq_len=64)
    assert data.stats.records == 12 and data.stats.train == 5
    assert dict(data.stats.malformed) == {
        "missing or empty `output`": 1, "missing or empty `instruction`": 1, "`input` is not a string": 1,
        "roles do not alternate user/assistant after an optional system message": 1,
        "neither `messages` nor Alpaca `instruction`/`output` fields": 1, "record is not a JSON object": 1,
        "invalid JSON line": 1}
    assert "malformed: 7" in data.stats.summary()


def test_validation_split_is_held_out_by_content(tokenizer):
    records = [{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(200)]
    sft = SFTConfig(template="plain", val_fraction=0.2)
    data = build_sft_data(sft, tokenizer, 32, records=records)
    again = build_sft_data(sft, tokenizer, 32, records=list(reversed(records)))
    val_questions = {c[0]["content"] for c in data.val_conversations}
    assert 20 <= len(val_questions) <= 60 and data.stats.train + data.stats.val == 200
    assert val_questions == {c[0]["content"] for c in again.val_conversations}


def synthetic_examples(count: int, seed: int = 0) -> list[Example]:
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(count):
        length = int(torch.randint(4, 30, (1,), generator=generator))
        prompt = int(torch.randint(1, length - 1, (1,), generator=generator))
        ids = torch.randint(1, 50, (length,), generator=generator).tolist()
        examples.append(Example(ids, [False] * prompt + [True] * (length - prompt), [length]))
    return examples


def test_packed_rows_keep_examples_whole_with_their_own_positions_and_mask():
    a, b = Example([5, 6, 7, 8], [False, False, True, True]), Example([9, 10, 11], [False, True, True])
    batch = make_rows([[a, b]], seq_len=8, pad_id=0, packed=True)
    assert batch.inputs.tolist() == [[5, 6, 7, 9, 10, 0, 0, 0]]
    assert batch.targets.tolist() == [[IGNORE_INDEX, 7, 8, 10, 11, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch.positions.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    mask = batch.attention_mask()[0, 0].int().tolist()
    assert mask[4] == [0, 0, 0, 1, 1, 0, 0, 0]  # b's second token sees b only
    assert mask[2] == [1, 1, 1, 0, 0, 0, 0, 0]
    assert mask[7] == [0, 0, 0, 0, 0, 1, 1, 1]  # padding sees padding: no empty row
    padded = make_rows([[a], [b]], seq_len=8, pad_id=0, packed=False)
    assert padded.positions is None and padded.attention_mask() is None


@pytest.mark.parametrize("packing", [True, False])
def test_loader_sees_every_example_once_per_epoch_and_resumes_exactly(packing):
    examples = synthetic_examples(50)
    loader = SFTLoader(examples, batch_size=3, seq_len=32, pad_id=0, seed=1, packing=packing)
    while loader.epoch == 0:  # run into the second epoch, whose order differs
        loader.next_batch()
    state = loader.state_dict()
    resumed = SFTLoader(examples, batch_size=3, seq_len=32, pad_id=0, seed=1, packing=packing)
    resumed.load_state_dict(state)
    for _ in range(5):
        x, y = loader.next_batch(), resumed.next_batch()
        assert torch.equal(x.inputs, y.inputs) and torch.equal(x.targets, y.targets)
    fresh = SFTLoader(examples, batch_size=1, seq_len=32, pad_id=0, seed=1, packing=packing)
    rows = []
    while fresh.epoch == 0:
        rows.append(fresh._next_row())
    first_epoch = [e for row in rows for e in row][: len(examples)]  # the last row may reach into epoch 1
    assert sorted(map(id, first_epoch)) == sorted(map(id, examples))
    assert all(sum(len(e) - 1 for e in row) <= 32 for row in rows)
    assert packing or all(len(row) == 1 for row in rows)


def test_fixed_batches_hold_every_example_once_in_order():
    examples = synthetic_examples(20, seed=3)
    batches = fixed_batches(examples, batch_size=4, seq_len=32, pad_id=0, packing=True)
    assert sum(b.target_tokens for b in batches) == sum(sum(e.mask[1:]) for e in examples)
    assert fixed_batches(examples, 4, 32, 0, True) is not batches
    assert all(torch.equal(a.inputs, b.inputs) for a, b in zip(batches, fixed_batches(examples, 4, 32, 0, True)))


def test_shared_alpaca_file_reads_with_few_malformed_records(tokenizer):
    path = SHARED_DATA / "sft" / "alpaca_5000.json"
    if not path.is_file():
        pytest.skip("../shared/data not present")
    records, malformed = read_records(str(path))
    assert len(records) == 5000 and not malformed
    data = build_sft_data(SFTConfig(template="vicuna_v1.1", val_fraction=0.02), tokenizer, 512, records=records[:500])
    assert data.stats.train + data.stats.val + sum(data.stats.malformed.values()) + data.stats.too_long == 500
    assert all(e.ids[-1] == tokenizer.eos_id and e.mask[-1] for e in data.train)
