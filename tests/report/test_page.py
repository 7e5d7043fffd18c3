import json
import re
import shutil

from llamalite.report.page import fmt_seconds, fmt_tokens, render_page
from llamalite.report.runs import load_run

EXTERNAL = re.compile(r"""https?://|(?:src|href)\s*=\s*["']?//""", re.IGNORECASE)


def render(runs, tmp_path):
    from llamalite.report.figures import benchmark_figure, loss_figure, throughput_figure

    figures = {"loss": loss_figure(runs, tmp_path / "loss.png"),
               "throughput": throughput_figure(runs, tmp_path / "throughput.png"),
               "benchmarks": benchmark_figure(runs, tmp_path / "benchmarks.png")}
    return render_page(runs, figures, list(figures.values()))


def test_the_page_embeds_its_figures_and_names_no_external_url(reset_run, tmp_path):
    page = render([load_run(reset_run)], tmp_path)
    assert page.count('src="data:image/png;base64,') == 3
    assert not EXTERNAL.search(page)
    assert "<link" not in page and "<script" not in page and "@import" not in page


def test_samples_form_a_table_of_steps_by_prompt(reset_run, tmp_path):
    page = render([load_run(reset_run)], tmp_path)
    section = page[page.index("Samples per checkpoint"):page.index("<h2>Events")]
    assert section.count("<tr>") == 1 + 3  # header + steps 0, 4 and 8
    assert "&#x27;the king&#x27;" in section and "&#x27;a lady&#x27;" in section


def test_text_from_the_run_is_escaped(reset_run, tmp_path):
    run_dir = shutil.copytree(reset_run, tmp_path / "run")
    with open(run_dir / "samples.jsonl", "a") as f:
        f.write(json.dumps({"step": 8, "prompt": "<b>", "completion": "<script>alert(1)</script>"}) + "\n")
    page = render([load_run(run_dir)], tmp_path)
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_a_run_without_evals_says_so(baseline_run, tmp_path):
    page = render([load_run(baseline_run)], tmp_path)
    assert "no evaluations yet" in page


def test_formats():
    assert (fmt_tokens(0), fmt_tokens(1_228_800), fmt_tokens(20e9)) == ("0", "1.23M", "20B")
    assert fmt_seconds(3725.4) == "1:02:05"
