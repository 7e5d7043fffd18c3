"""CSV exports of the series the figures draw, one row per point, with a `run` column to tell runs apart."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from llamalite.report import emergence
from llamalite.report.runs import Run, loss_unit, summary_row

SUMMARY_COLUMNS = ["run", "recipe", "path", "status", "steps", "tokens", "wall_seconds", "final_train_loss",
                   "best_val_loss", "best_val_step", "best_val_bits_per_byte", "best_val_bits_per_byte_step",
                   "final_scores"]
TRAIN_COLUMNS = ["step", "time", "train/tokens", "train/loss", "train/lr", "train/grad_norm", "train/skipped",
                 "perf/tokens_per_s", "perf/mfu"]


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([["" if value is None else value for value in row] for row in rows])
    return path


def train_rows(runs: list[Run]) -> list[list[Any]]:
    return [[run.label] + [r.get(column) for column in TRAIN_COLUMNS] for run in runs for r in run.train]


def val_rows(runs: list[Run]) -> list[list[Any]]:
    return [[run.label, v["step"], v["tokens"], v["time"], v["loss"], v["perplexity"], v["bits_per_byte"], v["source"]]
            for run in runs for v in run.val]


def benchmark_rows(runs: list[Run]) -> list[list[Any]]:
    rows = []
    for run in runs:
        for task, bench in run.benchmarks.items():
            for metric, points in bench.series.items():
                rows += [[run.label, step, tokens, task, metric, value, stderr, bench.chance, bench.n]
                         for step, tokens, value, stderr in points]
    return rows


def emergence_rows(runs: list[Run]) -> list[list[Any]]:
    """Every benchmark score with the validation loss of its checkpoint, in the emergence figure's unit."""
    unit = loss_unit(runs)
    return [[run.label, point.step, task, metric, point.score, point.stderr, bench.chance, unit.key, point.loss]
            for run in runs for task, bench in run.benchmarks.items() for metric in bench.series
            for point in emergence.points(run, task, metric, unit)]


def left_chance_rows(runs: list[Run]) -> list[list[Any]]:
    unit = loss_unit(runs)
    rows = []
    for entry in emergence.left_chance(runs, unit):
        first = entry.first
        where = [first.step, unit.key, first.loss, first.score, first.stderr] if first else [None] * 5
        rows.append([entry.run, entry.task, entry.metric, entry.chance, *where])
    return rows


def event_rows(runs: list[Run]) -> list[list[Any]]:
    detail_skip = {"step", "time", "event", "tokens"}
    return [[run.label, e["step"], e["tokens"], e.get("time"), e.get("event"),
             json.dumps({k: v for k, v in e.items() if k not in detail_skip})] for run in runs for e in run.events]


def sample_rows(runs: list[Run]) -> list[list[Any]]:
    return [[run.label, s["step"], s["tokens"], s.get("prompt"), s.get("completion")]
            for run in runs for s in run.samples]


def summary_rows(runs: list[Run]) -> list[list[Any]]:
    rows = []
    for run in runs:
        row = summary_row(run)
        scores = "; ".join(f"{name}={value:.4f}" for name, (value, _, _) in row["final_scores"].items())
        rows.append([row["run"], row["recipe"], row["path"], row["status"], row["steps"], row["tokens"],
                     round(row["wall_seconds"], 1), row["final_train_loss"], row["best_val_loss"],
                     row["best_val_step"], row["best_val_bits_per_byte"], row["best_val_bits_per_byte_step"], scores])
    return rows


def write_exports(runs: list[Run], out_dir: Path) -> list[Path]:
    """train.csv, val.csv, benchmarks.csv, emergence.csv, left_chance.csv, events.csv, samples.csv and summary.csv
    in out_dir."""
    return [
        write_csv(out_dir / "train.csv", ["run"] + TRAIN_COLUMNS, train_rows(runs)),
        write_csv(out_dir / "val.csv", ["run", "step", "tokens", "time", "val/loss", "val/perplexity",
                                        "val/bits_per_byte", "source"], val_rows(runs)),
        write_csv(out_dir / "benchmarks.csv", ["run", "step", "tokens", "task", "metric", "value", "stderr", "chance",
                                               "n"], benchmark_rows(runs)),
        write_csv(out_dir / "emergence.csv", ["run", "step", "task", "metric", "value", "stderr", "chance",
                                              "loss_unit", "val_loss"], emergence_rows(runs)),
        write_csv(out_dir / "left_chance.csv", ["run", "task", "metric", "chance", "step", "loss_unit", "val_loss",
                                                "value", "stderr"], left_chance_rows(runs)),
        write_csv(out_dir / "events.csv", ["run", "step", "tokens", "time", "event", "details"], event_rows(runs)),
        write_csv(out_dir / "samples.csv", ["run", "step", "tokens", "prompt", "completion"], sample_rows(runs)),
        write_csv(out_dir / "summary.csv", SUMMARY_COLUMNS, summary_rows(runs)),
    ]
