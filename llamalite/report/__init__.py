"""The training-dynamics report: `build_report(run_dirs)` writes index.html, PNG figures and CSV exports.

It only reads the run directories; the report goes to RUN_DIR/report/ for one run and to
<first run>/report/compare/ for several, unless an output directory is given.
"""

from __future__ import annotations

from pathlib import Path

from llamalite.errors import ReportError
from llamalite.files import atomic_write_text, claim_output
from llamalite.report.runs import Run, load_runs

__all__ = ["ReportError", "build_report", "default_out_dir"]


def default_out_dir(run_dirs: list[Path]) -> Path:
    first = Path(run_dirs[0]) / "report"
    return first if len(run_dirs) == 1 else first / "compare"


def build_report(run_dirs: list[Path | str], out_dir: Path | str | None = None) -> Path:
    """Write the report of one run (or several overlaid) and return the path of its index.html."""
    from llamalite.report.emergence import emergence_figure
    from llamalite.report.exports import write_exports
    from llamalite.report.figures import benchmark_figure, loss_figure, throughput_figure
    from llamalite.report.page import render_page

    if not run_dirs:
        raise ReportError("no run directory given: pass one or more, e.g. llamalite report runs/demo")
    run_dirs = [Path(p) for p in run_dirs]
    out = Path(out_dir) if out_dir is not None else default_out_dir(run_dirs)
    # A run's report/ folder is the report's own; anywhere else, the report is one more output of the policy
    claim = claim_output(out, "report", "the report", inputs=run_dirs, rerun=True, force_hint=None,
                         own_slots=[run_dir / "report" for run_dir in run_dirs])
    runs: list[Run] = load_runs(run_dirs)
    claim.create()
    figures = {
        "loss": loss_figure(runs, out / "loss.png"),
        "throughput": throughput_figure(runs, out / "throughput.png"),
        "benchmarks": benchmark_figure(runs, out / "benchmarks.png"),
        "emergence": emergence_figure(runs, out / "emergence.png"),
    }
    files = write_exports(runs, out) + list(figures.values())
    index = out / "index.html"
    atomic_write_text(index, render_page(runs, figures, files))  # a reloading browser never sees half of it
    return index

