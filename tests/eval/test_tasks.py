import json

import pytest

from llamalite.errors import DataError
from llamalite.eval.tasks import (
    TASKS,
    get_task,
    load_examples,
    load_task,
    read_records,
    resolve_tasks,
    task_source,
)
from tests.conftest import SHARED_DATA


def test_hellaswag_prompt_is_lm_eval_s():
    doc = {"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
           "endings": ["is using [title] wrap.", "starts  pulling up roofing."], "label": "1"}
    example = TASKS["hellaswag"].build(doc)
    assert example.contexts == ("Roof shingle removal: A man is sitting on a roof. He",) * 2
    assert example.continuations == (" is using. wrap.", " starts pulling up roofing.")
    assert example.choices == ("is using. wrap.", "starts pulling up roofing.") and example.gold == 1


def test_hellaswag_falls_back_to_ctx_and_accepts_int_labels():
    doc = {"activity_label": "Cooking", "ctx": "A woman cuts onions. she", "endings": ["a", "b", "c", "d"], "label": 3}
    example = TASKS["hellaswag"].build(doc)
    assert example.contexts[0] == "Cooking: A woman cuts onions. she" and example.gold == 3


def test_arc_accepts_numeric_labels():
    doc = {"question": "Which?", "choices": {"text": ["x", "y", "z"], "label": ["1", "2", "3"]}, "answerKey": "2"}
    example = TASKS["arc_easy"].build(doc)
    assert example.contexts == ("Question: Which?\nAnswer:",) * 3 and example.gold == 1
    assert example.continuations == (" x", " y", " z")


def test_winogrande_scores_the_rest_of_the_sentence_after_each_option():
    doc = {"sentence": "Sarah was a better surgeon than Maria so _ always got the easier cases.",
           "option1": "Sarah", "option2": "Maria", "answer": "2"}
    example = TASKS["winogrande"].build(doc)
    assert example.contexts == ("Sarah was a better surgeon than Maria so Sarah",
                                "Sarah was a better surgeon than Maria so Maria")
    assert example.continuations == (" always got the easier cases.",) * 2 and example.gold == 1


@pytest.mark.parametrize("doc", [{"passage": "P", "question": "is it", "answer": True},
                                 {"passage": "P", "question": "is it", "label": 1}], ids=["google", "super_glue"])
def test_boolq_reads_both_hub_schemas(doc):
    example = TASKS["boolq"].build(doc)
    assert example.contexts[0] == "P\nQuestion: is it?\nAnswer:" and example.continuations == (" no", " yes")
    assert example.gold == 1


def test_lambada_predicts_the_last_space_separated_word():
    example = TASKS["lambada_openai"].build({"text": "he said hello to\n\nPower"})
    assert example.contexts == ("he said hello",) and example.continuations == (" to\n\nPower",)


def test_openbookqa_and_piqa_prompts():
    obqa = TASKS["openbookqa"].build({"question_stem": "The sun is", "answerKey": " B",
                                      "choices": {"text": ["cold", "hot"], "label": ["A", "B"]}})
    assert obqa.contexts[0] == "The sun is" and obqa.gold == 1
    piqa = TASKS["piqa"].build({"goal": "Open a jar", "sol1": "twist", "sol2": "sing", "label": 0})
    assert piqa.contexts[0] == "Question: Open a jar\nAnswer:" and piqa.continuations == (" twist", " sing")


def test_unknown_task_suggests_the_nearest():
    with pytest.raises(DataError, match="did you mean 'hellaswag'"):
        get_task("helaswag")
    with pytest.raises(DataError, match="no evaluation tasks"):
        resolve_tasks([])


def test_a_file_in_the_wrong_schema_names_the_missing_fields(tmp_path):
    path = tmp_path / "piqa_validation.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(DataError, match="not in the piqa schema: record 0 lacks goal, sol1, sol2, label"):
        load_examples(TASKS["piqa"], path)


def test_a_record_with_a_bad_label_is_named(tmp_path):
    path = tmp_path / "arc.jsonl"
    path.write_text(json.dumps({"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "E"}) + "\n")
    with pytest.raises(DataError, match="record 0 does not fit the arc_easy schema"):
        load_examples(TASKS["arc_easy"], path)


def test_missing_task_file_in_data_dir_says_what_was_looked_for(tmp_path):
    with pytest.raises(DataError, match="no file for task winogrande .*winogrande_validation.jsonl"):
        task_source(TASKS["winogrande"], str(tmp_path), {})
    with pytest.raises(DataError, match="fix eval.task_files.piqa"):
        task_source(TASKS["piqa"], None, {"piqa": str(tmp_path / "nope.jsonl")})


def test_json_array_parquet_and_jsonl_read_alike(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"goal": f"g{i}", "sol1": "a", "sol2": "b", "label": i % 2} for i in range(3)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "a.json").write_text(json.dumps(records))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "a.parquet")
    for name in ("a.jsonl", "a.json", "a.parquet"):
        assert read_records(tmp_path / name) == (records, 3)
        assert read_records(tmp_path / name, limit=2) == (records[:2], 3)
    assert len(load_examples(TASKS["piqa"], tmp_path / "a.parquet", limit=2)) == 2


def test_a_limit_parses_json_lines_up_to_it_and_counts_them_all(tmp_path):
    records = [{"goal": f"g{i}", "sol1": "a", "sol2": "b", "label": i % 2} for i in range(5)]
    path = tmp_path / "piqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n\n" for r in records[:3]) + json.dumps(records[3]) + "\n{broken\n")
    examples, available = load_task(TASKS["piqa"], path, limit=2)
    assert [e.contexts[0] for e in examples] == ["Question: g0\nAnswer:", "Question: g1\nAnswer:"] and available == 5
    with pytest.raises(DataError, match="line 8 is not valid JSON"):
        load_task(TASKS["piqa"], path)


def test_json_lines_are_split_at_newlines_only_and_bytes_that_are_not_utf8_are_a_one_line_error(tmp_path):
    path = tmp_path / "piqa.jsonl"
    record = {"goal": "a\u2028b", "sol1": "a", "sol2": "b", "label": 0}  # U+2028 raw inside a string is valid JSON
    path.write_bytes(json.dumps(record, ensure_ascii=False).encode() + b"\n" + b'{"goal": "\xff"}\n')
    examples, available = load_task(TASKS["piqa"], path, limit=1)
    assert examples[0].contexts[0] == "Question: a\u2028b\nAnswer:" and available == 2
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        load_task(TASKS["piqa"], path)


@pytest.mark.skipif(not (SHARED_DATA / "eval").is_dir(), reason="../shared/data not present")
@pytest.mark.parametrize("task", list(TASKS))
def test_every_shared_file_loads(task):
    spec = TASKS[task]
    examples = load_examples(spec, task_source(spec, str(SHARED_DATA / "eval"), {}))
    assert len(examples) >= 500
    assert all(0 <= e.gold < len(e.choices) for e in examples)


def test_a_hub_dataset_that_cannot_be_loaded_says_how_to_use_local_files(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("no network\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"could not load Rowan/hellaswag .*no network; set eval.data_dir"):
        load_examples(TASKS["hellaswag"], None)


@pytest.mark.parametrize("change", [{"sol1": ""}, {"label": 1e999}, {"label": 1.5}, {"label": True}, {"label": "1"},
                                    {"goal": 5}, {"sol2": ["d"]}, {"label": 2}],
                         ids=["empty choice", "inf label", "float label", "bool label", "string label",
                              "number goal", "list choice", "label out of range"])
def test_a_piqa_record_that_cannot_be_scored_is_one_line_naming_the_file(tmp_path, change):
    path = tmp_path / "piqa.jsonl"
    path.write_text(json.dumps({"goal": "a", "sol1": "b", "sol2": "d", "label": 0} | change) + "\n")
    with pytest.raises(DataError, match=r"piqa\.jsonl record 0 does not fit the piqa schema") as caught:
        load_task(TASKS["piqa"], path)
    assert "\n" not in str(caught.value)


def test_hellaswag_whose_preprocessing_empties_an_ending_is_refused():
    doc = {"activity_label": "A", "ctx": "b", "endings": ["[title]", "c"], "label": "0"}
    with pytest.raises(ValueError, match="a choice is empty"):
        from llamalite.eval.tasks import check_example

        check_example(TASKS["hellaswag"].build(doc))
