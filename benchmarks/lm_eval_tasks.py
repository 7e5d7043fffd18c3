"""lm-evaluation-harness task YAMLs over local files, for side-by-side checks (tests) and timings (benchmarks).

The YAMLs copy lm_eval's own (prompts, targets, metrics) and point them at `json` data files in the layout of
../shared/data/eval. HellaSwag's keeps lm_eval's preprocessing but falls back to `ctx` when a file has no
ctx_a/ctx_b, as the shared extraction does; BoolQ's reads the `answer` of google/boolq where super_glue has `label`.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

TASK_FILES = {
    "hellaswag": ("hellaswag_val.jsonl", "validation"),
    "arc_easy": ("arc_easy_test.jsonl", "test"),
    "piqa": ("piqa_validation.jsonl", "validation"),
    "winogrande": ("winogrande_dev.jsonl", "validation"),
    "arc_challenge": ("arc_challenge_test.jsonl", "test"),
    "boolq": ("boolq_validation.jsonl", "validation"),
    "openbookqa": ("openbookqa_test.jsonl", "test"),
    "lambada_openai": ("lambada_openai_test.jsonl", "test"),
}
FIRST_FOUR = ("hellaswag", "arc_easy", "piqa", "winogrande")
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
    "boolq": """\
        doc_to_text: "{{passage}}\\nQuestion: {{question}}?\\nAnswer:"
        doc_to_target: "{{answer | int}}"
        doc_to_choice: ["no", "yes"]
        metric_list: [{metric: acc}]""",
    "openbookqa": """\
        doc_to_text: question_stem
        doc_to_target: "{{choices.label.index(answerKey.lstrip())}}"
        doc_to_choice: "{{choices.text}}"
        metric_list: [{metric: acc, aggregation: mean}, {metric: acc_norm, aggregation: mean}]""",
    "lambada_openai": """\
        doc_to_text: "{{text.split(' ')[:-1]|join(' ')}}"
        doc_to_target: "{{' '+text.split(' ')[-1]}}"
        metric_list: [{metric: perplexity, aggregation: perplexity}, {metric: acc, aggregation: mean}]""",
}
TASK_BODIES["arc_challenge"] = TASK_BODIES["arc_easy"]
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


def write_task_yamls(folder: Path, eval_dir: Path, tasks=FIRST_FOUR) -> None:
    from lm_eval.tasks.winogrande import preprocess_winogrande

    (folder / "hellaswag_utils.py").write_text(HELLASWAG_UTILS)
    (folder / "winogrande_utils.py").write_text(open(preprocess_winogrande.__file__).read())
    for task in tasks:
        file_name, split = TASK_FILES[task]
        output_type = "loglikelihood" if task == "lambada_openai" else "multiple_choice"
        header = textwrap.dedent(f"""\
            task: local_{task}
            dataset_path: json
            dataset_kwargs:
              data_files:
                {split}: {json.dumps(str(eval_dir / file_name))}
            output_type: {output_type}
            {'validation_split' if split == 'validation' else 'test_split'}: {split}
            """)
        (folder / f"local_{task}.yaml").write_text(header + textwrap.dedent(TASK_BODIES[task]) + "\n")


def run_lm_eval(hf_dir, task_dir, tasks=FIRST_FOUR, limit=200, batch_size=32, dtype="float32"):
    """{task: (lm_eval's results of the task, its samples in document order)} from its hf backend."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    output = simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},dtype={dtype}", device="cpu",
                             tasks=[f"local_{t}" for t in tasks], limit=limit, batch_size=batch_size,
                             task_manager=manager, log_samples=True)
    return {task: (output["results"][f"local_{task}"],
                   sorted(output["samples"][f"local_{task}"], key=lambda s: s["doc_id"]))
            for task in tasks}
