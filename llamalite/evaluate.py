"""`llamalite eval`: validation loss and benchmarks of a checkpoint, or of every checkpoint of a run, appended to
the run's evals.jsonl (records as llamalite/eval/suite.py describes them), and the training-dynamics table."""

from __future__ import annotations

import json
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
from llamalite.errors import CheckpointError, DataError, EvalError
from llamalite.eval.harness import validation_metrics
from llamalite.eval.suite import EVALS_FILE, BenchmarkSuite, eval_record
from llamalite.eval.tasks import LOGLIKELIHOOD, TASKS, TaskSpec, resolve_tasks, task_data_fingerprint, task_source
from llamalite.files import (
    JsonlWriter,
    OutputClaim,
    atomic_write_text,
    claim_output_file,
    read_jsonl,
    read_regular_file,
)
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
    skip_too_long: bool = False  # leave out documents whose continuation is longer than the model's context


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
                suite = _load_suite(options, loaded)
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


def _load_suite(options: SweepOptions, loaded: InferenceModel) -> BenchmarkSuite:
    """The tasks read, tokenized and checked against the model's context: a document that cannot be scored fails
    here, before any checkpoint is scored."""
    eval_cfg = EvalConfig(tasks=options.tasks, data_dir=options.data_dir, task_files=options.task_files,
                          limit=options.limit, batch_size=options.batch_size, skip_too_long=options.skip_too_long)
    suite = BenchmarkSuite(eval_cfg, loaded.tokenizer, max_length=loaded.model.config.max_seq_len)
    for task, count in suite.skipped.items():
        if count:
            print(f"{task}: skipped {count} documents whose continuation is longer than the model's context of "
                  f"{loaded.model.config.max_seq_len} tokens (--skip-too-long)", file=sys.stderr)
    return suite


def _evaluate_one(loaded: InferenceModel, suite: BenchmarkSuite | None, options: SweepOptions, device: torch.device,
                  autocast: Any) -> dict[str, Any]:
    model = loaded.model.to(device)
    started = time.perf_counter()
    val = _checkpoint_validation(loaded, device, autocast) if options.val_loss else None
    results = suite.run(model, model.config.max_seq_len, device, autocast) if suite else {}
    seconds = time.perf_counter() - started
    return eval_record(loaded.step, loaded.tokens_seen, seconds, "eval", results, val, loaded.path.name, options.limit,
                       suite.task_data if suite else None, suite.available if suite else None,
                       suite.skipped if suite else None)


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
def dynamics_table(records: list[dict[str, Any]], width: int | None = None) -> str:
    """One row per step (later records win per metric), one column per metric, a benchmark's value as
    `value±stderr`: the training-dynamics table. With `width`, the metric columns wrap into blocks that fit it,
    each block repeating the step and tokens columns."""
    by_step: dict[int, dict[str, Any]] = {}
    for record in sorted(records, key=lambda r: (r["step"], r.get("time", 0))):
        row = by_step.setdefault(record["step"], {"tokens": record.get("tokens", 0), "metrics": {}})
        row["metrics"].update(record.get("metrics", {}))
    if not by_step:
        return "(no evaluations)"
    columns = sorted({name for row in by_step.values() for name in row["metrics"] if not name.endswith("_stderr")},
                     key=_column_order)
    keys = [[str(step), f"{row['tokens']:,}"] for step, row in sorted(by_step.items())]
    cells = [[_cell(row["metrics"], c) for c in columns] for _, row in sorted(by_step.items())]
    blocks = _column_blocks(["step", "tokens"], keys, [_short(c) for c in columns], cells, width)
    return "\n\n".join(blocks)


def _cell(metrics: dict[str, float], name: str) -> str:
    stderr = metrics.get(name + "_stderr")
    if stderr is None or math.isnan(stderr):
        return _fmt(metrics.get(name))
    return f"{_fmt(metrics.get(name))}±{stderr:.4f}"


def _column_blocks(key_header: list[str], keys: list[list[str]], header: list[str], cells: list[list[str]],
                   width: int | None) -> list[str]:
    """The table as blocks of whole columns, each at most `width` characters wide (at least one column each)."""
    col_widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    key_widths = [max(len(line[i]) for line in [key_header, *keys]) for i in range(len(key_header))]
    used, block, blocks = sum(key_widths) + 2 * (len(key_widths) - 1), [], []
    for i, w in enumerate(col_widths):
        if block and width is not None and used + sum(col_widths[j] + 2 for j in block) + w + 2 > width:
            blocks.append(block)
            block = []
        block.append(i)
    blocks.append(block)
    return [_render([key_header + [header[i] for i in b]] + [k + [c[i] for i in b] for k, c in zip(keys, cells)],
                    key_widths + [col_widths[i] for i in b]) for b in blocks]


def _render(lines: list[list[str]], widths: list[int]) -> str:
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines)


def _column_order(name: str) -> tuple[int, str]:
    return (0 if name.startswith("val/") else 1, name)


def _short(name: str) -> str:
    return name.removeprefix("eval/")


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.1f}"


# ---------------------------------------------------------------------------------------------- lm-eval's results JSON
# lm-evaluation-harness's task versions (its 0.4.x task YAMLs' metadata.version) and metric directions.
LM_EVAL_VERSIONS = {"boolq": 2.0}
HIGHER_IS_BETTER = {"acc": True, "acc_norm": True, "perplexity": False}


def lm_eval_results(records: list[dict[str, Any]], step: int, config: dict[str, Any]) -> dict[str, Any]:
    """The benchmark results of one step of evals.jsonl in lm-evaluation-harness's results layout (what its
    `--output_path` JSON holds, and what lm_eval.utils.make_table renders): "results" with `<metric>,none` keys,
    "versions", "n-shot", "higher_is_better", "n-samples", "configs", "config". A standard error that one example
    cannot give is "N/A", as lm-eval writes it."""
    metrics: dict[str, float] = {}
    n: dict[str, int] = {}
    available: dict[str, int] = {}
    for record in sorted((r for r in records if r["step"] == step), key=lambda r: r.get("time", 0)):
        metrics.update({k: v for k, v in record.get("metrics", {}).items() if k.startswith("eval/")})
        n.update(record.get("n", {}))
        available.update(record.get("available", {}))
    tasks = sorted({name.split("/")[1] for name in metrics})
    results = {task: _task_results(task, metrics, n.get(task, 0)) for task in tasks}
    return {
        "results": results,
        "group_subtasks": {},
        "configs": {task: _task_config(task) for task in tasks},
        "versions": {task: LM_EVAL_VERSIONS.get(task, 1.0) for task in tasks},
        "n-shot": {task: 0 for task in tasks},
        "higher_is_better": {task: {m: HIGHER_IS_BETTER[m] for m in TASKS[task].metrics} for task in tasks},
        "n-samples": {task: {"original": available.get(task, n.get(task, 0)), "effective": n.get(task, 0)}
                      for task in tasks},
        "config": config,
        "date": time.time(),
    }


def _task_results(task: str, metrics: dict[str, float], n: int) -> dict[str, Any]:
    out: dict[str, Any] = {"name": task, "alias": task, "sample_len": n}
    for metric in TASKS[task].metrics:
        out[f"{metric},none"] = metrics.get(f"eval/{task}/{metric}")
        stderr = metrics.get(f"eval/{task}/{metric}_stderr")
        if stderr is not None:
            out[f"{metric}_stderr,none"] = "N/A" if math.isnan(stderr) else stderr
    return out


def _task_config(task: str) -> dict[str, Any]:
    spec = TASKS[task]
    path, name, split = spec.hub
    return {"task": task, "dataset_path": path, "dataset_name": name, "test_split": split, "num_fewshot": 0,
            "output_type": "loglikelihood" if spec.kind == LOGLIKELIHOOD else "multiple_choice",
            "metric_list": [{"metric": m, "higher_is_better": HIGHER_IS_BETTER[m]} for m in spec.metrics]}


def write_results_json(path: Path, target: Path, options: SweepOptions, records: list[dict[str, Any]]) -> int:
    """Write the requested tasks' results at the newest checkpoint of `target` (the one checkpoint when `target` is
    one), taken from `records` (the run's evals.jsonl), as lm-eval's results JSON; returns the step. The file must be
    new or one this command wrote before (docs/safety.md)."""
    claim = claim_results_json(path, target)
    step = checkpoint_step_of(checkpoints_to_evaluate(target, options.all_checkpoints)[-1])
    tasks = {spec.name for spec in resolve_tasks(options.tasks)}
    mine = [{**r, "metrics": {k: v for k, v in r.get("metrics", {}).items() if _task_of(k) in tasks}}
            for r in records if r["step"] == step]
    if not any(r["metrics"] for r in mine):
        raise EvalError(f"no benchmark results at step {step} to write to {path}: pass --tasks")
    config = {"model": "llamalite", "model_args": str(target), "checkpoint": mine[-1].get("checkpoint"),
              "step": step, "tokens": mine[-1].get("tokens", 0), "batch_size": options.batch_size,
              "device": options.device, "dtype": options.dtype, "limit": options.limit, "bootstrap_iters": 0}
    text = json.dumps(lm_eval_results(mine, step, config), indent=2, allow_nan=False)
    claim.create()
    atomic_write_text(path, text + "\n")
    return step


def claim_results_json(path: Path, target: Path) -> OutputClaim:
    """The output policy for --output-json: a new file, or one this command wrote; never the target nor inside it
    or another artifact. Called before the evaluation too, so that a refusal costs nothing."""
    return claim_output_file(path, "eval-results", "--output-json", inputs=(target,), recognise=is_results_json)


def is_results_json(path: Path) -> bool:
    """Whether `path` is a results file that write_results_json wrote (its config names llamalite as the model)."""
    data = read_regular_file(path)  # never a FIFO, a device or a huge file: those are not ours, and unread
    try:
        results = json.loads(data.decode("utf-8")) if data is not None else None
    except ValueError:
        return False
    return isinstance(results, dict) and isinstance(results.get("config"), dict) and \
        results["config"].get("model") == "llamalite" and "results" in results


def _task_of(metric: str) -> str | None:
    parts = metric.split("/")  # eval/<task>/<metric>
    return parts[1] if len(parts) == 3 and parts[0] == "eval" else None
