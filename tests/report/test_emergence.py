"""The emergence figure and the left-chance table, on synthetic run directories shaped like real ones."""

import csv
import json
import math

import pytest
import yaml
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure

from llamalite.report import build_report
from llamalite.report.emergence import Point, draw_emergence, first_above_chance, left_chance
from llamalite.report.figures import draw_stderr, metric_style
from llamalite.report.runs import BITS_PER_BYTE, NATS, load_run, load_runs, loss_unit, tokenizer_identity
from tests.report.test_figures import assert_drawn_png

STEPS = [0, 100, 200, 300, 400]
TOKENS_PER_STEP = 4096
PIQA = [0.50, 0.53, 0.545, 0.58, 0.61]  # stderr 0.02 -> leaves chance (0.5 + 2 x 0.02) at step 200 (0.545)
ARC = [0.25, 0.24, 0.26, 0.25, 0.27]  # stderr 0.03 -> never 0.06 above 0.25: "not yet"


def val_loss(step: int, scale: float) -> float:
    return scale * (3.0 + 5.0 * math.exp(-step / 150))


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def make_run(path, fingerprint: str | None, loss_scale: float = 1.0, bytes_per_token: float = 4.0,
             tokenizer_path: str | None = None):
    """metrics.jsonl (train and val records as the trainer writes them), evals.jsonl (as llamalite eval writes
    them: piqa and arc_easy at every checkpoint, hellaswag at the last one only), config.yaml and checkpoints."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"tokenizer": {"path": tokenizer_path, "vocab_size": 4096},
                                                      "train": {"max_steps": 400, "batch_tokens": TOKENS_PER_STEP}}))
    metrics = []
    for step in STEPS:
        loss = val_loss(step, loss_scale)
        metrics.append({"step": step, "time": 1000.0 + step, "train/loss": loss + 0.1, "train/lr": 1e-3,
                        "train/grad_norm": 1.0, "train/tokens": step * TOKENS_PER_STEP, "perf/tokens_per_s": 5e4})
        metrics.append({"step": step, "time": 1000.5 + step, "val/loss": loss, "val/perplexity": math.exp(loss),
                        "val/bits_per_byte": loss / math.log(2) / bytes_per_token})
    write_jsonl(path / "metrics.jsonl", metrics)
    evals = []
    for i, step in enumerate(STEPS):
        values = {"eval/piqa/acc": PIQA[i], "eval/piqa/acc_stderr": 0.02, "eval/arc_easy/acc": ARC[i],
                  "eval/arc_easy/acc_stderr": 0.03, "eval/arc_easy/acc_norm": ARC[i] + 0.01,
                  "eval/arc_easy/acc_norm_stderr": 0.03}
        if step == STEPS[-1]:
            values |= {"eval/hellaswag/acc": 0.31, "eval/hellaswag/acc_stderr": 0.015}
        evals.append({"step": step, "tokens": step * TOKENS_PER_STEP, "time": 2000.0 + step, "seconds": 3.0,
                      "source": "eval", "checkpoint": f"step_{step:07d}", "limit": 500, "metrics": values,
                      "chance": {"piqa": 0.5, "arc_easy": 0.25, "hellaswag": 0.25},
                      "n": {"piqa": 500, "arc_easy": 500, "hellaswag": 500}})
    write_jsonl(path / "evals.jsonl", evals)
    for step in (200, 400):
        folder = path / "checkpoints" / f"step_{step:07d}"
        folder.mkdir(parents=True)
        state = {"step": step, "tokens_seen": step * TOKENS_PER_STEP}
        if fingerprint:
            state["tokenizer_fingerprint"] = fingerprint
        (folder / "trainer_state.json").write_text(json.dumps(state))
    return path


@pytest.fixture
def same_tokenizer(tmp_path):
    return [make_run(tmp_path / "a", "f" * 64), make_run(tmp_path / "b", "f" * 64, loss_scale=1.1)]


@pytest.fixture
def two_tokenizers(tmp_path):
    return [make_run(tmp_path / "bpe4k", "a" * 64), make_run(tmp_path / "gpt2", "b" * 64, loss_scale=1.3,
                                                              bytes_per_token=4.6)]


def errorbars(ax) -> list[ErrorbarContainer]:
    return [c for c in ax.containers if isinstance(c, ErrorbarContainer)]


def panel(fig, task):
    return next(ax for ax in fig.axes if ax.get_title() == task)


def test_the_loss_axis_is_bits_per_byte_when_tokenizers_differ_and_nats_otherwise(same_tokenizer, two_tokenizers):
    for run_dirs, unit, other in ((two_tokenizers, BITS_PER_BYTE, NATS), (same_tokenizer, NATS, BITS_PER_BYTE)):
        runs = load_runs(run_dirs)
        assert loss_unit(runs) is unit
        fig = draw_emergence(runs)
        label = fig.get_supxlabel()
        assert unit.label in label and other.label not in label
        assert "lower loss to the right" in label
        ax = panel(fig, "piqa")
        xs = list(errorbars(ax)[0].lines[0].get_xdata())
        assert xs == pytest.approx([v[unit.key] for v in runs[0].val])
        assert ax.xaxis_inverted()  # lower loss to the right


def test_a_single_run_is_drawn_in_nats(same_tokenizer):
    assert loss_unit(load_runs(same_tokenizer[:1])) is NATS


def test_tokenizers_are_told_apart_by_fingerprint_else_by_configured_path(tmp_path):
    hub = [make_run(tmp_path / "x", None, tokenizer_path="gpt2"), make_run(tmp_path / "y", None,
                                                                           tokenizer_path="gpt2")]
    assert tokenizer_identity(load_run(hub[0])) == "path:gpt2" and loss_unit(load_runs(hub)) is NATS
    trained = [make_run(tmp_path / "p", None), make_run(tmp_path / "q", None)]  # each trained its own BPE: unknown
    assert tokenizer_identity(load_run(trained[0])) is None and loss_unit(load_runs(trained)) is BITS_PER_BYTE


def test_left_chance_is_the_first_step_two_standard_errors_above_chance(same_tokenizer):
    run = load_run(same_tokenizer[0])
    entries = {e.task: e for e in left_chance([run], NATS)}
    assert entries["piqa"].first.step == 200
    assert entries["piqa"].first.loss == pytest.approx(val_loss(200, 1.0))
    assert entries["arc_easy"].metric == "acc_norm" and entries["arc_easy"].first is None
    assert entries["hellaswag"].first.step == 400  # 0.31 > 0.25 + 2 x 0.015


def test_first_above_chance_is_strict_and_skips_points_without_stderr():
    series = [Point(0, 0.75, 0.125, 5.0), Point(10, 0.9, None, 4.0), Point(20, 0.7578125, 0.125, 3.0)]
    assert first_above_chance(series, 0.5).step == 20  # 0.75 is exactly 2 s.e. above (exact in binary): not yet
    assert first_above_chance(series[:2], 0.5) is None


def test_the_untrained_model_and_a_passing_fluke_have_not_left_chance():
    above, below = 0.33, 0.27  # stderr 0.03 around chance 0.25: above means more than 0.31
    series = [Point(0, above, 0.03, 5.0), Point(10, above, 0.03, 4.0), Point(20, below, 0.03, 3.5),
              Point(30, above, 0.03, 3.0), Point(40, above, None, 2.8), Point(50, above, 0.03, 2.5)]
    assert first_above_chance(series, 0.25).step == 30  # not 0 (untrained), not 10 (fell back at 20)
    assert first_above_chance(series[:3], 0.25) is None
    assert first_above_chance(series[:2], 0.25).step == 10


def test_a_perplexity_is_drawn_against_loss_on_a_log_panel_of_its_own(same_tokenizer):
    run_dir = same_tokenizer[0]
    with open(run_dir / "evals.jsonl", "a") as f:
        for i, step in enumerate(STEPS):
            f.write(json.dumps({"step": step, "tokens": step * TOKENS_PER_STEP, "time": 3000.0 + step,
                                "metrics": {"eval/lambada_openai/perplexity": 1e6 / 10 ** i,
                                            "eval/lambada_openai/acc": 0.0, "eval/lambada_openai/acc_stderr": 0.0},
                                "chance": {"lambada_openai": 0.0}, "n": {"lambada_openai": 200}}) + "\n")
    fig = draw_emergence(load_runs([run_dir]))
    ax = panel(fig, "lambada_openai (lower is better)")
    assert ax.get_yscale() == "log" and ax.xaxis_inverted()
    (line,) = ax.get_lines()
    assert list(line.get_ydata()) == [1e6 / 10 ** i for i in range(len(STEPS))]
    assert list(line.get_xdata()) == pytest.approx([val_loss(step, 1.0) for step in STEPS])
    assert panel(fig, "lambada_openai")  # its accuracy keeps a panel of its own


def test_single_evaluation_points_get_error_bars(same_tokenizer):
    fig = draw_emergence(load_runs(same_tokenizer))
    bars = errorbars(panel(fig, "hellaswag"))
    assert len(bars) == 2  # one per run, each a single point
    for container in bars:
        assert container.has_yerr and len(container.lines[0].get_xdata()) == 1
        (low, high), = [seg[:, 1] for seg in container.lines[2][0].get_segments()]
        assert high - low == pytest.approx(2 * 0.015)
    ax = Figure().subplots()
    draw_stderr(ax, [(400, 1e6, 0.31, 0.015)], "red")  # the benchmarks figure: a band cannot show one point
    assert len(errorbars(ax)) == 1
    ax = Figure().subplots()
    draw_stderr(ax, [(200, 5e5, 0.3, 0.015), (400, 1e6, 0.31, 0.015)], "red")
    assert not errorbars(ax) and len(ax.collections) == 1  # two points or more: a band


def test_acc_and_acc_norm_differ_in_marker_and_line_style(same_tokenizer):
    (acc_line, acc_marker), (norm_line, norm_marker) = metric_style("acc", 0), metric_style("acc_norm", 1)
    assert acc_line != norm_line and acc_marker != norm_marker
    ax = panel(draw_emergence(load_runs(same_tokenizer[:1])), "arc_easy")
    lines = {c.get_label(): c.lines[0] for c in errorbars(ax)}
    assert lines["acc"].get_marker() != lines["acc_norm"].get_marker()
    assert lines["acc"].get_linestyle() != lines["acc_norm"].get_linestyle()


def test_the_report_carries_the_emergence_figure_and_the_left_chance_table(two_tokenizers, tmp_path):
    index = build_report(two_tokenizers, tmp_path / "report")
    assert_drawn_png(index.parent / "emergence.png")
    assert_drawn_png(index.parent / "loss.png")
    page = index.read_text()
    section = page[page.index("<h2>Emergence"):page.index("Samples per checkpoint")]
    assert "(emergence.png)" in section and 'src="data:image/png;base64,' in section
    assert "bits per byte" in section and "different tokenizers" in section
    assert section.count("not yet") == 2  # arc_easy in each run
    assert "<td>piqa</td><td>acc</td><td class=\"num\">0.5</td><td class=\"num\">200</td>" in section
    rows = list(csv.DictReader(open(index.parent / "left_chance.csv")))
    piqa = [r for r in rows if r["task"] == "piqa"]
    assert len(rows) == section.count("<tr>") - 1 and len(piqa) == 2
    assert piqa[0]["step"] == "200" and piqa[0]["loss_unit"] == "bits_per_byte" and float(piqa[0]["val_loss"]) > 0
    assert all(r["step"] == "" for r in rows if r["task"] == "arc_easy")  # not yet
    points = list(csv.DictReader(open(index.parent / "emergence.csv")))
    assert {r["loss_unit"] for r in points} == {"bits_per_byte"} and {r["task"] for r in points} >= {"piqa"}
    summary = page[page.index("<h2>Summary"):page.index("<h2>", page.index("<h2>Summary") + 5)]
    assert "best val bits per byte" in summary and "compare the runs by bits per byte" in summary
    best = {r["run"]: r for r in csv.DictReader(open(index.parent / "summary.csv"))}
    assert float(best["gpt2"]["best_val_bits_per_byte"]) == pytest.approx(val_loss(400, 1.3) / math.log(2) / 4.6)
