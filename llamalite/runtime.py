"""Where and how code runs: the device, autocast, seeded generators and the process group.

Library code logs through `logging.getLogger(__name__)` (under the `llamalite` logger); the console script calls
`llamalite.logs.setup_logging()` once, which shows INFO lines on stdout and warnings on stderr, from rank 0 only
under torchrun.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from llamalite.errors import ConfigError, DistributedError
from llamalite.logs import is_rank_zero

DTYPES = ("auto", "bf16", "fp32")


# ------------------------------------------------------------------------------------------------- device
def available_devices() -> list[str]:
    """The devices this torch can compute on here: cpu, each visible CUDA GPU, mps where built and present."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += ["cuda", *(f"cuda:{index}" for index in range(torch.cuda.device_count()))]
    if torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def resolve_device(name: str) -> torch.device:
    """The device `name` asks for (auto: the first GPU, else cpu), checked before anything uses it: a device type this
    torch was not built with, or a GPU that is not there, is a one-line ConfigError naming the available devices."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        with warnings.catch_warnings():  # torch's deprecation warning of a device type (mkldnn) it then refuses here
            warnings.simplefilter("ignore")
            device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        device = None
    if device is None or str(device) not in available_devices():
        what = "no CUDA GPU is visible" if str(name).startswith("cuda") and not torch.cuda.is_available() else \
            "it is not available here"
        raise ConfigError(f"device {name!r} was asked for but {what}: use auto or one of "
                          f"{', '.join(available_devices())}")
    return device


def configure_device(device: torch.device) -> None:
    if device.type == "cuda":
        if device.index is not None:
            torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls that autocast leaves


def has_fast_bf16(device: torch.device) -> bool:
    """Whether the device computes bf16 matmuls natively. CPUs without AVX512-BF16 or AMX emulate them, and bf16
    autocast there is many times slower than fp32 (about 100x for a 1024 x 1024 matmul on an AVX2-only CPU)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
        return any(probe is not None and probe() for probe in probes)
    return False


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """bf16 or fp32; `auto` is bf16 where the device computes it natively, else fp32."""
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}: use auto, bf16 or fp32")
    if dtype == "auto":
        return "bf16" if has_fast_bf16(device) else "fp32"
    return dtype


def autocast_context(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 autocast, or nothing for fp32 (`auto` resolved for the device)."""
    if resolve_dtype(dtype, device) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def seeded_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with `seed`, or from the OS when None; never the global RNG."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


# ------------------------------------------------------------------------------------------------- processes
@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistInfo:
    """Rank and world size from torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE); joins the process group
    (NCCL on GPUs, gloo on CPUs) when there are several processes. One process without torchrun: rank 0 of 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world_size)
    if info.active and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise DistributedError("WORLD_SIZE is set but MASTER_ADDR is not: launch with torchrun "
                                   "(torchrun --nproc_per_node N -m llamalite train CONFIG)")
        backend = "nccl" if device_type == "cuda" else "gloo"
        minutes = int(os.environ.get("LLAMALITE_DIST_TIMEOUT_MIN", "30"))
        dist.init_process_group(backend, timeout=timedelta(minutes=minutes))
    return info


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """Rank 0 of the process group, or of torchrun's environment before the group exists; True on one process."""
    return is_rank_zero()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def mean_across_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar tensor over all ranks (itself with one process)."""
    if not dist.is_initialized():
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / dist.get_world_size()


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's value of a picklable object, on every rank."""
    if not dist.is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
