"""The end-to-end demo: Shakespeare's plays -> BPE tokenizer -> shards -> a tiny LLaMA trained on the CPU -> a short
instruction tuning (on Alpaca records when given, else on "continue the line" pairs from the plays) -> the report.

The demo is the one composition of commands: it may import every command module.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from contextlib import contextmanager
from importlib.resources import as_file, files
from pathlib import Path

import numpy as np

from llamalite.config import load_config
from llamalite.data.prepare import prepare
from llamalite.data.shards import read_shard
from llamalite.errors import ConfigError, DataError
from llamalite.report import build_report
from llamalite.sft import Answer, SFTTrainer, answer_prompts
from llamalite.tokenizer import Tokenizer
from llamalite.train.trainer import Trainer, TrainResult

BAR_WIDTH = 40
DEMO_QUESTIONS = ["Give three tips for staying healthy.", "What is the capital of France?",
                  "Write a short poem about the sea."]


@contextmanager
def packaged_config(name: str):
    """The path of a config shipped inside the package (llamalite/configs/NAME), for the life of the context."""
    with as_file(files("llamalite") / "configs" / name) as path:
        yield path


def run_demo(config_path: str | None = None, overrides: Sequence[str] = (), sft_overrides: Sequence[str] = (),
             alpaca_file: str | None = None) -> TrainResult:
    if alpaca_file is not None and not Path(alpaca_file).is_file():  # checked before minutes of pretraining
        raise DataError(f"Alpaca file not found: {alpaca_file} (pass --alpaca with an existing JSON file, "
                        "or leave it out to fine-tune on lines of the plays)")
    started = time.perf_counter()
    with packaged_config("demo.yaml") as default_path:
        path = Path(config_path) if config_path else default_path
        if not path.is_file():
            raise ConfigError(f"demo config not found at {path}: pass --config FILE with an existing YAML file")
        config = load_config(path, ["train.overwrite=true", *overrides])  # the demo always starts afresh
    with packaged_config("sft-demo.yaml") as sft_config_file:
        load_config(sft_config_file, sft_overrides)  # a bad --sft-override fails here, not after the pretraining
    print(f"[1/2] preparing the corpus into {config.data.out_dir}/")
    prepare(config)
    print(f"[2/2] training the {config.model.preset or 'custom'} model for {config.train.max_steps} steps")
    result = Trainer(config).fit()
    if result.stopped_by:
        return stopped(result, "pretraining")
    print_summary(result, time.perf_counter() - started)
    sft_result = run_demo_sft(result, sft_overrides, Path(alpaca_file) if alpaca_file else None)
    if sft_result.stopped_by:
        return stopped(sft_result, "fine-tuning")
    print(f"report: {build_report([result.run_dir])}  (open it in a browser; llamalite report {result.run_dir} "
          "rebuilds it)")
    return result


def stopped(result: TrainResult, stage: str) -> TrainResult:
    """The demo ends at the first signal; its rerun starts afresh (train.overwrite=true), so say how to resume."""
    print(f"\nllamalite demo stopped by {result.stopped_by} during {stage} at step {result.steps}: `llamalite demo` "
          f"starts afresh; `llamalite train {result.run_dir}/config.yaml train.overwrite=false` resumes this run")
    return result


def print_summary(result: TrainResult, seconds: float) -> None:
    print(f"\nllamalite demo finished in {seconds / 60:.1f} min "
          f"({result.steps} steps, {result.tokens:,} tokens, {result.tokens_per_s:,.0f} tokens/s while training)")
    print(f"run directory: {result.run_dir}/  (config.yaml, metrics.jsonl, samples.jsonl, tb/, "
          f"checkpoints/{result.checkpoint.name if result.checkpoint else ''})")
    print("\nvalidation loss:")
    print(loss_curve(result.val_losses))
    if len(result.val_losses) >= 2:
        first, last = result.val_losses[0][1], result.val_losses[-1][1]
        print(f"final / step-0 val loss: {last:.3f} / {first:.3f} = {last / first:.2f}")
    final_samples = [s for s in result.samples if s["step"] == result.steps]
    if final_samples:
        print(f"\nsamples at step {result.steps}:")
        for record in final_samples:
            print(f"--- {record['prompt']!r}\n{record['prompt']}{record['completion']}\n")


def loss_curve(points: list[tuple[int, float]]) -> str:
    if not points:
        return "  (no evaluations)"
    top = max(loss for _, loss in points)
    return "\n".join(
        f"  step {step:>6}  {loss:7.4f}  {'#' * max(1, round(BAR_WIDTH * loss / top))}" for step, loss in points
    )


# ------------------------------------------------------------------------------------------------- fine-tuning
def run_demo_sft(result: TrainResult, overrides: Sequence[str] = (), alpaca_file: Path | None = None) -> TrainResult:
    """The demo's last stage: a short full fine-tuning of the demo model on Alpaca (when a file is given) or on
    instruction pairs made from the demo's own plays, with answers before and after."""
    run_dir = Path(result.run_dir)
    if alpaca_file is None:
        prepared_dir = Path(load_config(run_dir / "config.yaml").data.out_dir)
        data_file = write_play_instructions(prepared_dir, prepared_dir / "sft_plays.jsonl")
        questions = [json.loads(line)["messages"][0]["content"] for line in data_file.read_text().splitlines()[:3]]
    else:
        data_file, questions = alpaca_file, DEMO_QUESTIONS
    sft_run_dir = run_dir.parent / f"{run_dir.name}-sft"  # runs/demo-sft beside runs/demo
    with packaged_config("sft-demo.yaml") as config_file:
        config = load_config(config_file, [f"sft.base={run_dir}", f"sft.data={data_file}", "train.overwrite=true",
                                           f"train.run_dir={sft_run_dir}", *overrides])
    print(f"\n[sft] fine-tuning the demo model on {data_file.name} ({config.sft.method}, {config.train.max_steps} "
          f"steps of {config.train.batch_tokens:,} tokens, {config.sft.template} template)")
    started = time.perf_counter()
    trainer = SFTTrainer(config)
    template = trainer.template
    before = _demo_answers(trainer, questions)
    sft_result = trainer.fit()
    if sft_result.stopped_by:
        return sft_result
    after = _demo_answers(trainer, questions)
    losses = sft_result.val_losses
    if len(losses) >= 2:
        print(f"[sft] held-out answer loss {losses[0][1]:.3f} -> {losses[-1][1]:.3f} "
              f"in {time.perf_counter() - started:.0f} s; run directory {sft_result.run_dir}/")
    for question, old, new in zip(questions, before, after):
        print(f"\n{template.user_format.replace('{content}', question)}{template.assistant_prefix}")
        print(f"  before: {_one_line(old)}")
        print(f"  after:  {_one_line(new)}")
    return sft_result


def _demo_answers(trainer: SFTTrainer, questions: list[str]) -> list[Answer]:
    trainer.model.eval()
    with trainer.autocast():
        return answer_prompts(trainer.model, trainer.tokenizer, trainer.template, questions, 48)


def _one_line(answer: Answer, width: int = 160) -> str:
    text = " ".join(answer.text.split())
    text = text if len(text) <= width else text[: width - 3] + "..."
    return f"{text!r}  [{'ended with EOS' if answer.ended_with_eos else answer.finish_reason}]"


def write_play_instructions(prepared_dir: Path, out_file: Path, count: int = 600) -> Path:
    """'Continue the line' pairs from the demo's training text: half a line of verse in, its other half out."""
    tokenizer = Tokenizer.load(prepared_dir / "tokenizer.json")
    manifest = json.loads((prepared_dir / "manifest.json").read_text())
    shards = manifest["splits"]["train"]["shards"]
    text = tokenizer.decode(np.asarray(read_shard(prepared_dir / shards[0]["file"])[:400_000]).tolist())
    lines = [line.strip() for line in text.splitlines()
             if 6 <= len(line.split()) <= 12 and not any(c in line for c in "*#")]
    records = []
    for line in lines[:: max(1, len(lines) // count)][:count]:
        words = line.split()
        half = len(words) // 2
        records.append({"messages": [{"role": "user", "content": "Continue the line: " + " ".join(words[:half])},
                                     {"role": "assistant", "content": " ".join(words[half:])}]})
    if not records:
        raise DataError(f"no line of verse found in {prepared_dir} to build the demo's instruction pairs")
    out_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    return out_file
