import json
import shutil

import pytest

from llamalite.report.runs import (
    ReportError,
    check_run_dir,
    event_markers,
    load_run,
    load_runs,
    read_jsonl_tolerant,
    recipe_label,
    run_status,
    step_to_tokens,
    summary_row,
)


def test_a_torn_last_line_is_skipped_and_counted(reset_run, tmp_path):
    run_dir = shutil.copytree(reset_run, tmp_path / "live")
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "time": 1.0, "train/lo')  # the trainer is half-way through writing a line
    records, torn = read_jsonl_tolerant(run_dir / "metrics.jsonl")
    assert torn == 1 and records[-1]["step"] == 8
    run = load_run(run_dir)
    assert run.torn_lines == 1 and run.train[-1]["step"] == 8


def test_reads_the_real_run_with_its_resume_optimizer_reset_and_skipped_step(reset_run):
    run = load_run(reset_run)
    assert [r["step"] for r in run.train] == [2, 4, 6, 8]
    assert [(v["step"], v["tokens"]) for v in run.val] == [(0, 0), (4, 256), (8, 512)]
    markers = {(m.kind, m.step, m.tokens) for m in run.markers}
    assert markers == {("optimizer_reset", 4, 256), ("resume", 4, 256), ("skipped_step", 6, 384)}
    assert [s["prompt"] for s in run.samples if s["step"] == 8] == ["the king", "a lady"]
    assert [c["name"] for c in run.checkpoints] == ["step_0000004", "step_0000008"]


def test_later_eval_records_win_per_metric(reset_run):
    benchmarks = load_run(reset_run).benchmarks
    assert list(benchmarks) == ["hellaswag", "lambada_openai", "piqa"]
    hellaswag = benchmarks["hellaswag"]
    assert hellaswag.series["acc"] == [(4, 256, 0.24, 0.06), (8, 512, 0.28, 0.06)]  # 0.26 rescored as 0.28
    assert hellaswag.series["acc_norm"][-1] == (8, 512, 0.28, 0.06)
    assert (hellaswag.chance, hellaswag.n) == (0.25, 50)
    assert benchmarks["piqa"].series["acc"] == [(8, 512, 0.55, 0.07)]
    assert benchmarks["lambada_openai"].series["perplexity"][0] == (4, 256, 9000.0, None)


def test_the_trainers_val_loss_wins_over_an_eval_record_of_the_same_step(reset_run):
    val = {v["step"]: v for v in load_run(reset_run).val}
    assert val[4]["source"] == "train" and val[4]["loss"] != 5.0


def test_eval_val_loss_fills_steps_the_trainer_did_not_evaluate(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 10, "time": 1.0, "train/loss": 3.0,
                                                        "train/tokens": 1000}) + "\n")
    (tmp_path / "evals.jsonl").write_text(json.dumps({"step": 10, "tokens": 1000, "time": 2.0, "source": "eval",
                                                      "metrics": {"val/loss": 2.5, "val/bits_per_byte": 1.1}}) + "\n")
    [point] = load_run(tmp_path).val
    assert (point["loss"], point["bits_per_byte"], point["source"]) == (2.5, 1.1, "eval")


def test_a_resume_on_another_world_size_marks_a_world_size_change():
    events = [{"step": 0, "event": "start", "world_size": 8, "tokens": 0},
              {"step": 50, "event": "resume", "world_size": 4, "previous_world_size": 8, "tokens": 100}]
    kinds = [(m.kind, m.step) for m in event_markers(events)]
    assert kinds == [("resume", 50), ("world_size_change", 50)]
    events.append({"step": 50, "event": "world_size_change", "tokens": 100})  # an explicit event is not doubled
    assert [m.kind for m in event_markers(events)].count("world_size_change") == 1


def test_steps_become_tokens_by_interpolation_or_the_configured_batch():
    to_tokens = step_to_tokens([{"step": 10, "train/tokens": 1000}, {"step": 20, "train/tokens": 3000}], [], [],
                               {"train": {"batch_tokens": 100}})
    assert (to_tokens(10), to_tokens(15), to_tokens(30)) == (1000, 2000, 4000)
    assert step_to_tokens([], [], [], {"train": {"batch_tokens": 64}})(5) == 320


def test_summary_of_a_finished_run(reset_run):
    row = summary_row(load_run(reset_run))
    assert (row["status"], row["steps"], row["tokens"], row["best_val_step"]) == ("finished", 8, 512, 8)
    assert row["final_scores"]["hellaswag/acc_norm"] == (0.28, 0.06, 8)
    assert row["final_scores"]["lambada_openai/acc"][0] == 0.01
    assert row["wall_seconds"] > 0


def test_a_run_still_training_is_reported_as_such(tmp_path):
    (tmp_path / "config.yaml").write_text("train:\n  max_steps: 100\n  batch_tokens: 64\n")
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "time": 1.0, "val/loss": 5.0, "train/tokens": 0})
                                            + "\n")
    run = load_run(tmp_path)
    assert run_status(run) == "in progress or interrupted at step 0 of 100"
    assert run.benchmarks == {} and run.train == []


def test_a_directory_that_is_not_a_run_is_refused_with_what_a_run_holds(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ReportError, match=f"{tmp_path} is not a run directory: a run directory holds metrics.jsonl"):
        check_run_dir(tmp_path)
    with pytest.raises(ReportError, match="does not exist"):
        load_run(tmp_path / "missing")


def test_runs_with_the_same_directory_name_get_distinct_labels(reset_run, tmp_path):
    shutil.copytree(reset_run, tmp_path / "other" / "reset")
    assert [run.label for run in load_runs([reset_run, tmp_path / "other" / "reset"])] == [
        f"{reset_run.parent.name}/reset", "other/reset"]


def test_the_recipe_label_tells_two_recipes_apart():
    paper = {"optim": {"name": "adamw", "lr": 6e-4, "schedule": "cosine"}, "model": {"qk_norm": False}}
    ours = {"optim": {"name": "muon", "lr": 3e-3, "schedule": "wsd"},
            "model": {"qk_norm": True, "zero_init_residual": True, "logit_softcap": 15.0}}
    assert recipe_label(paper) == "adamw lr 6e-04 cosine"
    assert recipe_label(ours) == "muon lr 3e-03 wsd, qk_norm, zero_init_residual, logit_softcap 15"
    assert recipe_label({}) == "unknown"
