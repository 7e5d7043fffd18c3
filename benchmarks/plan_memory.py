"""`llamalite plan`'s memory estimate against the peak RSS of real training steps on this CPU.

Each case runs in a fresh process: it builds the model, the loss and the optimizer through the trainer's own
functions (parallelize, build_optimizer, autocast_context), then runs two optimizer steps of two accumulated micro
batches each: the second step's last micro batch holds the parameters, the accumulated gradients, the optimizer
state and a micro batch's activations at once, the steady state of a run. Measured: peak RSS (ru_maxrss) minus the
RSS before the model was built (the Python and torch runtime, which the estimate leaves out on a CPU). Estimated:
plan_run's total for the same config on a CPU. The case passes within 25%.

Each case runs twice, under two glibc malloc settings:
- live: MALLOC_MMAP_THRESHOLD_=131072, every block above 128 KiB is its own mapping, returned to the OS when freed,
  so the peak RSS is the peak of live memory: what the estimate counts;
- default: glibc's own, whose mmap threshold grows to 32 MiB as blocks are freed; smaller tensors then come from a
  heap that keeps freed memory, so RSS holds allocator slack on top of live memory (a GPU's caching allocator has
  its own, which is why a plan only counts on 90% of GPU memory).

    .venv/bin/python benchmarks/plan_memory.py [--cases tiny,124m,350m] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 0.25

# name -> (preset, micro batch, seq len, overrides); fp32 (this CPU emulates bf16 matmuls) unless a case says.
CASES: dict[str, tuple[str, int, int, tuple[str, ...]]] = {
    "tiny": ("tiny", 8, 256, ()),
    "tiny-selective": ("tiny", 8, 256, ("train.activation_checkpointing=selective",)),
    "tiny-bf16": ("tiny", 4, 256, ("train.dtype=bf16",)),
    "124m": ("124m", 2, 1024, ()),
    "124m-chunked-block": ("124m", 2, 1024, ("train.activation_checkpointing=block", "train.loss_chunk_tokens=1024")),
    "350m": ("350m", 1, 1024, ()),
}
DEFAULT_CASES = "tiny,tiny-selective,124m,124m-chunked-block,350m"


def case_config(name: str):
    from llamalite.config import load_config

    preset, micro, seq, extra = CASES[name]
    return load_config(None, [f"model.preset={preset}", f"train.micro_batch_size={micro}", f"train.seq_len={seq}",
                              f"train.batch_tokens={2 * micro * seq}", "train.dtype=fp32", "train.compile=false",
                              "optim.warmup_steps=1", *extra])


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def measure(name: str) -> dict:
    """In this process: the peak RSS of two real optimizer steps above the RSS before the model existed.

    A warm-up on a toy model of the same config first maps in the torch kernels the steps use (code pages, thread
    pools): runtime, not the tensors the estimate counts."""
    import dataclasses
    import gc

    import torch

    config = case_config(name)
    toy = dataclasses.replace(config.model, n_layer=1, d_model=64, n_head=2, n_kv_head=2, ffn_hidden=128,
                              vocab_size=256, max_seq_len=config.train.seq_len)
    training_steps(dataclasses.replace(config, model=toy), micro_batch=1)
    gc.collect()
    baseline = rss_bytes()
    started = time.perf_counter()
    training_steps(config, config.train.micro_batch_size)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"baseline": baseline, "peak": peak, "measured": peak - baseline, "torch": torch.__version__,
            "seconds": time.perf_counter() - started}


def training_steps(config, micro_batch: int, steps: int = 2, accumulation: int = 2) -> None:
    """Real optimizer steps: the trainer's loss module, autocast, clipping and optimizer, on random tokens."""
    import torch

    from llamalite.model.llama import Llama
    from llamalite.runtime import autocast_context
    from llamalite.train.distributed import clip_grad_norm, parallelize
    from llamalite.train.optim import build_optimizer

    train, device = config.train, torch.device("cpu")
    torch.manual_seed(0)
    batches = [torch.randint(0, config.model.vocab_size, (micro_batch, train.seq_len + 1))
               for _ in range(accumulation)]
    model = Llama(config.model)
    loss_fn, _ = parallelize(model, "none", device, train.dtype, train.activation_checkpointing, False, "loss",
                             train.loss_chunk_tokens)
    optimizer = build_optimizer(model, config.optim, "cpu")
    for _ in range(steps):
        for batch in batches:
            with autocast_context(device, train.dtype):
                loss = loss_fn(batch[:, :-1], batch[:, 1:]) / accumulation
            loss.backward()
        clip_grad_norm(list(model.parameters()), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def estimate(name: str) -> dict:
    from llamalite.plan import Hardware, plan_run

    plan = plan_run(case_config(name), Hardware(gpus=1, memory=float("inf"), device="cpu", name="cpu"))
    parts = plan.memory.parts
    state = sum(value for label, value in parts.items() if label.startswith(("parameters", "gradients", "optimizer")))
    return {"params": plan.counts.total, "state": state, "activations": plan.memory.total - state,
            "estimate": plan.memory.total}


ALLOCATORS = {"live": {"MALLOC_MMAP_THRESHOLD_": "131072"}, "default": {}}


def run_case(name: str, allocator: str) -> dict:
    """The case in a fresh process (no memory of earlier cases in its RSS) under one malloc setting."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")} | ALLOCATORS[allocator]
    result = subprocess.run([sys.executable, __file__, "--child", name], cwd=ROOT, capture_output=True, text=True,
                            env=env)
    if result.returncode:
        raise RuntimeError(f"case {name} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=DEFAULT_CASES, help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--allocators", default="live,default", help="malloc settings to run each case under")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child)))
        return
    print(f"malloc settings: live = {ALLOCATORS['live']}, default = glibc's; torch {torch_version()}, "
          f"default threads; fp32 unless the case says bf16")
    header = (f"{'case':<20} {'params':>8} {'tokens':>10} {'state est':>10} {'act est':>9} {'estimate':>10} "
              f"{'live RSS':>10} {'est/live':>8} {'default RSS':>11} {'est/default':>11}  live within 25%")
    print(header)
    print("-" * len(header))
    rows = []
    for name in args.cases.split(","):
        preset, micro, seq, _ = CASES[name]
        row = {"case": name, **estimate(name)}
        for allocator in args.allocators.split(","):
            row[allocator] = run_case(name, allocator)
            row[f"ratio_{allocator}"] = row["estimate"] / row[allocator]["measured"]
        rows.append(row)
        print(f"{name:<20} {row['params'] / 1e6:>7.1f}M {f'{micro} x {seq}':>10} {_mib(row['state']):>10} "
              f"{_mib(row['activations']):>9} {_mib(row['estimate']):>10} {_measured(row, 'live'):>10} "
              f"{_ratio(row, 'live'):>8} {_measured(row, 'default'):>11} {_ratio(row, 'default'):>11}  "
              f"{'yes' if abs(row.get('ratio_live', 0) - 1) <= TOLERANCE else 'NO'}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def _measured(row: dict, allocator: str) -> str:
    return _mib(row[allocator]["measured"]) if allocator in row else "-"


def _ratio(row: dict, allocator: str) -> str:
    return f"{row[f'ratio_{allocator}']:.3f}" if allocator in row else "-"


def torch_version() -> str:
    import torch

    return torch.__version__


def _mib(value: float) -> str:
    return f"{value / 2**20:,.0f} MiB"


if __name__ == "__main__":
    main()
