"""BPE training time on text with one long run without a space (DNA letters), with and without llamalite's piece
cap (tokenizer.TRAINING_PIECE_CHARS), measured side by side, interleaved, in one process.

    .venv/bin/python benchmarks/bpe_long_runs.py [--letters 50000,100000,200000] [--vocab 1000]

The uncapped trainer is quadratic in the run's length (so its largest size takes seconds to minutes); the capped one
is linear. Prints the CPU, cores, commit and date with the table."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import subprocess
import time

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

from llamalite.tokenizer import Tokenizer


def train_uncapped(texts: list[str], vocab_size: int) -> None:
    inner = HFTokenizer(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    inner.train_from_iterator(texts, trainer)


def seconds(train, texts: list[str], vocab_size: int) -> float:
    start = time.perf_counter()
    train(texts, vocab_size)
    return time.perf_counter() - start


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return f"{cpu}, {os.cpu_count()} cores, commit {commit or '?'}, {datetime.date.today()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--letters", default="50000,100000,200000")
    parser.add_argument("--vocab", type=int, default=1000)
    args = parser.parse_args()
    rng = random.Random(0)
    print(machine())
    print(f"{'letters':>10} {'uncapped s':>11} {'capped s':>9} {'ratio':>7}")
    for letters in (int(n) for n in args.letters.split(",")):
        texts = ["".join(rng.choice("ACGT") for _ in range(letters)), "some ordinary text"]
        capped = seconds(lambda t, v: Tokenizer.train(t, v), texts, args.vocab)
        uncapped = seconds(train_uncapped, texts, args.vocab)
        print(f"{letters:>10,} {uncapped:>11.2f} {capped:>9.2f} {uncapped / capped:>6.0f}x")


if __name__ == "__main__":
    main()
