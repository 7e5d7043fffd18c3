"""load_for_inference: a checkpoint made ready to use, by one loader for every command that reads one (eval,
generate, chat, export, merge, and the base of a fine-tuning run).

It resolves the path (a run directory means its newest checkpoint), verifies the checksums of the files it reads
once, reads trainer_state.json once, finds the tokenizer and checks it is the one the model was trained with, and
builds a plain or LoRA model from single-file or sharded weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llamalite.checkpoint.format import (
    SHARDED_DIR,
    STATE_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    is_sharded,
    load_model_tensors,
    read_state,
    read_weights,
    resolve_checkpoint_dir,
    verify_checkpoint,
    weight_names,
)
from llamalite.checkpoint.sharded import load_sharded
from llamalite.config import Config, config_from_dict
from llamalite.errors import CheckpointError, LlamaliteError
from llamalite.model.llama import Llama
from llamalite.model.lora import add_lora, is_lora_state
from llamalite.tokenizer import Tokenizer


@dataclass
class InferenceModel:
    """A checkpoint's model (eval mode, fp32, on the CPU), its tokenizer and trainer state."""

    path: Path
    model: Llama  # a LoRA checkpoint's model carries its adapters (injected in place)
    tokenizer: Tokenizer
    state: dict[str, Any]
    config: Config  # the run's, from the state
    adapter: Any = None  # the peft PeftModel wrapping `model`, for a LoRA checkpoint

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def tokens_seen(self) -> int:
        return int(self.state.get("tokens_seen", 0))


def load_for_inference(path: Path, tokenizer_path: Path | None = None, allow_lora: bool = True) -> InferenceModel:
    """Load a checkpoint directory (or a run directory: its newest checkpoint) with its tokenizer, checked to match.

    allow_lora=False refuses a checkpoint with LoRA adapters (naming `llamalite merge` as the fix)."""
    checkpoint = resolve_checkpoint_dir(Path(path))
    verify_checkpoint(checkpoint, wanted=_read_by_inference)
    state = read_state(checkpoint)
    config = config_from_dict(state["config"])
    tokenizer = find_tokenizer(checkpoint, state, tokenizer_path)
    model, adapter = _build_model(checkpoint, config, allow_lora)
    check_finite(model, checkpoint)
    if tokenizer.size > model.config.vocab_size:
        raise CheckpointError(f"the tokenizer has {tokenizer.size} tokens but the model only {model.config.vocab_size} "
                              "embedding rows: pass the tokenizer.json this checkpoint was trained with")
    return InferenceModel(checkpoint, model.eval(), tokenizer, state, config, adapter)


def check_finite(model: torch.nn.Module, checkpoint: Path) -> None:
    """Refuse weights holding NaN or infinity (a run that diverged): every output of such a model is garbage."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{checkpoint} holds non-finite weights ({name} has NaN or infinite values; a run "
                                  "that diverged?): use an earlier checkpoint")


def _read_by_inference(name: str) -> bool:
    """The files of a checkpoint that inference reads (never the optimizer state)."""
    return name in (WEIGHTS_FILE, STATE_FILE, TOKENIZER_FILE) or name.startswith(f"{SHARDED_DIR}/")


def find_tokenizer(checkpoint: Path, state: dict[str, Any], override: Path | None) -> Tokenizer:
    """The run's tokenizer: the override, else tokenizer.json in the checkpoint, else <data.out_dir>/tokenizer.json,
    else (a relative data.out_dir, read from another folder) <a folder above the checkpoint>/<data.out_dir>/
    tokenizer.json whose fingerprint is the one the run recorded."""
    config = state["config"]
    expected = state.get("tokenizer_fingerprint")
    out_dir = Path(config["data"]["out_dir"])
    candidates = [override] if override else [checkpoint / TOKENIZER_FILE, out_dir / TOKENIZER_FILE]
    found = next((path for path in candidates if path.is_file()), None)
    if found is None and override is None and expected and not out_dir.is_absolute():
        found = _tokenizer_above(checkpoint, out_dir, config, expected)
    if found is None:
        raise CheckpointError(f"tokenizer not found at {' or '.join(map(str, candidates))}: "
                              f"{_tokenizer_fix(checkpoint)}")
    tokenizer = _load_tokenizer(found, config)
    if expected and tokenizer.fingerprint != expected:
        raise CheckpointError(f"{found} is not the tokenizer {checkpoint} was trained with (its fingerprint differs): "
                              + ("pass --tokenizer PATH with the run's tokenizer.json" if override
                                 else _tokenizer_fix(checkpoint)))
    return tokenizer


def _tokenizer_fix(checkpoint: Path) -> str:
    """What every command that loads a checkpoint can do about its tokenizer (only export has --tokenizer)."""
    return (f"run the command from the folder the run was trained in (its data.out_dir is relative), or copy the "
            f"run's tokenizer.json (in its data.out_dir) into {checkpoint} (checksums.json need not list it: its "
            "fingerprint is checked); `llamalite export` also takes --tokenizer PATH")


def _load_tokenizer(path: Path, config: dict[str, Any]) -> Tokenizer:
    return Tokenizer.load(path, config["tokenizer"]["eos_token"], config["tokenizer"].get("bos_token"))


def _tokenizer_above(checkpoint: Path, out_dir: Path, config: dict[str, Any], expected: str) -> Path | None:
    """<folder>/<out_dir>/tokenizer.json for the folders above the checkpoint (the run was trained in one of them),
    the first whose fingerprint is the run's; any other is passed over."""
    for folder in checkpoint.resolve().parents:
        path = folder / out_dir / TOKENIZER_FILE
        try:
            if path.is_file() and _load_tokenizer(path, config).fingerprint == expected:
                return path
        except LlamaliteError:  # a damaged file that is not the run's tokenizer anyway
            continue
    return None


def _build_model(checkpoint: Path, config: Config, allow_lora: bool) -> tuple[Llama, Any]:
    """(model, peft adapter or None). Single-file weights go straight into a model built on the meta device: no
    random init (seconds at 1.7B parameters) and no draw from the global RNG."""
    if is_sharded(checkpoint):  # train.parallel=fsdp writes no LoRA runs
        model = Llama(config.model)
        load_sharded(checkpoint, model, None)
        return model, None
    lora = is_lora_state(weight_names(checkpoint / WEIGHTS_FILE))
    if lora and not allow_lora:
        raise CheckpointError(f"{checkpoint} holds LoRA adapters: merge them first "
                              f"(llamalite merge {checkpoint} OUT_DIR) and use the merged checkpoint")
    adapter = None
    with torch.device("meta"):
        model = Llama(config.model)
        if lora:
            adapter = add_lora(model, config.sft.lora)
    weights = checkpoint / WEIGHTS_FILE
    load_model_tensors(model, read_weights(weights), assign=True, source=weights)
    return model, adapter
