"""The one reader of safetensors weights: every load of a checkpoint's model.safetensors, a transformers folder's
shards and an adapter's adapter_model.safetensors goes through read_safetensors (or safetensors_names).

A damaged file (a header length past the file, offsets out of order or past the end, an unknown dtype, a negative
shape, a header that is not a JSON object, a number too large for its field, ...) is whatever exception the
safetensors library or torch raises for it; here it becomes one line naming the file. Weights must be floating
point: a dtype changed to an integer or float8 type (a valid file) would otherwise load and fail inside a matmul.
The caller checks that the names and shapes are the ones its model expects (checkpoint/format.check_tensors_fit,
export/hf.checked_tensors, peft's unexpected keys).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# what a damaged file can make safetensors or torch raise (OverflowError/ValueError for sizes, TypeError for dtypes)
DAMAGED_FILE_ERRORS = (SafetensorError, OSError, ValueError, TypeError, OverflowError, RuntimeError, MemoryError)


def read_safetensors(path: Path, error: type[Exception], fix: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, each of a floating-point dtype; anything else is error(one line)."""
    try:
        tensors = load_file(path)
    except DAMAGED_FILE_ERRORS as exc:
        raise error(f"{path} is not a readable safetensors file ({_reason(exc)}): {fix}") from None
    for name, tensor in tensors.items():
        if tensor.dtype not in WEIGHT_DTYPES:
            dtype = str(tensor.dtype).removeprefix("torch.")
            raise error(f"{path}: tensor {shown(name)} has dtype {dtype}, not a weight dtype (float32, bfloat16 or "
                        f"float16): {fix}")
    return tensors


def safetensors_names(path: Path, error: type[Exception], fix: str) -> list[str]:
    """The tensor names of a safetensors file, from its header (no tensor is read)."""
    try:
        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    except DAMAGED_FILE_ERRORS as exc:
        raise error(f"{path} is not a readable safetensors file ({_reason(exc)}): {fix}") from None


def shown(name: str) -> str:
    """A tensor name from a file as a message shows it: quoted when it holds a line break or another control."""
    return name if name.isprintable() and name.strip() == name and name else repr(name)


def _reason(exc: Exception) -> str:
    """The first line of an exception's message, cut short (serde messages quote the whole list of dtypes)."""
    text = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.removeprefix("Error while deserializing header: ")[:160]
