"""LoRA as a model variant, through peft: adapters injected into a Llama's linear layers.

A LoRA model keeps every parameter name of its Llama under peft's module names (`...q_proj.base_layer.weight`,
`...q_proj.lora_A.default.weight`), so its whole state, frozen base included, saves as one checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from llamalite.errors import ConfigError


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


def save_adapter(peft_model: Any, out_dir: Path, base: str | None) -> Path:
    """adapter_config.json + adapter_model.safetensors, loadable with
    peft.PeftModel.from_pretrained(Llama(...), out_dir)."""
    peft_model.peft_config["default"].base_model_name_or_path = base
    peft_model.save_pretrained(str(out_dir), save_embedding_layers=False)  # adapters only: embeddings are not adapted
    return out_dir
