"""`llamalite eval`: validation loss and benchmarks of a checkpoint, or of every checkpoint of a run, appended to
the run's evals.jsonl (records as llamalite/eval/suite.py describes them), and the training-dynamics table."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llamalite.checkpoint.format import CHECKPOINT_NAME, is_checkpoint_dir, list_checkpoints, read_state
from llamalite.checkpoint.inference import InferenceModel, load_for_inference
from llamalite.config import EvalConfig
from llamalite.data.loader import validation_batches
from llamalite.errors import CheckpointError, DataError
from llamalite.eval.harness import validation_metrics
from llamalite.eval.suite import EVALS_FILE, BenchmarkSuite, eval_record
from llamalite.eval.tasks import TaskSpec, resolve_tasks, task_data_fingerprint, task_source
from llamalite.files import JsonlWriter, read_jsonl
from llamalite.runtime import autocast_context, resolve_device


# ------------------------------------------------------------------------------------------------ checkpoints
@dataclass
class SweepOptions:
    tasks: list[str]
    limit: int | None = None
    all_checkpoints: bool = False
    val_loss: bool = True
    batch_size: int = 32
    data_dir: str | None = None
    task_files: dict[str, str] = field(default_factory=dict)
    device: str = "auto"
    dtype: str = "fp32"


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run directory a checkpoint belongs to (runs/<name>/checkpoints/step_X), or None for a lone checkpoint."""
    run_dir = checkpoint.resolve().parent.parent
    is_run = (run_dir / "config.yaml").exists() or (run_dir / "metrics.jsonl").exists()
    return run_dir if checkpoint.resolve().parent.name == "checkpoints" and is_run else None


def checkpoints_to_evaluate(target: Path, all_checkpoints: bool) -> list[Path]:
    if is_checkpoint_dir(target):
        return [target]
    found = list_checkpoints(target / "checkpoints")
    if not found:
        raise CheckpointError(f"{target} is neither a checkpoint nor a run directory with checkpoints: pass "
                              "runs/<name> or runs/<name>/checkpoints/step_XXXXXXX")
    return found if all_checkpoints else found[-1:]


def checkpoint_step_of(checkpoint: Path) -> int:
    """The step of a checkpoint: from a run's directory name, else from its trainer state."""
    named = CHECKPOINT_NAME.match(checkpoint.name)
    return int(named.group(1)) if named else int(read_state(checkpoint)["step"])


def already_done(records: list[dict[str, Any]], step: int, wanted: list[str], limit: int | None,
                 task_data: dict[str, str]) -> bool:
    """Whether evals.jsonl already holds every wanted metric of this step, measured with the same limit and, for a
    benchmark, on the same task data (task_data: task -> fingerprint)."""
    have = set()
    for record in records:
        if record.get("step") == step and record.get("limit") == limit:
            recorded = record.get("task_data", {})
            have.update(name for name in record.get("metrics", {})
                        if not name.startswith("eval/") or _same_task_data(name, recorded, task_data))
    return all(name in have for name in wanted)


def _same_task_data(metric: str, recorded: dict[str, str], task_data: dict[str, str]) -> bool:
    task = metric.split("/")[1]  # eval/<task>/<metric>
    return task in recorded and recorded[task] == task_data.get(task)


def wanted_metric_names(specs: list[TaskSpec], val_loss: bool) -> list[str]:
    names = [f"eval/{spec.name}/{metric}" for spec in specs for metric in spec.metrics]
    return (["val/loss"] if val_loss else []) + names


def evaluate_checkpoints(target: Path, options: SweepOptions) -> list[dict[str, Any]]:
    """Evaluate the newest (or every) checkpoint of `target`, append to the run's evals.jsonl, return the records."""
    checkpoints = checkpoints_to_evaluate(target, options.all_checkpoints)
    run_dir = run_dir_of(checkpoints[0])
    specs = resolve_tasks(options.tasks) if options.tasks else []
    task_data = {spec.name: task_data_fingerprint(spec, task_source(spec, options.data_dir, options.task_files))
                 for spec in specs}
    existing = read_jsonl(run_dir / EVALS_FILE) if run_dir else []
    device = resolve_device(options.device)
    autocast = autocast_context(device, options.dtype)
    suite = None
    writer = JsonlWriter(run_dir / EVALS_FILE) if run_dir else None
    records = []
    try:
        for checkpoint in checkpoints:
            step = checkpoint_step_of(checkpoint)
            wanted = wanted_metric_names(specs, options.val_loss)
            if run_dir and already_done(existing, step, wanted, options.limit, task_data):
                print(f"{checkpoint.name}: already evaluated (in {run_dir / EVALS_FILE}), skipped", file=sys.stderr)
                continue
            loaded = load_for_inference(checkpoint)
            if suite is None and specs:
                eval_cfg = EvalConfig(tasks=options.tasks, data_dir=options.data_dir, task_files=options.task_files,
                                      limit=options.limit, batch_size=options.batch_size)
                suite = BenchmarkSuite(eval_cfg, loaded.tokenizer)
            elif suite is not None and loaded.tokenizer.fingerprint != suite.tokenizer.fingerprint:
                raise CheckpointError(f"{checkpoint} uses another tokenizer than the checkpoints before it: "
                                      "evaluate checkpoints of one run at a time")
            record = _evaluate_one(loaded, suite, options, device, autocast)
            records.append(record)
            if writer:
                writer.write(record)
            print(f"{checkpoint.name}: evaluated in {record['seconds']:.1f}s", file=sys.stderr)
    finally:
        if writer:
            writer.close()
    return records


def _evaluate_one(loaded: InferenceModel, suite: BenchmarkSuite | None, options: SweepOptions, device: torch.device,
                  autocast: Any) -> dict[str, Any]:
    model = loaded.model.to(device)
    started = time.perf_counter()
    val = _checkpoint_validation(loaded, device, autocast) if options.val_loss else None
    results = suite.run(model, model.config.max_seq_len, device, autocast) if suite else {}
    seconds = time.perf_counter() - started
    return eval_record(loaded.step, loaded.tokens_seen, seconds, "eval", results, val, loaded.path.name, options.limit,
                       suite.task_data if suite else None)


def _checkpoint_validation(loaded: InferenceModel, device: torch.device, autocast: Any) -> dict[str, float] | None:
    """Val loss on the run's held-out split, with the run's fixed batches; None when the data is not here."""
    config = loaded.config
    data_dir = Path(config.data.out_dir)
    if not (data_dir / "manifest.json").is_file():
        print(f"{loaded.path.name}: no validation loss ({data_dir}/manifest.json not found)", file=sys.stderr)
        return None
    seq_len = config.train.seq_len or config.model.max_seq_len
    try:
        batches = validation_batches(data_dir, config.train.micro_batch_size, seq_len, config.train.val_batches)
    except DataError as exc:
        print(f"{loaded.path.name}: no validation loss ({exc})", file=sys.stderr)
        return None
    return validation_metrics(loaded.model, batches, loaded.tokenizer.token_byte_lengths(), device, autocast)


def read_evals_for(target: Path, options: SweepOptions, computed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the table shows: every record of the run measured with the same limit, or what was just computed."""
    checkpoints = checkpoints_to_evaluate(target, options.all_checkpoints)
    run_dir = run_dir_of(checkpoints[0])
    if run_dir is None:
        return computed
    return [r for r in read_jsonl(run_dir / EVALS_FILE) if r.get("limit") == options.limit]


# ------------------------------------------------------------------------------------------------ the table
def dynamics_table(records: list[dict[str, Any]]) -> str:
    """One row per step (later records win per metric), one column per metric: the training-dynamics table."""
    by_step: dict[int, dict[str, Any]] = {}
    for record in sorted(records, key=lambda r: (r["step"], r.get("time", 0))):
        row = by_step.setdefault(record["step"], {"tokens": record.get("tokens", 0), "metrics": {}})
        row["metrics"].update({k: v for k, v in record.get("metrics", {}).items() if not k.endswith("_stderr")})
    columns = sorted({name for row in by_step.values() for name in row["metrics"]}, key=_column_order)
    if not by_step:
        return "(no evaluations)"
    header = ["step", "tokens"] + [_short(c) for c in columns]
    lines = [header]
    for step, row in sorted(by_step.items()):
        lines.append([str(step), f"{row['tokens']:,}"] + [_fmt(row["metrics"].get(c)) for c in columns])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines)


def _column_order(name: str) -> tuple[int, str]:
    return (0 if name.startswith("val/") else 1, name)


def _short(name: str) -> str:
    return name.removeprefix("eval/")


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.1f}"
