"""Decode throughput on this machine: llamalite with its KV cache, llamalite recomputing the whole sequence at
every step, and transformers' LlamaForCausalLM.generate() on the same weights. Batch 1, greedy, random weights,
a fixed prompt, every path generating exactly the same number of new tokens.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 .venv/bin/python benchmarks/generate_throughput.py

tokens/s = new tokens / wall time of the whole call (the short prefill included), the median of --repeats calls
made round robin. Ratios compare rows of one run only (the malloc setting, the thread count and the machine's
load change absolute figures). On 2 shared cores, --threads 1 is steadier: two intra-op threads slow to a crawl
when other processes compete for the cores. 124m: --presets tiny,124m --skip-recompute 124m (its recompute row
would take many minutes).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import torch

from llamalite.export.hf import hf_config, hf_tensors
from llamalite.generate import SamplingOptions, generate_ids
from llamalite.model.llama import Llama, ModelConfig
from llamalite.model.presets import get_preset

WARMUP_TOKENS = 8
AGREEMENT_TOKENS = 16  # greedy paths must pick the same first tokens


def benchmark_config(preset: str, prompt_tokens: int, new_tokens: int) -> ModelConfig:
    """The preset, with a context long enough for prompt + new tokens (tiny's 256 would stop generation early)."""
    config = get_preset(preset)
    return dataclasses.replace(config, max_seq_len=max(config.max_seq_len, prompt_tokens + new_tokens))


def hf_model(model: Llama) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = model.config.vocab_size
    special = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": 0}
    hf = LlamaForCausalLM(LlamaConfig(**hf_config(model.config, vocab, "float32", special))).eval()
    missing, unexpected = hf.load_state_dict(hf_tensors(model, vocab, torch.float32), strict=False)
    allowed_missing = {"lm_head.weight"} if model.config.tie_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise RuntimeError(f"weight mapping failed: missing {missing}, unexpected {unexpected}")
    return hf


def ours(model: Llama, use_cache: bool):
    def run(prompt: list[int], new_tokens: int) -> list[int]:
        options = SamplingOptions(max_new_tokens=new_tokens, temperature=0.0)
        return generate_ids(model, [prompt], options, use_cache=use_cache)[0].tokens

    return run


def transformers_generate(hf: torch.nn.Module):
    def run(prompt: list[int], new_tokens: int) -> list[int]:
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return out[0, len(prompt):].tolist()

    return run


def generate_count(run, prompt: list[int], new_tokens: int) -> tuple[float, list[int]]:
    started = time.perf_counter()
    tokens = run(prompt, new_tokens)
    seconds = time.perf_counter() - started
    if len(tokens) != new_tokens:
        raise RuntimeError(f"generated {len(tokens)} tokens instead of {new_tokens}")
    return new_tokens / seconds, tokens


def run_preset(name: str, prompt_len: int, new_tokens: int, skip_recompute: bool,
               repeats: int) -> list[tuple[str, float, int]]:
    """Each path `repeats` times, round robin (so a change in the machine's load hits every path); the median counts."""
    torch.manual_seed(0)
    model = Llama(benchmark_config(name, prompt_len, new_tokens)).eval()
    prompt = torch.randint(0, model.config.vocab_size, (prompt_len,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    variants = {"transformers generate()": transformers_generate(hf_model(model)),
                "llamalite KV cache": ours(model, use_cache=True)}
    if not skip_recompute:
        variants["llamalite recompute"] = ours(model, use_cache=False)
    for run in variants.values():
        run(prompt, WARMUP_TOKENS)
    speeds: dict[str, list[float]] = {label: [] for label in variants}
    tokens = {}
    for _ in range(repeats):
        for label, run in variants.items():
            tps, tokens[label] = generate_count(run, prompt, new_tokens)
            speeds[label].append(tps)
    median = {label: statistics.median(values) for label, values in speeds.items()}
    reference = tokens["transformers generate()"]
    rows = []
    for label in variants:
        agree = next((i for i, (a, b) in enumerate(zip(tokens[label], reference)) if a != b), new_tokens)
        rows.append((label, median[label], agree))
        calls = ", ".join(f"{v:.1f}" for v in speeds[label])
        print(f"  {name:>5} {label:<24} {median[label]:>9,.1f} tok/s  (calls: {calls}; first {agree} tokens equal "
              "transformers')", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="tiny", help="comma-separated: tiny,124m")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--skip-recompute", default="", help="presets whose recompute row is left out (slow ones)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per row; the median counts (default: 3)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc = {k: os.environ.get(k, "unset") for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, malloc: {malloc}")
    print(f"batch 1, greedy, prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, random weights (fp32), "
          f"median of {args.repeats} calls")
    skip = set(filter(None, args.skip_recompute.split(",")))
    tables = {name: run_preset(name, args.prompt_tokens, args.new_tokens, name in skip, args.repeats)
              for name in args.presets.split(",")}

    print("\n| preset | path | new tokens/s | vs recompute | vs transformers | first tokens equal |")
    print("|---|---|---:|---:|---:|---:|")
    for name, rows in tables.items():
        by_label = {label: tps for label, tps, _ in rows}
        hf_tps, recompute_tps = by_label["transformers generate()"], by_label.get("llamalite recompute")
        for label, tps, agree in rows:
            vs_recompute = f"{tps / recompute_tps:.2f}x" if recompute_tps else "-"
            print(f"| {name} | {label} | {tps:,.1f} | {vs_recompute} | {tps / hf_tps:.2f}x "
                  f"| {agree}/{args.new_tokens} |")


if __name__ == "__main__":
    main()
