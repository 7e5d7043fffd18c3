"""Issue 28, property 5: text and streams as users have them (llamalite/text.py; cli.main is the choke point).

- a reader that closes the pipe ends every printing command quietly, with 0 or the shell's 141 (128 + SIGPIPE);
- bytes that are not UTF-8 (argv, stdin, instruction data, text sources) become U+FFFD with a warning, and settings
  (config files, overrides) refuse them in one line: never a traceback;
- CRLF and a lone CR read as LF in text sources and chat lines;
- a text source left as one giant document says so and names `separator`, and the error of an empty split no longer
  sends the user to data.val_fraction when too few documents are the cause.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from llamalite.config import SourceConfig
from llamalite.data import sources
from llamalite.data.sft import encode_conversation, get_template, read_records, record_to_messages
from llamalite.errors import LlamaliteError
from llamalite.text import EXIT_BROKEN_PIPE, clean_str, decode_text, replace_invalid, split_lines
from llamalite.tokenizer import Tokenizer
from llamalite.train.trainer import Trainer
from tests.adversarial.conftest import assert_clean_outcome, run_main
from tests.conftest import small_config, synthetic_documents

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "llamalite" / "configs" / "demo.yaml"
QUIET = (EXIT_BROKEN_PIPE, 0, -signal.SIGPIPE)
# Bytes a user's text can hold: invalid UTF-8 (lone continuation bytes, truncated sequences, overlongs, encoded
# surrogates), CR, CRLF, NUL, and the UTF-8 of valid text.
NASTY_PIECES = [b"\xff", b"\xfe", b"\x80", b"\xc3", b"\xe2\x82", b"\xc0\xaf", b"\xed\xb3\xbf", b"\r", b"\r\n", b"\n",
                b"\x00", b"\t", "é".encode(), "日本".encode(), b"the king ", b"\"", b"\\", b"\\udcff"]
nasty_bytes = st.lists(st.one_of(st.sampled_from(NASTY_PIECES), st.binary(max_size=4)), max_size=12).map(b"".join)
argv_bytes = nasty_bytes.map(lambda data: data.replace(b"\x00", b""))  # argv is C strings: NUL cannot be in it
FEW = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
MANY = settings(max_examples=100, deadline=None)


@pytest.fixture(scope="module")
def run_dir(corpus_dir, prepared_dir, tmp_path_factory) -> Path:
    """A two-layer model trained for 4 steps: a run directory and its checkpoint."""
    run = tmp_path_factory.mktemp("text_streams") / "run"
    Trainer(small_config(corpus_dir, prepared_dir, run)).fit()
    return run


def subprocess_env() -> dict[str, str]:
    # A user's en_US.UTF-8 terminal decodes stdin strictly (the C.UTF-8 locale of CI would be lenient for us).
    return os.environ | {"PYTHONIOENCODING": "utf-8:strict", "OMP_NUM_THREADS": "1"}


def llamalite(*args: str | bytes) -> list[str | bytes]:
    return [sys.executable, "-m", "llamalite", *args]


# ------------------------------------------------------------------------------------------------ a closed pipe
# Every subprocess of this file starts at once (each pays ~2 s of CPU to import torch): a module fixture runs them in
# a few threads and the tests read their outcomes.
def prepare_config(tmp_path: Path) -> Path:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(synthetic_documents(30)))
    config = tmp_path / "prepare.yaml"
    config.write_text(f"data:\n  sources: [{{type: text, path: {corpus}}}]\n  out_dir: {tmp_path / 'prepared'}\n"
                      "  val_fraction: 0.2\n  num_workers: 1\ntokenizer:\n  vocab_size: 300\n")
    return config


PRINTING_COMMANDS = {
    "model-info": lambda run, tmp: ["model-info", "124m"],
    "plan": lambda run, tmp: ["plan", str(DEMO_CONFIG)],
    "generate": lambda run, tmp: ["generate", str(run), "--prompt", "the king", "--max-new-tokens", "200"],
    "generate --no-stream": lambda run, tmp: ["generate", str(run), "--prompt", "a", "--prompt", "b", "--no-stream",
                                              "--max-new-tokens", "20"],
    "chat": lambda run, tmp: ["chat", str(run), "--max-new-tokens", "20"],
    "eval --val-only": lambda run, tmp: ["eval", str(run), "--val-only"],
    "report": lambda run, tmp: ["report", str(run), "--out", str(tmp / "report")],
    "prepare": lambda run, tmp: ["prepare", str(prepare_config(tmp))],
    "--help": lambda run, tmp: ["--help"],
}


def closing_stdout(argv: list[str | bytes], read: int = 0, stderr_too: bool = False) -> tuple[int, bytes, str]:
    """Run llamalite with stdout a pipe that this reader closes after `read` bytes: (exit, bytes read, stderr)."""
    process = subprocess.Popen(llamalite(*argv), env=subprocess_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT if stderr_too else subprocess.PIPE)
    head = process.stdout.read(read) if read else b""
    process.stdout.close()
    try:  # chat's turns; a command that has already ended closed its end
        process.stdin.write(b"the king\nthe queen\n" * 50)
        process.stdin.close()
    except BrokenPipeError:
        pass
    err = b"" if stderr_too else process.stderr.read()
    return process.wait(timeout=300), head, err.decode(errors="replace")


def captured(argv: list[str | bytes], stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run(llamalite(*argv), input=stdin, env=subprocess_env(), capture_output=True, timeout=300)


ARGV_PROMPT, ARGV_STOP, ARGV_SYSTEM = b"the \xff king\r\n\xc3(", b"\xe2\x82", b"be \xfe brief\r"
CHAT_STDIN = b"the \xff king\r\nthe queen\rof \x80 war\x00\n"


@pytest.fixture(scope="module")
def subprocess_outcomes(run_dir, tmp_path_factory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("subprocesses")
    config_path = os.fsencode(tmp / "config") + b"\xff.yaml"  # a real path that is not UTF-8
    with open(config_path, "wb") as f:
        f.write(b"train:\n  max_steps: 10\n")
    jobs: dict[str, Callable[[], Any]] = {}
    for name, make in PRINTING_COMMANDS.items():
        folder = tmp / name.replace(" ", "_")
        folder.mkdir()
        jobs[f"closed {name}"] = partial(closing_stdout, make(run_dir, folder), 0, name == "prepare")
    jobs["head -c 10"] = partial(closing_stdout, ["generate", str(run_dir), "--prompt", "x", "--max-new-tokens",
                                                  "2000", "--temperature", "1", "--top-k", "0"], 10)
    jobs["argv generate"] = partial(captured, ["generate", str(run_dir), b"--prompt", ARGV_PROMPT, b"--stop", ARGV_STOP,
                                               "--max-new-tokens", "3", "--greedy"])
    jobs["argv chat"] = partial(captured, ["chat", str(run_dir), b"--system", ARGV_SYSTEM, "--max-new-tokens", "3",
                                           "--jsonl"], CHAT_STDIN)
    jobs["config path"] = partial(captured, ["plan", config_path])
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("command", PRINTING_COMMANDS)
def test_a_closed_pipe_ends_every_printing_command_quietly(command, subprocess_outcomes):
    """`llamalite ... | head -c 0`: the reader closes stdout before a byte is written (stderr, for prepare, too)."""
    code, _, err = subprocess_outcomes[f"closed {command}"]
    assert code in QUIET, f"{command}: exit {code}\n{err[-3000:]}"
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, err[-3000:]


def test_a_reader_that_stops_after_a_few_bytes_stops_generate_quietly(subprocess_outcomes):
    """`llamalite generate CKPT --prompt x | head -c 10`, the issue's example."""
    code, head, err = subprocess_outcomes["head -c 10"]
    assert head.startswith(b"x") and code in QUIET, err[-3000:]
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]


class ClosedPipe(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")


@pytest.mark.parametrize("argv", [["model-info", "tiny"], ["--help"], ["model-info", "no-such-preset"]])
def test_main_returns_141_when_stdout_is_a_closed_pipe(argv, monkeypatch, capsys):
    with capsys.disabled():
        monkeypatch.setattr(sys, "stdout", ClosedPipe())
        monkeypatch.setattr(sys, "stderr", ClosedPipe())
        from llamalite.cli import main

        assert main(argv) == EXIT_BROKEN_PIPE


# ----------------------------------------------------------------------------------- bytes that are not UTF-8
@MANY
@given(nasty_bytes)
@example(b"\xe2\x82\xff a \xed\xa0\x80")
def test_one_rule_for_bytes_and_for_the_strings_python_makes_of_them(data):
    """decode_text on bytes, and clean_str on the str Python makes of the same bytes (argv, stdin: surrogateescape),
    give the same valid text: what errors="replace" gives."""
    expected = data.decode("utf-8", "replace")
    assert replace_invalid(data)[0] == expected
    assert clean_str(data.decode("utf-8", "surrogateescape"))[0] == expected
    assert clean_str(os.fsdecode(data))[0] == expected
    expected.encode("utf-8")  # valid: the tokenizer and stdout take it


@MANY
@given(st.text())
def test_lone_surrogates_of_json_become_replacement_characters(text):
    cleaned, replaced = clean_str(text)
    cleaned.encode("utf-8")
    assert replaced == 0 or "\ufffd" in cleaned
    assert (replaced == 0) == (cleaned == text)


def test_a_replacement_is_counted_in_one_warning(caplog):
    with caplog.at_level(logging.WARNING):
        assert decode_text(b"a\xffb\xfe", "--prompt") == "a\ufffdb\ufffd"
    (record,) = caplog.records
    assert record.getMessage() == "--prompt: replaced 2 invalid UTF-8 bytes or lone surrogates with U+FFFD"


def test_prompt_stop_and_system_bytes_from_the_command_line(subprocess_outcomes):
    """Real argv bytes (not UTF-8, CR, CRLF) to generate and chat, and chat's stdin bytes: exit 0, U+FFFD shown."""
    result = subprocess_outcomes["argv generate"]
    assert result.returncode == 0 and b"Traceback" not in result.stderr, result.stderr.decode(errors="replace")
    assert result.stdout.startswith("the \ufffd king\r\n\ufffd(".encode())
    assert b"--prompt: replaced 2 invalid UTF-8 bytes" in result.stderr and b"--stop: replaced 2" in result.stderr
    chat = subprocess_outcomes["argv chat"]
    assert chat.returncode == 0 and b"Traceback" not in chat.stderr, chat.stderr.decode(errors="replace")
    users = [json.loads(line)["user"] for line in chat.stdout.decode().splitlines()]
    assert users == ["the \ufffd king", "the queen", "of \ufffd war\x00"]


def test_a_config_path_that_is_not_utf8_opens_and_is_printed_as_its_bytes(subprocess_outcomes):
    result = subprocess_outcomes["config path"]
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert b"config\xff.yaml" in result.stdout


@FEW
@given(prompt=argv_bytes, stop=argv_bytes)
def test_generated_prompts_and_stop_strings_in_process(run_dir, capsys, prompt, stop):
    outcome = run_main(capsys, ["generate", str(run_dir), "--prompt", os.fsdecode(prompt) or "x",
                                "--stop", os.fsdecode(stop) or "y", "--max-new-tokens", "2", "--greedy"])
    assert_clean_outcome(outcome)
    assert outcome.code == 0


@FEW
@given(stdin=nasty_bytes, system=argv_bytes)
def test_generated_chat_stdin_in_process(run_dir, capsys, stdin, system):
    """stdin as Python opens it on a UTF-8 terminal (strict): main() makes it tolerant, chat applies the rule."""
    saved = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8", errors="strict")
    try:
        outcome = run_main(capsys, ["chat", str(run_dir), "--system", os.fsdecode(system) or "s", "--jsonl",
                                    "--max-new-tokens", "2", "--greedy"])
    finally:
        sys.stdin = saved
    assert_clean_outcome(outcome)
    lines = [line.strip() for line in split_lines(stdin.decode("utf-8", "replace"))]
    if "/exit" in lines:
        lines = lines[:lines.index("/exit")]
    answers = [json.loads(line) for line in outcome.out.splitlines()]
    assert [a["user"] for a in answers] == [line for line in lines if line and line != "/reset"]


@pytest.fixture(scope="module")
def toy_tokenizer() -> Tokenizer:
    return Tokenizer.train(synthetic_documents(5), vocab_size=300)


def _as_json_string_with_escapes(data: bytes) -> str:
    """A JSON string literal whose undecodable bytes are spelled as \\udcXX escapes (lone surrogates)."""
    return json.dumps(data.decode("utf-8", "surrogateescape"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(instruction=nasty_bytes, output=nasty_bytes, layout=st.sampled_from(["jsonl-raw", "jsonl-escaped", "array"]),
       newline=st.sampled_from([b"\n", b"\r\n", b"\r"]))
def test_generated_instruction_data(tmp_path, toy_tokenizer, instruction, output, layout, newline):
    """Raw invalid bytes in a JSON Lines record, \\udcXX escapes, a JSON array; any line ending."""
    good = b'{"instruction": "say hi", "output": "hi"}'
    if layout == "jsonl-raw":
        bad = b'{"instruction": "' + instruction.replace(b'"', b"").replace(b"\\", b"") + b'", "output": "o' \
              + output.replace(b'"', b"").replace(b"\\", b"") + b'"}'
        content = newline.join([good, bad, good])
    else:
        bad = ('{"instruction": ' + _as_json_string_with_escapes(instruction) + ', "output": '
               + _as_json_string_with_escapes(b"o" + output) + "}").encode()
        content = b"[" + b",".join([good, bad]) + b"]" if layout == "array" else newline.join([good, bad])
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    try:
        records, _ = read_records(str(path))
    except LlamaliteError as exc:
        assert "\n" not in str(exc)
        return
    assert records[0] == {"instruction": "say hi", "output": "hi"}
    for record in records:
        json.dumps(record).encode("utf-8")
        try:
            messages = record_to_messages(record)
        except LlamaliteError:
            continue  # a malformed record: counted by the caller
        for message in messages:
            message["content"].encode("utf-8")  # no lone surrogate reaches the tokenizer
        encode_conversation(messages, get_template("plain"), toy_tokenizer)


@settings(max_examples=100, deadline=None)
@given(texts=st.lists(st.text(), min_size=1, max_size=3))
def test_the_tokenizer_takes_any_str(toy_tokenizer, texts):
    """The last line of defence: whatever reads text, a lone surrogate never reaches tokenizers' TypeError."""
    for text in texts:
        assert toy_tokenizer.encode(text) == toy_tokenizer.encode(clean_str(text)[0])
    assert len(toy_tokenizer.encode_sequences(texts)) == len(texts)


@pytest.mark.parametrize("line", [b'{"goal": "a \\ud800 b", "sol1": "x\\udcff", "sol2": "y", "label": 0}',
                                  b'{"goal": "a \xff b", "sol1": "x", "sol2": "y", "label": 0}'])
def test_task_files_with_lone_surrogates_or_bytes_that_are_not_utf8(run_dir, tmp_path, capsys, line):
    path = tmp_path / "piqa.jsonl"
    path.write_bytes(b'{"goal": "c", "sol1": "x", "sol2": "y", "label": 1}\r\n' + line + b"\n")
    outcome = run_main(capsys, ["eval", str(run_dir), "--tasks", "piqa", "--task-file", f"piqa={path}",
                                "--no-val-loss"])
    assert_clean_outcome(outcome)


@FEW
@given(value=argv_bytes, key_bytes=st.sampled_from([b"", b"\xff"]))
def test_generated_config_overrides(capsys, value, key_bytes):
    override = os.fsdecode(b"train.run_dir" + key_bytes + b"=" + value)
    assert_clean_outcome(run_main(capsys, ["plan", str(DEMO_CONFIG), override]))


@FEW
@given(garbage=nasty_bytes)
def test_generated_config_files(tmp_path, capsys, garbage):
    path = tmp_path / "config.yaml"
    path.write_bytes(b"train:\n  max_steps: 10\n# " + garbage + b"\n")
    assert_clean_outcome(run_main(capsys, ["plan", str(path)]))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(corpus=nasty_bytes, newline=st.sampled_from([b"\n", b"\r\n", b"\r"]))
def test_generated_text_sources_for_prepare(tmp_path_factory, capsys, corpus, newline):
    folder = tmp_path_factory.mktemp("prepare")
    documents = [(" ".join(doc.split()[:40]) + " ").encode() for doc in synthetic_documents(12)]
    (folder / "corpus.txt").write_bytes((newline * 2).join([*documents, corpus]))
    config = folder / "config.yaml"
    config.write_text(f"data:\n  sources: [{{type: text, path: {folder / 'corpus.txt'}}}]\n"
                      f"  out_dir: {folder / 'out'}\n  val_fraction: 0.2\n  num_workers: 1\n"
                      "tokenizer:\n  vocab_size: 280\n")
    outcome = run_main(capsys, ["prepare", str(config)])
    assert_clean_outcome(outcome)
    if outcome.code == 0:  # every document found, whatever the line endings
        manifest = json.loads((folder / "out" / "manifest.json").read_text())
        total = sum(split["documents"] for split in manifest["splits"].values())
        assert total >= len(documents)


# ----------------------------------------------------------------------------------------------- line endings
def read_text_documents(path: Path, separator: str | None = "\n\n") -> list[str]:
    return [document.text for document in sources._read_text_file(path, separator)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(blacklist_characters="\r", blacklist_categories=["Cs"]), max_size=80)
       .map(lambda t: t.replace("\x00", "")),
       separator=st.sampled_from(["\n\n", "\n", "\n---\n", None]), block=st.integers(1, 9))
def test_lf_crlf_and_cr_files_give_the_same_documents(tmp_path, text, separator, block):
    """A file written with \\n, \\r\\n or \\r line endings: the same documents (a CR ending one block of the
    reader and its LF starting the next included), and the same as str.split."""
    expected = text.split(separator) if separator else [text]
    for newline in ("\n", "\r\n", "\r"):
        path = tmp_path / "corpus.txt"
        path.write_bytes(text.replace("\n", newline).encode())
        assert read_text_documents(path, separator) == expected, newline
        if separator:
            with open(path, encoding="utf-8") as f:  # the reader's own mode: universal newlines
                assert list(sources._split_stream(f, separator, block_chars=block)) == expected


def test_a_crlf_at_the_decoders_chunk_boundary(tmp_path):
    path = tmp_path / "corpus.txt"
    for cut in range(8180, 8200):  # TextIOWrapper decodes 8 KiB chunks
        path.write_bytes(b"a" * cut + b"\r\n\r\nb\r\rc")
        assert read_text_documents(path) == ["a" * cut, "b", "c"]


def test_a_crlf_separator_in_the_config_still_splits(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"one\r\n\r\ntwo\r\n\r\nthree")
    assert read_text_documents(path, "\r\n\r\n") == ["one", "two", "three"]


# ---------------------------------------------------------------------------------------- too few documents
def test_a_file_that_its_separator_never_splits_is_warned_about(tmp_path, caplog):
    path = tmp_path / "book.txt"
    path.write_text("the king speaks of love and war\n" * 40_000)  # 1.3 MB, not one blank line
    source = SourceConfig(type="text", path=str(path))
    with caplog.at_level(logging.WARNING):
        assert len(list(sources._read_text_source(source, None))) == 1
    (warning,) = [r.getMessage() for r in caplog.records if "separator" in r.getMessage()]
    assert str(path) in warning and "1,280,000 bytes" in warning and "'\\n\\n'" in warning
    assert "CRLF" in warning


def test_one_document_names_the_separator_not_val_fraction(tmp_path, capsys):
    corpus = tmp_path / "notes.txt"
    corpus.write_bytes(b"".join(line.encode() + b"\r\n" for line in synthetic_documents(20)))  # CRLF, no blank line
    config = tmp_path / "config.yaml"
    config.write_text(f"data:\n  sources: [{{type: text, path: {corpus}}}]\n  out_dir: {tmp_path / 'out'}\n"
                      "  val_fraction: 0.01\n  num_workers: 1\ntokenizer:\n  vocab_size: 300\n")
    outcome = run_main(capsys, ["prepare", str(config)])
    assert_clean_outcome(outcome, allow_success=False)
    error = outcome.err.strip().splitlines()[-1]
    assert "only 1 document" in error and "data.sources.0.separator ('\\n\\n')" in error, error
    assert "val_fraction" not in error, error



# ------------------------------------------------------------------------------- closed or full standard streams
# A stream the command was started without (`<&-`, `>&-`, `2>&-`) reads or writes /dev/null; a standard stream that
# cannot be written (`> /dev/full`) ends the command with one line and exit 2; never a traceback.
STREAM_COMMANDS = {
    "model-info": lambda run: ["model-info", "124m"],
    "plan": lambda run: ["plan", str(DEMO_CONFIG)],
    "generate": lambda run: ["generate", str(run), "--prompt", "the king", "--max-new-tokens", "5"],
    "chat": lambda run: ["chat", str(run), "--max-new-tokens", "3", "--jsonl"],
    "eval --val-only": lambda run: ["eval", str(run), "--val-only"],
}
# Each command with the redirections that matter to it (a subprocess costs ~2 s of CPU to import torch).
# (The in-process tests below draw the rest: any errno, either stream, at any write.)
STREAM_CASES = [("model-info", ">&-"), ("model-info", "2>&-"), ("plan", ">/dev/full"), ("generate", ">&-"),
                ("generate", ">/dev/full"), ("chat", "<&-"), ("chat", "2>/dev/full"), ("eval --val-only", ">/dev/full")]


def redirected(argv: list[str], redirection: str) -> subprocess.CompletedProcess:
    """llamalite run by sh with one of its standard streams closed or pointed at /dev/full (stderr is read back
    unless it is the redirected one)."""
    script = f'exec "$@" {redirection}'
    return subprocess.run(["sh", "-c", script, "sh", *llamalite(*argv)], input=b"the king\n{\"oops\n",
                          stdout=None if ">" in redirection and not redirection.startswith("2") else subprocess.PIPE,
                          stderr=subprocess.PIPE, env=subprocess_env(), timeout=300)


@pytest.fixture(scope="module")
def stream_outcomes(run_dir) -> dict[tuple[str, str], subprocess.CompletedProcess]:
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {case: pool.submit(redirected, STREAM_COMMANDS[case[0]](run_dir), case[1]) for case in STREAM_CASES}
        return {case: future.result() for case, future in futures.items()}


@pytest.mark.parametrize("case", STREAM_CASES, ids=lambda case: f"{case[0]} {case[1]}")
def test_closed_or_full_standard_streams(case, stream_outcomes):
    command, redirection = case
    outcome = stream_outcomes[case]
    err = outcome.stderr.decode(errors="replace")
    assert outcome.returncode in (0, 2, EXIT_BROKEN_PIPE), err[-3000:]
    assert "Traceback" not in err and "Exception ignored" not in err and "Logging error" not in err, err[-3000:]
    if redirection == ">/dev/full":  # every one of these commands prints its result on stdout
        assert outcome.returncode == 2, err[-3000:]
        assert err.splitlines()[-1] == "llamalite: error: cannot write to standard output (No space left on device)"
    if redirection in ("<&-", ">&-", "2>&-"):  # /dev/null in its place: the command does its work
        assert outcome.returncode == 0, err[-3000:]


class FailingStream(io.StringIO):
    """A standard stream whose write or flush fails with `error` (after `good_writes` writes went through)."""

    def __init__(self, error: OSError, at: str, good_writes: int):
        super().__init__()
        self.error, self.at, self.good_writes = error, at, good_writes

    def write(self, text: str) -> int:
        if self.at == "write":
            if self.good_writes <= 0:
                raise self.error
            self.good_writes -= 1
        return super().write(text)

    def flush(self) -> None:
        if self.at == "flush":
            raise self.error


WRITE_ERRORS = [(28, "No space left on device"), (5, "Input/output error"), (9, "Bad file descriptor"),
                (27, "File too large"), (122, "Disk quota exceeded")]
CHEAP_ARGV = [["model-info", "tiny"], ["model-info", "no-such-preset"], ["--help"], ["plan", str(DEMO_CONFIG)]]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=st.sampled_from(CHEAP_ARGV), error=st.sampled_from(WRITE_ERRORS), at=st.sampled_from(["write", "flush"]),
       good_writes=st.integers(0, 3), stream=st.sampled_from(["stdout", "stderr"]))
def test_any_write_error_of_a_standard_stream_is_one_line(monkeypatch, capsys, argv, error, at, good_writes, stream):
    """In process: whichever standard stream fails, with whatever errno, at whichever write: exit 2 (or 0 when the
    command never needed the stream), one line naming the stream on stderr when stdout failed, no traceback."""
    from llamalite.cli import main

    failing = FailingStream(OSError(*error), at, good_writes)
    healthy = io.StringIO()
    with capsys.disabled():
        monkeypatch.setattr(sys, stream, failing)
        monkeypatch.setattr(sys, "stderr" if stream == "stdout" else "stdout", healthy)
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's --help
            code = exc.code
    assert code in (0, 2)
    assert not isinstance(sys.stdout, type(None)) and type(sys.stdout).__name__ != "GuardedStream"
    if stream == "stdout" and code == 2 and "no-such-preset" not in argv:
        assert healthy.getvalue().splitlines()[-1] == f"llamalite: error: cannot write to standard output ({error[1]})"


def test_an_error_of_another_file_keeps_its_traceback(monkeypatch, capsys):
    """Only the standard streams' own write errors are turned into the one line: ENOSPC writing some other file is a
    different problem (the command's), and propagates as the OSError it is."""
    import llamalite.cli as cli

    def full_disk(args):
        raise OSError(28, "No space left on device", "/some/output")

    monkeypatch.setattr(cli, "cmd_model_info", full_disk)
    with pytest.raises(OSError, match="No space left"):
        cli.main(["model-info", "tiny"])


@pytest.mark.parametrize("name", ["stdin", "stdout", "stderr"])
def test_a_missing_standard_stream_is_dev_null(name, monkeypatch, capsys):
    """sys.stdin/stdout/stderr is None when the process started without it: main reads or writes /dev/null."""
    from llamalite.cli import main

    with capsys.disabled():
        for other in ("stdout", "stderr"):
            monkeypatch.setattr(sys, other, io.StringIO())
        monkeypatch.setattr(sys, name, None)
        assert main(["model-info", "tiny"]) == 0
        assert getattr(sys, name) is not None
