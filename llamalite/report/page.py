"""The report's HTML page: one self-contained file, figures embedded as base64 PNGs, inline CSS, no external URL."""

from __future__ import annotations

import base64
import datetime as dt
from html import escape
from pathlib import Path
from typing import Any

from llamalite import __version__
from llamalite.report.emergence import LeftChance, left_chance
from llamalite.report.runs import BITS_PER_BYTE, Run, event_detail, loss_unit, summary_row

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto; max-width: 1100px;
       padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } \
h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.meta { color: #666; font-size: 0.9em; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.4em 0.8em; margin: 0.8em 0; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.sample { white-space: pre-wrap; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.85em;
            max-width: 480px; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
"""


# ------------------------------------------------------------------------------------------------ formatting
def fmt_tokens(tokens: float | None) -> str:
    if tokens is None:
        return "–"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if tokens >= size:
            return f"{tokens / size:.3g}{unit}"
    return f"{tokens:.0f}"


def fmt_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def fmt_number(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table(header: list[str], rows: list[list[str]], classes: dict[int, str] | None = None) -> str:
    """An HTML table from already escaped cell strings; `classes` gives a column index its CSS class."""
    classes = classes or {}
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td class=\"{classes[i]}\">{c}</td>" if i in classes else f"<td>{c}</td>"
                         for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ------------------------------------------------------------------------------------------------ sections
def summary_section(runs: list[Run]) -> str:
    rows = []
    for run in runs:
        row = summary_row(run)
        best = _best(row["best_val_loss"], row["best_val_step"])
        best_bpb = _best(row["best_val_bits_per_byte"], row["best_val_bits_per_byte_step"])
        scores = "<br>".join(
            f"{escape(name)} {value:.3f}" + (f" ± {stderr:.3f}" if stderr is not None else "") + f" (step {step})"
            for name, (value, stderr, step) in row["final_scores"].items()
        ) or "no evaluations yet"
        rows.append([escape(row["run"]), escape(row["recipe"]), escape(row["status"]), f"{row['steps']:,}",
                     fmt_tokens(row["tokens"]), fmt_seconds(row["wall_seconds"]), fmt_number(row["final_train_loss"]),
                     best, best_bpb, scores])
    header = ["run", "recipe", "status", "steps", "tokens", "wall time", "final train loss",
              "best val loss (nats per token)", "best val bits per byte", "final benchmark scores"]
    note = ""
    if loss_unit(runs) is BITS_PER_BYTE and len(runs) > 1:
        note = (f"<p>Note: {escape(BITS_PER_BYTE.reason or '')}; compare the runs by bits per byte, not by the loss "
                "per token.</p>")
    return "<h2>Summary</h2>" + table(header, rows, classes=dict.fromkeys([3, 4, 5, 6, 7, 8], "num")) + note


def _best(value: float | None, step: int | None) -> str:
    return f"{value:.4f} (step {step})" if value is not None else "–"


def figure_section(title: str, png: Path, caption: str) -> str:
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return (f"<h2>{escape(title)}</h2><figure><img alt=\"{escape(title)}\" src=\"data:image/png;base64,{data}\">"
            f"<figcaption>{caption} ({escape(png.name)})</figcaption></figure>")


def emergence_section(runs: list[Run], png: Path) -> str:
    unit = loss_unit(runs)
    caption = (f"Each benchmark's score (±1 standard-error bars) against the {escape(unit.label)} of the same "
               "checkpoint, one colour per run (acc: circles, solid; acc_norm: squares, dashed), the chance level "
               "dotted. The loss axis is reversed, lower loss to the right, so training progresses left to right. "
               "A star marks where the task left chance.")
    if unit.reason:
        caption += f" Note: {escape(unit.reason)}."
    return figure_section("Emergence: benchmarks against validation loss", png, caption) + left_chance_table(runs)


def left_chance_table(runs: list[Run]) -> str:
    rows = [left_chance_row(entry) for entry in left_chance(runs, loss_unit(runs))]
    if not rows:
        return "<p>No benchmark with a chance level scored yet.</p>"
    header = ["run", "task", "metric", "chance", "left chance at (step)", f"val loss there ({loss_unit(runs).key})",
              "score there"]
    intro = ("<p>Left chance at: the first checkpoint whose score exceeds the chance level by 2 standard errors "
             "(a score without a standard error cannot tell, and is passed over).</p>")
    return intro + table(header, rows, classes=dict.fromkeys([3, 4, 5, 6], "num"))


def left_chance_row(entry: LeftChance) -> list[str]:
    first = entry.first
    cells = [escape(entry.run), escape(entry.task), escape(entry.metric), f"{entry.chance:g}"]
    if first is None:
        return cells + ["not yet", "–", "–"]
    return cells + [f"{first.step:,}", fmt_number(first.loss), f"{first.score:.3f} ± {first.stderr:.3f}"]


def samples_section(runs: list[Run]) -> str:
    parts = ["<h2>Samples per checkpoint</h2>"]
    for run in runs:
        if len(runs) > 1:
            parts.append(f"<h3>{escape(run.label)}</h3>")
        parts.append(samples_table(run))
    return "".join(parts)


def samples_table(run: Run) -> str:
    if not run.samples:
        return ("<p>No samples yet: set train.sample_prompts and train.sample_interval "
                "to record some during training.</p>")
    prompts = list(dict.fromkeys(s.get("prompt", "") for s in run.samples))
    by_step: dict[int, dict[str, Any]] = {}
    for sample in run.samples:
        by_step.setdefault(sample["step"], {"tokens": sample["tokens"]})[sample.get("prompt", "")] = \
            sample.get("completion", "")
    header = ["step", "tokens"] + [f"<code>{escape(repr(p))}</code>" for p in prompts]
    rows = [[f"{step:,}", fmt_tokens(entry["tokens"])]
            + [escape(entry.get(p, "")) for p in prompts]
            for step, entry in sorted(by_step.items())]
    classes = {0: "num", 1: "num", **{i: "sample" for i in range(2, 2 + len(prompts))}}
    return table(header, rows, classes)


def events_section(runs: list[Run]) -> str:
    rows = []
    for run in runs:
        for event in run.events:
            if event.get("event") == "checkpoint":  # one per checkpoint written: bookkeeping, not an event to read
                continue
            when = dt.datetime.fromtimestamp(event["time"], dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S") \
                if isinstance(event.get("time"), (int, float)) else "–"
            rows.append([escape(run.label), f"{event['step']:,}", fmt_tokens(event["tokens"]), when,
                         escape(str(event.get("event"))), escape(event_detail(event))])
    if not rows:
        return "<h2>Events</h2><p>No events recorded.</p>"
    return "<h2>Events</h2>" + table(["run", "step", "tokens", "time (UTC)", "event", "details"], rows,
                                     classes=dict.fromkeys([1, 2], "num"))


def files_section(runs: list[Run], files: list[Path]) -> str:
    links = " · ".join(f"<a href=\"{escape(p.name)}\">{escape(p.name)}</a>" for p in files)
    checkpoints = "".join(
        f"<li>{escape(run.label)}: {escape(', '.join(c['name'] for c in run.checkpoints) or 'none yet')}</li>"
        for run in runs
    )
    return (f"<h2>Data</h2><p>CSV exports and figures beside this page: {links}</p>"
            f"<p>Checkpoints on disk:</p><ul>{checkpoints}</ul>")


def notes(runs: list[Run]) -> str:
    torn = [f"{escape(run.label)}: {run.torn_lines}" for run in runs if run.torn_lines]
    if not torn:
        return ""
    return ("<p class=\"note\">Incomplete JSON lines skipped (a run still being written, or a killed process): "
            + "; ".join(torn) + "</p>")


# ------------------------------------------------------------------------------------------------ page
def render_page(runs: list[Run], figures: dict[str, Path], files: list[Path]) -> str:
    labels = ", ".join(run.label for run in runs)
    generated = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    paths = "<br>".join(f"{escape(run.label)}: <code>{escape(str(run.path))}</code>" for run in runs)
    body = [
        f"<h1>Training report: {escape(labels)}</h1>",
        f"<p class=\"meta\">generated {generated} by llamalite {escape(__version__)} "
        f"(<code>llamalite report</code> regenerates it)<br>{paths}</p>",
        notes(runs),
        summary_section(runs),
        figure_section("Loss", figures["loss"],
                       "Training loss (solid) and validation loss (dashed, dots) against tokens seen, log scale; the "
                       "learning rate and the gradient norm before clipping share the axis. "
                       "Vertical lines mark events."),
        figure_section("Throughput", figures["throughput"],
                       "Tokens per second and model FLOPs utilisation against wall-clock time since each run started; "
                       "gaps are time the run was not running."),
        figure_section("Benchmarks", figures["benchmarks"],
                       "Each benchmark against tokens seen, with ±1 standard-error bands (error bars on a single "
                       "point) and the random-chance line; acc and acc_norm differ in marker and line style."),
        emergence_section(runs, figures["emergence"]) if "emergence" in figures else "",
        samples_section(runs),
        events_section(runs),
        files_section(runs, files),
    ]
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>llamalite report: {escape(labels)}</title><style>{CSS}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")
