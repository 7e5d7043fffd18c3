"""Benchmark scoring speed: llamalite eval against lm-evaluation-harness's hf backend and against llamalite's
harness before shared contexts, on the same model, files, examples, dtype and threads, in one run.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 .venv/bin/python benchmarks/eval_throughput.py \
        [--tasks hellaswag,arc_easy,piqa] [--limit 200] [--rounds 2] [--dtype fp32]

- **lm-evaluation-harness** (`hf` backend, HFLM built once per batch size, so model loading is not timed) on the
  transformers export of the model, with task YAMLs copying its own over the same local files
  (benchmarks/lm_eval_tasks.py); every batch size of `--lm-eval-batch-sizes` is timed and its best is the baseline.
- **llamalite, one row per choice**: the harness before shared prefixes (`share_prefixes=False`), with today's
  other savings (the last layer and the output layer only where logits are read, batched tokenization).
- **llamalite, shared prefixes**: windows that start alike share one row, each token computed once (the default).

Beside the times, the work each contender does: tokens through the transformer layers (padding included) and
positions through the output layer (lm-evaluation-harness: every position of every request, padding left out).

Each contender runs whole (loading the task files, building and scoring the requests) `--rounds` times, the order
alternating; the median is kept. The model is the `tiny` preset (the demo's shape), randomly initialised (speed does
not depend on the weights), with `--tokenizer demo`: a 4,096-id byte-level BPE trained on WikiText-2 (the demo's
vocabulary size), or `gpt2`: GPT-2's (padded to 50,304), where the output layer over 50k ids, computed at every
continuation token by every contender, dominates the time. The accuracies must be identical (printed, checked).
Needs ../shared/data and `pip install '.[dev]'` (lm-eval, transformers).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from llamalite.checkpoint.format import save_checkpoint
from llamalite.config import Config, DataConfig, EvalConfig
from llamalite.eval.harness import forward_work
from llamalite.eval.suite import BenchmarkSuite
from llamalite.export.hf import export_checkpoint
from llamalite.model.llama import Llama
from llamalite.model.presets import get_preset
from llamalite.runtime import autocast_context
from llamalite.tokenizer import Tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
GPT2 = SHARED / "tokenizers" / "gpt2"
CPU = torch.device("cpu")


def benchmark_tokenizer(name: str) -> Tokenizer:
    if name == "gpt2":
        return Tokenizer.load(GPT2)
    text = (SHARED / "corpus" / "wikitext2_valid.txt").read_text(encoding="utf-8")
    return Tokenizer.train(text.split("\n \n"), vocab_size=4096)


def exported_model(folder: Path, tokenizer: Tokenizer) -> tuple[Llama, Path]:
    """The tiny preset over the tokenizer's vocabulary, random weights, and its transformers export."""
    torch.manual_seed(0)
    model = Llama(dataclasses.replace(get_preset("tiny"), vocab_size=tokenizer.padded_vocab_size(64))).eval()
    data_dir = folder / "data"
    data_dir.mkdir()
    tokenizer.save(data_dir / "tokenizer.json")
    config = Config(name="eval-throughput", model=model.config, data=DataConfig(out_dir=str(data_dir)))
    state = {"step": 1, "tokens_seen": 0, "tokenizer_fingerprint": tokenizer.fingerprint, "config": config.to_dict()}
    checkpoint = save_checkpoint(folder / "run" / "checkpoints", 1, model, None, state)
    return model, export_checkpoint(checkpoint, folder / "hf")


def llamalite_scores(model: Llama, tokenizer_file: Path, tasks: list[str], limit: int, batch_size: int, dtype: str,
                     share_prefixes: bool) -> dict[str, dict[str, float]]:
    suite = BenchmarkSuite(EvalConfig(tasks=tasks, data_dir=str(SHARED / "eval"), limit=limit,
                                      batch_size=batch_size), Tokenizer.load(tokenizer_file))
    results = suite.run(model, model.config.max_seq_len, CPU, autocast_context(CPU, dtype),
                        share_prefixes=share_prefixes)
    return {task: {k: v for k, v in r.metrics.items() if k in ("acc", "acc_norm")} for task, r in results.items()}


def work(tokenizer_file: Path, tasks: list[str], limit: int, max_length: int, batch_size: int) -> dict[str, tuple]:
    """Contender -> (tokens through the layers, positions through the output layer), summed over the tasks."""
    suite = BenchmarkSuite(EvalConfig(tasks=tasks, data_dir=str(SHARED / "eval"), limit=limit, batch_size=batch_size),
                           Tokenizer.load(tokenizer_file))
    requests = [request for task in suite.tasks for request in task.scored()[1]]
    windows = sum(len((context + continuation)[-(max_length + 1):][:-1]) for context, continuation in requests)
    counts = {"lm-evaluation-harness hf": (windows, windows)}
    for name, share in (("llamalite, one row per choice", False), ("llamalite, shared prefixes", True)):
        per_task = [forward_work(task.scored()[1], max_length, batch_size, share) for task in suite.tasks]
        counts[name] = tuple(map(sum, zip(*per_task)))
    return counts


def lm_eval_scores(lm, task_dir: Path, tasks: list[str], limit: int) -> dict[str, dict[str, float]]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    output = simple_evaluate(model=lm, tasks=[f"local_{t}" for t in tasks], limit=limit, task_manager=manager,
                             verbosity="ERROR")
    return {task: {k.split(",")[0]: v for k, v in output["results"][f"local_{task}"].items()
                   if k in ("acc,none", "acc_norm,none")} for task in tasks}


def timed(run) -> tuple[float, dict[str, dict[str, float]]]:
    started = time.perf_counter()
    scores = run()
    return time.perf_counter() - started, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="hellaswag,arc_easy,piqa")
    parser.add_argument("--limit", type=int, default=200, help="examples per task")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="llamalite's rows per forward")
    parser.add_argument("--lm-eval-batch-sizes", default="16,32,64")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--tokenizer", choices=["demo", "gpt2"], default="demo")
    args = parser.parse_args()
    if not (SHARED / "eval" / "hellaswag_val.jsonl").exists():
        raise SystemExit(f"{SHARED} not present: this benchmark needs the task files and GPT-2's tokenizer files")
    import lm_eval
    import lm_eval_tasks
    from lm_eval.models.huggingface import HFLM

    tasks = args.tasks.split(",")
    with tempfile.TemporaryDirectory(prefix="eval_throughput_") as tmp:
        model, hf_dir = exported_model(Path(tmp), benchmark_tokenizer(args.tokenizer))
        tokenizer_file = hf_dir / "tokenizer.json"
        task_dir = Path(tmp) / "tasks"
        task_dir.mkdir()
        lm_eval_tasks.write_task_yamls(task_dir, SHARED / "eval", tasks)
        hf_dtype = {"fp32": "float32", "bf16": "bfloat16"}[args.dtype]
        lms = {size: HFLM(pretrained=str(hf_dir), dtype=hf_dtype, device="cpu", batch_size=size)
               for size in map(int, args.lm_eval_batch_sizes.split(","))}
        contenders = {f"lm-evaluation-harness hf, batch {size}": (lambda lm=lm: lm_eval_scores(lm, task_dir, tasks,
                                                                                                 args.limit))
                      for size, lm in lms.items()}
        contenders["llamalite, one row per choice"] = lambda: llamalite_scores(
            model, tokenizer_file, tasks, args.limit, args.batch_size, args.dtype, share_prefixes=False)
        contenders["llamalite, shared prefixes"] = lambda: llamalite_scores(
            model, tokenizer_file, tasks, args.limit, args.batch_size, args.dtype, share_prefixes=True)

        print(f"torch {torch.__version__}, lm_eval {lm_eval.__version__}, {torch.get_num_threads()} threads, dtype "
              f"{args.dtype}, MALLOC_MMAP_MAX_={os.environ.get('MALLOC_MMAP_MAX_', 'unset')}, "
              f"MALLOC_TRIM_THRESHOLD_={os.environ.get('MALLOC_TRIM_THRESHOLD_', 'unset')}, load average "
              f"{os.getloadavg()[0]:.2f} at start")
        counts = work(tokenizer_file, tasks, args.limit, model.config.max_seq_len, args.batch_size)
        print(f"model: tiny preset, {args.tokenizer} tokenizer (vocabulary {model.config.vocab_size:,}; "
              f"{model.num_parameters():,} parameters); tasks {tasks}, the first {args.limit} examples of each\n")
        for run in contenders.values():  # warm-up: datasets cached, kernels loaded
            run()
        seconds: dict[str, list[float]] = {name: [] for name in contenders}
        scores: dict[str, dict] = {}
        for round_index in range(args.rounds):
            names = list(contenders) if round_index % 2 == 0 else list(reversed(contenders))
            for name in names:
                elapsed, scores[name] = timed(contenders[name])
                seconds[name].append(elapsed)

    examples = args.limit * len(tasks)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    lm_eval_best = min((n for n in median if n.startswith("lm-evaluation")), key=median.get)
    before = "llamalite, one row per choice"
    print(f"| contender | median s | examples/s | vs lm-eval (batch {lm_eval_best.split()[-1]}) "
          "| vs one row per choice |")
    print("|---|---:|---:|---:|---:|")
    for name in contenders:
        print(f"| {name} | {median[name]:.2f} | {examples / median[name]:.1f} "
              f"| {median[lm_eval_best] / median[name]:.2f}x | {median[before] / median[name]:.2f}x |")
    print("\n| contender | tokens through the layers | positions through the output layer |\n|---|---:|---:|")
    for name, (tokens, outputs) in counts.items():
        print(f"| {name} | {tokens:,} | {outputs:,} |")
    print()
    reference = scores[lm_eval_best]
    for name, values in scores.items():
        print(f"{name}: " + ", ".join(f"{t} " + " ".join(f"{m}={v:.4f}" for m, v in sorted(values[t].items()))
                                      for t in tasks))
    identical = all(values == reference for values in scores.values())
    print(f"\nidentical acc / acc_norm everywhere: {'yes' if identical else 'NO'}")
    if not identical:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
