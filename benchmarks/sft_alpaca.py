"""LoRA SFT of a small pretrained model on the 5,000 Alpaca examples: held-out answer loss, and how often greedy
answers end with the EOS, before and after.

The base is the demo's model (`llamalite demo` writes runs/demo); the data ../shared/data/sft/alpaca_5000.json, in
the Vicuna 1.1 template, 2% held out by content hash. Answer loss is the mean cross-entropy per held-out answer
token (EOS included). The EOS rate is over greedy answers to the first --prompts held-out instructions: the share
that end with the EOS id within --max-new-tokens new tokens (the rest ran into the limit or the context).

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 .venv/bin/python benchmarks/sft_alpaca.py [--steps 150]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from llamalite.config import load_config
from llamalite.runtime import autocast_context
from llamalite.sft import SFTTrainer, answer_prompts

ROOT = Path(__file__).resolve().parents[1]


def greedy_eos_rate(trainer: SFTTrainer, questions: list[str], max_new_tokens: int) -> tuple[float, float, str]:
    """(share ending with EOS, mean new tokens, first answer) of greedy answers."""
    trainer.model.eval()
    with autocast_context(trainer.device, trainer.train_cfg.dtype):
        answers = answer_prompts(trainer.model, trainer.tokenizer, trainer.template, questions, max_new_tokens)
    rate = sum(a.ended_with_eos for a in answers) / len(answers)
    return rate, sum(len(a.tokens) for a in answers) / len(answers), answers[0].text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="runs/demo", help="pretrained run or checkpoint (default: runs/demo)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sft" / "alpaca_5000.json"))
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps of 16 x 256 tokens (default: 150)")
    parser.add_argument("--method", default="lora", choices=["lora", "full"])
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--prompts", type=int, default=50, help="held-out instructions answered greedily (default: 50)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--run-dir", default=None, help="default: a temporary directory")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 on a busy machine")
    args = parser.parse_args()
    run_dir = args.run_dir or str(Path(tempfile.mkdtemp(prefix="sft_alpaca_")) / "run")
    config = load_config(ROOT / "configs" / "sft-demo.yaml", [
        f"sft.base={args.base}", f"sft.data={args.data}", f"sft.method={args.method}", "sft.lora.dropout=0.0",
        f"optim.lr={args.lr}", f"optim.min_lr={args.lr / 10}", f"train.max_steps={args.steps}",
        f"train.eval_interval={args.steps}", "train.val_batches=100", f"train.run_dir={run_dir}",
        "train.overwrite=true", "train.log_interval=25", f"train.threads={args.threads or 'null'}"])
    malloc = os.environ.get("MALLOC_MMAP_MAX_") == "0"
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"settings: {args.method}, {args.steps} steps x {config.train.batch_tokens} tokens, lr {args.lr}, "
          f"torch threads {torch.get_num_threads()}, glibc malloc {'keeps freed blocks' if malloc else 'default'}")
    trainer = SFTTrainer(config)
    questions = [conversation[0]["content"] for conversation in trainer.data.val_conversations[: args.prompts]]
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    eos_before, length_before, sample_before = greedy_eos_rate(trainer, questions, args.max_new_tokens)
    started = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - started
    eos_after, length_after, sample_after = greedy_eos_rate(trainer, questions, args.max_new_tokens)
    (_, loss_before), (_, loss_after) = result.val_losses[0], result.val_losses[-1]
    val_tokens = sum(batch.target_tokens for batch in trainer.val_batches)
    print(f"\n{trainer.data.stats.summary()}")
    print(f"\n{args.method}: {trainable:,} trained parameters; {result.steps} steps in {seconds / 60:.1f} min "
          f"(evaluations included); held-out: {len(trainer.data.val)} examples, {val_tokens:,} answer tokens\n")
    print("| metric | before SFT | after SFT |")
    print("|---|---:|---:|")
    print(f"| held-out answer loss (nats/token) | {loss_before:.3f} | {loss_after:.3f} |")
    print(f"| greedy answers ending with EOS within {args.max_new_tokens} tokens ({len(questions)} held-out prompts) "
          f"| {eos_before:.0%} | {eos_after:.0%} |")
    print(f"| mean new tokens per answer | {length_before:.1f} | {length_after:.1f} |")
    print(f"\nfirst held-out prompt: {questions[0]!r}\n  before: {sample_before[:200]!r}"
          f"\n  after:  {sample_after[:200]!r}")


if __name__ == "__main__":
    main()
