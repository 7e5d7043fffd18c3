"""Read a run directory into the series and tables the report draws; never writes to it.

Everything here tolerates a run that is still being written: a torn last line of a JSON Lines file
(the trainer appends while we read) is skipped and counted, never an error.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from llamalite.errors import ReportError
from llamalite.records import read_json, read_run_records
from llamalite.schema import load_yaml

# The checkpoint directory names of llamalite.train.checkpoint, matched here without importing torch.
CHECKPOINT_NAME = re.compile(r"^step_(\d{7,})$")
PLOTTED_EVENTS = ("resume", "world_size_change", "optimizer_reset", "skipped_step")


@dataclass
class Marker:
    """An event drawn on the time axes: a resume, world-size change, optimizer reset or skipped step."""

    kind: str
    step: int
    tokens: int
    time: float | None
    detail: str = ""


@dataclass
class Benchmark:
    """One task's scores over training: metric -> [(step, tokens, value, stderr or None)]."""

    task: str
    chance: float | None = None
    n: int | None = None
    series: dict[str, list[tuple[int, float, float, float | None]]] = field(default_factory=dict)


@dataclass
class Run:
    path: Path
    label: str
    config: dict[str, Any]
    train: list[dict[str, Any]]  # metrics.jsonl records holding train/loss
    val: list[dict[str, Any]]  # {step, tokens, time, loss, perplexity, bits_per_byte, source}
    events: list[dict[str, Any]]  # events.jsonl as written, each with "tokens" added
    markers: list[Marker]
    benchmarks: dict[str, Benchmark]
    samples: list[dict[str, Any]]
    checkpoints: list[dict[str, Any]]  # {name, step, tokens}
    torn_lines: int  # incomplete or unreadable JSON lines skipped

    @property
    def start_time(self) -> float | None:
        times = [r["time"] for r in self.train + self.val + self.events if isinstance(r.get("time"), (int, float))]
        return min(times) if times else None


# ------------------------------------------------------------------------------------------------ reading
def read_jsonl_tolerant(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The records of a JSON Lines file with a step, and how many lines were skipped (torn or malformed)."""
    if not path.is_file():
        return [], 0
    objects, skipped = read_run_records(path)
    records = [r for r in objects if isinstance(r.get("step"), int) and not isinstance(r.get("step"), bool)]
    return records, skipped + len(objects) - len(records)


def check_run_dir(path: Path) -> None:
    if not path.is_dir():
        raise ReportError(f"{path} does not exist or is not a directory: pass a run directory such as runs/demo")
    if not (path / "metrics.jsonl").is_file() and not _checkpoint_dirs(path):
        raise ReportError(
            f"{path} is not a run directory: a run directory holds metrics.jsonl and checkpoints/step_XXXXXXX/ "
            "(written by llamalite train); pass one such as runs/demo"
        )


def load_run(path: Path, label: str | None = None) -> Run:
    """Read one run directory (see check_run_dir for what counts as one)."""
    path = Path(path)
    check_run_dir(path)
    metrics, torn_metrics = read_jsonl_tolerant(path / "metrics.jsonl")
    events, torn_events = read_jsonl_tolerant(path / "events.jsonl")
    evals, torn_evals = read_jsonl_tolerant(path / "evals.jsonl")
    samples, torn_samples = read_jsonl_tolerant(path / "samples.jsonl")
    config = _read_config(path / "config.yaml")
    checkpoints = _read_checkpoints(path)
    to_tokens = step_to_tokens(metrics, evals, checkpoints, config)
    for event in events:
        event["tokens"] = to_tokens(event["step"])
    for sample in samples:
        sample["tokens"] = to_tokens(sample["step"])
    return Run(
        path=path,
        label=label or path.name,
        config=config,
        train=[m for m in metrics if _is_number(m.get("train/loss"))],
        val=validation_series(metrics, evals, to_tokens),
        events=events,
        markers=event_markers(events),
        benchmarks=benchmark_series(evals, to_tokens),
        samples=samples,
        checkpoints=checkpoints,
        torn_lines=torn_metrics + torn_events + torn_evals + torn_samples,
    )


def load_runs(paths: list[Path]) -> list[Run]:
    """Read several runs, labelled by directory name (with the parent's name where two names clash)."""
    paths = [Path(p) for p in paths]
    for path in paths:
        check_run_dir(path)
    names = [p.resolve().name for p in paths]
    labels = [f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names)]
    return [load_run(path, label) for path, label in zip(paths, labels)]


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        config = load_yaml(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError):
        return {}
    return config if isinstance(config, dict) else {}


def _checkpoint_dirs(run_dir: Path) -> list[Path]:
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and CHECKPOINT_NAME.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.match(p.name).group(1)))


def _read_checkpoints(run_dir: Path) -> list[dict[str, Any]]:
    checkpoints = []
    for folder in _checkpoint_dirs(run_dir):
        try:
            state = read_json(folder / "trainer_state.json", "the checkpoint state", "", error=ReportError)
        except ReportError:
            state = {}  # a damaged checkpoint still has its step (its name); its tokens are unknown
        step = int(CHECKPOINT_NAME.match(folder.name).group(1))
        checkpoints.append({"name": folder.name, "step": step, "tokens": state.get("tokens_seen"),
                            "tokenizer": state.get("tokenizer_fingerprint")})
    return checkpoints


def tokenizer_identity(run: Run) -> str | None:
    """What tells the run's tokenizer apart: the fingerprint its newest checkpoint recorded (sha256 of the
    tokenizer's canonical JSON), else the tokenizer.path of config.yaml, else None (unknown: a tokenizer trained
    on the run's data is told apart only by its fingerprint)."""
    for checkpoint in reversed(run.checkpoints):
        if isinstance(checkpoint.get("tokenizer"), str):
            return checkpoint["tokenizer"]
    path = (run.config.get("tokenizer") or {}).get("path")
    return f"path:{path}" if path else None


def tokenizers_differ(runs: list[Run]) -> bool:
    """True where several runs do not all share one known tokenizer: their losses per token are not comparable."""
    identities = [tokenizer_identity(run) for run in runs]
    return len(runs) > 1 and (None in identities or len(set(identities)) > 1)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ------------------------------------------------------------------------------------------------ series
def step_to_tokens(metrics, evals, checkpoints, config: dict[str, Any]):
    """A function step -> tokens seen (int), interpolated between the steps whose token count was recorded.

    Falls back to step x train.batch_tokens where nothing was recorded (a batch size change shows in the records).
    """
    known: dict[int, float] = {}
    for record in metrics:
        if _is_number(record.get("train/tokens")):
            known[record["step"]] = record["train/tokens"]
    for record in evals:
        if _is_number(record.get("tokens")):
            known.setdefault(record["step"], record["tokens"])
    for checkpoint in checkpoints:
        if _is_number(checkpoint.get("tokens")):
            known.setdefault(checkpoint["step"], checkpoint["tokens"])
    batch_tokens = (config.get("train") or {}).get("batch_tokens") or 0
    if not known:
        return lambda step: int(step * batch_tokens)
    steps = np.array(sorted(known), dtype=float)
    tokens = np.array([known[int(s)] for s in steps], dtype=float)

    def to_tokens(step: int) -> int:
        if step in known:
            return int(known[step])
        if step > steps[-1] and batch_tokens:
            return int(tokens[-1] + (step - steps[-1]) * batch_tokens)
        return int(round(float(np.interp(step, steps, tokens))))

    return to_tokens


def validation_series(metrics, evals, to_tokens) -> list[dict[str, Any]]:
    """Validation loss per step from metrics.jsonl (the trainer) and evals.jsonl (llamalite eval); the trainer's
    wins."""
    by_step: dict[int, dict[str, Any]] = {}
    for record in evals:
        values = record.get("metrics") or {}
        if _is_number(values.get("val/loss")):
            by_step[record["step"]] = _val_point(record["step"], values, record.get("time"), "eval", to_tokens)
    for record in metrics:
        if _is_number(record.get("val/loss")):
            by_step[record["step"]] = _val_point(record["step"], record, record.get("time"), "train", to_tokens)
    return [by_step[step] for step in sorted(by_step)]


def _val_point(step: int, values: dict[str, Any], time: Any, source: str, to_tokens) -> dict[str, Any]:
    loss = values["val/loss"]
    perplexity = values.get("val/perplexity")
    return {
        "step": step,
        "tokens": to_tokens(step),
        "time": time,
        "loss": loss,
        "perplexity": perplexity if _is_number(perplexity) else (math.exp(loss) if loss < 700 else math.inf),
        "bits_per_byte": values.get("val/bits_per_byte"),
        "source": source,
    }


def merged_evals(evals: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Per step: the metrics, chance levels and example counts of all its records, later records winning per key."""
    merged: dict[int, dict[str, Any]] = defaultdict(lambda: {"metrics": {}, "chance": {}, "n": {}})
    for record in evals:
        entry = merged[record["step"]]
        for key in ("metrics", "chance", "n"):
            if isinstance(record.get(key), dict):
                entry[key].update(record[key])
        if _is_number(record.get("tokens")):
            entry["tokens"] = record["tokens"]
    return dict(sorted(merged.items()))


def benchmark_series(evals, to_tokens) -> dict[str, Benchmark]:
    """eval/<task>/<metric> values (with <metric>_stderr where given) per task, in step order."""
    benchmarks: dict[str, Benchmark] = {}
    for step, entry in merged_evals(evals).items():
        tokens = entry.get("tokens", to_tokens(step))
        values = entry["metrics"]
        for key, value in values.items():
            parts = key.split("/")
            if len(parts) != 3 or parts[0] != "eval" or parts[2].endswith("_stderr") or not _is_number(value):
                continue
            task, metric = parts[1], parts[2]
            bench = benchmarks.setdefault(task, Benchmark(task))
            stderr = values.get(f"{key}_stderr")
            bench.series.setdefault(metric, []).append((step, tokens, value, stderr if _is_number(stderr) else None))
            if _is_number(entry["chance"].get(task)):
                bench.chance = entry["chance"][task]
            if isinstance(entry["n"].get(task), int):
                bench.n = entry["n"][task]
    return dict(sorted(benchmarks.items()))


def event_markers(events: list[dict[str, Any]]) -> list[Marker]:
    """The events drawn on time axes; a resume on another world size also marks a world-size change."""
    markers = []
    explicit_changes = {e["step"] for e in events if e.get("event") == "world_size_change"}
    for event in events:
        kind = event.get("event")
        if kind in PLOTTED_EVENTS:
            markers.append(Marker(kind, event["step"], event["tokens"], event.get("time"), event_detail(event)))
        previous = event.get("previous_world_size", event.get("saved_world_size"))
        if (kind == "resume" and previous is not None and previous != event.get("world_size")
                and event["step"] not in explicit_changes):
            markers.append(Marker("world_size_change", event["step"], event["tokens"], event.get("time"),
                                  f"world size {previous} -> {event.get('world_size')}"))
    return markers


def event_detail(event: dict[str, Any]) -> str:
    """The event's own fields, as one short line."""
    skip = {"step", "time", "event", "tokens"}
    return ", ".join(f"{key}={value}" for key, value in event.items() if key not in skip)


# ------------------------------------------------------------------------------------------------ summary
def wall_seconds(run: Run) -> float:
    """Seconds the run spent running: the spans from each start or resume to its last record, added up."""
    times = sorted(r["time"] for r in run.train + run.val + run.events if _is_number(r.get("time")))
    if not times:
        return 0.0
    starts = sorted(e["time"] for e in run.events
                    if e.get("event") in ("start", "resume") and _is_number(e.get("time")))
    bounds = [times[0]] + [s for s in starts if s > times[0]] + [math.inf]
    total = 0.0
    for begin, end in zip(bounds, bounds[1:]):
        inside = [t for t in times if begin <= t < end]
        if inside:
            total += inside[-1] - begin
    return total


def run_status(run: Run) -> str:
    max_steps = (run.config.get("train") or {}).get("max_steps")
    step = last_step(run)
    if max_steps and step >= max_steps:
        return "finished"
    last_event = run.events[-1].get("event") if run.events else None
    if last_event == "stopped":
        return f"stopped at step {step} (resumable)"
    return f"in progress or interrupted at step {step}" + (f" of {max_steps}" if max_steps else "")


def last_step(run: Run) -> int:
    steps = [r["step"] for r in run.train + run.val + run.events] + [c["step"] for c in run.checkpoints]
    return max(steps, default=0)


def last_tokens(run: Run) -> float:
    points = [(r["step"], r["train/tokens"]) for r in run.train if _is_number(r.get("train/tokens"))]
    points += [(v["step"], v["tokens"]) for v in run.val]
    points += [(c["step"], c["tokens"]) for c in run.checkpoints if _is_number(c.get("tokens"))]
    return max(points, default=(0, 0.0))[1]


def headline_metric(bench: Benchmark) -> str | None:
    """The metric a task is reported by: acc_norm where scored, then acc, then whatever comes first."""
    for name in ("acc_norm", "acc"):
        if name in bench.series:
            return name
    return next(iter(bench.series), None)


def recipe_label(config: dict[str, Any]) -> str:
    """The training recipe in a few words, so that runs of different recipes read apart: optimizer, peak LR,
    schedule, and the model's recipe options that are on (e.g. `muon lr 3e-03 wsd, qk_norm, zero_init_residual`)."""
    optim, model = config.get("optim") or {}, config.get("model") or {}
    if not optim:
        return "unknown"
    words = f"{optim.get('name', 'adamw')} lr {optim.get('lr', 0):.0e} {optim.get('schedule', 'cosine')}"
    options = [key for key in ("qk_norm", "zero_init_residual") if model.get(key)]
    if model.get("logit_softcap"):
        options.append(f"logit_softcap {model['logit_softcap']:g}")
    return ", ".join([words, *options])


def summary_row(run: Run) -> dict[str, Any]:
    best = min(run.val, key=lambda v: v["loss"], default=None)
    best_bpb = min((v for v in run.val if v.get("bits_per_byte") is not None), key=lambda v: v["bits_per_byte"],
                   default=None)
    final_scores = {}
    for task, bench in run.benchmarks.items():
        metric = headline_metric(bench)
        if metric:
            step, _, value, stderr = bench.series[metric][-1]
            final_scores[f"{task}/{metric}"] = (value, stderr, step)
    return {
        "run": run.label,
        "recipe": recipe_label(run.config),
        "path": str(run.path),
        "status": run_status(run),
        "steps": last_step(run),
        "tokens": last_tokens(run),
        "wall_seconds": wall_seconds(run),
        "final_train_loss": run.train[-1]["train/loss"] if run.train else None,
        "best_val_loss": best["loss"] if best else None,
        "best_val_step": best["step"] if best else None,
        "best_val_bits_per_byte": best_bpb["bits_per_byte"] if best_bpb else None,  # comparable across tokenizers
        "best_val_bits_per_byte_step": best_bpb["step"] if best_bpb else None,
        "final_scores": final_scores,
    }


# ------------------------------------------------------------------------------------------------ loss unit
@dataclass(frozen=True)
class LossUnit:
    """The unit runs' validation losses are compared in: `key` of a run.val point, axis label, and why (if not
    the plain per-token loss)."""

    key: str
    label: str
    reason: str | None = None


NATS = LossUnit("loss", "validation loss (nats per token)")
BITS_PER_BYTE = LossUnit(
    "bits_per_byte", "validation loss (bits per byte)",
    "the runs use different tokenizers, so a loss per token is not comparable between them: validation loss is "
    "shown in bits per byte of text",
)


def loss_unit(runs: list[Run]) -> LossUnit:
    """Bits per byte where the runs' tokenizers differ (or cannot be told apart), else nats per token."""
    return BITS_PER_BYTE if tokenizers_differ(runs) else NATS
