import json

import numpy as np
from matplotlib.figure import Figure
from matplotlib.image import imread

from llamalite.report.figures import (
    benchmark_figure,
    benchmark_panels,
    loss_figure,
    set_tokens_axis,
    throughput_figure,
    token_ticks,
)
from llamalite.report.runs import load_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def rgb_pixels(path) -> np.ndarray:
    """The image as 0-255 RGB integers (decoding it checks the PNG is whole)."""
    return np.round(imread(path, format="png")[..., :3] * 255).astype(int)


def assert_drawn_png(path, min_colours=20):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = rgb_pixels(path)
    assert pixels.shape[1] == 1000  # 10 inches at 100 dpi
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) >= min_colours  # more than a blank canvas


def test_every_figure_is_a_drawn_png_for_one_run_and_for_two(reset_run, baseline_run, tmp_path):
    runs = [load_run(reset_run), load_run(baseline_run)]
    for name, draw in {"loss": loss_figure, "throughput": throughput_figure, "benchmarks": benchmark_figure}.items():
        assert_drawn_png(draw(runs[:1], tmp_path / f"{name}_one.png"))
        assert_drawn_png(draw(runs, tmp_path / f"{name}_two.png"))


def test_each_task_gets_a_score_panel_and_perplexities_their_own(reset_run, baseline_run):
    assert benchmark_panels([load_run(reset_run)]) == [
        ("hellaswag", ["acc", "acc_norm"], False),
        ("lambada_openai", ["acc"], False),
        ("lambada_openai", ["perplexity"], True),
        ("piqa", ["acc"], False),
    ]
    assert benchmark_panels([load_run(baseline_run)]) == []


def test_panels_of_a_run_with_nothing_logged_yet_are_still_drawn(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "time": 1.0, "val/loss": 5.0, "train/tokens": 0})
                                            + "\n")
    runs = [load_run(tmp_path)]
    for draw in (loss_figure, throughput_figure, benchmark_figure):
        assert_drawn_png(draw(runs, tmp_path / "figure.png"), min_colours=5)


def test_a_token_axis_with_a_point_at_zero_is_symlog_and_keeps_the_point():
    ax = Figure().subplots()
    set_tokens_axis(ax, [0, 1e5, 1e6, 1e7])
    assert ax.get_xscale() == "symlog" and ax.get_xlim()[0] < 0
    assert list(ax.xaxis.get_major_locator()()) == [0.0, 1e5, 1e6, 1e7]
    set_tokens_axis(ax, [1e5, 1e7])
    assert ax.get_xscale() == "log"


def test_token_ticks_fall_back_to_finer_steps_in_a_narrow_range():
    assert token_ticks(50, 5e4) == [100.0, 1000.0, 10000.0]
    assert token_ticks(150, 600) == [200.0, 300.0, 500.0]
    assert len(token_ticks(510, 590)) == 2
