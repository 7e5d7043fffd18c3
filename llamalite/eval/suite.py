"""The benchmark suite: tasks read and tokenized once, scored at any step, and the record an evaluation leaves.

Each evaluation of one step is one record of the run's `evals.jsonl`:
  {"step", "tokens", "time", "seconds", "source": "train" | "eval", "checkpoint", "limit",
   "metrics": {"eval/<task>/<metric>": value, "val/loss": ..., ...}, "chance": {task: p}, "n": {task: examples},
   "task_data": {task: fingerprint of the task's data (task_data_fingerprint)},
   "available": {task: records in the task's data before the limit} (absent in records of older versions)}
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from llamalite.config import EvalConfig
from llamalite.eval.harness import LogitsFn, TaskResult, example_requests, flat_metrics, score_requests, task_metrics
from llamalite.eval.tasks import Example, TaskSpec, load_task, resolve_tasks, task_data_fingerprint, task_source
from llamalite.tokenizer import Tokenizer

EVALS_FILE = "evals.jsonl"


@dataclass
class LoadedTask:
    spec: TaskSpec
    examples: list[Example]
    requests: list[tuple[list[int], list[int]]]  # tokenized once, scored at every evaluation
    fingerprint: str  # of the task's data: an evaluation on other data is another result
    available: int  # records in the task's data before the limit


class BenchmarkSuite:
    """The configured tasks, read and tokenized once, scored against any model that fits the tokenizer."""

    def __init__(self, eval_cfg: EvalConfig, tokenizer: Tokenizer, task_names: Iterable[str] | None = None):
        self.eval_cfg = eval_cfg
        self.tokenizer = tokenizer
        self.tasks = []
        for spec in resolve_tasks(task_names if task_names is not None else eval_cfg.tasks):
            source = task_source(spec, eval_cfg.data_dir, eval_cfg.task_files)
            examples, available = load_task(spec, source, eval_cfg.limit)
            self.tasks.append(LoadedTask(spec, examples, example_requests(tokenizer, examples),
                                         task_data_fingerprint(spec, source), available))

    @property
    def task_data(self) -> dict[str, str]:
        return {task.spec.name: task.fingerprint for task in self.tasks}

    @property
    def available(self) -> dict[str, int]:
        return {task.spec.name: task.available for task in self.tasks}

    def run(self, logits_fn: LogitsFn, max_length: int, device: torch.device,
            autocast: Any = None) -> dict[str, TaskResult]:
        results = {}
        for task in self.tasks:
            scores = score_requests(logits_fn, task.requests, max_length, self.eval_cfg.batch_size, device, autocast,
                                    progress=f"{task.spec.name} ({len(task.examples)} examples)")
            results[task.spec.name] = task_metrics(task.spec, task.examples, scores)
        return results


def eval_record(
    step: int, tokens: int, seconds: float, source: str, results: dict[str, TaskResult],
    val: dict[str, float] | None = None, checkpoint: str | None = None, limit: int | None = None,
    task_data: dict[str, str] | None = None, available: dict[str, int] | None = None,
) -> dict[str, Any]:
    record = {
        "step": step, "tokens": tokens, "time": time.time(), "seconds": seconds, "source": source,
        "checkpoint": checkpoint, "limit": limit,
        "metrics": {**(val or {}), **flat_metrics(results)},
        "chance": {name: r.chance for name, r in results.items()},
        "n": {name: r.n for name, r in results.items()},
        "task_data": task_data or {},
    }
    return {**record, "available": available} if available else record
