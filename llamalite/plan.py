"""`llamalite plan`: memory per rank, time and disk of a training run, before any GPU time is spent.

The model is built on the meta device (shapes only, no memory), the optimizer is built over it with the run's own
checks, and the rest is counted:

- parameters, gradients and optimizer state per rank (FSDP2 shards all three), the bf16 weight copies that
  autocast keeps, DDP's gradient buckets and FSDP2's gathered blocks;
- the tensors that autograd saves for backward, tensor by tensor as llamalite/model/llama.py computes them under
  the run's precision (fp32, bf16 autocast, or bf16 parameters under FSDP2), for the micro batch, with activation
  checkpointing and the loss's chunks; plus the cross-entropy's peak at the start of backward;
- time per step at a given model-FLOPs utilisation, and disk for token shards and checkpoints.

The activation count follows eager PyTorch with a fused (flash) attention kernel, which saves the attention output
and its log-sum-exp rather than the (T, T) score matrix; torch.compile usually saves less. benchmarks/plan_memory.py
checks the estimate against the peak RSS of real training steps on a CPU.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

import torch

from llamalite.config import Config, TrainConfig, with_overrides
from llamalite.errors import ConfigError
from llamalite.model.llama import Llama, ModelConfig
from llamalite.model.presets import training_flops_per_token
from llamalite.runtime import resolve_dtype
from llamalite.train.distributed import CHECKPOINTING_MODES, resolve_parallel
from llamalite.train.metrics import GPU_PEAK_BF16_FLOPS
from llamalite.train.optim import build_optimizer, muon_split
from llamalite.train.trainer import accumulation_steps

GIB = 2**30
FP32, BF16 = 4, 2
HEADROOM = 0.90  # share of GPU memory a plan may use: the caching allocator fragments the rest
CUDA_RUNTIME_BYTES = 1.5 * GIB  # CUDA context, cuBLAS and NCCL workspaces: 1-2 GiB on H100s

# Memory (MiB, as nvidia-smi reports it) and dense bf16 peak of GPUs worth planning for.
GPUS: dict[str, tuple[int, str]] = {
    "h100": (81_559, "H100"),
    "h200": (143_771, "H200"),
    "a100-80gb": (81_920, "A100"),
    "a100-40gb": (40_960, "A100"),
    "a6000": (49_140, "A6000"),  # the paper's GPUs (RTX A6000)
    "l40s": (46_068, "L40S"),
    "4090": (24_564, "RTX 4090"),
}
PRECISIONS = ("fp32", "autocast", "bf16-params")


@dataclass(frozen=True)
class Hardware:
    """What the run will have: `gpus` ranks with `memory` bytes each, `peak_flops` each, reaching `mfu`."""

    gpus: int = 8
    memory: float = GPUS["h100"][0] * 2**20
    peak_flops: float = GPU_PEAK_BF16_FLOPS["H100"]
    mfu: float = 0.45
    device: str = "cuda"  # cpu: plan a CPU process (no CUDA runtime, dtype auto resolved for this CPU)
    name: str = "h100"


def gpu_hardware(gpu: str, gpus: int, memory: str | None, flops: float | None, mfu: float) -> Hardware:
    """Hardware from a GPU name, with memory and peak FLOP/s overridable; one-line errors for bad values."""
    if gpu not in GPUS:
        raise ConfigError(f"unknown --gpu {gpu!r}: choose one of {', '.join(GPUS)}, or give --gpu-memory and "
                          "--gpu-flops")
    if gpus < 1:
        raise ConfigError(f"--gpus {gpus}: a run needs at least one GPU")
    if not 0 < mfu <= 1:  # NaN included
        raise ConfigError(f"--mfu {mfu}: model-FLOPs utilisation is a fraction in (0, 1], e.g. 0.4")
    if flops is not None and not (0 < flops < math.inf):
        raise ConfigError(f"--gpu-flops {flops:g}: give the GPU's dense bf16 peak in FLOP/s, e.g. 989e12")
    mebibytes, flops_key = GPUS[gpu]
    return Hardware(gpus=gpus, memory=parse_gpu_memory(memory) if memory else mebibytes * 2**20,
                    peak_flops=flops or GPU_PEAK_BF16_FLOPS[flops_key], mfu=mfu, name=gpu)


def parse_gpu_memory(text: str) -> float:
    """'80GB' or '80GiB' -> 80 * 2**30 bytes: GPU makers' GB is a binary one (an '80 GB' H100 holds 79.6 GiB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(gb|gib|g|mb|mib|m|tb|tib|t)\s*", str(text), flags=re.IGNORECASE)
    if not match or not 0 < float(match.group(1)) < 1e9:  # over an exabyte: digits typed by mistake
        raise ConfigError(f"--gpu-memory {str(text)[:40]!r} is not a memory size: write e.g. 80GB or 48GiB")
    scale = {"g": 2**30, "m": 2**20, "t": 2**40}[match.group(2)[0].lower()]
    return float(match.group(1)) * scale


# -- what the model holds ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    per_block: int  # one transformer block (FSDP2's all-gather unit)
    root: int  # embeddings, final norm and output head (FSDP2's root unit)
    matmul_weights: int  # weights autocast casts to bf16 (every nn.Linear, the output head included)
    muon: int  # hidden matrices Muon would take


def meta_model(model_cfg: ModelConfig) -> Llama:
    with torch.device("meta"):
        return Llama(model_cfg)


def count_model_parameters(model: Llama) -> ParameterCounts:
    block = sum(p.numel() for p in model.layers[0].parameters())
    linears = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)}
    total = model.num_parameters()
    hidden, _ = muon_split(model)
    return ParameterCounts(total=total, per_block=block, root=total - block * len(model.layers),
                           matmul_weights=sum(linears.values()), muon=sum(p.numel() for p in hidden))


# -- what autograd saves ------------------------------------------------------------------------------------------


def saved_per_token(model_cfg: ModelConfig, precision: str) -> dict[str, float]:
    """Bytes one token leaves saved for backward in one block, by tensor, as Block.forward computes them.

    fp32: everything fp32. autocast: fp32 parameters and residual stream, bf16 matmul outputs, and each nn.Linear
    saves its own bf16 copy of its input. bf16-params (FSDP2 with bf16 parameters): a bf16 residual stream, whose
    norms save an fp32 copy of their input. RoPE saves nothing per token (only its cos/sin tables), and the
    attention output is already laid out as o_proj's input, so the two share one tensor.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    d, ffn = model_cfg.d_model, model_cfg.ffn_hidden
    act = FP32 if precision == "fp32" else BF16  # matmul outputs
    saved = {
        "norms": 2 * norm_saved(d, precision),
        # the normed stream as q/k/v's and gate/up's input (autocast: one bf16 copy per linear)
        "linear inputs": 5 * d * BF16 if precision == "autocast" else 2 * d * act,
        # q, k, v (KV heads repeated to every query head), the output, and a log-sum-exp per head
        "attention": 4 * d * act + FP32 * model_cfg.n_head,
        # SwiGLU: gate and up projections, silu(gate), and their product (the down projection's input)
        "mlp": 4 * ffn * act,
    }
    if model_cfg.qk_norm:
        kv = model_cfg.n_kv_head * model_cfg.head_dim
        saved["qk norms"] = (d + kv) * (2 * FP32 if precision == "fp32" else FP32 + BF16)
    return saved


def norm_saved(d: int, precision: str) -> int:
    """RMSNorm computes in fp32: it saves its (fp32) input, the normalised value and a per-token rsqrt."""
    if precision == "bf16-params":
        return d * FP32 + d * BF16 + FP32  # an fp32 copy of the bf16 input; the normalised value cast back to bf16
    return 2 * d * FP32 + FP32


def head_input(d: int, precision: str) -> int:
    return d * (FP32 if precision == "fp32" else BF16)


def selective_saved_per_token(model_cfg: ModelConfig, precision: str) -> float:
    """Bytes per token per block kept by selective checkpointing: the outputs of matmuls and attention, and the
    block's input (everything element-wise is recomputed)."""
    d, kv, ffn = model_cfg.d_model, model_cfg.n_kv_head * model_cfg.head_dim, model_cfg.ffn_hidden
    act = FP32 if precision == "fp32" else BF16
    matmuls = (d + 2 * kv + d + 2 * ffn + d) * act  # q, k, v, o, gate, up, down
    attention = d * act + FP32 * model_cfg.n_head
    return matmuls + attention + residual_bytes(precision) * d


def residual_bytes(precision: str) -> int:
    return BF16 if precision == "bf16-params" else FP32


@dataclass(frozen=True)
class Activations:
    blocks: float  # saved by every block at the end of forward
    recompute: float  # one block's full set, alive while a checkpointed block is recomputed in backward
    loss: float  # final norm, logits and cross-entropy at their peak (the start of backward)

    @property
    def total(self) -> float:
        return self.blocks + self.recompute + self.loss


def activation_memory(model_cfg: ModelConfig, micro_batch: int, seq_len: int, precision: str, checkpointing: str,
                      loss_chunk_tokens: int) -> Activations:
    tokens = micro_batch * seq_len
    full_block = sum(saved_per_token(model_cfg, precision).values()) * tokens
    per_block = {
        "none": full_block,
        "selective": selective_saved_per_token(model_cfg, precision) * tokens,
        "block": residual_bytes(precision) * model_cfg.d_model * tokens,
    }[checkpointing]
    recompute = 0.0 if checkpointing == "none" else full_block
    return Activations(blocks=per_block * model_cfg.n_layer, recompute=recompute,
                       loss=loss_memory(model_cfg, tokens, precision, loss_chunk_tokens))


def loss_memory(model_cfg: ModelConfig, tokens: int, precision: str, chunk_tokens: int) -> float:
    """The final norm's saved tensors, and the cross-entropy at the start of backward: the saved log-softmax and the
    loss's gradients w.r.t. it and w.r.t. the logits, all fp32 (V floats each), for the tokens computed in one piece.
    Chunked, the final hidden states and their gradient stay whole while each chunk's logits are recomputed."""
    d = model_cfg.d_model
    in_one_piece = min(chunk_tokens, tokens) if chunk_tokens > 0 else tokens
    cross_entropy = 3 * FP32 * model_cfg.vocab_size * in_one_piece
    if chunk_tokens > 0:
        hidden = 2 * residual_bytes(precision) * d
    else:
        hidden = head_input(d, precision)
    return (norm_saved(d, precision) + hidden) * tokens + cross_entropy


# -- the whole plan ---------------------------------------------------------------------------------------------


@dataclass
class MemoryPlan:
    parts: dict[str, float]  # label -> bytes per rank
    activations: Activations

    @property
    def total(self) -> float:
        return sum(self.parts.values())


@dataclass
class Plan:
    config: Config
    hardware: Hardware
    model_cfg: ModelConfig
    counts: ParameterCounts
    parallel: str
    precision: str
    seq_len: int
    accumulation: int
    memory: MemoryPlan
    flops_per_token: int
    step_seconds: float
    shard_bytes: int
    checkpoint_bytes: int
    checkpoints_on_disk: int
    notes: list[str] = field(default_factory=list)
    fixes: list[tuple[str, float]] = field(default_factory=list)  # overrides that would fit, with their total

    @property
    def budget(self) -> float:
        return self.hardware.memory * HEADROOM

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.budget

    @property
    def total_seconds(self) -> float:
        return self.step_seconds * self.config.train.max_steps


def plan_run(config: Config, hardware: Hardware, vocab_size: int | None = None, search_fixes: bool = True) -> Plan:
    """The plan of `config` on `hardware`. vocab_size: the tokenizer's padded size when the config leaves
    model.vocab_size to the tokenizer."""
    model_cfg = resolved_model_config(config, vocab_size)
    train = config.train
    if train.activation_checkpointing not in CHECKPOINTING_MODES:
        raise ConfigError(f"unknown train.activation_checkpointing {train.activation_checkpointing!r}: "
                          f"choose one of {', '.join(CHECKPOINTING_MODES)}")
    parallel = resolve_parallel(train.parallel, hardware.gpus)
    seq_len = train.seq_len or model_cfg.max_seq_len
    accumulation = accumulation_steps(train.batch_tokens, train.micro_batch_size, seq_len, hardware.gpus)
    model = meta_model(model_cfg)
    build_optimizer(model, dataclasses.replace(config.optim, fused=False), "meta", parallel)  # the run's checks
    counts = count_model_parameters(model)
    precision = run_precision(train.dtype, hardware, parallel)
    memory = memory_per_rank(config, model_cfg, counts, hardware, parallel, precision, seq_len)
    flops_per_token = training_flops_per_token(model_cfg, seq_len)
    step_seconds = flops_per_token * train.batch_tokens / (hardware.gpus * hardware.peak_flops * hardware.mfu)
    plan = Plan(config=config, hardware=hardware, model_cfg=model_cfg, counts=counts, parallel=parallel,
                precision=precision, seq_len=seq_len, accumulation=accumulation, memory=memory,
                flops_per_token=flops_per_token, step_seconds=step_seconds,
                shard_bytes=shard_bytes(config, model_cfg), checkpoint_bytes=checkpoint_bytes(config, counts),
                checkpoints_on_disk=checkpoints_on_disk(train))
    plan.notes = plan_notes(plan)
    if search_fixes and not plan.fits:
        plan.fixes = fitting_overrides(config, hardware, vocab_size)
    return plan


def resolved_model_config(config: Config, vocab_size: int | None) -> ModelConfig:
    model_cfg = dataclasses.replace(config.model)
    if model_cfg.vocab_size is None:
        if vocab_size is None:
            size = config.tokenizer.vocab_size
            multiple = config.tokenizer.pad_vocab_multiple
            vocab_size = math.ceil(size / multiple) * multiple
        model_cfg.vocab_size = vocab_size
    model_cfg.validate()
    return model_cfg


def run_precision(dtype: str, hardware: Hardware, parallel: str) -> str:
    device = torch.device(hardware.device)
    resolved = "bf16" if dtype == "auto" and device.type == "cuda" else resolve_dtype(dtype, device)
    if resolved == "fp32":
        return "fp32"
    return "bf16-params" if parallel == "fsdp" else "autocast"


def memory_per_rank(config: Config, model_cfg: ModelConfig, counts: ParameterCounts, hardware: Hardware,
                    parallel: str, precision: str, seq_len: int) -> MemoryPlan:
    train = config.train
    shards = hardware.gpus if parallel == "fsdp" else 1
    optimizer_bytes = optimizer_state_bytes(config.optim.name, counts)
    parts = {
        "parameters (fp32)": FP32 * counts.total / shards,
        "gradients (fp32)": FP32 * counts.total / shards,
        f"optimizer state ({config.optim.name})": optimizer_bytes / shards,
    }
    if parallel == "ddp":
        parts["DDP gradient buckets (fp32)"] = FP32 * counts.total
    if precision == "autocast":
        parts["bf16 weight copies (autocast)"] = BF16 * counts.matmul_weights
    if parallel == "fsdp":
        param_bytes = BF16 if precision == "bf16-params" else FP32
        # the root stays gathered from forward to backward; in backward a block is gathered, the next one prefetched,
        # and the block's unsharded gradients exist in the parameter dtype and as fp32 for the reduce-scatter
        parts["FSDP2 gathered parameters"] = param_bytes * (counts.root + 2 * counts.per_block) + \
            (param_bytes + FP32) * counts.per_block
    activations = activation_memory(model_cfg, train.micro_batch_size, seq_len, precision,
                                    train.activation_checkpointing, train.loss_chunk_tokens)
    parts["activations (saved for backward)"] = activations.blocks + activations.recompute
    parts["loss (logits, cross-entropy)"] = activations.loss
    if hardware.device == "cuda":
        parts["CUDA runtime (context, workspaces)"] = CUDA_RUNTIME_BYTES
    return MemoryPlan(parts=parts, activations=activations)


def optimizer_state_bytes(name: str, counts: ParameterCounts) -> float:
    """AdamW keeps two fp32 moments per parameter; Muon one momentum per hidden-matrix entry (AdamW the rest)."""
    if name == "muon":
        return FP32 * counts.muon + 2 * FP32 * (counts.total - counts.muon)
    return 2 * FP32 * counts.total


def shard_bytes(config: Config, model_cfg: ModelConfig) -> int:
    """Token shards for the tokens the run reads (one epoch of them): 2 bytes a token when the vocab fits 16 bits."""
    dtype = config.data.dtype
    itemsize = {"uint16": 2, "uint32": 4}.get(dtype, 2 if model_cfg.vocab_size <= 2**16 else 4)
    return config.train.max_steps * config.train.batch_tokens * itemsize


def checkpoint_bytes(config: Config, counts: ParameterCounts) -> int:
    """fp32 weights (safetensors or DCP shards) and the optimizer state: the same total under any parallelism."""
    return int(FP32 * counts.total + optimizer_state_bytes(config.optim.name, counts))


def checkpoints_on_disk(train: TrainConfig) -> int:
    """The newest keep_checkpoints, every milestone, and the one being written before the oldest is pruned."""
    if train.keep_checkpoints == 0:
        regular = max(1, train.max_steps // train.save_interval) if train.save_interval else 1
        return regular + 1
    milestones = train.max_steps // train.milestone_interval if train.milestone_interval else 0
    return train.keep_checkpoints + milestones + 1


def plan_notes(plan: Plan) -> list[str]:
    train, notes = plan.config.train, []
    if train.activation_checkpointing == "block":
        notes.append("block checkpointing runs every block's forward twice (about a third more FLOPs): "
                     "expect a lower MFU than without")
    if train.compile:
        notes.append("train.compile=true: the activation count is eager PyTorch's; compiled blocks usually save less")
    if train.loss_chunk_tokens == 0 and plan.memory.activations.loss > 0.1 * plan.memory.total:
        notes.append("the fp32 logits of a whole micro batch are a large share: train.loss_chunk_tokens=4096 "
                     "computes the loss a chunk at a time")
    return notes


# Overrides tried, cheapest first, when a plan does not fit.
FIX_CANDIDATES: tuple[dict[str, str], ...] = (
    {"train.loss_chunk_tokens": "4096"},
    {"train.activation_checkpointing": "selective"},
    {"train.parallel": "fsdp"},
    {"train.parallel": "fsdp", "train.activation_checkpointing": "selective"},
    {"train.activation_checkpointing": "block"},
    {"train.parallel": "fsdp", "train.activation_checkpointing": "block"},
)


def fitting_overrides(config: Config, hardware: Hardware, vocab_size: int | None) -> list[tuple[str, float]]:
    """The cheapest overrides (and smaller micro batches) under which the run fits, with their totals."""
    micro_batches = [config.train.micro_batch_size]
    while micro_batches[-1] > 1:
        micro_batches.append(micro_batches[-1] // 2)
    for micro in micro_batches:
        for candidate in FIX_CANDIDATES:
            overrides = dict(candidate)
            if config.train.loss_chunk_tokens:
                overrides.pop("train.loss_chunk_tokens", None)
            if micro != config.train.micro_batch_size:
                overrides["train.micro_batch_size"] = str(micro)
            if not overrides or not _allowed(config, overrides, hardware):
                continue
            trial = with_overrides(config, [f"{key}={value}" for key, value in overrides.items()])
            try:
                plan = plan_run(trial, hardware, vocab_size, search_fixes=False)
            except ConfigError:
                continue
            if plan.fits:
                return [(" ".join(f"{k}={v}" for k, v in overrides.items()), plan.memory.total)]
    return []


def _allowed(config: Config, overrides: dict[str, str], hardware: Hardware) -> bool:
    if overrides.get("train.parallel") == "fsdp" and (hardware.gpus == 1 or config.optim.name == "muon"):
        return False
    return overrides.get("train.activation_checkpointing", "") != config.train.activation_checkpointing


# -- printing -----------------------------------------------------------------------------------------------------


def format_plan(plan: Plan, config_name: str) -> str:
    hw, train, model_cfg = plan.hardware, plan.config.train, plan.model_cfg
    lines = [
        f"plan: {config_name} on {hw.gpus} x {hw.name} ({hw.memory / GIB:.1f} GiB, {hw.peak_flops / 1e12:g} TFLOP/s "
        f"bf16 peak), MFU {hw.mfu:g}",
        "",
    ]
    rows = [
        ("model", f"{model_cfg.preset or 'custom'}: {plan.counts.total:,} parameters ({model_cfg.n_layer} layers, "
                  f"d_model {model_cfg.d_model}, vocab {model_cfg.vocab_size})"),
        ("parallelism", f"{plan.parallel} over {hw.gpus} rank{'s' if hw.gpus > 1 else ''}; "
                        f"{_precision_text(plan.precision)}"),
        ("memory savers", f"activation checkpointing {train.activation_checkpointing}; loss "
                          + (f"in chunks of {train.loss_chunk_tokens} tokens" if train.loss_chunk_tokens
                             else "over the whole micro batch")),
        ("tokens per step", f"{train.batch_tokens:,} = {train.micro_batch_size} sequences x {plan.seq_len} tokens x "
                            f"{hw.gpus} ranks x {plan.accumulation} accumulation steps"),
    ]
    lines += _aligned(rows)
    verdict = "fits" if plan.fits else ("tight: over the 90% a run can use" if plan.memory.total <= hw.memory
                                        else "does NOT fit")
    lines += ["", "memory per rank (estimate)"]
    lines += _aligned([*((f"  {label}", _gib(value)) for label, value in plan.memory.parts.items()),
                       ("  total", f"{_gib(plan.memory.total)} of {_gib(hw.memory)}: {verdict}")])
    for overrides, total in plan.fixes:
        lines.append(f"  fits with: {overrides} ({_gib(total)})")
    if not plan.fits and not plan.fixes:
        lines.append("  nothing tried fits: more GPUs with train.parallel=fsdp, or a smaller model")
    total_tokens = train.max_steps * train.batch_tokens
    checkpoint_disk = plan.checkpoint_bytes * plan.checkpoints_on_disk
    gpu_hours = plan.total_seconds * hw.gpus / 3600
    lines += ["", "time and disk"]
    lines += _aligned([
        ("  FLOPs per token", f"{plan.flops_per_token / 1e9:.2f} GFLOP (forward + backward)"),
        ("  step", f"{plan.step_seconds:.2f} s at MFU {hw.mfu:g} "
                   f"({train.batch_tokens / plan.step_seconds:,.0f} tokens/s)"),
        ("  run", f"{train.max_steps:,} steps, {total_tokens / 1e9:.2f}B tokens: {_duration(plan.total_seconds)} "
                  f"({gpu_hours:,.0f} GPU-hours)"),
        ("  token shards", f"{plan.shard_bytes / 1e9:.1f} GB for the tokens the run reads"),
        ("  checkpoints", f"{plan.checkpoint_bytes / 1e9:.1f} GB each (fp32 weights + optimizer state); up to "
                          f"{plan.checkpoints_on_disk} on disk: {checkpoint_disk / 1e9:.0f} GB"),
    ])
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)


def _precision_text(precision: str) -> str:
    return {"fp32": "fp32", "autocast": "bf16 autocast over fp32 weights",
            "bf16-params": "bf16 parameters gathered, fp32 shards and gradient reduction"}[precision]


def _aligned(rows: list[tuple[str, str]]) -> list[str]:
    width = max(len(name) for name, _ in rows)
    return [f"{name:<{width}}  {value}" for name, value in rows]


def _gib(value: float) -> str:
    return f"{value / GIB:.1f} GiB" if value >= 0.1 * GIB else f"{value / 2**20:.0f} MiB"


def _duration(seconds: float) -> str:
    hours = seconds / 3600
    return f"{hours:.1f} h ({hours / 24:.1f} days)" if hours >= 24 else f"{hours:.1f} h"
