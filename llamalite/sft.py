"""`llamalite sft`: fine-tune a checkpoint on instruction data, with LoRA adapters (peft) or every weight;
`llamalite merge`: fold the adapters into the base weights as a normal checkpoint, and save them in PEFT format.

SFTTrainer is the pretraining Trainer with its data hooks replaced: the model and tokenizer come from
`sft.base`, batches from llamalite.data.sft (templated, loss-masked, packed), and the loss sees each
packed example's positions and attention mask. Checkpoints, resume, the LR schedule, metrics and
signals are the Trainer's.

Checkpoints of a LoRA run hold the whole adapted model under the names of the peft-injected modules
(`...q_proj.base_layer.weight`, `...q_proj.lora_A.default.weight`): the frozen base weights
travel with the adapters, so a run resumes (adapters, AdamW moments of the adapters, loader
position, RNG) without its base checkpoint, and the base may be deleted or replaced meanwhile.
`llamalite merge` turns such a checkpoint into one with the plain llamalite names.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llamalite.checkpoint.format import temp_dir_of, write_checkpoint_dir
from llamalite.checkpoint.inference import InferenceModel, load_for_inference
from llamalite.config import Config
from llamalite.data.sft import (
    ChatTemplate,
    SFTBatch,
    SFTLoader,
    build_sft_data,
    encode_prompt,
    fixed_batches,
    template_from_config,
)
from llamalite.errors import CheckpointError, ConfigError
from llamalite.files import claim_output
from llamalite.generate import SamplingOptions, generate_ids
from llamalite.model.llama import ModelConfig
from llamalite.model.lora import add_lora, save_adapter
from llamalite.tokenizer import Tokenizer
from llamalite.train.trainer import Trainer, TrainResult

logger = logging.getLogger(__name__)
METHODS = ("lora", "full")
SFT_DATA_REPORT = "sft_data.json"


# ------------------------------------------------------------------------------------------------- the base
def load_base(path: str | None) -> InferenceModel:
    """The checkpoint a fine-tuning run starts from, verified like any loaded checkpoint; LoRA runs are refused."""
    if not path:
        raise ConfigError("sft.base is not set: point it at a checkpoint or run directory (e.g. runs/demo)")
    return load_for_inference(Path(path), allow_lora=False)


def adopt_base(config: Config, base: InferenceModel) -> None:
    """The run's model and tokenizer settings are the base's. data.out_dir, where loading a checkpoint looks for
    tokenizer.json, becomes the run directory, which gets a copy of the base's tokenizer."""
    if config.model != ModelConfig() and config.model != base.config.model:
        raise ConfigError("sft takes its model from sft.base: remove the model: section of the config "
                          f"(it differs from the model of {base.path})")
    config.model = copy.deepcopy(base.config.model)
    config.tokenizer = copy.deepcopy(base.config.tokenizer)
    config.data.out_dir = str(config.run_path())


# ------------------------------------------------------------------------------------------------- trainer
def sft_loss(model: nn.Module, batch: SFTBatch) -> torch.Tensor:
    """Summed next-token cross-entropy (fp32) over the trained tokens of a batch."""
    logits = model(batch.inputs, positions=batch.positions, attn_mask=batch.attention_mask())
    return nn.functional.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(0, 1),
                                       ignore_index=-100, reduction="sum")


class SFTTrainer(Trainer):
    """The Trainer on instruction data: LoRA or full fine-tuning of `sft.base`."""

    activity = "fine-tuned"
    run_purpose = "sft-run"  # never resumes or writes into a pretraining run directory, nor the other way round

    def __init__(self, config: Config):
        if config.sft.method not in METHODS:
            raise ConfigError(f"unknown sft.method {config.sft.method!r}: choose lora or full")
        if config.train.compile:
            raise ConfigError("sft does not compile its masked, packed forward yet: set train.compile=false")
        self.base = load_base(config.sft.base)
        adopt_base(config, self.base)
        self.peft_model = None
        super().__init__(config)

    # -- Trainer hooks
    def build_tokenizer(self) -> Tokenizer:
        return self.base.tokenizer  # saved into the run directory once it is claimed (on_run_dir_ready)

    def build_model(self) -> nn.Module:
        model = self.base.model
        if self.config.sft.method == "lora":
            self.peft_model = add_lora(model, self.config.sft.lora)  # adapters injected into `model` itself
        return model

    def build_data(self) -> tuple[SFTLoader, list[SFTBatch]]:
        sft, cfg = self.config.sft, self.train_cfg
        self.template = template_from_config(self.config)
        self.data = build_sft_data(sft, self.tokenizer, self.seq_len)
        logger.info(f"SFT data ({sft.data}, template {sft.template}, {'packed' if sft.packing else 'padded'} rows "
                    f"of {self.seq_len}):\n{self.data.stats.summary()}")
        loader = SFTLoader(self.data.train, cfg.micro_batch_size, self.seq_len, self.tokenizer.eos_id,
                           seed=cfg.seed, packing=sft.packing)
        val = []
        if cfg.eval_interval > 0 and self.data.val:
            val = fixed_batches(self.data.val, cfg.micro_batch_size, self.seq_len, self.tokenizer.eos_id,
                                sft.packing, cfg.val_batches)
        return loader, val

    def micro_batch_loss(self, batch: SFTBatch) -> torch.Tensor:
        batch = batch.to(self.device)
        return sft_loss(self.model, batch) / max(1, batch.target_tokens)

    # -- evaluation and samples
    @torch.no_grad()
    def validation_metrics(self) -> dict[str, float]:
        """val/loss: the mean loss per held-out answer token (answers + EOS), over the fixed validation batches."""
        self.model.eval()
        total, count = 0.0, 0
        for batch in self.val_batches:
            batch = batch.to(self.device)
            with self.autocast():
                total += float(sft_loss(self.model, batch))
            count += batch.target_tokens
        return {"val/loss": total / max(1, count)}

    def generate_samples(self) -> list[dict[str, Any]]:
        """Greedy answers to train.sample_prompts, each a user turn rendered with the run's template."""
        self.model.eval()
        prompts = list(self.train_cfg.sample_prompts)
        with self.autocast():
            answers = answer_prompts(self.model, self.tokenizer, self.template, prompts, self.train_cfg.sample_tokens)
        return [{"step": self.step, "prompt": prompt, "completion": answer.text, "finish_reason": answer.finish_reason}
                for prompt, answer in zip(prompts, answers)]

    def run_inputs(self) -> list[Path | str | None]:
        return [self.config.sft.base, self.base.path, self.config.sft.data]

    def on_run_dir_ready(self, run_dir: Path) -> None:
        self.tokenizer.save(run_dir / "tokenizer.json")  # the run directory's: its checkpoints find it there
        report = {"data": self.config.sft.data, "template": self.config.sft.template, **self.data.stats.to_dict()}
        (run_dir / SFT_DATA_REPORT).write_text(json.dumps(report, indent=2))


def run_sft(config: Config) -> TrainResult:
    trainer = SFTTrainer(config)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    print(f"fine-tuning {trainer.base.path} ({config.sft.method}): {trainable:,} of {total:,} parameters trained")
    return trainer.fit()


# ------------------------------------------------------------------------------------------------- generation
@dataclass
class Answer:
    text: str
    tokens: list[int]
    finish_reason: str  # eos | stop | length | context

    @property
    def ended_with_eos(self) -> bool:
        return self.finish_reason == "eos"


def answer_prompts(model: nn.Module, tokenizer: Tokenizer, template: ChatTemplate, questions: list[str],
                   max_new_tokens: int, batch_size: int = 16) -> list[Answer]:
    """Greedy answers to single-turn questions. finish_reason "eos": the model ended its answer itself."""
    prompts = [encode_prompt([{"role": "user", "content": q}], template, tokenizer) for q in questions]
    return answer_conversations(model, tokenizer, prompts, max_new_tokens, batch_size)


def answer_conversations(model: nn.Module, tokenizer: Tokenizer, prompts: list[list[int]], max_new_tokens: int,
                         batch_size: int = 16) -> list[Answer]:
    options = SamplingOptions(max_new_tokens=max_new_tokens, temperature=0.0)
    answers = []
    for start in range(0, len(prompts), batch_size):
        for generation in generate_ids(model, prompts[start : start + batch_size], options, eos_id=tokenizer.eos_id):
            tokens = [t for t in generation.tokens if t != tokenizer.eos_id]
            answers.append(Answer(tokenizer.decode(tokens), generation.tokens, generation.finish_reason))
    return answers


# ------------------------------------------------------------------------------------------------- merge
def merge(checkpoint_path: Path, out_dir: Path, adapter_out: Path | None = None, force: bool = False,
          adapter_base: str | None = None) -> Path:
    """Write `out_dir`, a plain checkpoint (base + LoRA folded in) with its tokenizer.json; loadable by
    load_for_inference and `llamalite export`. A full fine-tuning checkpoint is copied the same way. out_dir (and
    adapter_out) must be new or empty unless `force`: then files of other names in them are kept.

    `adapter_out` gets the adapters in PEFT format under transformers' names, for the transformers export of the
    base; its adapter_config.json names `adapter_base` (that export's folder or Hub id) as the base model, else the
    base checkpoint the run was fine-tuned from."""
    claim = claim_output(out_dir, "checkpoint", "the merged checkpoint", inputs=(checkpoint_path, adapter_out),
                         force=force)
    adapter_claim = None
    if adapter_out is not None:
        adapter_claim = claim_output(adapter_out, "adapter", "the adapter", inputs=(checkpoint_path, out_dir),
                                     force=force)
    loaded = load_for_inference(checkpoint_path)
    model, adapter = loaded.model, loaded.adapter
    if adapter is None and adapter_out is not None:
        raise CheckpointError(f"{loaded.path} has no LoRA adapters (sft.method=full or a pretraining run): "
                              "drop --adapter-out")
    with ExitStack() as writing:
        if adapter is not None:
            if adapter_claim is not None:
                writing.enter_context(adapter_claim.writing())
                save_adapter(adapter, Path(adapter_out), adapter_base or loaded.config.sft.base)
            model = adapter.merge_and_unload()
        merged_state = {key: value for key, value in loaded.state.items() if key not in ("loader", "stability")}
        merged_state["merged_from"] = str(loaded.path)
        writing.enter_context(claim.writing(temporaries=(temp_dir_of(Path(out_dir)),)))
        tmp = writing.enter_context(tempfile.TemporaryDirectory())
        tokenizer_file = Path(tmp) / "tokenizer.json"
        loaded.tokenizer.save(tokenizer_file)
        return write_checkpoint_dir(Path(out_dir), model, None, merged_state, keep_other_files=True,
                                    extra_files={"tokenizer.json": tokenizer_file})
