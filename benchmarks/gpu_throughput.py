"""Training throughput of the dmas-1.7b preset on one NVIDIA GPU: tokens/s, MFU and peak memory, eager and compiled.

    benchmarks/gpu_throughput.sh            # the wrapper: runs this from the source tree, nothing installed

The recipe is the trainer's on one GPU: bf16 autocast over fp32 master weights, fused AdamW, the chunked
cross-entropy (train.loss_chunk_tokens, so the fp32 logits of the batch never exist at once), gradient clipping, and
the largest micro-batch that fits (tried in eager mode, where an attempt is cheap; the compiled mode reuses it, as
compiling needs less memory). A timed step is one optimizer update over --accum micro-batches of seq 1024.
MFU = tokens/s x training FLOPs per token (6 x matmul params + attention, PaLM's count) / the device's dense bf16 peak
(llamalite/train/metrics.py GPU_PEAK_BF16_FLOPS); an unknown device says so unless --peak-flops is given.
Runs on torch 2.11 and later.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time

import torch

from llamalite.model.llama import Llama
from llamalite.model.presets import count_parameters, get_preset, training_flops_per_token
from llamalite.runtime import autocast_context
from llamalite.train.distributed import apply_activation_checkpointing
from llamalite.train.metrics import device_peak_flops
from llamalite.train.step import LanguageModelLoss

SEQ_LEN = 1024


def build_optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    """The paper's AdamW (decay on matrices only), fused: one kernel for all parameters."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)


class Bench:
    def __init__(self, device: torch.device, preset: str, accum: int, chunk_tokens: int, checkpointing: str):
        self.device = device
        torch.manual_seed(0)
        self.config = get_preset(preset)
        self.model = Llama(self.config).to(self.device)
        apply_activation_checkpointing(self.model, checkpointing)
        self.optimizer = build_optimizer(self.model)
        self._allocate_optimizer_state()
        self.accum = accum
        self.loss_module = LanguageModelLoss(self.model, chunk_tokens)
        self.generator = torch.Generator(device=self.device).manual_seed(0)

    def _allocate_optimizer_state(self) -> None:
        """AdamW's moments exist from the start (a step at lr 0 on zero gradients), so that trying micro-batches
        measures the memory of a run in its steady state."""
        for param in self.model.parameters():
            param.grad = torch.zeros_like(param)
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"] = 0.0
        self.optimizer.step()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)

    def batch(self, micro_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(0, self.config.vocab_size, (micro_batch, SEQ_LEN + 1), device=self.device,
                               generator=self.generator)
        return tokens[:, :-1], tokens[:, 1:]

    def step(self, loss_fn, micro_batch: int) -> float:
        for _ in range(self.accum):
            inputs, targets = self.batch(micro_batch)
            with autocast_context(self.device, "bf16"):
                loss = loss_fn(inputs, targets) / self.accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss)

    def fits(self, micro_batch: int) -> bool:
        """One eager forward + backward at this micro-batch (plus the optimizer state) without running out of memory."""
        try:
            self.step(self.loss_module, micro_batch)
            torch.cuda.synchronize()
            return True
        except torch.cuda.OutOfMemoryError:
            self.optimizer.zero_grad(set_to_none=True)
            return False
        finally:
            gc.collect()
            torch.cuda.empty_cache()

    def measure(self, loss_fn, micro_batch: int, warmup: int, steps: int) -> dict[str, float]:
        started = time.perf_counter()
        for _ in range(warmup):
            loss = self.step(loss_fn, micro_batch)
        torch.cuda.synchronize()
        warmup_seconds = time.perf_counter() - started
        torch.cuda.reset_peak_memory_stats(self.device)
        started = time.perf_counter()
        for _ in range(steps):
            loss = self.step(loss_fn, micro_batch)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        if not math.isfinite(loss):
            raise RuntimeError(f"non-finite loss {loss}")
        return {"tokens_per_s": steps * self.accum * micro_batch * SEQ_LEN / seconds, "warmup_s": warmup_seconds,
                "step_s": seconds / steps, "peak_gib": torch.cuda.max_memory_allocated(self.device) / 2**30}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="dmas-1.7b")
    parser.add_argument("--modes", default="eager,compile", help="eager and/or compile (model + loss as one graph)")
    parser.add_argument("--micro-batches", default="16,12,8,6,4,2",
                        help="candidates, largest first; the first that fits is used (default: 16,12,8,6,4,2)")
    parser.add_argument("--accum", type=int, default=4, help="micro-batches per optimizer step (default: 4)")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per mode (default: 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first, compilation included (default: 2)")
    parser.add_argument("--loss-chunk-tokens", type=int, default=4096, help="0: logits in one piece (default: 4096)")
    parser.add_argument("--activation-checkpointing", default="none", choices=["none", "block", "selective"])
    parser.add_argument("--peak-flops", type=float, default=None,
                        help="device dense bf16 peak FLOP/s, if not in the table")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print("no CUDA GPU visible: this benchmark needs one NVIDIA GPU", file=sys.stderr)
        return 1
    device = torch.device("cuda")
    torch.set_float32_matmul_precision("high")
    name = torch.cuda.get_device_name(device)
    peak = device_peak_flops(device, args.peak_flops)
    config = get_preset(args.preset)
    flops_per_token = training_flops_per_token(config, SEQ_LEN)
    print(f"device: {name} ({torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB), "
          f"torch {torch.__version__}, CUDA {torch.version.cuda}")
    print(f"dense bf16 peak: {peak / 1e12:.1f} TFLOP/s" if peak else
          f"dense bf16 peak: unknown device {name!r}, not in GPU_PEAK_BF16_FLOPS (llamalite/train/metrics.py): "
          "MFU not reported; pass --peak-flops")
    print(f"model: {args.preset}, {count_parameters(config):,} parameters, seq {SEQ_LEN}, "
          f"{flops_per_token / 1e9:.2f} GFLOP/token (training); bf16 autocast, fused AdamW, "
          f"loss chunks {args.loss_chunk_tokens or 'off'}, activation checkpointing {args.activation_checkpointing}")

    bench = Bench(device, args.preset, args.accum, args.loss_chunk_tokens, args.activation_checkpointing)
    candidates = [int(b) for b in args.micro_batches.split(",")]
    micro_batch = next((b for b in candidates if bench.fits(b)), None)
    if micro_batch is None:
        print(f"no micro-batch of {candidates} fits: try --activation-checkpointing selective", file=sys.stderr)
        return 1
    print(f"micro-batch: {micro_batch} (largest of {candidates} that fits in eager mode), {args.accum} per step = "
          f"{args.accum * micro_batch * SEQ_LEN:,} tokens per optimizer step", flush=True)

    rows = []
    for mode in args.modes.split(","):
        loss_fn = torch.compile(bench.loss_module) if mode == "compile" else bench.loss_module
        try:
            result = bench.measure(loss_fn, micro_batch, args.warmup, args.steps)
        except Exception as exc:  # a failed mode is a row saying why, not a lost table
            print(f"{mode}: failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", flush=True)
            rows.append((mode, None))
            bench.optimizer.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
            continue
        rows.append((mode, result))
        print(f"{mode}: {result['tokens_per_s']:,.0f} tokens/s, {result['step_s']:.2f} s/step, peak "
              f"{result['peak_gib']:.1f} GiB (warm-up {result['warmup_s']:.0f} s)", flush=True)

    print("\n| mode | micro-batch | tokens/s | MFU | peak memory (GiB) | warm-up (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode, r in rows:
        if r is None:
            print(f"| {mode} | {micro_batch} | failed | | | |")
            continue
        mfu = f"{r['tokens_per_s'] * flops_per_token / peak:.1%}" if peak else "n/a (unknown device)"
        print(f"| {mode} | {micro_batch} | {r['tokens_per_s']:,.0f} | {mfu} | {r['peak_gib']:.1f} "
              f"| {r['warmup_s']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
