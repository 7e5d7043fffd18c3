"""The pure parts of benchmarks/data_efficiency.py: documents of a plain text, recipes, tokens to a target loss."""

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "data_efficiency.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("data_efficiency", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_a_text_with_blank_lines_is_cut_at_paragraphs_joined_to_a_minimum_size(bench):
    paragraphs = [f"paragraph {i}\n" + "word " * 30 for i in range(10)]
    documents = bench.split_text("\n\n".join(paragraphs), doc_chars=300, doc_lines=200)
    assert 1 < len(documents) < 10
    assert all(len(d) >= 300 for d in documents[:-1])
    assert "".join(documents).replace("\n", "") == "".join(paragraphs).replace("\n", "")


def test_a_text_without_blank_lines_is_cut_into_chunks_of_lines(bench):
    text = "\n".join(f"sentence {i}." for i in range(450))
    documents = bench.split_text(text, doc_chars=4000, doc_lines=200)
    assert [d.count("\n") + 1 for d in documents] == [200, 200, 50]


def test_recipes_and_ablations_remove_one_component_each(bench):
    ours, baseline = bench.recipe_overrides("ours"), bench.recipe_overrides("baseline")
    assert baseline["optim.name"] == "adamw" and ours["optim.name"] == "muon" and ours["model.qk_norm"]
    without_muon = bench.recipe_overrides("ours-muon")
    assert without_muon["optim.name"] == "adamw" and without_muon["model.qk_norm"]
    assert bench.recipe_overrides("ours-wsd")["optim.schedule"] == "cosine"
    assert bench.recipe_overrides("ours+softcap") == {**ours, "model.logit_softcap": 15.0}


def test_tokens_to_a_target_interpolate_the_val_curve(bench):
    run = bench.Run("ours", 1e-3, [(0, 8.0), (100, 6.0), (200, 5.0), (300, 4.5)], 1000.0, 10)
    assert run.tokens_to(5.5) == pytest.approx(150)
    assert run.tokens_to(6.0) == 100
    assert run.tokens_to(4.0) is None
    assert (run.final_val_loss, run.best_val_loss) == (4.5, 4.5)
