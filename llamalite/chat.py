"""`llamalite chat`: a terminal chat with a checkpoint, in the chat template it was fine-tuned with; and
`llamalite generate`: continuations of prompts, streamed. Both take a loaded checkpoint (the CLI loads it).

Interactive on a terminal (streamed answers, `/reset` forgets the history, `/exit` or Ctrl-D quits);
when stdin is not a terminal every line is a user turn and each answer is printed on its own line, for scripts.

Templates and their rendering come from llamalite/data/sft.py (exactly as fine-tuning tokenized them):
`get_template`, `encode_prompt` (answers end with the EOS *id*), `stop_strings`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

import torch

from llamalite.checkpoint.inference import InferenceModel
from llamalite.config import ChatTemplate, SFTConfig, config_from_dict
from llamalite.data.sft import encode_prompt, get_template, stop_strings, trained_template
from llamalite.errors import ConfigError
from llamalite.generate import Generation, SamplingOptions, generate, iter_generate_ids
from llamalite.runtime import seeded_generator
from llamalite.text import clean_text, split_lines
from llamalite.tokenizer import Tokenizer

DEFAULT_TEMPLATE = "plain"


def template_from_state(state: dict[str, Any], name: str | None = None) -> tuple[str, ChatTemplate]:
    """(name, template): `name` when given, else the one a fine-tuned checkpoint was trained with, else plain.

    A checkpoint counts as fine-tuned when its config's sft section names a base or data (every config
    has an sft.template default, so the name alone does not say a run was fine-tuned).
    """
    raw = state.get("config") or {}
    sft = raw.get("sft") or {}
    if name is None:
        try:
            trained = trained_template(raw)
        except ConfigError as exc:
            warnings.warn(f"{exc}; using the {DEFAULT_TEMPLATE!r} template (pass --template to choose)", stacklevel=2)
            trained = None
        if trained is not None:
            return sft.get("template") or SFTConfig.template, trained
    name = name or DEFAULT_TEMPLATE
    extra = {}
    if name in (sft.get("templates") or {}):  # a template defined in the run's config
        extra = config_from_dict(raw).sft.templates
    return name, get_template(name, extra)


class ChatSession:
    """Multi-turn history; the oldest turns are dropped when the conversation outgrows the context."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, template: ChatTemplate,
                 options: SamplingOptions, generator: torch.Generator | None = None, system: str | None = None,
                 compile: bool = False):
        self.model = model
        self.compile = compile
        self.tokenizer = tokenizer
        self.template = template
        stops = tuple(options.stop) + tuple(stop_strings(template, tokenizer.eos_token))
        self.options = SamplingOptions(options.max_new_tokens, options.temperature, options.top_k, options.top_p, stops)
        self.generator = generator
        self.system = system
        self.history: list[dict[str, str]] = []

    def reset(self) -> None:
        self.history = []

    def prompt_ids(self) -> list[int]:
        """The rendered history, ending with the assistant's cue to answer."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return encode_prompt(system + self.history, self.template, self.tokenizer)

    def drop_oldest_turns(self) -> list[int]:
        """Forget the oldest turns while the prompt leaves too little room for an answer; return the prompt."""
        context = self.model.config.max_seq_len
        room = min(self.options.max_new_tokens, context // 2)
        while True:
            ids = self.prompt_ids()
            user_turns = [i for i, m in enumerate(self.history) if m["role"] == "user"]
            if len(ids) + room <= context or len(user_turns) <= 1:
                return ids  # the newest turn alone is truncated from the left by generate if it must be
            self.history = self.history[user_turns[1]:]

    def reply(self, text: str, on_text: Callable[[str], None] | None = None) -> Generation:
        self.history.append({"role": "user", "content": text})
        result = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a prompt cut to the context is reported as the result's prompt_truncated
            pieces = iter_generate_ids(self.model, [self.drop_oldest_turns()], self.options,
                                       eos_id=self.tokenizer.eos_id, tokenizer=self.tokenizer, generator=self.generator,
                                       compile=self.compile)
            for piece in pieces:
                if piece.text and on_text is not None:
                    on_text(piece.text)
                result = piece.done or result
        answer = result.text.strip()
        if answer:
            self.history.append({"role": "assistant", "content": answer})
        else:  # a conversation never holds an empty answer (fine-tuning never saw one): forget the exchange
            self.history.pop()
        return result


def run_chat(loaded: InferenceModel, template: str | None, options: SamplingOptions, seed: int | None = None,
             system: str | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None,
             jsonl: bool = False, compile: bool = False) -> None:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    options, system = user_text_options(options), clean_text(system, "--system") if system else system
    name, chat_template = template_from_state(loaded.state, template)
    session = ChatSession(loaded.model, loaded.tokenizer, chat_template, options, seeded_generator(seed), system,
                          compile=compile)
    if stdin.isatty():
        print(f"chatting with {loaded.path} (template {name}); /reset forgets the history, "
              "/exit quits", file=stdout)
        _interactive(session, stdout)
    else:
        _scripted(session, stdin, stdout, jsonl)


def _interactive(session: ChatSession, stdout: TextIO) -> None:
    def show(piece: str) -> None:
        stdout.write(piece)
        stdout.flush()

    while True:
        try:
            line = clean_text(input("you> "), "your line").strip()
        except EOFError:
            print(file=stdout)
            return
        if line == "/exit":
            return
        if line == "/reset":
            session.reset()
            print("(history cleared)", file=stdout)
        elif line:
            show("assistant> ")
            session.reply(line, on_text=show)
            show("\n")


def _scripted(session: ChatSession, stdin: TextIO, stdout: TextIO, jsonl: bool) -> None:
    """Each line (ended by LF, CRLF or CR) a user turn; each answer printed as it is (it may span lines) or as one
    JSON line."""
    for line in _stdin_lines(stdin):
        if line == "/exit":
            return
        if line == "/reset":
            session.reset()
        elif line:
            result = session.reply(line)
            answer = result.text.strip()
            if jsonl:
                answer = json.dumps({"user": line, "assistant": answer, "finish_reason": result.finish_reason},
                                    ensure_ascii=False)
            stdout.write(answer + "\n")
            stdout.flush()


def _stdin_lines(stdin: TextIO) -> Iterator[str]:
    """The stripped lines of stdin, read one at a time; bytes that are not UTF-8 are U+FFFD (llamalite/text.py)."""
    for number, raw in enumerate(stdin, start=1):
        for line in split_lines(clean_text(raw, f"stdin line {number}")):
            yield line.strip()


def user_text_options(options: SamplingOptions) -> SamplingOptions:
    """`options` with its stop strings under the rule of llamalite/text.py."""
    stop = tuple(clean_text(text, "--stop") for text in options.stop)
    return dataclasses.replace(options, stop=stop) if stop != tuple(options.stop) else options


# ------------------------------------------------------------------------------------------------- generate
def run_generate(loaded: InferenceModel, prompts: Sequence[str], options: SamplingOptions, seed: int | None = None,
                 stream: bool = True, stdout: TextIO | None = None, stderr: TextIO | None = None,
                 compile: bool = False) -> list[Generation]:
    """`llamalite generate`: one prompt streams to stdout; several run as one batch, printed in order.

    stdout gets prompt + continuation; stderr one line per prompt with why it stopped and the speed.
    """
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    prompts = [clean_text(prompt, "--prompt") for prompt in prompts]
    options = user_text_options(options)
    streaming = stream and len(prompts) == 1

    def show(row: int, piece: str) -> None:
        stdout.write(piece)
        stdout.flush()

    if streaming:
        stdout.write(prompts[0])
        stdout.flush()
    started = time.perf_counter()
    results = generate(loaded.model, loaded.tokenizer, prompts, options, generator=seeded_generator(seed),
                       on_text=show if streaming else None, compile=compile)
    seconds = time.perf_counter() - started
    for row, (prompt, result) in enumerate(zip(prompts, results)):
        if streaming:
            stdout.write("\n")
        else:
            if len(prompts) > 1:
                stdout.write(f"=== {row + 1}/{len(prompts)} ===\n")
            stdout.write(prompt + result.text + "\n")
        truncated = f", prompt truncated by {result.prompt_truncated} tokens" if result.prompt_truncated else ""
        stderr.write(f"[{row + 1}/{len(prompts)}] finished by {result.finish_reason}: {len(result.tokens)} new tokens"
                     f"{truncated}\n")
    total = sum(len(r.tokens) for r in results)
    stderr.write(f"{total} tokens in {seconds:.2f}s ({total / max(seconds, 1e-9):,.1f} tokens/s)\n")
    stdout.flush()
    return results
