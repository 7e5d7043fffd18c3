"""HellaSwag scoring speed: llamalite's batched harness next to scoring one example at a time, as the seed code
(a build-nanogpt fork) does, on the same model, examples and threads, in one run.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 .venv/bin/python benchmarks/eval_throughput.py

The model is the `tiny` preset with GPT-2's tokenizer (vocabulary padded to 50,304), randomly initialised:
speed does not depend on the weights. Needs ../shared/data (HellaSwag and GPT-2's tokenizer files).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llamalite.config import EvalConfig
from llamalite.eval.harness import score_requests
from llamalite.eval.suite import BenchmarkSuite
from llamalite.eval.tasks import Example
from llamalite.model.llama import Llama
from llamalite.model.presets import get_preset
from llamalite.runtime import autocast_context
from llamalite.tokenizer import Tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@torch.inference_mode()
def seed_code_predictions(model: Llama, tokenizer: Tokenizer, examples: list[Example]) -> list[int]:
    """build-nanogpt's HellaSwag loop: one forward per example (its choices padded together), the cross-entropy
    over every position, then the mean loss of each ending's tokens; the lowest wins (its acc_norm)."""
    predictions = []
    for example in examples:
        context = tokenizer.encode(example.contexts[0])
        endings = [tokenizer.encode(c) for c in example.continuations]
        width = max(len(context) + len(e) for e in endings)
        tokens = torch.zeros(len(endings), width, dtype=torch.long)
        mask = torch.zeros(len(endings), width, dtype=torch.long)
        for i, ending in enumerate(endings):
            row = context + ending
            tokens[i, :len(row)] = torch.tensor(row)
            mask[i, len(context):len(row)] = 1
        logits = model(tokens)
        shift_logits, shift_tokens = logits[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        losses = F.cross_entropy(shift_logits.flatten(0, 1).float(), shift_tokens.flatten(), reduction="none")
        losses = losses.view(tokens.size(0), -1)
        shift_mask = mask[:, 1:]
        average = (losses * shift_mask).sum(1) / shift_mask.sum(1)
        predictions.append(int(average.argmin()))
    return predictions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args()
    if not (SHARED / "eval" / "hellaswag_val.jsonl").exists():
        raise SystemExit(f"{SHARED} not present: this benchmark needs HellaSwag and GPT-2's tokenizer files")

    torch.manual_seed(0)
    tokenizer = Tokenizer.load(SHARED / "tokenizers" / "gpt2")
    config = dataclasses.replace(get_preset("tiny"), vocab_size=tokenizer.padded_vocab_size(64))
    model = Llama(config).eval()
    suite = BenchmarkSuite(EvalConfig(tasks=["hellaswag"], data_dir=str(SHARED / "eval"), limit=args.examples,
                                      batch_size=args.batch_size), tokenizer)
    task = suite.tasks[0]
    device = torch.device("cpu")
    autocast = autocast_context(device, args.dtype)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, dtype {args.dtype}, "
          f"MALLOC_MMAP_MAX_={os.environ.get('MALLOC_MMAP_MAX_', 'unset')}, "
          f"MALLOC_TRIM_THRESHOLD_={os.environ.get('MALLOC_TRIM_THRESHOLD_', 'unset')}")
    print(f"model: tiny preset with GPT-2's vocabulary ({model.num_parameters():,} parameters); "
          f"HellaSwag: the first {len(task.examples)} validation examples, {len(task.requests)} scored rows\n")
    score_requests(model, task.requests[:64], config.max_seq_len, args.batch_size, device, autocast)  # warm-up

    started = time.perf_counter()
    with autocast:
        seed_predictions = seed_code_predictions(model, tokenizer, task.examples)
    seed_seconds = time.perf_counter() - started

    started = time.perf_counter()
    results = suite.run(model, config.max_seq_len, device, autocast)
    ours_seconds = time.perf_counter() - started

    n = len(task.examples)
    seed_rate, ours_rate = n / seed_seconds, n / ours_seconds
    rows = [("one example per forward (seed code)", seed_rate),
            (f"llamalite batched ({args.batch_size} rows)", ours_rate)]
    print(f"| {'scoring':<36} | {'examples/s':>10} | {'vs seed code':>12} |")
    print(f"|{'-' * 38}|{'-' * 11}:|{'-' * 13}:|")
    for name, rate in rows:
        print(f"| {name:<36} | {rate:>10.1f} | {rate / seed_rate:>11.2f}x |")
    seed_acc_norm = sum(p == e.gold for p, e in zip(seed_predictions, task.examples)) / n
    print(f"\nacc_norm: llamalite {results['hellaswag'].metrics['acc_norm']:.4f} "
          "(per character, lm-evaluation-harness); "
          f"seed code {seed_acc_norm:.4f} (per token)")


if __name__ == "__main__":
    main()
