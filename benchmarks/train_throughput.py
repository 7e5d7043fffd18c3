"""Training throughput on this machine: llamalite (fp32/bf16, eager/compile) next to transformers' LlamaForCausalLM
built with the same configuration, batch and threads. Each row is one optimizer step = forward + backward + AdamW.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 .venv/bin/python benchmarks/train_throughput.py

Ratios compare rows of one run only (the malloc setting and the machine's load change absolute figures).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from llamalite.model.llama import Llama, ModelConfig
from llamalite.model.presets import get_preset
from llamalite.runtime import autocast_context
from llamalite.train.step import build_loss_fn, lm_loss

# (micro batch, sequence length, timed steps) per preset: sized so the whole table takes minutes on 2 cores.
SHAPES = {"tiny": (16, 256, 10), "124m": (4, 512, 3)}
WARMUP_STEPS = 2


def hf_model(config: ModelConfig) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.ffn_hidden,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_kv_head,
        max_position_embeddings=config.max_seq_len,
        rope_theta=config.rope_theta,
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
    )
    return LlamaForCausalLM(hf_config)


def hf_loss_fn(model: torch.nn.Module):
    def loss_fn(tokens, targets):
        return lm_loss(model(input_ids=tokens).logits, targets)

    return loss_fn


def tokens_per_second(model, loss_fn, dtype: str, batch: int, seq: int, steps: int) -> tuple[float, float]:
    """Returns (tokens/s over the timed steps, seconds of warm-up including compilation)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (batch, seq), generator=generator)
    targets = torch.randint(0, vocab, (batch, seq), generator=generator)

    def step():
        with autocast_context(torch.device("cpu"), dtype):
            loss = loss_fn(tokens, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    started = time.perf_counter()
    for _ in range(WARMUP_STEPS):
        step()
    warmup = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * seq * steps / (time.perf_counter() - started), warmup


def run_preset(name: str, steps_override: int | None) -> list[tuple[str, float, float]]:
    config = get_preset(name)
    batch, seq, steps = SHAPES[name]
    steps = steps_override or steps
    rows = []
    variants = [
        ("transformers eager fp32", "hf", "fp32", False),
        ("transformers eager bf16", "hf", "bf16", False),
        ("llamalite eager fp32", "ours", "fp32", False),
        ("llamalite eager bf16", "ours", "bf16", False),
        ("llamalite compile fp32", "ours", "fp32", True),
        ("llamalite compile bf16", "ours", "bf16", True),
    ]
    for label, impl, dtype, compile in variants:
        torch.manual_seed(0)
        torch._dynamo.reset()
        if impl == "hf":
            model = hf_model(config)
            loss_fn = hf_loss_fn(model)
        else:
            model = Llama(config)
            loss_fn = build_loss_fn(model, compile)
        tps, warmup = tokens_per_second(model, loss_fn, dtype, batch, seq, steps)
        rows.append((label, tps, warmup))
        print(f"  {name:>5} {label:<26} {tps:>9,.0f} tok/s  (warm-up {warmup:.1f}s)", flush=True)
        del model, loss_fn
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="tiny,124m")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default: per preset)")
    args = parser.parse_args()
    malloc = {k: os.environ.get(k, "unset") for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, malloc: {malloc}")
    tables = {}
    for name in args.presets.split(","):
        batch, seq, _ = SHAPES[name]
        print(f"{name}: batch {batch} x seq {seq}")
        tables[name] = run_preset(name, args.steps)

    print("\n| preset | path | tokens/s | vs transformers eager fp32 | vs transformers eager bf16 |")
    print("|---|---|---:|---:|---:|")
    for name, rows in tables.items():
        base_fp32, base_bf16 = rows[0][1], rows[1][1]
        for label, tps, _ in rows:
            print(f"| {name} | {label} | {tps:,.0f} | {tps / base_fp32:.2f}x | {tps / base_bf16:.2f}x |")


if __name__ == "__main__":
    main()
