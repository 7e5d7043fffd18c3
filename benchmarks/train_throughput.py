"""Training throughput on this machine: llamalite (fp32/bf16, eager/compile) next to transformers' LlamaForCausalLM
built with the same configuration, batch and threads. Each row is one optimizer step = forward + backward + AdamW.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 .venv/bin/python benchmarks/train_throughput.py

Ratios compare rows of one run only (the malloc setting and the machine's load change absolute figures).

`--threads` instead measures the thread settings on the tiny preset (fp32 eager): 1 and 2 OpenMP threads, each with
the default OpenMP wait policy and with OMP_WAIT_POLICY=PASSIVE, on a quiet machine and next to a competing
process (one core kept busy by a Python loop), each setting a fresh process (the policy is read at start-up),
rounds alternating. It prints what was in force in each row.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
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


THREAD_SETTINGS = [(2, None), (2, "PASSIVE"), (1, None), (1, "PASSIVE")]  # (OMP_NUM_THREADS, OMP_WAIT_POLICY)
COMPETITOR = "while True: pass"


def tiny_step_rate(steps: int) -> float:
    """tokens/s of the tiny preset's fp32 eager step in this process (its thread settings from the environment)."""
    torch.manual_seed(0)
    model = Llama(get_preset("tiny"))
    batch, seq, _ = SHAPES["tiny"]
    return tokens_per_second(model, build_loss_fn(model, False), "fp32", batch, seq, steps)[0]


def measured_in_child(threads: int, policy: str | None, steps: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("OMP_WAIT_POLICY", None)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    result = subprocess.run([sys.executable, __file__, "--child-steps", str(steps)], env=env, capture_output=True,
                            text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def threads_study(steps: int, rounds: int) -> None:
    print(f"torch {torch.__version__}, {os.cpu_count()} cores; tiny preset, fp32 eager, batch "
          f"{SHAPES['tiny'][0]} x {SHAPES['tiny'][1]}, {steps} timed steps per process, {rounds} rounds; competitor: "
          f"one process running `{COMPETITOR}`; malloc: MALLOC_MMAP_MAX_="
          f"{os.environ.get('MALLOC_MMAP_MAX_', 'unset')}")
    rates: dict[tuple[str, int, str | None], list[float]] = {}
    for round_index in range(rounds):
        for load in ("quiet", "competing process"):
            competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR]) if load != "quiet" else None
            try:
                order = THREAD_SETTINGS if round_index % 2 == 0 else list(reversed(THREAD_SETTINGS))
                for threads, policy in order:
                    rates.setdefault((load, threads, policy), []).append(measured_in_child(threads, policy, steps))
            finally:
                if competitor is not None:
                    competitor.kill()
                    competitor.wait()
    print("\n| load | OMP_NUM_THREADS | OMP_WAIT_POLICY | tokens/s (median) | vs 2 threads, default policy |")
    print("|---|---:|---|---:|---:|")
    for load in ("quiet", "competing process"):
        base = statistics.median(rates[(load, 2, None)])
        for threads, policy in THREAD_SETTINGS:
            rate = statistics.median(rates[(load, threads, policy)])
            print(f"| {load} | {threads} | {policy or 'unset (OpenMP default)'} | {rate:,.0f} | {rate / base:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="tiny,124m")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default: per preset)")
    parser.add_argument("--threads", action="store_true", help="the thread-settings study instead (see above)")
    parser.add_argument("--rounds", type=int, default=2, help="--threads: rounds over the settings")
    parser.add_argument("--child-steps", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_steps:
        print(tiny_step_rate(args.child_steps))
        return
    if args.threads:
        return threads_study(args.steps or 6, args.rounds)
    malloc = {k: os.environ.get(k, "unset") for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}, malloc: {malloc}")
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
