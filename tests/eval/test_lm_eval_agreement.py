"""llamalite eval and lm-evaluation-harness give identical acc / acc_norm on the same weights and files.

The model is exported to a transformers folder; lm_eval reads the same local files through task YAMLs that copy
its own (prompts, targets, metrics), pointed at `json` data files. HellaSwag's YAML keeps lm_eval's
preprocessing but falls back to `ctx` when a file has no ctx_a/ctx_b, as the shared extraction does.
"""

import json
import textwrap

import pytest
import torch

from llamalite.config import EvalConfig
from llamalite.eval.harness import score_requests, task_metrics
from llamalite.eval.suite import BenchmarkSuite
from llamalite.tokenizer import Tokenizer
from tests.conftest import SHARED_DATA
from tests.eval.conftest import export_random_model

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
if not (SHARED_DATA / "eval").is_dir():
    pytest.skip("../shared/data not present", allow_module_level=True)

LIMIT = 200
TASK_FILES = {
    "hellaswag": ("hellaswag_val.jsonl", "validation"),
    "arc_easy": ("arc_easy_test.jsonl", "test"),
    "piqa": ("piqa_validation.jsonl", "validation"),
    "winogrande": ("winogrande_dev.jsonl", "validation"),
}
TASK_BODIES = {
    "hellaswag": """\
        process_docs: !function hellaswag_utils.process_docs
        doc_to_text: "{{query}}"
        doc_to_target: "{{label}}"
        doc_to_choice: "choices"
        metric_list: [{metric: acc, aggregation: mean}, {metric: acc_norm, aggregation: mean}]""",
    "arc_easy": """\
        doc_to_text: "Question: {{question}}\\nAnswer:"
        doc_to_target: "{{choices.label.index(answerKey)}}"
        doc_to_choice: "{{choices.text}}"
        metric_list: [{metric: acc, aggregation: mean}, {metric: acc_norm, aggregation: mean}]""",
    "piqa": """\
        doc_to_text: "Question: {{goal}}\\nAnswer:"
        doc_to_target: label
        doc_to_choice: "{{[sol1, sol2]}}"
        metric_list: [{metric: acc, aggregation: mean}, {metric: acc_norm, aggregation: mean}]""",
    "winogrande": """\
        doc_to_text: !function winogrande_utils.doc_to_text
        doc_to_target: !function winogrande_utils.doc_to_target
        doc_to_choice: !function winogrande_utils.doc_to_choice
        metric_list: [{metric: acc, aggregation: mean}]""",
}
HELLASWAG_UTILS = '''
import re


def preprocess(text):
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\\\[.*?\\\\]", "", text)
    text = text.replace("  ", " ")
    return text


def process_docs(dataset):
    def _process_doc(doc):
        if doc.get("ctx_a") is not None and doc.get("ctx_b") is not None:
            ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        else:
            ctx = doc["ctx"]
        return {"query": preprocess(doc["activity_label"] + ": " + ctx),
                "choices": [preprocess(ending) for ending in doc["endings"]], "gold": int(doc["label"])}

    return dataset.map(_process_doc)
'''


def write_task_yamls(folder, eval_dir):
    from lm_eval.tasks.winogrande import preprocess_winogrande

    (folder / "hellaswag_utils.py").write_text(HELLASWAG_UTILS)
    (folder / "winogrande_utils.py").write_text(open(preprocess_winogrande.__file__).read())
    for task, (file_name, split) in TASK_FILES.items():
        header = textwrap.dedent(f"""\
            task: local_{task}
            dataset_path: json
            dataset_kwargs:
              data_files:
                {split}: {json.dumps(str(eval_dir / file_name))}
            output_type: multiple_choice
            {'validation_split' if split == 'validation' else 'test_split'}: {split}
            """)
        (folder / f"local_{task}.yaml").write_text(header + textwrap.dedent(TASK_BODIES[task]) + "\n")


def run_lm_eval(hf_dir, task_dir):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    output = simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},dtype=float32", device="cpu",
                             tasks=[f"local_{t}" for t in TASK_FILES], limit=LIMIT, batch_size=32,
                             task_manager=manager, log_samples=True)
    return {task: (output["results"][f"local_{task}"],
                   sorted(output["samples"][f"local_{task}"], key=lambda s: s["doc_id"]))
            for task in TASK_FILES}


def test_acc_and_acc_norm_equal_lm_evaluation_harness(tmp_path):
    checkpoint, hf_dir, model = export_random_model(tmp_path)
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    write_task_yamls(task_dir, SHARED_DATA / "eval")
    theirs = run_lm_eval(hf_dir, task_dir)

    tokenizer = Tokenizer.load(hf_dir / "tokenizer.json")
    suite = BenchmarkSuite(EvalConfig(tasks=list(TASK_FILES), data_dir=str(SHARED_DATA / "eval"), limit=LIMIT),
                           tokenizer)
    for loaded in suite.tasks:
        task = loaded.spec.name
        scores = score_requests(model, loaded.requests, model.config.max_seq_len, 32, torch.device("cpu"))
        ours = task_metrics(loaded.spec, loaded.examples, scores)
        results, samples = theirs[task]
        assert ours.n == LIMIT == len(samples)
        for metric in ("acc", "acc_norm") if task != "winogrande" else ("acc",):
            assert ours.metrics[metric] == results[f"{metric},none"], (task, metric)
            assert ours.metrics[f"{metric}_stderr"] == pytest.approx(results[f"{metric}_stderr,none"])
        # The same prompts and continuations, character for character, and the same log-likelihoods.
        their_pairs = [tuple(pair) for sample in samples for pair in sample["arguments"]]
        our_pairs = [pair for example in loaded.examples for pair in zip(example.contexts, example.continuations)]
        assert our_pairs == their_pairs, task
        their_lls = [ll for sample in samples for ll, _ in sample["filtered_resps"]]
        assert [ll for ll, _ in scores] == pytest.approx(their_lls, abs=2e-3), task
