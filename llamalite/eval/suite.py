"""The benchmark suite: tasks read and tokenized once, scored at any step, and the record an evaluation leaves.

Each evaluation of one step is one record of the run's `evals.jsonl`:
  {"step", "tokens", "time", "seconds", "source": "train" | "eval", "checkpoint", "limit",
   "metrics": {"eval/<task>/<metric>": value, "val/loss": ..., ...}, "chance": {task: p}, "n": {task: examples},
   "task_data": {task: fingerprint of the task's data (task_data_fingerprint)},
   "available": {task: records in the task's data before the limit} (absent in records of older versions),
   "skipped": {task: documents left out as too long for the model's context} (only with eval.skip_too_long)}

Before anything is scored, every request of every task is checked against the model's context (`fit`). A context
longer than the model's is left-truncated, as lm-evaluation-harness does; a continuation longer than the context
cannot be scored (lm-evaluation-harness cannot score it either), so such a document is an EvalError naming the task
and the documents, or, with eval.skip_too_long, is left out of the task and counted.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from llamalite.config import EvalConfig
from llamalite.errors import EvalError
from llamalite.eval.harness import LogitsFn, TaskResult, example_requests, flat_metrics, score_requests, task_metrics
from llamalite.eval.tasks import (
    LOGLIKELIHOOD,
    Example,
    TaskSpec,
    load_task,
    resolve_tasks,
    task_data_fingerprint,
    task_source,
)
from llamalite.tokenizer import Tokenizer

EVALS_FILE = "evals.jsonl"


@dataclass
class LoadedTask:
    spec: TaskSpec
    examples: list[Example]
    requests: list[tuple[list[int], list[int]]]  # tokenized once, scored at every evaluation
    fingerprint: str  # of the task's data: an evaluation on other data is another result
    available: int  # records in the task's data before the limit
    skipped: list[int] = field(default_factory=list)  # documents left out by fit(): a continuation too long

    def documents(self) -> list[tuple[Example, list[tuple[list[int], list[int]]]]]:
        """Each example with its requests (one per choice)."""
        out, position = [], 0
        for example in self.examples:
            count = len(example.continuations)
            out.append((example, self.requests[position:position + count]))
            position += count
        return out

    def scored(self) -> tuple[list[Example], list[tuple[list[int], list[int]]]]:
        """The examples and requests to score: all but the skipped documents."""
        skipped = set(self.skipped)
        kept = [doc for index, doc in enumerate(self.documents()) if index not in skipped]
        return [example for example, _ in kept], [request for _, requests in kept for request in requests]


def too_long_documents(task: LoadedTask, max_length: int) -> dict[int, int]:
    """Document index -> its longest continuation in tokens, for documents with a continuation longer than
    `max_length`: no left truncation of the context can make them fit."""
    longest = {index: max(len(continuation) for _, continuation in requests)
               for index, (_, requests) in enumerate(task.documents())}
    return {index: length for index, length in longest.items() if length > max_length}


def too_long_message(too_long: dict[str, dict[int, int]], sizes: dict[str, int], max_length: int) -> str:
    """One line: per task the first few documents (and how many), their continuations' lengths, and the fixes."""
    parts = []
    for task, documents in too_long.items():
        first = list(documents)[:3]
        etc = ", ..." if len(documents) > len(first) else ""
        parts.append(f"{task} documents {', '.join(map(str, first))}{etc} ({len(documents)} of {sizes[task]}) have "
                     f"continuations of {', '.join(str(documents[i]) for i in first)}{etc} tokens")
    return (f"{'; '.join(parts)}: longer than the model's context of {max_length} tokens, they cannot be scored "
            "(lm-evaluation-harness cannot score them either): evaluate with a model of a longer context "
            "(model.max_seq_len), or skip such documents with `llamalite eval --skip-too-long` "
            "(eval.skip_too_long=true in training)")


class BenchmarkSuite:
    """The configured tasks, read and tokenized once, scored against any model that fits the tokenizer."""

    def __init__(self, eval_cfg: EvalConfig, tokenizer: Tokenizer, task_names: Iterable[str] | None = None,
                 max_length: int | None = None):
        """With `max_length` (the model's context), every request is checked against it now (see `fit`)."""
        if eval_cfg.limit is not None and eval_cfg.limit < 1:
            raise EvalError(f"eval.limit (--limit) must be a positive number of examples per task, got "
                            f"{eval_cfg.limit}: leave it unset to score every example")
        self.eval_cfg = eval_cfg
        self.tokenizer = tokenizer
        self.fitted_to: int | None = None
        self.tasks = []
        for spec in resolve_tasks(task_names if task_names is not None else eval_cfg.tasks):
            source = task_source(spec, eval_cfg.data_dir, eval_cfg.task_files)
            examples, available = load_task(spec, source, eval_cfg.limit)
            self.tasks.append(LoadedTask(spec, examples, example_requests(tokenizer, examples),
                                         task_data_fingerprint(spec, source), available))
        if max_length is not None:
            self.fit(max_length)

    def fit(self, max_length: int) -> None:
        """Check every request of every task against the model's context, before anything is scored.

        A document with a continuation longer than `max_length` is an EvalError naming every such document of every
        task, or, with eval.skip_too_long, is left out of its task (`skipped`). The tokenization done at load is
        reused; fitting again to the same context does nothing.
        """
        if self.fitted_to == max_length:
            return
        too_long = {task.spec.name: too_long_documents(task, max_length) for task in self.tasks}
        too_long = {name: documents for name, documents in too_long.items() if documents}
        sizes = {task.spec.name: len(task.examples) for task in self.tasks}
        if too_long and not self.eval_cfg.skip_too_long:
            raise EvalError(too_long_message(too_long, sizes, max_length))
        every = [name for name, documents in too_long.items() if len(documents) == sizes[name]]
        if every:
            raise EvalError(f"every document of {', '.join(every)} has a continuation longer than the model's context "
                            f"of {max_length} tokens: evaluate with a model of a longer context (model.max_seq_len) "
                            "or leave the task out")
        for task in self.tasks:
            task.skipped = sorted(too_long.get(task.spec.name, {}))
        self.fitted_to = max_length

    @property
    def skipped(self) -> dict[str, int]:
        """Documents left out per task as too long for the context; empty unless eval.skip_too_long is set."""
        if not self.eval_cfg.skip_too_long:
            return {}
        return {task.spec.name: len(task.skipped) for task in self.tasks}

    @property
    def task_data(self) -> dict[str, str]:
        return {task.spec.name: task.fingerprint for task in self.tasks}

    @property
    def available(self) -> dict[str, int]:
        return {task.spec.name: task.available for task in self.tasks}

    def run(self, logits_fn: LogitsFn, max_length: int, device: torch.device,
            autocast: Any = None, share_prefixes: bool = True) -> dict[str, TaskResult]:
        """Every task scored with the model; every request was checked against `max_length` first (`fit`).
        share_prefixes=False scores every request in a row of its own (the harness before shared prefixes)."""
        self.fit(max_length)
        results = {}
        for task in self.tasks:
            examples, requests = task.scored()
            scores = score_requests(logits_fn, requests, max_length, self.eval_cfg.batch_size, device, autocast,
                                    progress=f"{task.spec.name} ({len(examples)} examples)",
                                    share_prefixes=share_prefixes, greedy=task.spec.kind == LOGLIKELIHOOD)
            results[task.spec.name] = task_metrics(task.spec, examples, scores)
        return results


def eval_record(
    step: int, tokens: int, seconds: float, source: str, results: dict[str, TaskResult],
    val: dict[str, float] | None = None, checkpoint: str | None = None, limit: int | None = None,
    task_data: dict[str, str] | None = None, available: dict[str, int] | None = None,
    skipped: dict[str, int] | None = None,
) -> dict[str, Any]:
    record = {
        "step": step, "tokens": tokens, "time": time.time(), "seconds": seconds, "source": source,
        "checkpoint": checkpoint, "limit": limit,
        "metrics": {**(val or {}), **flat_metrics(results)},
        "chance": {name: r.chance for name, r in results.items()},
        "n": {name: r.n for name, r in results.items()},
        "task_data": task_data or {},
    }
    if available:
        record["available"] = available
    if skipped:
        record["skipped"] = skipped
    return record
