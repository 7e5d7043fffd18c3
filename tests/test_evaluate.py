import json
import random
import shutil

import pytest

from llamalite.checkpoint.format import list_checkpoints, save_checkpoint
from llamalite.cli import main
from llamalite.config import Config, DataConfig
from llamalite.errors import CheckpointError, EvalError
from llamalite.evaluate import SweepOptions, dynamics_table, evaluate_checkpoints
from llamalite.files import read_jsonl
from llamalite.tokenizer import Tokenizer
from llamalite.train.trainer import Trainer
from tests.conftest import SHARED_DATA, WORDS, small_config


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


def test_cli_eval_needs_tasks_or_val_only(trained_run, capsys):
    run_dir, _ = trained_run
    assert main(["eval", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--tasks" in err and "--val-only" in err
    assert main(["eval", str(run_dir), "--val-only", "--tasks", "piqa"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert main(["eval", str(run_dir), "--val-only"]) == 0
    assert capsys.readouterr().out.splitlines()[0].split()[:4] == ["step", "tokens", "val/bits_per_byte", "val/loss"]


def test_the_table_shows_stderr_and_wraps_to_the_width():
    metrics = {"val/loss": 4.5, "eval/piqa/acc": 0.5, "eval/piqa/acc_stderr": 0.1508, "eval/piqa/acc_norm": 0.25,
               "eval/piqa/acc_norm_stderr": 0.125, "eval/lambada_openai/perplexity": 1234.5}
    records = [{"step": s, "tokens": s * 64, "metrics": metrics} for s in (2, 4)]
    wide = dynamics_table(records).splitlines()
    assert wide[0].split() == ["step", "tokens", "val/loss", "lambada_openai/perplexity", "piqa/acc", "piqa/acc_norm"]
    assert wide[1].split() == ["2", "128", "4.5000", "1,234.5", "0.5000±0.1508", "0.2500±0.1250"]
    narrow = dynamics_table(records, width=50)
    assert all(len(line) <= 50 for line in narrow.splitlines())
    blocks = narrow.split("\n\n")
    assert len(blocks) > 1 and all(block.split()[:2] == ["step", "tokens"] for block in blocks)
    assert "0.5000±0.1508" in narrow and "0.2500±0.1250" in narrow


@pytest.mark.skipif(not (SHARED_DATA / "eval").is_dir(), reason="../shared/data not present")
def test_output_json_is_lm_evals_results_layout(tmp_path, capsys):
    from lm_eval.utils import make_table

    from tests.eval.conftest import GPT2_DIR, random_gpt2_model

    run_dir = tmp_path / "run"
    tokenizer = Tokenizer.load(GPT2_DIR)
    model = random_gpt2_model(max_seq_len=256)
    config = Config(name="json-test", model=model.config, data=DataConfig(out_dir=str(tmp_path / "data")))
    state = {"step": 10, "tokens_seen": 640, "tokenizer_fingerprint": tokenizer.fingerprint, "config": config.to_dict()}
    (tmp_path / "data").mkdir()
    tokenizer.save(tmp_path / "data" / "tokenizer.json")
    save_checkpoint(run_dir / "checkpoints", 10, model, None, state)
    (run_dir / "metrics.jsonl").write_text("")
    out = tmp_path / "results" / "eval.json"
    assert main(["eval", str(run_dir), "--tasks", "piqa,lambada_openai", "--limit", "8", "--no-val-loss",
                 "--data-dir", str(SHARED_DATA / "eval"), "--output-json", str(out)]) == 0
    assert f"to {out}" in capsys.readouterr().out
    results = json.loads(out.read_text())
    record = [r for r in read_jsonl(run_dir / "evals.jsonl") if r["limit"] == 8][-1]
    metrics = record["metrics"]
    piqa, lambada = results["results"]["piqa"], results["results"]["lambada_openai"]
    assert piqa["alias"] == "piqa" and piqa["acc,none"] == metrics["eval/piqa/acc"]
    assert piqa["acc_stderr,none"] == metrics["eval/piqa/acc_stderr"]
    assert piqa["acc_norm,none"] == metrics["eval/piqa/acc_norm"]
    assert piqa["acc_norm_stderr,none"] == metrics["eval/piqa/acc_norm_stderr"]
    assert lambada["perplexity,none"] == metrics["eval/lambada_openai/perplexity"]
    assert lambada["acc,none"] == metrics["eval/lambada_openai/acc"]
    assert results["n-shot"] == {"lambada_openai": 0, "piqa": 0}
    assert results["n-samples"]["piqa"]["effective"] == 8 and results["n-samples"]["piqa"]["original"] > 8
    assert results["config"]["step"] == record["step"] and results["config"]["limit"] == 8
    assert results["higher_is_better"]["lambada_openai"] == {"acc": True, "perplexity": False}
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in make_table(results).splitlines()[2:]]
    shown = {(row[4], float(row[6])): float(row[8]) if row[8] else None for row in rows}  # (metric, value): stderr
    assert rows[0][0] == "lambada_openai" and rows[2][0] == "piqa"
    assert shown[("perplexity", round(metrics["eval/lambada_openai/perplexity"], 4))] is None
    assert shown[("acc", round(metrics["eval/lambada_openai/acc"], 4))] == round(
        metrics["eval/lambada_openai/acc_stderr"], 4)
    assert shown[("acc_norm", round(metrics["eval/piqa/acc_norm"], 4))] == round(
        metrics["eval/piqa/acc_norm_stderr"], 4)


def test_output_json_needs_benchmarks(trained_run, tmp_path, capsys):
    run_dir, _ = trained_run
    assert main(["eval", str(run_dir), "--val-only", "--output-json", str(tmp_path / "x.json")]) == 2
    assert "--output-json" in capsys.readouterr().err


def write_long_piqa(path, long_documents=(2, 5)):
    """A PIQA-schema file whose listed documents have a solution far longer than the test model's 16-token context."""
    rng = random.Random(2)
    records = [{"goal": " ".join(rng.choice(WORDS) for _ in range(5)), "label": i % 2,
                "sol1": " ".join(rng.choice(WORDS) for _ in range(3)),
                "sol2": " ".join(rng.choice(WORDS) for _ in range(40 if i in long_documents else 4))} for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_cli_eval_checks_the_context_before_scoring_and_can_skip(trained_run, tmp_path, capsys):
    run_dir, tasks_dir = trained_run
    run_copy = tmp_path / "run"
    shutil.copytree(run_dir, run_copy)
    before = read_jsonl(run_copy / "evals.jsonl")
    piqa = write_long_piqa(tmp_path / "piqa.jsonl")
    args = ["eval", str(run_copy), "--tasks", "hellaswag,piqa", "--data-dir", str(tasks_dir), "--task-file",
            f"piqa={piqa}", "--no-val-loss"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "piqa documents 2, 5 (2 of 8) have continuations of " in err and "--skip-too-long" in err
    assert "hellaswag" not in err and "evaluated" not in err
    assert read_jsonl(run_copy / "evals.jsonl") == before  # nothing was scored, not even hellaswag
    assert main([*args, "--skip-too-long"]) == 0
    assert "piqa: skipped 2 documents" in capsys.readouterr().err
    record = read_jsonl(run_copy / "evals.jsonl")[-1]
    assert record["skipped"] == {"hellaswag": 0, "piqa": 2} and record["n"] == {"hellaswag": 10, "piqa": 6}


def test_training_checks_the_context_before_its_first_step(corpus_dir, prepared_dir, tmp_path):
    piqa = write_long_piqa(tmp_path / "piqa.jsonl")
    config = small_config(corpus_dir, prepared_dir, tmp_path / "run", max_steps=2)
    config.eval.tasks, config.eval.task_files, config.eval.interval = ["piqa"], {"piqa": str(piqa)}, 1
    with pytest.raises(EvalError, match="piqa documents 2, 5"):
        Trainer(config)
    config.eval.skip_too_long = True
    Trainer(config).fit()
    records = read_jsonl(tmp_path / "run" / "evals.jsonl")
    assert records and all(r["skipped"] == {"piqa": 2} and r["n"] == {"piqa": 6} for r in records)
