"""Decode throughput on this machine: llamalite's compiled static decode step, its eager KV cache, and its
whole-sequence recompute, against transformers' LlamaForCausalLM.generate() on the same weights, eager and with its
static cache + torch.compile (under our step's max-autotune settings). Batch 1, greedy, random weights, a fixed
prompt, every path generating exactly the same number of new tokens.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 .venv/bin/python benchmarks/generate_throughput.py \
        --presets tiny,124m --dtype bf16 --skip-recompute 124m

tokens/s = new tokens / wall time of the whole call (the short prefill included), the median of --repeats calls
made round robin, after one untimed call per path (which compiles the compiled paths: its time is the "first call"
column). Ratios compare rows of one run only (the malloc setting, threads, the OpenMP wait policy and the machine's
load change absolute figures). On 2 shared cores, --threads 1 is steadier: two intra-op threads slow to a crawl
when other processes compete for the cores. The 124m recompute row would take many minutes: --skip-recompute 124m.

Each preset also gets its memory-bandwidth limit: the bytes one decode step must read (every weight matrix once,
the embedding table only when the head shares it, and the KV cache of the average context) over the bandwidth
of reading a large tensor measured in the same process, and each path's fraction of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import torch
from torch._inductor import config as inductor_config

from llamalite.export.hf import hf_config, hf_tensors
from llamalite.generate import CPU_INDUCTOR_SETTINGS, SamplingOptions, generate_ids
from llamalite.model.llama import Llama, ModelConfig
from llamalite.model.presets import get_preset

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
REFERENCE = "transformers generate()"
EAGER = "llamalite KV cache"


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


def ours(model: Llama, use_cache: bool = True, compile: bool = False):
    def run(prompt: list[int], new_tokens: int) -> list[int]:
        options = SamplingOptions(max_new_tokens=new_tokens, temperature=0.0)
        return generate_ids(model, [prompt], options, use_cache=use_cache, compile=compile)[0].tokens

    return run


def transformers_generate(hf: torch.nn.Module, compiled: bool = False):
    """generate(); compiled: with its static cache and its own torch.compile of the forward (transformers only
    compiles on accelerators unless told to compile on every device), under the inductor settings of llamalite's
    compiled step (max-autotune with the C++ GEMM template) but freezing, which its static cache rules out."""
    extra, settings = {}, {}
    if compiled:
        # Freezing would fold its static cache, which generate() writes, into the graph as a constant: left out.
        settings = {key: value for key, value in CPU_INDUCTOR_SETTINGS.items() if key != "freezing"}
        from transformers import CompileConfig

        compile_config = CompileConfig(fullgraph=True, dynamic=False, mode="default")
        compile_config._compile_all_devices = True  # its switch for CPUs
        extra = {"cache_implementation": "static", "compile_config": compile_config}

    def run(prompt: list[int], new_tokens: int) -> list[int]:
        ids = torch.tensor([prompt])
        with torch.inference_mode(), inductor_config.patch(settings):
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **extra)
        return out[0, len(prompt):].tolist()

    return run


def read_bandwidth(gigabytes: float = 0.5, repeats: int = 5) -> float:
    """GB/s of summing a large fp32 tensor (the best of a few reads; the tensor is far larger than any cache)."""
    data = torch.ones(int(gigabytes * 1e9) // 4)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - started)
    return data.numel() * 4 / best / 1e9


def bytes_per_token(model: Llama, context: float) -> float:
    """Bytes a decode step must read: each weight once (the embedding table only when the head is tied to it:
    otherwise one row), and the keys and values of `context` cached positions in every layer."""
    config = model.config
    weights = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                  if config.tie_embeddings or not name.startswith("embed_tokens"))
    element = next(model.parameters()).element_size()
    kv = 2 * config.n_layer * config.n_kv_head * config.head_dim * context * element
    return weights + kv


def equal_prefix(tokens: list[int], reference: list[int]) -> int:
    """How many tokens, from the first, equal the reference's (greedy paths diverge for good after a difference)."""
    return next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), len(tokens))


def generate_count(run, prompt: list[int], new_tokens: int) -> tuple[float, list[int]]:
    started = time.perf_counter()
    tokens = run(prompt, new_tokens)
    seconds = time.perf_counter() - started
    if len(tokens) != new_tokens:
        raise RuntimeError(f"generated {len(tokens)} tokens instead of {new_tokens}")
    return new_tokens / seconds, tokens


def run_preset(name: str, dtype: torch.dtype, prompt_len: int, new_tokens: int, skip_recompute: bool, repeats: int,
               bandwidth: float) -> dict:
    """Each path `repeats` times, round robin (so a change in the machine's load hits every path); the median counts."""
    torch.manual_seed(0)
    model = Llama(benchmark_config(name, prompt_len, new_tokens)).eval()
    hf = hf_model(model).to(dtype)
    model = model.to(dtype)
    prompt = torch.randint(0, model.config.vocab_size, (prompt_len,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    variants = {REFERENCE: transformers_generate(hf),
                "transformers static cache + compile": transformers_generate(hf, compiled=True),
                EAGER: ours(model),
                "llamalite compiled": ours(model, compile=True)}
    if not skip_recompute:
        variants["llamalite recompute"] = ours(model, use_cache=False)
    first_call = {}
    for label, run in variants.items():
        started = time.perf_counter()
        generate_count(run, prompt, new_tokens)
        first_call[label] = time.perf_counter() - started
    speeds: dict[str, list[float]] = {label: [] for label in variants}
    tokens = {}
    for _ in range(repeats):
        for label, run in variants.items():
            tps, tokens[label] = generate_count(run, prompt, new_tokens)
            speeds[label].append(tps)
    step_bytes = bytes_per_token(model, prompt_len + new_tokens / 2)
    limit = bandwidth * 1e9 / step_bytes
    rows = []
    for label in variants:
        median = statistics.median(speeds[label])
        agree = {reference: equal_prefix(tokens[label], tokens[reference]) for reference in (REFERENCE, EAGER)}
        rows.append({"path": label, "tps": median, "agree": agree, "first": first_call[label]})
        calls = ", ".join(f"{v:.1f}" for v in speeds[label])
        print(f"  {name:>5} {label:<36} {median:>9,.1f} tok/s  (calls: {calls}; first call {first_call[label]:.1f} s; "
              f"first {agree[REFERENCE]} tokens equal transformers', {agree[EAGER]} llamalite eager's)", flush=True)
    return {"rows": rows, "limit": limit, "mb_per_token": step_bytes / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="tiny", help="comma-separated: tiny,124m")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="weights of both models (default: fp32)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--skip-recompute", default="", help="presets whose recompute row is left out (slow ones)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per row; the median counts (default: 3)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    environment = {k: os.environ.get(k, "unset") for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_",
                                                             "OMP_WAIT_POLICY")}
    bandwidth = read_bandwidth()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {environment}; "
          f"read bandwidth {bandwidth:.1f} GB/s")
    print(f"batch 1, greedy, prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, random weights "
          f"({args.dtype}), median of {args.repeats} calls")
    skip = set(filter(None, args.skip_recompute.split(",")))
    tables = {name: run_preset(name, DTYPES[args.dtype], args.prompt_tokens, args.new_tokens, name in skip,
                               args.repeats, bandwidth)
              for name in args.presets.split(",")}

    print("\n| preset | path | new tokens/s | vs transformers | vs recompute | of the bandwidth limit | first call | "
          "first tokens equal: transformers' | llamalite eager's |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, table in tables.items():
        by_path = {row["path"]: row["tps"] for row in table["rows"]}
        recompute = by_path.get("llamalite recompute")
        for row in table["rows"]:
            vs_recompute = f"{row['tps'] / recompute:.2f}x" if recompute else "-"
            print(f"| {name} | {row['path']} | {row['tps']:,.1f} | {row['tps'] / by_path[REFERENCE]:.2f}x "
                  f"| {vs_recompute} | {row['tps'] / table['limit']:.0%} | {row['first']:.1f} s "
                  f"| {row['agree'][REFERENCE]}/{args.new_tokens} | {row['agree'][EAGER]}/{args.new_tokens} |")
    for name, table in tables.items():
        print(f"{name}: {table['mb_per_token']:,.1f} MB read per token at {bandwidth:.1f} GB/s: "
              f"at most {table['limit']:,.1f} tokens/s")


if __name__ == "__main__":
    main()
