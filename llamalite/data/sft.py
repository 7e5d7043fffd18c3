"""Instruction data -> templated, loss-masked examples -> packed (or padded) batches.

Records come in two schemas: Alpaca (`instruction`, optional `input`, `output`, as in
yahma/alpaca-cleaned) and chat (`messages`: a list of `{role, content}` with an optional leading
system message, then user and assistant turns alternating). A chat template (text in
`chat_templates.yaml` or the config's `sft.templates`) turns a conversation into alternating
prompt and answer segments; each answer is followed by the tokenizer's EOS *id* (never by its
text, which our tokenizers split like any other text). Only answer tokens and their EOS are
trained on.

Packing puts several examples in one row; each example keeps its own positions (0, 1, ...) and a
block-diagonal causal mask keeps it from attending to the others, so a packed row computes the
same logits as the examples one by one. A record that cannot be used is counted by reason and
reported, never silently dropped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from llamalite.config import ChatTemplate, build_section, config_from_dict
from llamalite.errors import ConfigError, DataError, did_you_mean
from llamalite.records import expect_type, parse_json
from llamalite.schema import load_yaml
from llamalite.text import clean_strings, may_hold_surrogates, replace_invalid, split_lines, warn_replaced

if TYPE_CHECKING:
    from llamalite.config import Config, SFTConfig
    from llamalite.tokenizer import Tokenizer

BUILTIN_TEMPLATES_FILE = Path(__file__).with_name("chat_templates.yaml")
FORMATS = ("auto", "alpaca", "messages")
TRUNCATIONS = ("answer", "drop")
IGNORE_INDEX = -100
ARRAY_FIX = "fix it, or convert it to JSON Lines (one record a line)"
PAD_SEGMENT = -1  # segment id of padding: pads attend only to pads, so no row of the mask is empty


# ------------------------------------------------------------------------------------------- templates
@lru_cache(maxsize=1)
def _builtin_template_dicts() -> dict[str, dict[str, Any]]:
    raw = load_yaml(BUILTIN_TEMPLATES_FILE.read_text(encoding="utf-8"))
    return raw


def builtin_templates() -> dict[str, ChatTemplate]:
    """The templates of chat_templates.yaml: vicuna_v1.1 (the paper's), chatml and plain."""
    return {name: build_section(ChatTemplate, raw, f"{BUILTIN_TEMPLATES_FILE.name}:{name}.")
            for name, raw in _builtin_template_dicts().items()}


def get_template(name: str, extra: dict[str, ChatTemplate] | None = None) -> ChatTemplate:
    """A template by name: one of `extra` (e.g. a config's sft.templates) first, else a built-in one."""
    templates = {**builtin_templates(), **(extra or {})}
    if name not in templates:
        raise ConfigError(f"unknown chat template {name!r}: {did_you_mean(name, sorted(templates))} "
                          "(or define it under sft.templates)")
    return templates[name]


def template_from_config(config: Config) -> ChatTemplate:
    """The template a config names in sft.template, looked up in its sft.templates, then the built-in ones."""
    return get_template(config.sft.template, config.sft.templates)


def stop_strings(template: ChatTemplate, eos_token: str | None = None) -> list[str]:
    """Text that ends a generated answer: the template's stop strings, plus the EOS text when given."""
    return list(template.stop_strings) + ([eos_token] if eos_token else [])


def trained_template(raw_config: dict[str, Any]) -> ChatTemplate | None:
    """The template a fine-tuned checkpoint was trained with (from its saved config), None for one that was not
    fine-tuned: its sft section names no base and no data (every config has an sft.template default)."""
    sft = raw_config.get("sft") or {}
    if not (sft.get("base") or sft.get("data")):
        return None
    return template_from_config(config_from_dict(raw_config))


def jinja_template(template: ChatTemplate, bos: bool = False) -> str:
    """The template as a transformers `chat_template`: apply_chat_template(messages, add_generation_prompt=True)
    renders exactly the text of conversation_segments, each answer followed by the EOS token (`eos_token`), after
    the BOS token (`bos_token`) when `bos` (the tokenizer puts one before every text: apply_chat_template adds no
    special tokens of its own)."""
    def text(value: str) -> str:  # a Jinja string literal
        return repr(value)

    def fill(fmt: str, field_name: str, value: str) -> str:
        return f"{{{{ {text(fmt)} | replace({text('{' + field_name + '}')}, {value}) }}}}"

    return "".join([
        "{{ bos_token }}" if bos else "",
        f"{{%- set system = {text(template.system)} -%}}",
        "{%- set turns = messages -%}",
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}{%- endif -%}",
        f"{{%- if system and {text(template.system_format)} -%}}",
        fill(template.system_format, "system", "system"), "{%- endif -%}",
        "{%- for message in turns -%}",
        "{%- if message['role'] == 'user' -%}",
        f"{{%- if not loop.first -%}}{{{{ {text(template.turn_separator)} }}}}{{%- endif -%}}",
        fill(template.user_format, "content", "message['content']"),
        "{%- elif message['role'] == 'assistant' -%}",
        f"{{{{ {text(template.assistant_prefix)} }}}}",
        fill(template.assistant_format, "content", "message['content']"), "{{ eos_token }}",
        "{%- else -%}{{ raise_exception('roles must be system (first), user and assistant') }}{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}",
        f"{{%- if turns and turns[-1]['role'] == 'assistant' -%}}{{{{ {text(template.turn_separator)} }}}}"
        "{%- endif -%}",
        f"{{{{ {text(template.assistant_prefix)} }}}}",
        "{%- endif -%}",
    ])


# ------------------------------------------------------------------------------------------- conversations
class MalformedRecord(DataError):
    """A record that cannot become a training example; str(exc) is the reason, counted in the report."""


def check_messages(messages: Any, for_generation: bool = False) -> list[dict[str, str]]:
    """Validate a conversation: optional system message, then user/assistant alternating, starting with user.

    A training conversation ends with an assistant answer; one for generation ends with a user turn.
    """
    if not isinstance(messages, list) or not messages:
        raise MalformedRecord("messages is not a non-empty list")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise MalformedRecord("a message is not a {role, content} mapping of strings")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    expected_roles = ["user", "assistant"] * len(turns)
    if [m["role"] for m in turns] != expected_roles[: len(turns)]:
        raise MalformedRecord("roles do not alternate user/assistant after an optional system message")
    if not turns:
        raise MalformedRecord("no user turn")
    last = turns[-1]["role"]
    if for_generation and last != "user":
        raise MalformedRecord("a prompt for generation must end with a user turn")
    if not for_generation and last != "assistant":
        raise MalformedRecord("conversation does not end with an assistant answer")
    if any(m["role"] == "assistant" and not m["content"].strip() for m in turns):
        raise MalformedRecord("empty assistant answer")
    return messages


def conversation_segments(messages: list[dict[str, str]], template: ChatTemplate,
                          for_generation: bool = False) -> list[tuple[str, bool]]:
    """(text, is_answer) pieces in order. Every answer is followed by the EOS id (added by the encoder).

    For generation the last piece is the prompt ready for the assistant's next turn.
    """
    messages = check_messages(messages, for_generation)
    system = template.system
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    prompt = template.system_format.replace("{system}", system) if system and template.system_format else ""
    segments: list[tuple[str, bool]] = []
    for message in messages:
        if message["role"] == "user":
            prompt += template.user_format.replace("{content}", message["content"])
        else:
            segments.append((prompt + template.assistant_prefix, False))
            segments.append((template.assistant_format.replace("{content}", message["content"]), True))
            prompt = template.turn_separator
    if for_generation:
        segments.append((prompt + template.assistant_prefix, False))
    return segments


def render_chat(messages: list[dict[str, str]], template: ChatTemplate, eos_token: str = "<|endoftext|>") -> str:
    """The prompt text ready for the assistant's next turn (earlier answers end with `eos_token`).

    For display and logs: to feed a model use encode_prompt, which puts the EOS *id* after answers.
    """
    return "".join(text + (eos_token if is_answer else "")
                   for text, is_answer in conversation_segments(messages, template, for_generation=True))


def encode_prompt(messages: list[dict[str, str]], template: ChatTemplate, tokenizer: Tokenizer) -> list[int]:
    """Token ids of the prompt for the assistant's next turn, tokenized exactly as in training."""
    ids: list[int] = list(tokenizer.start_ids)
    for text, is_answer in conversation_segments(messages, template, for_generation=True):
        ids += tokenizer.encode(text)
        if is_answer:
            ids.append(tokenizer.eos_id)
    return ids


@dataclass
class Example:
    """One tokenized conversation: ids, and True where a token is an answer token or an answer's EOS."""

    ids: list[int]
    mask: list[bool]
    turn_ends: list[int] = field(default_factory=list)  # index just past each answer's EOS

    def __len__(self) -> int:
        return len(self.ids)


def encode_conversation(messages: list[dict[str, str]], template: ChatTemplate, tokenizer: Tokenizer) -> Example:
    """A training example: prompts (and the tokenizer's BOS, where it puts one first) are not trained on; answers and
    the EOS id after each are."""
    example = Example(list(tokenizer.start_ids), [False] * len(tokenizer.start_ids))
    for text, is_answer in conversation_segments(messages, template):
        tokens = tokenizer.encode(text)
        example.ids += tokens
        example.mask += [is_answer] * len(tokens)
        if is_answer:
            example.ids.append(tokenizer.eos_id)
            example.mask.append(True)
            example.turn_ends.append(len(example.ids))
    return example


def truncate_example(example: Example, max_tokens: int, eos_id: int, mode: str = "answer",
                     min_answer_tokens: int = 8) -> tuple[Example | None, str]:
    """Fit an example into max_tokens. Returns (example or None, what happened: kept | turns | answer | too_long).

    Whole trailing turns go first. When even the first answer does not fit, mode "answer" cuts its
    tail and keeps its EOS (if at least min_answer_tokens of it remain); otherwise the example is
    dropped. A kept answer never loses its EOS.
    """
    if mode not in TRUNCATIONS:
        raise ConfigError(f"unknown sft.truncation {mode!r}: choose one of {', '.join(TRUNCATIONS)}")
    if len(example) <= max_tokens:
        return example, "kept"
    fitting = [end for end in example.turn_ends if end <= max_tokens]
    if fitting:
        end = fitting[-1]
        return Example(example.ids[:end], example.mask[:end], example.turn_ends[: len(fitting)]), "turns"
    answer_start = example.mask.index(True)
    room = max_tokens - answer_start - 1  # answer tokens that fit before the EOS
    if mode == "drop" or room < max(1, min_answer_tokens):
        return None, "too_long"
    end = answer_start + room
    return Example(example.ids[:end] + [eos_id], example.mask[:end] + [True], [end + 1]), "answer"


# ------------------------------------------------------------------------------------------- records
def record_to_messages(record: Any, fmt: str = "auto", input_separator: str = "\n\n") -> list[dict[str, str]]:
    """An Alpaca or chat record as a conversation; MalformedRecord names what is wrong with it."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown sft.format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if not isinstance(record, dict):
        raise MalformedRecord("record is not a JSON object")
    if fmt == "messages" or (fmt == "auto" and "messages" in record):
        return check_messages(record.get("messages"))
    if fmt == "auto" and not ("instruction" in record or "output" in record):
        raise MalformedRecord("neither `messages` nor Alpaca `instruction`/`output` fields")
    instruction, extra, output = record.get("instruction"), record.get("input") or "", record.get("output")
    if not isinstance(instruction, str) or not instruction.strip():
        raise MalformedRecord("missing or empty `instruction`")
    if not isinstance(extra, str):
        raise MalformedRecord("`input` is not a string")
    if not isinstance(output, str) or not output.strip():
        raise MalformedRecord("missing or empty `output`")
    user = instruction.strip() + (input_separator + extra.strip() if extra.strip() else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output.strip()}]


def read_records(source: str, hf_split: str = "train", max_records: int | None = None) -> tuple[list[Any], Counter]:
    """Records of a JSON array, a JSON Lines file or a Hugging Face dataset; lines that are not JSON are counted."""
    path = Path(source)
    malformed: Counter = Counter()
    if path.is_file():
        text, replaced = replace_invalid(path.read_bytes())  # llamalite/text.py: the rule for text users give
        if text.lstrip().startswith("["):
            records = expect_type(parse_json(text, f"{path}, which starts like a JSON array,", ARRAY_FIX),
                                  list, str(path), ARRAY_FIX)
        else:
            records = []
            for line in split_lines(text):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except (ValueError, RecursionError):  # documented: counted and reported with the other malformed
                    malformed["invalid JSON line"] += 1
        if may_hold_surrogates(text):
            records, surrogates = clean_strings(records)
            replaced += surrogates
        warn_replaced(replaced, str(path))
    elif path.suffix in (".json", ".jsonl") or path.exists() or source.count("/") != 1:
        raise DataError(f"SFT data not found: {source} "
                        "(set sft.data to a .json/.jsonl file or a Hugging Face dataset name)")
    else:
        records = _hf_records(source, hf_split)
    if max_records is not None:
        records = records[:max_records]
    return records, malformed


def _hf_records(name: str, split: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"sft.data={name} names a Hugging Face dataset, which needs `pip install -e .[hf]`") from None
    try:
        return list(datasets.load_dataset(name, split=split))
    except Exception as exc:  # the hub raises many types; the message is what the user needs
        raise DataError(f"cannot load the Hugging Face dataset {name} (split {split}): "
                        f"{str(exc).splitlines()[0]}") from None


def is_validation(record: Any, val_fraction: float) -> bool:
    """Held out by a hash of the record's content: stable across runs, orders and subsets."""
    digest = hashlib.blake2b(json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8"), digest_size=8)
    return int.from_bytes(digest.digest(), "big") < val_fraction * 2**64


@dataclass
class SFTStats:
    records: int = 0
    malformed: Counter = field(default_factory=Counter)  # reason -> records
    train: int = 0
    val: int = 0
    truncated: Counter = field(default_factory=Counter)  # turns (trailing turns cut) | answer (answer tail cut)
    too_long: int = 0  # dropped: the prompt left less than min_answer_tokens for the answer
    answer_tokens: int = 0  # trained-on tokens (answers + EOS) in the train split
    tokens: int = 0  # all tokens in the train split

    def summary(self) -> str:
        malformed = sum(self.malformed.values())
        reasons = "; ".join(f"{reason}: {count}" for reason, count in self.malformed.most_common())
        lines = [
            f"{self.records:,} records -> {self.train:,} train + {self.val:,} val examples",
            f"malformed: {malformed:,}" + (f" ({reasons})" if reasons else ""),
            f"truncated: {sum(self.truncated.values()):,} (trailing turns cut: {self.truncated['turns']:,}, "
            f"answer tail cut, EOS kept: {self.truncated['answer']:,}); dropped as too long: {self.too_long:,}",
            f"train tokens: {self.tokens:,}, of which answer tokens + EOS (trained on): {self.answer_tokens:,}",
        ]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["malformed"], data["truncated"] = dict(self.malformed), dict(self.truncated)
        return data


@dataclass
class SFTData:
    train: list[Example]
    val: list[Example]
    val_conversations: list[list[dict[str, str]]]  # the held-out conversations behind `val`, in order
    stats: SFTStats


def build_sft_data(sft: SFTConfig, tokenizer: Tokenizer, seq_len: int, records: list[Any] | None = None) -> SFTData:
    """Read, validate, split, template, tokenize and truncate (to seq_len + 1 tokens) the SFT records."""
    if records is None:
        if not sft.data:
            raise ConfigError("sft.data is not set: point it at an Alpaca/messages .json or .jsonl file")
        records, malformed = read_records(sft.data, sft.hf_split, sft.max_records)
    else:
        malformed = Counter()
    if not 0 <= sft.val_fraction < 1:
        raise ConfigError(f"sft.val_fraction={sft.val_fraction} must be in [0, 1): e.g. 0.02")
    template = get_template(sft.template, sft.templates)
    stats = SFTStats(records=len(records) + sum(malformed.values()), malformed=malformed)
    data = SFTData([], [], [], stats)
    for record in records:
        try:
            messages = record_to_messages(record, sft.format, sft.alpaca_input_separator)
        except MalformedRecord as exc:
            stats.malformed[str(exc)] += 1
            continue
        example, outcome = truncate_example(encode_conversation(messages, template, tokenizer), seq_len + 1,
                                            tokenizer.eos_id, sft.truncation, sft.min_answer_tokens)
        if example is None:
            stats.too_long += 1
            continue
        if outcome != "kept":
            stats.truncated[outcome] += 1
        if is_validation(record, sft.val_fraction):
            data.val.append(example)
            data.val_conversations.append(messages)
        else:
            data.train.append(example)
            stats.answer_tokens += sum(example.mask)
            stats.tokens += len(example)
    stats.train, stats.val = len(data.train), len(data.val)
    if not data.train:
        raise DataError(f"no usable SFT example in {sft.data} ({stats.summary().replace(chr(10), '; ')}): "
                        "give sft.data records in Alpaca (instruction/output) or chat (messages) form")
    return data


# ------------------------------------------------------------------------------------------- batches
@dataclass
class SFTBatch:
    """inputs/targets (B, T); positions and segments (B, T) when packed, None for one example per row."""

    inputs: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor | None = None
    segments: torch.Tensor | None = None

    def to(self, device: torch.device) -> SFTBatch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return SFTBatch(move(self.inputs), move(self.targets), move(self.positions), move(self.segments))

    def attention_mask(self) -> torch.Tensor | None:
        """(B, 1, T, T) boolean, True where a query may attend: causal and within its own example."""
        if self.segments is None:
            return None
        seq = self.segments.shape[1]
        causal = torch.ones(seq, seq, dtype=torch.bool, device=self.segments.device).tril()
        same_example = self.segments[:, :, None] == self.segments[:, None, :]
        return (same_example & causal).unsqueeze(1)

    @property
    def target_tokens(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())


def example_inputs_targets(example: Example) -> tuple[list[int], list[int]]:
    """Next-token pairs: inputs ids[:-1]; a target is ids[i + 1] where that token is trained on, else -100."""
    targets = [token if trained else IGNORE_INDEX for token, trained in zip(example.ids[1:], example.mask[1:])]
    return example.ids[:-1], targets


def make_rows(rows: list[list[Example]], seq_len: int, pad_id: int, packed: bool) -> SFTBatch:
    """A batch of rows, each the concatenation of its examples, right-padded to seq_len."""
    batch = len(rows)
    inputs = np.full((batch, seq_len), pad_id, dtype=np.int64)
    targets = np.full((batch, seq_len), IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros((batch, seq_len), dtype=np.int64)
    segments = np.full((batch, seq_len), PAD_SEGMENT, dtype=np.int64)
    for r, examples in enumerate(rows):
        start = 0
        for index, example in enumerate(examples):
            ids, tgt = example_inputs_targets(example)
            end = start + len(ids)
            inputs[r, start:end], targets[r, start:end] = ids, tgt
            positions[r, start:end], segments[r, start:end] = np.arange(len(ids)), index
            start = end
        positions[r, start:] = np.arange(seq_len - start)  # padding: its own causal block
    as_tensor = torch.from_numpy
    if not packed:
        return SFTBatch(as_tensor(inputs), as_tensor(targets))
    return SFTBatch(as_tensor(inputs), as_tensor(targets), as_tensor(positions), as_tensor(segments))


def examples_fingerprint(examples: list[Example]) -> str:
    digest = hashlib.sha256()
    for example in examples:
        digest.update(np.asarray(example.ids, dtype=np.int64).tobytes())
        digest.update(np.packbits(np.asarray(example.mask, dtype=bool)).tobytes())
        digest.update(b"|")
    return digest.hexdigest()


class SFTLoader:
    """Endless, resumable batches of examples: shuffled per epoch, packed greedily in that order (or one per row).

    Its state is (epoch, position of the next example in the epoch's order); rows are rebuilt from it
    deterministically, so a resumed run sees exactly the batches of an uninterrupted one.
    """

    def __init__(self, examples: list[Example], batch_size: int, seq_len: int, pad_id: int, seed: int = 0,
                 packing: bool = True, shuffle: bool = True) -> None:
        if not examples:
            raise DataError("the SFT loader got no examples")
        too_long = max(len(e) for e in examples) - 1
        if too_long > seq_len:
            raise DataError(f"an SFT example has {too_long + 1} tokens, more than seq_len + 1 = {seq_len + 1}: "
                            "truncate first")
        self.examples, self.batch_size, self.seq_len, self.pad_id = examples, batch_size, seq_len, pad_id
        self.seed, self.packing, self.shuffle = seed, packing, shuffle
        self.fingerprint = examples_fingerprint(examples)
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.examples))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

    def _peek(self) -> Example:
        if self.position == len(self.examples):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        return self.examples[int(self._order[self.position])]

    def _next_row(self) -> list[Example]:
        row, used = [], 0
        while True:
            example = self._peek()
            need = len(example) - 1
            if row and (not self.packing or used + need > self.seq_len):
                return row
            row.append(example)
            used += need
            self.position += 1

    def next_batch(self) -> SFTBatch:
        return make_rows([self._next_row() for _ in range(self.batch_size)], self.seq_len, self.pad_id, self.packing)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "shuffle": self.shuffle,
                "packing": self.packing, "seq_len": self.seq_len, "num_examples": len(self.examples),
                "examples_fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, current in (("seq_len", self.seq_len), ("num_examples", len(self.examples)),
                             ("packing", self.packing), ("examples_fingerprint", self.fingerprint)):
            if state.get(key) != current:
                raise DataError(f"SFT loader state was saved with another {key} ({state.get(key)!r}, now {current!r}): "
                                "resume with the SFT data, template and seq_len of the saved run")
        self.seed, self.shuffle = int(state["seed"]), bool(state["shuffle"])
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order(self.epoch)


def fixed_batches(examples: list[Example], batch_size: int, seq_len: int, pad_id: int, packing: bool,
                  max_batches: int | None = None) -> list[SFTBatch]:
    """Every example once, in order (the last batch may be smaller): the same held-out batches every time."""
    rows: list[list[Example]] = []
    used = seq_len + 1
    for example in examples:
        need = len(example) - 1
        if not packing or used + need > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(example)
        used += need
    batches = [make_rows(rows[i : i + batch_size], seq_len, pad_id, packing) for i in range(0, len(rows), batch_size)]
    return batches[:max_batches] if max_batches else batches
