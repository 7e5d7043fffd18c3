"""The emergence figure: each benchmark's score against validation loss across checkpoints, and when it left chance.

A score is joined with the validation loss recorded at the same step (metrics.jsonl or evals.jsonl, see
runs.validation_series). The loss axis is bits per byte where the runs' tokenizers differ, else nats per token,
and it is reversed: lower loss to the right, so training progresses left to right.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from llamalite.report.figures import WIDTH_IN, benchmark_panels, metric_style, run_color, save, say
from llamalite.report.runs import BITS_PER_BYTE, Benchmark, LossUnit, Run, headline_metric, loss_unit

SIGMAS = 2.0  # a score has left chance when it exceeds the chance level by this many standard errors


@dataclass(frozen=True)
class Point:
    step: int
    score: float
    stderr: float | None
    loss: float | None  # the validation loss at this step in the figure's unit; None where none was recorded


@dataclass(frozen=True)
class LeftChance:
    """A task's headline metric in one run, and the first checkpoint at which it left chance (None: not yet)."""

    run: str
    task: str
    metric: str
    chance: float
    first: Point | None


def points(run: Run, task: str, metric: str, unit: LossUnit) -> list[Point]:
    """The task's scores in step order, each with the validation loss of the same step."""
    losses = {v["step"]: v.get(unit.key) for v in run.val}
    bench = run.benchmarks.get(task)
    series = bench.series.get(metric, []) if bench else []
    return [Point(step, value, stderr, _number(losses.get(step))) for step, _, value, stderr in series]


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def first_above_chance(series: list[Point], chance: float, sigmas: float = SIGMAS) -> Point | None:
    """The first trained checkpoint (step > 0) from which on every score exceeds chance by `sigmas` standard errors.

    The untrained model (step 0) is left out: its score is chance plus noise, and at a few hundred examples a
    random model clears 2 standard errors now and then (HellaSwag acc_norm 0.32 +- 0.033 at step 0 of a real run).
    Every later score must stay above too, so one lucky checkpoint is not an emergence. A point without a standard
    error cannot tell: it is passed over (it neither starts nor breaks a run above chance)."""
    first = None
    for point in sorted(series, key=lambda p: p.step):
        if point.step <= 0 or point.stderr is None:
            continue
        if point.score - chance > sigmas * point.stderr:
            first = first or point
        else:
            first = None
    return first


def left_chance(runs: list[Run], unit: LossUnit) -> list[LeftChance]:
    """Per run and task with a chance level: where its headline metric (acc_norm, else acc) left chance."""
    rows = []
    for run in runs:
        for task, bench in run.benchmarks.items():
            metric = _scored_metric(bench)
            if metric is None or bench.chance is None:
                continue
            first = first_above_chance(points(run, task, metric, unit), bench.chance)
            rows.append(LeftChance(run.label, task, metric, bench.chance, first))
    return rows


def _scored_metric(bench: Benchmark) -> str | None:
    metric = headline_metric(bench)
    return metric if metric is not None and "perplexity" not in metric else None


# ------------------------------------------------------------------------------------------------ figure
def loss_axis_label(unit: LossUnit) -> str:
    return f"{unit.label}, reversed: lower loss to the right, so training progresses left to right"


def draw_emergence(runs: list[Run]) -> Figure:
    """One panel per task: score (±1 standard-error bars) against validation loss, chance line, left-chance star;
    a perplexity (LAMBADA's) on a log-scale panel of its own."""
    unit = loss_unit(runs)
    panels = benchmark_panels(runs)
    joined = [p.loss for run in runs for task, metrics, _ in panels for m in metrics
              for p in points(run, task, m, unit) if p.loss is not None]
    if not joined:
        fig = Figure(figsize=(WIDTH_IN, 2.5), layout="constrained")
        say(fig.subplots(), f"no benchmark score at a step with a {unit.label} yet: the emergence figure joins "
                            "evals.jsonl scores with the validation loss of the same step")
        return fig
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(WIDTH_IN, 3.4 * rows + 0.9), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    low, high = min(joined), max(joined)
    pad = 0.05 * (high - low) or 0.05 * abs(high) or 0.05
    for ax, (task, metrics, is_perplexity) in zip(axes, panels):
        if is_perplexity:
            draw_perplexity(ax, runs, task, metrics, unit)
        else:
            draw_task(ax, runs, task, metrics, unit)
        ax.set_xlim(high + pad, low - pad)  # reversed: lower loss to the right; one range for every panel
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.supxlabel(loss_axis_label(unit), fontsize=10)
    title = "Benchmark scores against validation loss (bars: ±1 standard error; star: left chance by 2 s.e.)"
    note = f"\n{textwrap.fill('Note: ' + (unit.reason or ''), 110)}" if unit is BITS_PER_BYTE else ""
    fig.suptitle(title + note, fontsize=10)
    return fig


def draw_task(ax, runs: list[Run], task: str, metrics: list[str], unit: LossUnit) -> None:
    for i, run in enumerate(runs):
        bench = run.benchmarks.get(task)
        if bench is None:
            continue
        for j, metric in enumerate(m for m in metrics if m in bench.series):
            series = [p for p in points(run, task, metric, unit) if p.loss is not None]
            if series:
                draw_series(ax, series, run_color(i), metric_style(metric, j),
                            f"{run.label} {metric}" if len(runs) > 1 else metric)
        chance, metric = bench.chance, _scored_metric(bench)
        first = first_above_chance(points(run, task, metric, unit), chance) if chance is not None and metric else None
        if first is not None and first.loss is not None:
            ax.plot([first.loss], [first.score], marker="*", markersize=14, color=run_color(i),
                    markeredgecolor="black", linestyle="none", zorder=5)
    chance = next((run.benchmarks[task].chance for run in runs if task in run.benchmarks), None)
    if chance is not None:
        ax.axhline(chance, color="#777777", linestyle=(0, (1, 1)), linewidth=1.8, label=f"chance {chance:g}")
    ax.set_title(task, fontsize=10)
    ax.set_ylabel("score", fontsize=9)
    ax.grid(True, alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], marker="*", markersize=10, color="#999999", markeredgecolor="black",
                          linestyle="none", label="left chance"))
    ax.legend(handles=handles, fontsize=7, loc="best")


def draw_perplexity(ax, runs: list[Run], task: str, metrics: list[str], unit: LossUnit) -> None:
    """A task's perplexity against validation loss, on a log scale (lower is better): no chance line, no stderr."""
    for i, run in enumerate(runs):
        for j, metric in enumerate(metrics):
            series = [p for p in points(run, task, metric, unit) if p.loss is not None]
            if series:
                linestyle, marker = metric_style(metric, j)
                ax.plot([p.loss for p in series], [p.score for p in series], color=run_color(i), marker=marker,
                        linestyle=linestyle, markersize=5, linewidth=1.3,
                        label=f"{run.label} {metric}" if len(runs) > 1 else metric)
    ax.set_yscale("log")
    ax.set_title(f"{task} (lower is better)", fontsize=10)
    ax.set_ylabel("perplexity", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def draw_series(ax, series: list[Point], color: str, style: tuple[str, str], label: str) -> None:
    """Scores against loss with ±1 standard-error bars (drawn on a single point too)."""
    linestyle, marker = style
    ax.errorbar([p.loss for p in series], [p.score for p in series],
                yerr=[p.stderr if p.stderr is not None else 0.0 for p in series], color=color, linestyle=linestyle,
                marker=marker, markersize=5, capsize=3, linewidth=1.3, label=label)


def emergence_figure(runs: list[Run], path: Path) -> Path:
    return save(draw_emergence(runs), path)
