"""LoRA as a model variant, through peft: adapters injected into a Llama's linear layers.

A LoRA model keeps every parameter name of its Llama under peft's module names (`...q_proj.base_layer.weight`,
`...q_proj.lora_A.default.weight`), so its whole state, frozen base included, saves as one checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from safetensors.torch import save_file
from torch import nn

from llamalite.errors import CheckpointError, ConfigError
from llamalite.model.llama import hf_name, name_from_hf
from llamalite.model.weights_file import read_safetensors


class LoraSettings(Protocol):
    """What the adapters need (config.py's LoraConfig has these fields; the model layer does not import config)."""

    r: int
    alpha: float
    dropout: float
    target_modules: Sequence[str]


def require_peft() -> Any:
    try:
        import peft
    except ImportError:
        raise ConfigError("LoRA needs peft: pip install -e '.[sft]' (or set sft.method=full)") from None
    return peft


def add_lora(model: nn.Module, lora: LoraSettings) -> Any:
    """Inject LoRA adapters into `model` in place (base weights frozen). Returns the PeftModel wrapping it."""
    peft = require_peft()
    r, target_modules = lora.r, list(lora.target_modules)
    present = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    unknown = sorted(set(target_modules) - present)
    if unknown or not target_modules:
        raise ConfigError(f"sft.lora.target_modules {unknown or '[]'} match no linear layer of the model: "
                          f"choose among {', '.join(sorted(present))}")
    if r <= 0:
        raise ConfigError(f"sft.lora.r={r} must be a positive rank, e.g. 16")
    config = peft.LoraConfig(r=r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=target_modules,
                             bias="none")
    return peft.get_peft_model(model, config)


def is_lora_state(tensor_names: Iterable[str]) -> bool:
    return any(".lora_A." in name for name in tensor_names)


ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FIX = "pass a folder written by llamalite merge --adapter-out"
PEFT_PREFIX = "base_model.model."  # what peft puts before a module's name in the adapter's tensor names


def save_adapter(peft_model: Any, out_dir: Path, base: str | None) -> Path:
    """adapter_config.json + adapter_model.safetensors under transformers' module names, loadable with
    peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(<export of the base>), out_dir)."""
    peft_model.peft_config["default"].base_model_name_or_path = base
    peft_model.save_pretrained(str(out_dir), save_embedding_layers=False)  # adapters only: embeddings are not adapted
    weights = Path(out_dir) / ADAPTER_WEIGHTS
    adapter = read_safetensors(weights, CheckpointError, ADAPTER_FIX)
    save_file(renamed(adapter, hf_name), weights, metadata={"format": "pt"})
    return out_dir


def load_adapter(model: nn.Module, adapter_dir: Path) -> Any:
    """A saved adapter (transformers' names) injected into one of our Llamas: the PeftModel wrapping it. Only the
    safetensors weights are read: an adapter_model.bin is a pickle, which could run code, and is never loaded."""
    weights = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights} not found: pass a folder written by llamalite merge --adapter-out "
                              "(adapter_model.bin, a pickle, is never loaded)")
    peft = require_peft()
    config = peft.PeftConfig.from_pretrained(str(adapter_dir))
    config.base_model_name_or_path = None  # `model` is the base (peft warns when a config names another)
    peft_model = peft.get_peft_model(model, config)
    adapter = read_safetensors(weights, CheckpointError, ADAPTER_FIX)
    result = peft.set_peft_model_state_dict(peft_model, renamed(adapter, name_from_hf))
    if result.unexpected_keys:
        raise CheckpointError(f"{weights} holds tensors this model has no place for "
                              f"({result.unexpected_keys[0]}, ...): load it onto the base it was trained on")
    return peft_model


def renamed(tensors: dict[str, Any], rename: Callable[[str], str]) -> dict[str, Any]:
    """Adapter tensors with each module name (after peft's prefix) passed through `rename`."""
    return {PEFT_PREFIX + rename(name.removeprefix(PEFT_PREFIX)): tensor for name, tensor in tensors.items()}
