"""The report's figures, drawn with matplotlib's object-oriented API on the Agg canvas (no display, no pyplot state).

Token axes are logarithmic; where a point sits at 0 tokens (the step-0 evaluation) the axis is symlog, linear
between 0 and the first logged token count, so that point stays visible instead of being dropped.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from llamalite.report.runs import BITS_PER_BYTE, NATS, LossUnit, Marker, Run, loss_unit

RUN_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
# Event lines: the style tells the kind; the colour is the run's when several runs are overlaid, else black.
EVENT_STYLES = {  # kind -> (line style, line width, legend label)
    "resume": ("--", 1.3, "resume"),
    "world_size_change": ("-.", 1.3, "world-size change"),
    "optimizer_reset": ("-", 1.6, "optimizer reset"),
    "skipped_step": (":", 0.9, "skipped step"),
}
METRIC_STYLES = ["-", "--", ":", "-."]
# acc and acc_norm read apart in any colour: their own marker and line style; other metrics take the rest in turn.
NAMED_METRIC_STYLES = {"acc": ("-", "o"), "acc_norm": ("--", "s")}
OTHER_METRIC_MARKERS = ["^", "D", "v", "P"]
WIDTH_IN, DPI = 10.0, 100


def run_color(index: int) -> str:
    return RUN_COLORS[index % len(RUN_COLORS)]


def metric_style(metric: str, index: int) -> tuple[str, str]:
    """(line style, marker) of a metric: fixed for acc and acc_norm, else by its index among the panel's metrics."""
    return NAMED_METRIC_STYLES.get(metric, (METRIC_STYLES[(index + 2) % 4], OTHER_METRIC_MARKERS[index % 4]))


def save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, format="png", dpi=DPI)
    return path


def say(ax, text: str) -> None:
    """Write a message in an empty panel (no data yet, metric not recorded)."""
    ax.text(0.5, 0.5, textwrap.fill(text, 90), transform=ax.transAxes, ha="center", va="center", fontsize=11,
            color="#555555")
    ax.tick_params(left=False, bottom=False, labelleft=False, labelbottom=False)


# ------------------------------------------------------------------------------------------------ axes
def set_tokens_axis(ax, xs: list[float]) -> None:
    """Log x for tokens seen; symlog when a point sits at 0 tokens. Ticks read 0, 500, 1k, 2M ..."""
    positive = [x for x in xs if x > 0]
    ax.set_xlabel("tokens seen")
    if not positive:
        return
    low, high = min(positive), max(positive)
    if len(positive) == len(xs):
        ax.set_xscale("log")
        ax.set_xlim(low / 1.15, high * 1.15)
    else:
        ax.set_xscale("symlog", linthresh=low, linscale=0.25)
        ax.set_xlim(-0.05 * low, high * 1.15)
    ticks = token_ticks(low / 1.15, high * 1.15)
    ax.xaxis.set_major_locator(FixedLocator(([0.0] if len(positive) < len(xs) else []) + ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: short_count(x)))
    ax.xaxis.set_minor_locator(NullLocator())


def token_ticks(low: float, high: float) -> list[float]:
    """The powers of ten in [low, high]; 1-2-3-5 steps where fewer than two powers fall inside; else the ends."""
    decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    for multiples in ((1,), (1, 2, 3, 5)):
        ticks = [m * 10.0 ** k for k in decades for m in multiples if low <= m * 10.0 ** k <= high]
        if len(ticks) >= 2:
            return ticks
    return [float(f"{low * 1.1:.2g}"), float(f"{high / 1.1:.2g}")]


def short_count(x: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= size:
            return f"{x / size:g}{unit}"
    return f"{x:g}"


def mark_events(ax, runs: list[Run], x_of) -> set[str]:
    """Vertical lines at each run's events (x_of(run, marker) -> x or None); returns the kinds drawn."""
    drawn = set()
    for i, run in enumerate(runs):
        color = run_color(i) if len(runs) > 1 else "black"
        for marker in run.markers:
            x = x_of(run, marker)
            if x is None:
                continue
            style, width, _ = EVENT_STYLES[marker.kind]
            ax.axvline(x, color=color, linestyle=style, linewidth=width, alpha=0.75, zorder=1)
            drawn.add(marker.kind)
    return drawn


def event_handles(kinds: set[str]) -> list[Line2D]:
    return [Line2D([], [], color="black", linestyle=style, linewidth=width, label=label)
            for kind, (style, width, label) in EVENT_STYLES.items() if kind in kinds]


def tokens_of(run: Run, marker: Marker) -> float:
    return marker.tokens


def all_tokens(runs: list[Run]) -> list[float]:
    xs = [r["train/tokens"] for run in runs for r in run.train if "train/tokens" in r]
    xs += [v["tokens"] for run in runs for v in run.val]
    return xs


def add_legend(ax, kinds: set[str], fontsize: float = 8) -> None:
    handles, _ = ax.get_legend_handles_labels()
    handles += event_handles(kinds)
    if handles:
        ax.legend(handles=handles, fontsize=fontsize, loc="best")


# ------------------------------------------------------------------------------------------------ loss
def loss_figure(runs: list[Run], path: Path) -> Path:
    """Train and validation loss against tokens, with the LR and gradient norm on aligned panels below.

    Where the runs' tokenizers differ, the top panel overlays validation loss in bits per byte (with a note saying
    why) and the training loss, per token of each run's own tokenizer, moves to a panel of its own."""
    unit = loss_unit(runs)
    per_byte = unit is BITS_PER_BYTE
    fig = Figure(figsize=(WIDTH_IN, 11 if per_byte else 9), layout="constrained")
    axes = fig.subplots(4 if per_byte else 3, 1, sharex=True, height_ratios=[3, 2, 1, 1] if per_byte else [3, 1, 1])
    loss_ax, lr_ax, norm_ax = axes[0], axes[-2], axes[-1]
    train_ax = axes[1] if per_byte else loss_ax
    if not any(run.train or run.val for run in runs):
        say(loss_ax, "no training steps or validation logged yet")
        for ax in axes[1:]:
            ax.set_visible(False)
        return save(fig, path)
    for i, run in enumerate(runs):
        draw_loss(loss_ax, train_ax, lr_ax, norm_ax, run, run_color(i), several=len(runs) > 1, unit=unit)
    kinds = set()
    for ax in axes:
        kinds |= mark_events(ax, runs, tokens_of)
        ax.grid(True, which="major", alpha=0.3)
    loss_ax.set_ylabel(unit.label if per_byte else "loss (nats/token)")
    title = "Loss against tokens seen"
    loss_ax.set_title(title + (f"\n{textwrap.fill('Note: ' + unit.reason, 110)}" if per_byte else ""),
                      fontsize=10 if per_byte else None)
    if per_byte and not any(isinstance(v.get("bits_per_byte"), (int, float)) for run in runs for v in run.val):
        say(loss_ax, "val/bits_per_byte not recorded in these runs: validation losses per token of different "
                     "tokenizers are not comparable, so none is overlaid")
    if per_byte:
        train_ax.set_ylabel("train loss (nats per token\nof each run's tokenizer)")
    lr_ax.set_ylabel("learning rate")
    norm_ax.set_ylabel("grad norm\n(before clipping)")
    if max((r.get("train/grad_norm") or 0 for run in runs for r in run.train),
           default=0) > 20 * min_positive_norm(runs):
        norm_ax.set_yscale("log")
    set_tokens_axis(norm_ax, all_tokens(runs))
    add_legend(loss_ax, kinds)
    if per_byte:
        add_legend(train_ax, set())
    return save(fig, path)


def min_positive_norm(runs: list[Run]) -> float:
    norms = [r["train/grad_norm"] for run in runs for r in run.train if (r.get("train/grad_norm") or 0) > 0]
    return min(norms, default=math.inf)


def draw_loss(loss_ax, train_ax, lr_ax, norm_ax, run: Run, color: str, several: bool, unit: LossUnit = NATS) -> None:
    prefix = f"{run.label}: " if several else ""
    rows = [r for r in run.train if "train/tokens" in r]
    tokens = [r["train/tokens"] for r in rows]
    if rows:
        train_ax.plot(tokens, [r["train/loss"] for r in rows], color=color, linewidth=1.4,
                      label=f"{prefix}train loss")
        lr_ax.plot(tokens, [r.get("train/lr", math.nan) for r in rows], color=color, linewidth=1.2)
        norm_ax.plot(tokens, [r.get("train/grad_norm", math.nan) for r in rows], color=color, linewidth=1.0)
    val = [v for v in run.val if isinstance(v.get(unit.key), (int, float))]
    if val:
        name = "validation bits per byte" if unit is BITS_PER_BYTE else "validation loss"
        loss_ax.plot([v["tokens"] for v in val], [v[unit.key] for v in val], color=color, linestyle="--",
                     marker="o", markersize=4, label=f"{prefix}{name}")


# ------------------------------------------------------------------------------------------------ throughput
def throughput_figure(runs: list[Run], path: Path) -> Path:
    """Tokens/s and MFU against wall-clock time since each run's start (gaps are time the run was not running)."""
    rows = [r for run in runs for r in run.train if "perf/tokens_per_s" in r]
    has_mfu = any("perf/mfu" in r for r in rows)
    fig = Figure(figsize=(WIDTH_IN, 6 if has_mfu else 4.5), layout="constrained")
    speed_ax, mfu_ax = fig.subplots(2, 1, height_ratios=[1, 1] if has_mfu else [4, 1])
    if not rows:
        say(speed_ax, "no throughput logged yet")
        mfu_ax.set_visible(False)
        return save(fig, path)
    scale, unit = time_unit(runs)
    for i, run in enumerate(runs):
        draw_throughput(speed_ax, mfu_ax, run, run_color(i), scale, len(runs) > 1)
    axes = [speed_ax, mfu_ax] if has_mfu else [speed_ax]
    kinds = set()
    for ax in axes:
        kinds |= mark_events(ax, runs, lambda run, m: elapsed(run, m.time, scale))
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
    speed_ax.set_ylabel("tokens / s")
    speed_ax.set_title("Throughput against wall-clock time")
    axes[-1].set_xlabel(f"wall-clock time since the run started ({unit})")
    if has_mfu:
        mfu_ax.sharex(speed_ax)
        mfu_ax.set_ylabel("MFU (%)")
    else:
        say(mfu_ax, "MFU not recorded: the device's peak FLOP/s is unknown (set train.peak_flops to log perf/mfu)")
    add_legend(speed_ax, kinds)
    return save(fig, path)


def time_unit(runs: list[Run]) -> tuple[float, str]:
    longest = max((elapsed(run, r.get("time"), 1.0) or 0 for run in runs for r in run.train), default=0)
    if longest > 2 * 3600:
        return 3600.0, "hours"
    if longest > 120:
        return 60.0, "minutes"
    return 1.0, "seconds"


def elapsed(run: Run, time: float | None, scale: float) -> float | None:
    start = run.start_time
    if time is None or start is None:
        return None
    return (time - start) / scale


def draw_throughput(speed_ax, mfu_ax, run: Run, color: str, scale: float, several: bool) -> None:
    rows = [r for r in run.train if "perf/tokens_per_s" in r and "time" in r]
    xs = [elapsed(run, r["time"], scale) for r in rows]
    speed_ax.plot(xs, [r["perf/tokens_per_s"] for r in rows], color=color, marker=".", linewidth=1.2,
                  label=run.label if several else "tokens/s")
    mfu = [(x, 100 * r["perf/mfu"]) for x, r in zip(xs, rows) if "perf/mfu" in r]
    if mfu:
        mfu_ax.plot(*zip(*mfu), color=color, marker=".", linewidth=1.2)


# ------------------------------------------------------------------------------------------------ benchmarks
def benchmark_panels(runs: list[Run]) -> list[tuple[str, list[str], bool]]:
    """(task, metrics, is_perplexity) per panel: a task's accuracies share one panel, its perplexities another."""
    panels = []
    for task in sorted({task for run in runs for task in run.benchmarks}):
        metrics = sorted({m for run in runs if task in run.benchmarks for m in run.benchmarks[task].series})
        scores = [m for m in metrics if "perplexity" not in m]
        perplexities = [m for m in metrics if "perplexity" in m]
        panels += [(task, group, group is perplexities) for group in (scores, perplexities) if group]
    return panels


def benchmark_figure(runs: list[Run], path: Path) -> Path:
    """Each benchmark against tokens seen, with standard-error bands and its random-chance line."""
    panels = benchmark_panels(runs)
    if not panels:
        fig = Figure(figsize=(WIDTH_IN, 2.5), layout="constrained")
        say(fig.subplots(), "no benchmark evaluations yet (evals.jsonl is absent or empty): run "
                            "llamalite eval RUN_DIR --tasks all, or set eval.tasks and eval.interval")
        return save(fig, path)
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(WIDTH_IN, 3.2 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    tokens = [point[1] for run in runs for bench in run.benchmarks.values() for points in bench.series.values()
              for point in points]
    for k, (ax, (task, metrics, is_perplexity)) in enumerate(zip(axes, panels)):
        draw_benchmark(ax, runs, task, metrics, is_perplexity, events_in_legend=k == 0)
        set_tokens_axis(ax, tokens)  # one token range for every panel, so that they line up
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("Benchmarks against tokens seen (bands: ±1 standard error)")
    return save(fig, path)


def draw_stderr(ax, points, color: str) -> None:
    """±1 standard error: a band through two points or more, error bars on a single point (a band would not show)."""
    band = [(t, v - s, v + s) for _, t, v, s in points if s is not None]
    if len(points) == 1 and band:
        _, tokens, value, stderr = points[0]
        ax.errorbar([tokens], [value], yerr=[stderr], color=color, capsize=4, linestyle="none")
    elif band:
        ax.fill_between(*zip(*band), color=color, alpha=0.15, linewidth=0)


def draw_benchmark(ax, runs: list[Run], task: str, metrics: list[str], is_perplexity: bool,
                   events_in_legend: bool) -> None:
    for i, run in enumerate(runs):
        bench = run.benchmarks.get(task)
        if bench is None:
            continue
        for j, metric in enumerate(m for m in metrics if m in bench.series):
            points = bench.series[metric]
            tokens, values = [p[1] for p in points], [p[2] for p in points]
            label = f"{run.label} {metric}" if len(runs) > 1 else metric
            linestyle, marker = metric_style(metric, j)
            ax.plot(tokens, values, color=run_color(i), linestyle=linestyle, marker=marker, markersize=4, label=label)
            draw_stderr(ax, points, run_color(i))
    chance = next((run.benchmarks[task].chance for run in runs if task in run.benchmarks), None)
    if chance is not None and not is_perplexity:
        ax.axhline(chance, color="#777777", linestyle=(0, (1, 1)), linewidth=1.8, label=f"chance {chance:g}")
    if is_perplexity:
        ax.set_yscale("log")
    kinds = mark_events(ax, runs, tokens_of)
    n = next((run.benchmarks[task].n for run in runs if task in run.benchmarks and run.benchmarks[task].n), None)
    ax.set_title(f"{task}{' perplexity' if is_perplexity else ''}" + (f" (n={n})" if n else ""), fontsize=10)
    ax.grid(True, alpha=0.3)
    add_legend(ax, kinds if events_in_legend else set(), fontsize=7)

