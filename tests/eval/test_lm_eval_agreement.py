"""llamalite eval and lm-evaluation-harness give identical acc / acc_norm on the same weights and files.

The model is exported to a transformers folder; lm_eval reads the same local files through task YAMLs that copy
its own (benchmarks/lm_eval_tasks.py).

A second test imports transformers models whose tokenizer puts a BOS before every text (Llama 3 and TinyLlama
layouts): lm_eval adds it through the tokenizer, llamalite through the tokenizer's BOS rule; all 8 tasks agree.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

from llamalite.checkpoint.inference import load_for_inference
from llamalite.config import EvalConfig
from llamalite.eval.harness import score_requests, task_metrics
from llamalite.eval.suite import BenchmarkSuite
from llamalite.eval.tasks import TASKS
from llamalite.export.hf import import_hf
from llamalite.tokenizer import Tokenizer
from tests.bos_models import STYLES, bos_transformers_folder
from tests.conftest import SHARED_DATA
from tests.eval.conftest import export_random_model

ROOT = Path(__file__).resolve().parents[2]
lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
if not (SHARED_DATA / "eval").is_dir():
    pytest.skip("../shared/data not present", allow_module_level=True)

LIMIT = 200
BOS_LIMIT = 40  # per task, 8 tasks, 2 tokenizers
_spec = importlib.util.spec_from_file_location("lm_eval_tasks", ROOT / "benchmarks" / "lm_eval_tasks.py")
lm_eval_tasks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lm_eval_tasks)
FIRST_FOUR, TASK_FILES = lm_eval_tasks.FIRST_FOUR, lm_eval_tasks.TASK_FILES
write_task_yamls, run_lm_eval = lm_eval_tasks.write_task_yamls, lm_eval_tasks.run_lm_eval


def assert_same_scores(model, tokenizer, tasks, limit, theirs):
    """Per task: the same metrics (accuracies exactly), prompts, token-level requests and log-likelihoods."""
    suite = BenchmarkSuite(EvalConfig(tasks=list(tasks), data_dir=str(SHARED_DATA / "eval"), limit=limit), tokenizer)
    for loaded in suite.tasks:
        task = loaded.spec.name
        scores = score_requests(model, loaded.requests, model.config.max_seq_len, 32, torch.device("cpu"))
        ours = task_metrics(loaded.spec, loaded.examples, scores)
        results, samples = theirs[task]
        assert ours.n == limit == len(samples)
        for metric in TASKS[task].metrics:
            if metric == "perplexity":
                assert ours.metrics[metric] == pytest.approx(results[f"{metric},none"], rel=1e-3), task
                continue
            assert ours.metrics[metric] == results[f"{metric},none"], (task, metric)
            assert ours.metrics[f"{metric}_stderr"] == pytest.approx(results[f"{metric}_stderr,none"])
        # The same prompts and continuations, character for character, and the same log-likelihoods.
        their_pairs = [tuple(pair) for sample in samples for pair in sample["arguments"]]
        our_pairs = [pair for example in loaded.examples for pair in zip(example.contexts, example.continuations)]
        assert our_pairs == their_pairs, task
        their_lls = [ll for sample in samples for ll, _ in sample["filtered_resps"]]
        assert [ll for ll, _ in scores] == pytest.approx(their_lls, abs=2e-3), task
    return suite


def test_acc_and_acc_norm_equal_lm_evaluation_harness(tmp_path):
    checkpoint, hf_dir, model = export_random_model(tmp_path)
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    write_task_yamls(task_dir, SHARED_DATA / "eval")
    theirs = run_lm_eval(hf_dir, task_dir)
    assert_same_scores(model, Tokenizer.load(hf_dir / "tokenizer.json"), FIRST_FOUR, LIMIT, theirs)


@pytest.mark.parametrize("style", STYLES)
def test_an_imported_bos_adding_model_scores_as_lm_evaluation_harness_on_all_8_tasks(tmp_path, style):
    hf_dir = bos_transformers_folder(tmp_path / "hf", style)
    loaded = load_for_inference(import_hf(hf_dir, tmp_path / "imported"))
    assert loaded.tokenizer.prepends_bos
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    write_task_yamls(task_dir, SHARED_DATA / "eval", tuple(TASK_FILES))
    theirs = run_lm_eval(hf_dir, task_dir, tuple(TASK_FILES), BOS_LIMIT)
    suite = assert_same_scores(loaded.model, loaded.tokenizer, tuple(TASK_FILES), BOS_LIMIT, theirs)
    # Every request starts with the BOS, as lm_eval's do.
    assert all(context[0] == loaded.tokenizer.bos_id for task in suite.tasks for context, _ in task.requests)
