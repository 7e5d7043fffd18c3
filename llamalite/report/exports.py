"""CSV exports of the series the figures draw, one row per point, with a `run` column to tell runs apart."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from llamalite.report.runs import Run, summary_row

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
                     row["best_val_step"], scores])
    return rows


def write_exports(runs: list[Run], out_dir: Path) -> list[Path]:
    """train.csv, val.csv, benchmarks.csv, events.csv, samples.csv and summary.csv in out_dir."""
    return [
        write_csv(out_dir / "train.csv", ["run"] + TRAIN_COLUMNS, train_rows(runs)),
        write_csv(out_dir / "val.csv", ["run", "step", "tokens", "time", "val/loss", "val/perplexity",
                                        "val/bits_per_byte", "source"], val_rows(runs)),
        write_csv(out_dir / "benchmarks.csv", ["run", "step", "tokens", "task", "metric", "value", "stderr", "chance",
                                               "n"], benchmark_rows(runs)),
        write_csv(out_dir / "events.csv", ["run", "step", "tokens", "time", "event", "details"], event_rows(runs)),
        write_csv(out_dir / "samples.csv", ["run", "step", "tokens", "prompt", "completion"], sample_rows(runs)),
        write_csv(out_dir / "summary.csv", ["run", "recipe", "path", "status", "steps", "tokens", "wall_seconds",
                                            "final_train_loss", "best_val_loss", "best_val_step", "final_scores"],
                  summary_rows(runs)),
    ]
