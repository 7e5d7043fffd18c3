import json
import random

import pytest

from llamalite.checkpoint.format import list_checkpoints
from llamalite.cli import main
from llamalite.errors import CheckpointError
from llamalite.evaluate import SweepOptions, dynamics_table, evaluate_checkpoints
from llamalite.files import read_jsonl
from llamalite.train.trainer import Trainer
from tests.conftest import WORDS, small_config


def write_task_files(folder):
    """Small PIQA- and HellaSwag-schema files made of the test corpus's words."""
    rng = random.Random(0)

    def phrase(n):
        return " ".join(rng.choice(WORDS) for _ in range(n))

    folder.mkdir(exist_ok=True)
    piqa = [{"goal": phrase(6), "sol1": phrase(4), "sol2": phrase(5), "label": i % 2} for i in range(12)]
    hellaswag = [{"activity_label": "Court", "ctx": phrase(8), "endings": [phrase(3) for _ in range(4)],
                  "label": str(i % 4)} for i in range(10)]
    (folder / "piqa_validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in piqa))
    (folder / "hellaswag_val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hellaswag))
    return folder


@pytest.fixture(scope="module")
def trained_run(corpus_dir, prepared_dir, tmp_path_factory):
    """A 6-step run with checkpoints at 2, 4 and 6 and in-loop benchmarks every 3 steps."""
    root = tmp_path_factory.mktemp("evalrun")
    tasks_dir = write_task_files(root / "tasks")
    config = small_config(corpus_dir, prepared_dir, root / "run", max_steps=6, save_interval=2, keep_checkpoints=0)
    config.eval.tasks, config.eval.data_dir, config.eval.interval = ["piqa", "hellaswag"], str(tasks_dir), 3
    Trainer(config).fit()
    return root / "run", tasks_dir


def test_training_writes_benchmarks_to_evals_jsonl_with_step_tokens_and_time(trained_run):
    run_dir, _ = trained_run
    records = read_jsonl(run_dir / "evals.jsonl")
    assert [r["step"] for r in records] == [0, 3, 6]
    for record in records:
        assert record["source"] == "train" and record["tokens"] == record["step"] * 64 and record["seconds"] > 0
        assert record["n"] == {"piqa": 12, "hellaswag": 10} and record["chance"] == {"piqa": 0.5, "hellaswag": 0.25}
        assert {"eval/piqa/acc", "eval/piqa/acc_norm_stderr", "eval/hellaswag/acc_norm"} <= set(record["metrics"])
    val = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "val/loss" in r]
    assert val and all({"val/perplexity", "val/bits_per_byte"} <= set(r) for r in val)
    assert list((run_dir / "tb").iterdir())


def test_all_checkpoints_are_evaluated_once_and_tabulated(trained_run, capsys):
    run_dir, tasks_dir = trained_run
    before = len(read_jsonl(run_dir / "evals.jsonl"))
    options = SweepOptions(tasks=["piqa"], all_checkpoints=True, data_dir=str(tasks_dir))
    records = evaluate_checkpoints(run_dir, options)
    assert [r["step"] for r in records] == [2, 4, 6] and all(r["source"] == "eval" for r in records)
    assert all(r["metrics"]["val/loss"] > 0 and "eval/piqa/acc" in r["metrics"] for r in records)
    assert len(read_jsonl(run_dir / "evals.jsonl")) == before + 3

    assert evaluate_checkpoints(run_dir, options) == []  # already done: skipped
    assert "already evaluated" in capsys.readouterr().err
    table = dynamics_table(records).splitlines()
    assert table[0].split() == ["step", "tokens", "val/bits_per_byte", "val/loss", "val/perplexity",
                                "piqa/acc", "piqa/acc_norm"]
    assert [line.split()[0] for line in table[1:]] == ["2", "4", "6"]


def test_an_evaluation_on_other_task_data_is_not_taken_for_a_done_one(trained_run, tmp_path):
    run_dir, tasks_dir = trained_run
    evaluate_checkpoints(run_dir, SweepOptions(tasks=["piqa"], data_dir=str(tasks_dir)))
    other = tmp_path / "piqa_other.jsonl"
    records = read_jsonl(tasks_dir / "piqa_validation.jsonl")
    other.write_text("".join(json.dumps({**r, "label": 1 - r["label"]}) + "\n" for r in records))

    redone = evaluate_checkpoints(run_dir, SweepOptions(tasks=["piqa"], task_files={"piqa": str(other)}))
    assert [r["step"] for r in redone] == [6]
    assert redone[0]["task_data"]["piqa"].startswith("sha256:")
    assert evaluate_checkpoints(run_dir, SweepOptions(tasks=["piqa"], task_files={"piqa": str(other)})) == []


def test_cli_eval_prints_the_training_dynamics_table(trained_run, capsys):
    run_dir, tasks_dir = trained_run
    code = main(["eval", str(run_dir), "--all-checkpoints", "--tasks", "hellaswag", "--limit", "5",
                 "--data-dir", str(tasks_dir), "--no-val-loss"])
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["step", "tokens", "hellaswag/acc", "hellaswag/acc_norm"]
    assert [line.split()[0] for line in out[1:]] == ["2", "4", "6"]


def test_cli_eval_errors_are_one_line(trained_run, tmp_path, capsys):
    run_dir, tasks_dir = trained_run
    bad = tmp_path / "piqa.jsonl"
    bad.write_text(json.dumps({"text": "not piqa"}) + "\n")
    assert main(["eval", str(run_dir), "--tasks", "piqa", "--task-file", f"piqa={bad}", "--limit", "3"]) == 2
    assert "not in the piqa schema" in capsys.readouterr().err
    assert main(["eval", str(run_dir), "--tasks", "hellaswg", "--data-dir", str(tasks_dir)]) == 2
    assert "did you mean 'hellaswag'" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--tasks", "piqa"]) == 2
    assert "neither a checkpoint nor a run directory" in capsys.readouterr().err
    assert main(["eval", str(run_dir), "--tasks", "piqa", "--task-file", str(bad)]) == 2
    assert "must look like TASK=PATH" in capsys.readouterr().err


def test_a_checkpoint_whose_tokenizer_changed_is_refused(trained_run, tmp_path):
    run_dir, tasks_dir = trained_run
    checkpoint = list_checkpoints(run_dir / "checkpoints")[-1]
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    copy = tmp_path / "step_copy"
    copy.mkdir()
    for item in checkpoint.iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    state["tokenizer_fingerprint"] = "0" * 64
    (copy / "trainer_state.json").write_text(json.dumps(state))
    (copy / "checksums.json").unlink()  # rewritten below so that only the fingerprint differs
    from llamalite.files import sha256_file

    (copy / "checksums.json").write_text(json.dumps({p.name: sha256_file(p) for p in copy.iterdir()}))
    with pytest.raises(CheckpointError, match="fingerprint differs"):
        evaluate_checkpoints(copy, SweepOptions(tasks=["piqa"], data_dir=str(tasks_dir), val_loss=False))
