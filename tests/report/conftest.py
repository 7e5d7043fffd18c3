"""Two short real runs for the report: one stopped, resumed with an optimizer reset and given benchmark scores
(fabricated evals.jsonl records in the evaluation stage's format), and an uninterrupted baseline without evals."""

import json
import time

import pytest

from llamalite.train.trainer import Trainer
from tests.conftest import small_config

RUN = dict(max_steps=8, eval_interval=4, log_interval=2, sample_interval=4, sample_prompts=["the king", "a lady"],
           sample_tokens=5, save_interval=4)


def fabricated_evals(tokens_per_step: int) -> list[dict]:
    def record(step, metrics, tasks):
        return {"step": step, "tokens": step * tokens_per_step, "time": time.time(), "seconds": 1.5,
                "source": "eval", "checkpoint": f"step_{step:07d}", "limit": 50, "metrics": metrics,
                "chance": {"hellaswag": 0.25, "piqa": 0.5, "lambada_openai": 0.0}, "n": dict.fromkeys(tasks, 50)}

    def hellaswag(acc):
        return {"eval/hellaswag/acc": acc, "eval/hellaswag/acc_stderr": 0.06, "eval/hellaswag/acc_norm": acc + 0.02,
                "eval/hellaswag/acc_norm_stderr": 0.06}

    return [
        record(4, {**hellaswag(0.24), "eval/lambada_openai/acc": 0.0, "eval/lambada_openai/perplexity": 9000.0,
                   "val/loss": 5.0}, ["hellaswag", "lambada_openai"]),
        record(8, {**hellaswag(0.26), "eval/lambada_openai/acc": 0.01, "eval/lambada_openai/perplexity": 4000.0},
               ["hellaswag", "lambada_openai"]),
        # A second record for step 8, re-evaluated with another task and a rescored HellaSwag: it wins per metric.
        record(8, {"eval/piqa/acc": 0.55, "eval/piqa/acc_stderr": 0.07, "eval/hellaswag/acc": 0.28}, ["piqa"]),
    ]


def append_jsonl(path, records) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


@pytest.fixture(scope="session")
def reset_run(corpus_dir, prepared_dir, tmp_path_factory):
    """Stopped at step 4, resumed with train.reset_optimizer=true, trained to step 8, then scored."""
    run_dir = tmp_path_factory.mktemp("runs") / "reset"
    Trainer(small_config(corpus_dir, prepared_dir, run_dir, stop_at_step=4, **RUN)).fit()
    Trainer(small_config(corpus_dir, prepared_dir, run_dir, reset_optimizer=True, rewarmup_steps=2, **RUN)).fit()
    append_jsonl(run_dir / "events.jsonl", [{"step": 6, "time": time.time(), "event": "skipped_step",
                                             "reason": "loss spike", "loss": 9.9, "consecutive": 1}])
    append_jsonl(run_dir / "evals.jsonl", fabricated_evals(tokens_per_step=64))
    return run_dir


@pytest.fixture(scope="session")
def baseline_run(corpus_dir, prepared_dir, tmp_path_factory):
    """The same run uninterrupted, with no evals.jsonl."""
    run_dir = tmp_path_factory.mktemp("runs") / "baseline"
    Trainer(small_config(corpus_dir, prepared_dir, run_dir, **RUN)).fit()
    return run_dir
