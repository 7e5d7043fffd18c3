import csv
import shutil
import subprocess

import numpy as np
import pytest

from llamalite.cli import main
from llamalite.errors import ReportError
from llamalite.report import build_report
from tests.report.test_figures import assert_drawn_png, rgb_pixels
from tests.report.test_page import EXTERNAL

FIGURES = ("loss.png", "throughput.png", "benchmarks.png")
CSVS = ("train.csv", "val.csv", "benchmarks.csv", "events.csv", "samples.csv", "summary.csv")
LOSS_BLUE = (0x1F, 0x77, 0xB4)  # the first run's colour, used only inside the figures


def run_files(run_dir):
    """Path -> (size, mtime) of everything in the run except its report/ folder."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in run_dir.rglob("*")
            if p.is_file() and "report" not in p.relative_to(run_dir).parts}


def test_the_report_of_one_run_goes_to_its_report_folder_and_only_reads_the_run(reset_run):
    before = run_files(reset_run)
    index = build_report([reset_run])
    assert index == reset_run / "report" / "index.html"
    for name in FIGURES:
        assert_drawn_png(index.parent / name)
    for name in CSVS:
        assert (index.parent / name).stat().st_size > 0
    assert not EXTERNAL.search(index.read_text())
    assert run_files(reset_run) == before


def test_two_runs_compared_overlay_in_one_report(reset_run, baseline_run):
    index = build_report([reset_run, baseline_run])
    assert index == reset_run / "report" / "compare" / "index.html"
    page = index.read_text()
    assert "Training report: reset, baseline" in page and not EXTERNAL.search(page)
    for name in FIGURES:
        assert_drawn_png(index.parent / name)
    with open(index.parent / "val.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["run"] for r in rows} == {"reset", "baseline"} and len(rows) == 6
    with open(index.parent / "summary.csv") as f:
        summary = {r["run"]: r for r in csv.DictReader(f)}
    assert (summary["reset"]["final_scores"].startswith("hellaswag/acc_norm=0.2800")
            and summary["baseline"]["final_scores"] == "")
    assert summary["reset"]["recipe"].startswith("adamw lr ") and "<td>adamw lr " in page


def test_cli_writes_the_report_where_asked_and_refuses_a_non_run(reset_run, tmp_path, capsys):
    assert main(["report", str(reset_run), "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip() == f"report: {tmp_path / 'out' / 'index.html'}"
    assert main(["report", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'out'} is not a run directory" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ReportError, match="no run directory"):
        build_report([])


def test_a_run_still_being_written_gets_its_report(reset_run, tmp_path):
    run_dir = shutil.copytree(reset_run, tmp_path / "live", ignore=shutil.ignore_patterns("report"))
    with open(run_dir / "events.jsonl", "a") as f:
        f.write('{"step": 9, "time": 1.0, "eve')
    page = build_report([run_dir]).read_text()
    assert "Incomplete JSON lines skipped" in page


def chromium_screenshot(index, out, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (the CI set-up installs Debian's chromium where it can)")
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
                    f"--screenshot={out}", "--window-size=1200,1600", index.as_uri()],
                   check=True, capture_output=True, timeout=120)
    return rgb_pixels(out)


def test_the_page_renders_in_headless_chromium_with_its_loss_figure(reset_run, baseline_run, tmp_path):
    index = build_report([reset_run, baseline_run], tmp_path / "report")
    pixels = chromium_screenshot(index, tmp_path / "shot.png", tmp_path)
    assert pixels.shape == (1600, 1200, 3)
    assert (pixels < 250).any(axis=2).mean() > 0.05  # not a blank white page
    # Text alone renders in a few hundred distinct colours (antialiasing); the figures bring well over a thousand.
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 800
    # The loss figure (the first image, drawn in the first run's colour) is on screen above the fold.
    loss_blue = (np.abs(pixels[:1300] - LOSS_BLUE) <= 12).all(axis=2)
    assert loss_blue.sum() > 500
