"""Every request is checked against the model's context before anything is scored (issue 16, item 7)."""

import json
import random

import pytest
import torch

from llamalite.config import EvalConfig
from llamalite.errors import EvalError
from llamalite.eval.suite import BenchmarkSuite, eval_record
from llamalite.tokenizer import Tokenizer
from tests.eval.test_harness import small_model

CPU = torch.device("cpu")
WORDS = "the cat sat on a mat and the dog ran to it".split()
MAX_LENGTH = 24


@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(0)
    return Tokenizer.train([" ".join(rng.choice(WORDS) for _ in range(50)) for _ in range(40)], vocab_size=300)


def phrase(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def task_files(folder, long_documents=(1, 3), every_long=False):
    """A fine ARC-schema task and a PIQA-schema task whose listed documents have a 60-word solution; document 0 of
    PIQA also has a 60-word goal (a long context, left-truncated, never an error)."""
    rng = random.Random(1)
    arc = [{"question": phrase(rng, 5), "choices": {"text": [phrase(rng, 2), phrase(rng, 3)], "label": ["A", "B"]},
            "answerKey": "A"} for _ in range(4)]
    piqa = [{"goal": phrase(rng, 60 if i == 0 else 5), "label": i % 2, "sol1": phrase(rng, 3),
             "sol2": phrase(rng, 60 if every_long or i in long_documents else 4)} for i in range(6)]
    (folder / "arc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in arc))
    (folder / "piqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in piqa))
    return {"arc_easy": str(folder / "arc.jsonl"), "piqa": str(folder / "piqa.jsonl")}


def counting(model, calls):
    def logits_fn(tokens, output_positions=None):
        calls.append(tokens.shape)
        return model(tokens, output_positions=output_positions)
    return logits_fn


def test_a_too_long_continuation_fails_before_anything_is_scored(tokenizer, tmp_path):
    cfg = EvalConfig(tasks=["arc_easy", "piqa"], task_files=task_files(tmp_path))
    suite = BenchmarkSuite(cfg, tokenizer)
    calls = []
    with pytest.raises(EvalError) as error:
        suite.run(counting(small_model(MAX_LENGTH), calls), MAX_LENGTH, CPU)
    assert calls == []  # arc_easy, which fits, was not scored either
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("piqa documents 1, 3 (2 of 6) have continuations of ")
    assert "arc_easy" not in message and "documents 0" not in message  # a long context is truncated, not an error
    assert f"context of {MAX_LENGTH} tokens" in message and "model.max_seq_len" in message
    assert "llamalite eval --skip-too-long" in message and "eval.skip_too_long=true" in message


def test_the_check_runs_when_the_suite_is_built_with_the_context(tokenizer, tmp_path):
    cfg = EvalConfig(tasks=["arc_easy", "piqa"], task_files=task_files(tmp_path))
    with pytest.raises(EvalError, match="piqa documents 1"):
        BenchmarkSuite(cfg, tokenizer, max_length=MAX_LENGTH)
    BenchmarkSuite(cfg, tokenizer, max_length=512)  # a longer context fits every document


def test_the_message_lists_the_first_documents_and_counts_them(tokenizer, tmp_path):
    cfg = EvalConfig(tasks=["piqa"], task_files=task_files(tmp_path, long_documents=(1, 2, 3, 4, 5)))
    with pytest.raises(EvalError) as error:
        BenchmarkSuite(cfg, tokenizer, max_length=MAX_LENGTH)
    assert "piqa documents 1, 2, 3, ... (5 of 6)" in str(error.value)
    assert ", 4" not in str(error.value)


def test_skip_too_long_leaves_the_documents_out_and_counts_them(tokenizer, tmp_path):
    files = task_files(tmp_path)
    cfg = EvalConfig(tasks=["arc_easy", "piqa"], task_files=files, skip_too_long=True)
    suite = BenchmarkSuite(cfg, tokenizer)
    model = small_model(MAX_LENGTH)
    results = suite.run(model, MAX_LENGTH, CPU)
    assert suite.skipped == {"arc_easy": 0, "piqa": 2}
    assert results["piqa"].n == 4 and results["arc_easy"].n == 4
    record = eval_record(0, 0, 1.0, "eval", results, skipped=suite.skipped)
    assert record["skipped"] == {"arc_easy": 0, "piqa": 2} and record["n"]["piqa"] == 4
    # The kept documents score as they do in a task made of them alone
    kept = [json.loads(line) for i, line in enumerate(open(files["piqa"])) if i not in (1, 3)]
    (tmp_path / "kept.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    alone = BenchmarkSuite(EvalConfig(tasks=["piqa"], task_files={"piqa": str(tmp_path / "kept.jsonl")}), tokenizer)
    assert alone.run(model, MAX_LENGTH, CPU)["piqa"].metrics == results["piqa"].metrics
    assert "skipped" not in eval_record(0, 0, 1.0, "eval", alone.run(model, MAX_LENGTH, CPU), skipped=alone.skipped)


def test_a_task_with_no_document_that_fits_is_an_error_even_when_skipping(tokenizer, tmp_path):
    cfg = EvalConfig(tasks=["piqa"], task_files=task_files(tmp_path, every_long=True), skip_too_long=True)
    with pytest.raises(EvalError, match="every document of piqa"):
        BenchmarkSuite(cfg, tokenizer, max_length=MAX_LENGTH)


@pytest.mark.parametrize("limit", [0, -3])
def test_a_limit_below_one_is_a_clear_error(tokenizer, tmp_path, limit):
    with pytest.raises(EvalError, match="must be a positive number of examples"):
        BenchmarkSuite(EvalConfig(tasks=["piqa"], task_files=task_files(tmp_path), limit=limit), tokenizer)
