"""Periodic jobs of the training loop: validation, in-loop benchmarks, samples.

Each callback sees the trainer only through `TrainerView`, so none imports the Trainer, and a fine-tuning trainer
(whose validation and samples differ) drives the same callbacks. A callback runs every `interval` steps, and when
the loop forces it: before the first step of a fresh run and after the last step.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from llamalite.config import Config
from llamalite.eval.suite import EVALS_FILE, BenchmarkSuite, eval_record
from llamalite.files import JsonlWriter
from llamalite.train.metrics import MetricsLogger, NullLogger

logger = logging.getLogger(__name__)
SAMPLES_FILE = "samples.jsonl"


class TrainerView(Protocol):
    """What a callback may see and ask of the trainer."""

    step: int
    tokens_seen: int
    config: Config
    model: nn.Module
    device: torch.device

    def autocast(self) -> contextlib.AbstractContextManager: ...

    def validation_metrics(self) -> dict[str, float]: ...

    def generate_samples(self) -> list[dict[str, Any]]: ...


@dataclass
class RunContext:
    """Where a run writes: its directory and metrics logger; only rank 0 writes files."""

    run_dir: Path
    metrics: MetricsLogger | NullLogger
    is_main: bool


class Callback:
    interval: int = 0  # <= 0: never, not even when forced
    records_file: str | None = None  # a JSON Lines file of the run directory that rank 0 appends records to

    def start(self, context: RunContext) -> None:
        self.context = context
        self.file: JsonlWriter | NullLogger = NullLogger()
        if context.is_main and self.records_file:
            self.file = JsonlWriter(context.run_dir / self.records_file)

    def maybe_run(self, trainer: TrainerView, force: bool) -> None:
        if self.interval > 0 and (force or trainer.step % self.interval == 0):
            self.run(trainer)

    def run(self, trainer: TrainerView) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.file.close()


class ValidationCallback(Callback):
    """val/loss (and what the trainer's validation adds) on the fixed held-out batches, into metrics.jsonl."""

    def __init__(self, interval: int):
        self.interval = interval
        self.history: list[tuple[int, float]] = []  # (step, val/loss)

    def run(self, trainer: TrainerView) -> None:
        started = time.perf_counter()
        val = trainer.validation_metrics()
        seconds = time.perf_counter() - started
        self.context.metrics.log(trainer.step, {**val, "train/tokens": trainer.tokens_seen, "val/seconds": seconds})
        self.history.append((trainer.step, val["val/loss"]))
        logger.info(f"step {trainer.step:>6}  val/loss {val['val/loss']:.4f}  ({seconds:.1f}s)")


class BenchmarkCallback(Callback):
    """The benchmark suite scored on the model: one evals.jsonl record and TensorBoard scalars per evaluation."""

    records_file = EVALS_FILE

    def __init__(self, suite: BenchmarkSuite, interval: int, limit: int | None):
        self.suite = suite
        self.interval = interval
        self.limit = limit

    def run(self, trainer: TrainerView) -> None:
        started = time.perf_counter()
        trainer.model.eval()
        results = self.suite.run(trainer.model, trainer.config.model.max_seq_len, trainer.device, trainer.autocast())
        seconds = time.perf_counter() - started
        record = eval_record(trainer.step, trainer.tokens_seen, seconds, "train", results, limit=self.limit,
                             task_data=self.suite.task_data, skipped=self.suite.skipped)
        self.file.write(record)
        self.context.metrics.scalars(trainer.step, {**record["metrics"], "eval/seconds": seconds,
                                                    "eval/tokens": trainer.tokens_seen})
        summary = "  ".join(f"{name} {r.metrics['acc']:.3f}" for name, r in results.items())
        logger.info(f"step {trainer.step:>6}  {summary}  ({seconds:.1f}s)")


class SamplesCallback(Callback):
    """Continuations of the configured prompts, into samples.jsonl."""

    records_file = SAMPLES_FILE

    def __init__(self, interval: int):
        self.interval = interval
        self.records: list[dict[str, Any]] = []

    def run(self, trainer: TrainerView) -> None:
        for record in trainer.generate_samples():
            self.file.write(record)
            self.records.append(record)
