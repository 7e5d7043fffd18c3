"""Metric writers (JSON Lines, plus the trackers: TensorBoard, W&B), device peak FLOP/s for MFU, and run-file
truncation on resume."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from llamalite.files import JsonlWriter, atomic_write_text
from llamalite.records import parse_run_record
from llamalite.train.trackers import TensorBoardTracker, Tracker

# Dense bf16 tensor-core peaks (FLOP/s) by substring of torch.cuda.get_device_name().
GPU_PEAK_BF16_FLOPS = {
    "H200": 989.4e12,
    "H100 PCIe": 756e12,  # before "H100": the first key found in the name wins
    "H100 NVL": 835e12,
    "H100": 989.4e12,  # SXM
    "A100": 312e12,
    "A10G": 125e12,
    "A6000": 154.8e12,  # RTX A6000 (the paper's GPUs)
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165.2e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
}


def device_peak_flops(device: torch.device, override: float | None = None) -> float | None:
    """Peak FLOP/s of the device, or None when unknown (CPUs: set train.peak_flops to get MFU)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in GPU_PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


class MetricsLogger:
    """Writes `metrics.jsonl` (one record per logged step) and `events.jsonl`, and hands every metric to the trackers
    (llamalite/train/trackers.py) under the same name and step. None: TensorBoard under `tb/` alone."""

    def __init__(self, run_dir: Path, trackers: Sequence[Tracker] | None = None):
        self.jsonl = JsonlWriter(run_dir / "metrics.jsonl")
        self.events = JsonlWriter(run_dir / "events.jsonl")
        self.trackers = list(trackers) if trackers is not None else [TensorBoardTracker(run_dir / "tb")]

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.jsonl.write({"step": step, "time": time.time(), **metrics})
        self.scalars(step, metrics)

    def scalars(self, step: int, metrics: dict[str, float]) -> None:
        """The trackers only: for metrics whose JSON record lives elsewhere (evals.jsonl)."""
        for tracker in self.trackers:
            tracker.scalars(step, metrics)

    def event(self, step: int, kind: str, **details: Any) -> None:
        self.events.write({"step": step, "time": time.time(), "event": kind, **details})

    def close(self) -> None:
        """Idempotent: the trainer closes it when the loop ends, and again if the run fails before the loop."""
        self.jsonl.close()
        self.events.close()
        for tracker in self.trackers:
            tracker.close()


class NullLogger:
    """The MetricsLogger (and samples writer) of ranks other than 0: they compute everything and write nothing."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def scalars(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def event(self, step: int, kind: str, **details: Any) -> None:
        pass

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def truncate_jsonl_after(path: Path, step: int) -> None:
    """Keep the records of steps up to `step` (a resumed run redoes the rest); rewritten atomically.

    A torn last line, left by a killed process, goes too.
    """
    if not path.exists():
        return
    with open(path, encoding="utf-8", errors="replace") as f:  # a damaged line is dropped like a torn one
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if (record_step := _record_step(line)) is not None and record_step <= step]
    if len(kept) == len(lines):
        return
    atomic_write_text(path, "".join(kept))


def last_step(path: Path) -> int | None:
    """The highest step of a JSON Lines file's records (None: no file, or no record with a step)."""
    if not path.exists():
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        steps = [step for line in f if line.strip() and (step := _record_step(line)) is not None]
    return max(steps, default=None)


CHECKPOINT_EVENT = "checkpoint"  # written after each checkpoint is complete
_NOT_A_WRITTEN_CHECKPOINT = ("checkpoint_corrupted",)


def checkpoints_recorded(events_path: Path) -> list[str]:
    """The checkpoint names a run's events.jsonl says it wrote or resumed from (torn or foreign lines ignored).

    These records outlive the checkpoints: a run whose checkpoints were all deleted is still told from one that
    stopped before its first."""
    if not events_path.exists():
        return []
    with open(events_path, encoding="utf-8", errors="replace") as f:
        records = [parse_run_record(line) for line in f if line.strip()]
    return [record["checkpoint"] for record in records
            if record is not None and isinstance(record.get("checkpoint"), str)
            and record.get("event") not in _NOT_A_WRITTEN_CHECKPOINT]


def _record_step(line: str) -> int | None:
    """The step of a record line; None for a torn or foreign line, or a step that is not an integer."""
    step = (parse_run_record(line) or {}).get("step")
    return step if type(step) is int else None
