"""Zero-shot benchmark definitions, read in their Hugging Face dataset schemas.

Prompts, target delimiter, preprocessing and gold labels follow lm-evaluation-harness (0.4.x task YAMLs) exactly,
so that scores are comparable with what the field reports:
  hellaswag       "{activity_label}: {ctx_a} {ctx_b.capitalize()}" (bracket artifacts removed) -> " {ending}"
  arc_easy/_challenge  "Question: {question}\\nAnswer:" -> " {choice}"
  piqa            "Question: {goal}\\nAnswer:" -> " {sol}"
  winogrande      partial scoring: "{sentence up to _}{option}" -> " {rest of the sentence}"
  boolq           "{passage}\\nQuestion: {question}?\\nAnswer:" -> " no" | " yes"
  openbookqa      "{question_stem}" -> " {choice}"
  lambada_openai  "{text without its last word}" -> " {last word}" (loglikelihood task: accuracy and perplexity)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamalite.errors import DataError, did_you_mean
from llamalite.files import sha256_file
from llamalite.records import parquet_errors, parse_json, parse_jsonl

MULTIPLE_CHOICE = "multiple_choice"
LOGLIKELIHOOD = "loglikelihood"
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
TASK_FILE_FIX = "task files are JSON Lines, a JSON array or Parquet in the task's Hugging Face schema"


@dataclass(frozen=True)
class Example:
    """One benchmark item as (context, continuation) pairs, one pair per choice.

    Most tasks share one context across choices; WinoGrande shares the continuation across contexts.
    `choices` are the texts whose character lengths normalise acc_norm (lm-evaluation-harness's definition).
    """

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    choices: tuple[str, ...]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # multiple_choice | loglikelihood
    hub: tuple[str, str | None, str]  # dataset path, configuration, split: what lm-evaluation-harness evaluates
    local_stems: tuple[str, ...]  # file names (without suffix) looked for in eval.data_dir, best first
    fields: tuple[str, ...]  # fields every record must have
    build: Callable[[dict[str, Any]], Example]
    metrics: tuple[str, ...]


# ------------------------------------------------------------------------------------------------ builders
# A builder reads a record through _text, _texts and _label: a field of the wrong type or value is a ValueError,
# which _build_example turns into one line naming the file and record. Nothing is converted (no str(5), int(1.5)).
def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{field} is {_kind(value)}, not a string")
    return value


def _texts(value: Any, field: str) -> list[str]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{field} is {_kind(value)}, not a list of strings")
    return [_text(item, f"{field} item {index}") for index, item in enumerate(value)]


def _label(value: Any, field: str, digits: bool = False) -> int:
    """A gold index: an integer, or (`digits`: where the task's Hugging Face schema spells it so) a decimal string."""
    if digits and isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 4:
        return int(value)
    if type(value) is not int:
        raise ValueError(f"{field} is {_kind(value)}, not an integer")
    return value


def _kind(value: Any) -> str:
    shown = repr(value)
    return f"{type(value).__name__} {shown if len(shown) <= 40 else shown[:37] + '...'}"


def _multiple_choice(context: str, choices: list[str], gold: int) -> Example:
    if not 0 <= gold < len(choices):
        raise ValueError(f"gold answer {gold} is not one of {len(choices)} choices")
    return Example((context,) * len(choices), tuple(" " + c for c in choices), gold, tuple(choices))


def hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")  # WikiHow artifacts, removed as lm-evaluation-harness does
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def build_hellaswag(doc: dict[str, Any]) -> Example:
    if doc.get("ctx_a") is not None and doc.get("ctx_b") is not None:
        ctx = _text(doc["ctx_a"], "ctx_a") + " " + _text(doc["ctx_b"], "ctx_b").capitalize()
    else:  # extractions that kept only `ctx` (= ctx_a + " " + ctx_b)
        ctx = _text(doc["ctx"], "ctx")
    query = hellaswag_preprocess(_text(doc["activity_label"], "activity_label") + ": " + ctx)
    endings = [hellaswag_preprocess(e) for e in _texts(doc["endings"], "endings")]
    return _multiple_choice(query, endings, _label(doc["label"], "label", digits=True))  # Rowan/hellaswag: "2"


def build_arc(doc: dict[str, Any]) -> Example:
    choices = doc["choices"]
    return _multiple_choice(f"Question: {_text(doc['question'], 'question')}\nAnswer:",
                            _texts(choices["text"], "choices.text"),
                            _texts(choices["label"], "choices.label").index(_text(doc["answerKey"], "answerKey")))


def build_piqa(doc: dict[str, Any]) -> Example:
    return _multiple_choice(f"Question: {_text(doc['goal'], 'goal')}\nAnswer:",
                            [_text(doc["sol1"], "sol1"), _text(doc["sol2"], "sol2")], _label(doc["label"], "label"))


def build_winogrande(doc: dict[str, Any]) -> Example:
    sentence = _text(doc["sentence"], "sentence")
    blank = sentence.index("_")
    options = (_text(doc["option1"], "option1"), _text(doc["option2"], "option2"))
    contexts = tuple(sentence[:blank] + option for option in options)
    continuation = " " + sentence[blank + 1:].strip()
    answer = doc["answer"]
    if answer not in ("1", "2") or type(answer) is not str:  # the schema's strings; 1 and 2 as integers too
        answer = str(_label(answer, "answer"))
    gold = {"1": 0, "2": 1}[answer]
    return Example(contexts, (continuation,) * 2, gold, contexts)


def build_boolq(doc: dict[str, Any]) -> Example:
    if "label" in doc:  # super_glue/boolq: label 0/1
        label = _label(doc["label"], "label")
    elif isinstance(doc["answer"], bool):  # google/boolq: answer true/false
        label = int(doc["answer"])
    else:
        raise ValueError(f"answer is {_kind(doc['answer'])}, not true or false")
    context = f"{_text(doc['passage'], 'passage')}\nQuestion: {_text(doc['question'], 'question')}?\nAnswer:"
    return _multiple_choice(context, ["no", "yes"], label)


def build_openbookqa(doc: dict[str, Any]) -> Example:
    choices = doc["choices"]
    gold = _texts(choices["label"], "choices.label").index(_text(doc["answerKey"], "answerKey").lstrip())
    return _multiple_choice(_text(doc["question_stem"], "question_stem"), _texts(choices["text"], "choices.text"), gold)


def build_lambada(doc: dict[str, Any]) -> Example:
    words = _text(doc["text"], "text").split(" ")
    if len(words) < 2:
        raise ValueError("text has no last word to predict")
    continuation = " " + words[-1]
    return Example((" ".join(words[:-1]),), (continuation,), 0, (continuation,))


def check_example(example: Example) -> Example:
    """What scoring needs of every example, whatever its task: a choice of no characters would divide acc_norm by
    zero (lm-evaluation-harness's too)."""
    if not all(example.choices):
        raise ValueError("a choice is empty (after preprocessing): acc_norm divides by its length")
    return example


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("hellaswag", MULTIPLE_CHOICE, ("Rowan/hellaswag", None, "validation"),
                 ("hellaswag_validation", "hellaswag_val", "hellaswag"),
                 ("activity_label", "endings", "label"), build_hellaswag, ("acc", "acc_norm")),
        TaskSpec("arc_easy", MULTIPLE_CHOICE, ("allenai/ai2_arc", "ARC-Easy", "test"),
                 ("arc_easy_test", "arc_easy"), ("question", "choices", "answerKey"), build_arc, ("acc", "acc_norm")),
        TaskSpec("arc_challenge", MULTIPLE_CHOICE, ("allenai/ai2_arc", "ARC-Challenge", "test"),
                 ("arc_challenge_test", "arc_challenge"), ("question", "choices", "answerKey"), build_arc,
                 ("acc", "acc_norm")),
        TaskSpec("piqa", MULTIPLE_CHOICE, ("baber/piqa", None, "validation"), ("piqa_validation", "piqa_valid", "piqa"),
                 ("goal", "sol1", "sol2", "label"), build_piqa, ("acc", "acc_norm")),
        TaskSpec("winogrande", MULTIPLE_CHOICE, ("allenai/winogrande", "winogrande_xl", "validation"),
                 ("winogrande_validation", "winogrande_dev", "winogrande"),
                 ("sentence", "option1", "option2", "answer"), build_winogrande, ("acc",)),
        TaskSpec("boolq", MULTIPLE_CHOICE, ("aps/super_glue", "boolq", "validation"), ("boolq_validation", "boolq"),
                 ("passage", "question"), build_boolq, ("acc",)),
        TaskSpec("openbookqa", MULTIPLE_CHOICE, ("allenai/openbookqa", "main", "test"),
                 ("openbookqa_test", "openbookqa"),
                 ("question_stem", "choices", "answerKey"), build_openbookqa, ("acc", "acc_norm")),
        TaskSpec("lambada_openai", LOGLIKELIHOOD, ("EleutherAI/lambada_openai", "default", "test"),
                 ("lambada_openai_test", "lambada_openai"), ("text",), build_lambada, ("acc", "perplexity")),
    )
}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise DataError(f"unknown evaluation task {name!r}: {did_you_mean(name, TASKS)}")
    return TASKS[name]


def resolve_tasks(names: Iterable[str]) -> list[TaskSpec]:
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise DataError(f"no evaluation tasks named: pass --tasks (or eval.tasks) from {', '.join(TASKS)}")
    return [get_task(n) for n in dict.fromkeys(names)]


# ------------------------------------------------------------------------------------------------ loading
def find_task_file(spec: TaskSpec, data_dir: Path) -> Path | None:
    """The local file for a task in data_dir (named as its Hugging Face split, e.g. hellaswag_val.jsonl), if any."""
    for stem in spec.local_stems:
        for suffix in LOCAL_SUFFIXES:
            if (data_dir / f"{stem}{suffix}").is_file():
                return data_dir / f"{stem}{suffix}"
    return None


def task_source(spec: TaskSpec, data_dir: str | None, task_files: dict[str, str]) -> Path | None:
    """Where to read a task from: eval.task_files, else a file in eval.data_dir, else None (the hub)."""
    if spec.name in task_files:
        path = Path(task_files[spec.name])
        if not path.is_file():
            raise DataError(f"task file for {spec.name} not found: {path} (fix eval.task_files.{spec.name})")
        return path
    if data_dir is not None:
        folder = Path(data_dir)
        if not folder.is_dir():
            raise DataError(f"eval.data_dir {folder} is not a folder: point it at the folder of task files")
        found = find_task_file(spec, folder)
        if found is None:
            names = ", ".join(f"{stem}.jsonl" for stem in spec.local_stems[:2])
            raise DataError(f"no file for task {spec.name} in {folder} (looked for {names}, .json, .parquet): "
                            f"add it, or name it with eval.task_files.{spec.name}=PATH")
        return found
    return None


def task_data_fingerprint(spec: TaskSpec, path: Path | None) -> str:
    """What a task's scores depend on besides the model: the sha256 of its local file, or its hub dataset."""
    return f"sha256:{sha256_file(path)}" if path is not None else f"hub:{':'.join(map(str, spec.hub))}"


def read_records(path: Path, limit: int | None = None) -> tuple[list[dict[str, Any]], int]:
    """JSON Lines, a JSON array (or {"data": [...]}), or Parquet: the first `limit` records (all with None) and how
    many the file holds; lines of JSON Lines past the limit are counted, not parsed."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        with parquet_errors(path, TASK_FILE_FIX):
            records = pq.read_table(path).to_pylist()
        return records[:limit], len(records)
    raw = path.read_bytes()  # json parses UTF-8 bytes itself: nothing past the limit is decoded
    if name.endswith(".json"):
        try:
            data = parse_json(raw, str(path), TASK_FILE_FIX)
        except DataError:
            data = None  # perhaps JSON Lines under a .json name: read below, line by line
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if isinstance(data, list):
            return data[:limit], len(data)
    return parse_jsonl(raw, str(path), TASK_FILE_FIX, expect=object, limit=limit)


def read_hub(spec: TaskSpec) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"task {spec.name} has no local file and `datasets` is not installed: set eval.data_dir to a "
                        "folder of task files, or pip install 'llamalite[hf]'") from None
    path, name, split = spec.hub
    try:
        return list(datasets.load_dataset(path, name, split=split))
    except Exception as exc:  # network, missing split, unknown dataset: all end the same way for the user
        raise DataError(f"could not load {path} ({name or 'default'}, split {split}) for task {spec.name}: "
                        f"{str(exc).splitlines()[0]}; set eval.data_dir to a folder of local task files") from None


def load_examples(spec: TaskSpec, path: Path | None, limit: int | None = None) -> list[Example]:
    """The task's examples, in file order; with `limit`, the first `limit` (a fixed, deterministic subset)."""
    return load_task(spec, path, limit)[0]


def load_task(spec: TaskSpec, path: Path | None, limit: int | None = None) -> tuple[list[Example], int]:
    """load_examples, and how many records the task's data holds before the limit."""
    if path is not None:
        records, available = read_records(path, limit)
    else:
        records = read_hub(spec)
        available, records = len(records), records[:limit]
    where = str(path) if path is not None else spec.hub[0]
    if not available:
        raise DataError(f"{where} holds no records for task {spec.name}")
    return [_build_example(spec, record, where, index) for index, record in enumerate(records)], available


def _build_example(spec: TaskSpec, record: Any, where: str, index: int) -> Example:
    if not isinstance(record, dict):
        raise DataError(f"{where} record {index} is not an object: expected the {spec.name} schema")
    missing = [f for f in spec.fields if f not in record]
    if missing:
        raise DataError(f"{where} is not in the {spec.name} schema: record {index} lacks {', '.join(missing)} "
                        f"(fields: {', '.join(spec.fields)}; it has {', '.join(map(str, record)) or 'none'})")
    try:
        return check_example(spec.build(record))
    except (KeyError, ValueError, TypeError, IndexError, AttributeError, OverflowError) as exc:
        reason = " ".join(str(exc).split())[:160]  # one line, however long or odd the record's values
        raise DataError(f"{where} record {index} does not fit the {spec.name} schema "
                        f"({type(exc).__name__}: {reason})") from None
