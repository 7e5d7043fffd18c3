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
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from llamalite.config import Config, ConfigError, LoraConfig, config_from_dict
from llamalite.data import DataError
from llamalite.data.sft import (
    ChatTemplate,
    SFTBatch,
    SFTLoader,
    build_sft_data,
    encode_prompt,
    fixed_batches,
    template_from_config,
)
from llamalite.generate import SamplingOptions, generate_ids
from llamalite.model.llama import Llama, ModelConfig
from llamalite.tokenizer import Tokenizer
from llamalite.train.checkpoint import (
    CheckpointError,
    find_tokenizer,
    load_model_tensors,
    resolve_checkpoint_dir,
    write_checkpoint_dir,
)
from llamalite.train.step import autocast_context
from llamalite.train.trainer import Trainer, TrainError

METHODS = ("lora", "full")
SFT_DATA_REPORT = "sft_data.json"


# ------------------------------------------------------------------------------------------------- LoRA
def require_peft():
    try:
        import peft
    except ImportError:
        raise TrainError("sft.method=lora needs peft: pip install -e '.[sft]' (or set sft.method=full)") from None
    return peft


def add_lora(model: Llama, lora: LoraConfig) -> Any:
    """Inject LoRA adapters into `model` in place (base weights frozen). Returns the PeftModel wrapping it."""
    peft = require_peft()
    present = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    unknown = sorted(set(lora.target_modules) - present)
    if unknown or not lora.target_modules:
        raise ConfigError(f"sft.lora.target_modules {unknown or '[]'} match no linear layer of the model: "
                          f"choose among {', '.join(sorted(present))}")
    if lora.r <= 0:
        raise ConfigError(f"sft.lora.r={lora.r} must be a positive rank, e.g. 16")
    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=list(lora.target_modules), bias="none")
    return peft.get_peft_model(model, config)


def is_lora_state(tensor_names: Any) -> bool:
    return any(".lora_A." in name for name in tensor_names)


def checkpoint_tensor_names(checkpoint_dir: Path) -> list[str]:
    with safe_open(checkpoint_dir / "model.safetensors", framework="pt") as f:
        return list(f.keys())


# ------------------------------------------------------------------------------------------------- the base
@dataclass
class Base:
    """The checkpoint a fine-tuning run starts from: its directory, trainer state and config."""

    path: Path
    state: dict[str, Any]
    config: Config


def read_base(path: str | None) -> Base:
    if not path:
        raise ConfigError("sft.base is not set: point it at a checkpoint or run directory (e.g. runs/demo)")
    checkpoint = resolve_checkpoint_dir(Path(path))
    if is_lora_state(checkpoint_tensor_names(checkpoint)):
        raise CheckpointError(f"{checkpoint} holds LoRA adapters: merge them first (llamalite merge {checkpoint} OUT_DIR) "
                              "and fine-tune the merged checkpoint")
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return Base(checkpoint, state, config_from_dict(state["config"]))


def adopt_base(config: Config, base: Base) -> None:
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

    def __init__(self, config: Config):
        if config.sft.method not in METHODS:
            raise ConfigError(f"unknown sft.method {config.sft.method!r}: choose lora or full")
        if config.train.compile:
            raise ConfigError("sft does not compile its masked, packed forward yet: set train.compile=false")
        self.base = read_base(config.sft.base)
        adopt_base(config, self.base)
        self.peft_model = None
        super().__init__(config)

    # -- Trainer hooks
    def build_tokenizer(self) -> Tokenizer:
        tokenizer = find_tokenizer(self.base.path, self.base.state, None)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save(self.data_dir / "tokenizer.json")  # the run directory's: its checkpoints find it there
        return tokenizer

    def build_model(self) -> nn.Module:
        model = Llama(self.config.model)
        load_model_tensors(model, _load_tensors(self.base.path))
        if self.config.sft.method == "lora":
            self.peft_model = add_lora(model, self.config.sft.lora)  # adapters injected into `model` itself
        return model

    def build_data(self) -> tuple[SFTLoader, list[SFTBatch]]:
        sft, cfg = self.config.sft, self.train_cfg
        self.template = template_from_config(self.config)
        self.data = build_sft_data(sft, self.tokenizer, self.seq_len)
        print(f"SFT data ({sft.data}, template {sft.template}, {'packed' if sft.packing else 'padded'} rows "
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
            with autocast_context(self.device, self.train_cfg.dtype):
                total += float(sft_loss(self.model, batch))
            count += batch.target_tokens
        return {"val/loss": total / max(1, count)}

    def generate_samples(self) -> list[dict[str, Any]]:
        """Greedy answers to train.sample_prompts, each a user turn rendered with the run's template."""
        self.model.eval()
        prompts = list(self.train_cfg.sample_prompts)
        with autocast_context(self.device, self.train_cfg.dtype):
            answers = answer_prompts(self.model, self.tokenizer, self.template, prompts, self.train_cfg.sample_tokens)
        return [{"step": self.step, "prompt": prompt, "completion": answer.text, "finish_reason": answer.finish_reason}
                for prompt, answer in zip(prompts, answers)]

    def fit(self):
        run_dir = self.config.run_path()
        run_dir.mkdir(parents=True, exist_ok=True)
        report = {"data": self.config.sft.data, "template": self.config.sft.template, **self.data.stats.to_dict()}
        (run_dir / SFT_DATA_REPORT).write_text(json.dumps(report, indent=2))
        return super().fit()


def _load_tensors(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(checkpoint_dir / "model.safetensors")


def run_sft(config: Config):
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
def load_sft_model(path: Path) -> tuple[Path, dict[str, Any], Config, nn.Module, Any]:
    """A checkpoint of any run (LoRA, full fine-tuning or pretraining) as (dir, state, config, model, peft_model).

    For LoRA the model carries its adapters (peft_model wraps it); otherwise peft_model is None.
    """
    checkpoint = resolve_checkpoint_dir(Path(path))
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    config = config_from_dict(state["config"])
    model = Llama(config.model)
    tensors = _load_tensors(checkpoint)
    peft_model = add_lora(model, config.sft.lora) if is_lora_state(tensors) else None
    load_model_tensors(model, tensors)
    return checkpoint, state, config, model.eval(), peft_model


def save_adapter(peft_model: Any, out_dir: Path, base: str | None) -> Path:
    """adapter_config.json + adapter_model.safetensors, loadable with peft.PeftModel.from_pretrained(Llama(...), out_dir)."""
    peft_model.peft_config["default"].base_model_name_or_path = base
    peft_model.save_pretrained(str(out_dir), save_embedding_layers=False)  # adapters only: embeddings are not adapted
    return out_dir


def merge(checkpoint_path: Path, out_dir: Path, adapter_out: Path | None = None) -> Path:
    """Write `out_dir`, a plain checkpoint (base + LoRA folded in) with its tokenizer.json; loadable by
    load_for_inference and `llamalite export`. A full fine-tuning checkpoint is copied the same way."""
    checkpoint, state, config, model, peft_model = load_sft_model(checkpoint_path)
    tokenizer = find_tokenizer(checkpoint, state, None)
    if peft_model is None and adapter_out is not None:
        raise CheckpointError(f"{checkpoint} has no LoRA adapters (sft.method=full or a pretraining run): drop --adapter-out")
    if peft_model is not None:
        if adapter_out is not None:
            save_adapter(peft_model, Path(adapter_out), config.sft.base)
        model = peft_model.merge_and_unload()
    merged_state = {key: value for key, value in state.items() if key not in ("loader", "stability")}
    merged_state["merged_from"] = str(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_file = Path(tmp) / "tokenizer.json"
        tokenizer.save(tokenizer_file)
        out = write_checkpoint_dir(Path(out_dir), model, None, merged_state, extra_files={"tokenizer.json": tokenizer_file})
    return out


# ------------------------------------------------------------------------------------------------- demo
DEMO_QUESTIONS = ["Give three tips for staying healthy.", "What is the capital of France?",
                  "Write a short poem about the sea."]


def shared_alpaca_file() -> Path | None:
    """../shared/data/sft/alpaca_5000.json next to the source checkout, when present (tests, benchmarks, demo)."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "sft" / "alpaca_5000.json"
    return path if path.is_file() else None


def run_demo_sft(result, overrides: list[str] | tuple[str, ...] = ()) -> None:
    """The demo's last stage: a short full fine-tuning of the demo model on Alpaca (when available) or on
    instruction pairs made from the demo's own plays, with answers before and after."""
    from llamalite.config import load_config

    data_file = shared_alpaca_file()
    run_dir = Path(result.run_dir)
    if data_file is None:
        prepared_dir = Path(load_config(run_dir / "config.yaml").data.out_dir)
        data_file = write_play_instructions(prepared_dir, prepared_dir / "sft_plays.jsonl")
        questions = [json.loads(line)["messages"][0]["content"] for line in data_file.read_text().splitlines()[:3]]
    else:
        questions = DEMO_QUESTIONS
    config_file = Path(__file__).resolve().parent.parent / "configs" / "sft-demo.yaml"
    sft_run_dir = run_dir.parent / f"{run_dir.name}-sft"  # runs/demo-sft beside runs/demo
    config = load_config(config_file, [f"sft.base={run_dir}", f"sft.data={data_file}", "train.overwrite=true",
                                       f"train.run_dir={sft_run_dir}", *overrides])
    print(f"\n[sft] fine-tuning the demo model on {data_file.name} ({config.sft.method}, {config.train.max_steps} steps "
          f"of {config.train.batch_tokens:,} tokens, {config.sft.template} template)")
    started = time.perf_counter()
    trainer = SFTTrainer(config)
    template = trainer.template
    before = _demo_answers(trainer, questions)
    sft_result = trainer.fit()
    after = _demo_answers(trainer, questions)
    losses = sft_result.val_losses
    if len(losses) >= 2:
        print(f"[sft] held-out answer loss {losses[0][1]:.3f} -> {losses[-1][1]:.3f} "
              f"in {time.perf_counter() - started:.0f} s; run directory {sft_result.run_dir}/")
    for question, old, new in zip(questions, before, after):
        print(f"\n{template.user_format.replace('{content}', question)}{template.assistant_prefix}")
        print(f"  before: {_one_line(old)}")
        print(f"  after:  {_one_line(new)}")


def _demo_answers(trainer: SFTTrainer, questions: list[str]) -> list[Answer]:
    trainer.model.eval()
    with autocast_context(trainer.device, trainer.train_cfg.dtype):
        return answer_prompts(trainer.model, trainer.tokenizer, trainer.template, questions, 48)


def _one_line(answer: Answer, width: int = 160) -> str:
    text = " ".join(answer.text.split())
    text = text if len(text) <= width else text[: width - 3] + "..."
    return f"{text!r}  [{'ended with EOS' if answer.ended_with_eos else answer.finish_reason}]"


def write_play_instructions(prepared_dir: Path, out_file: Path, count: int = 600) -> Path:
    """'Continue the line' pairs from the demo's training text: half a line of verse in, its other half out."""
    import numpy as np

    from llamalite.data.shards import read_shard

    tokenizer = Tokenizer.load(prepared_dir / "tokenizer.json")
    manifest = json.loads((prepared_dir / "manifest.json").read_text())
    shards = manifest["splits"]["train"]["shards"]
    text = tokenizer.decode(np.asarray(read_shard(prepared_dir / shards[0]["file"])[:400_000]).tolist())
    lines = [line.strip() for line in text.splitlines() if 6 <= len(line.split()) <= 12 and not any(c in line for c in "*#")]
    records = []
    for line in lines[:: max(1, len(lines) // count)][:count]:
        words = line.split()
        half = len(words) // 2
        records.append({"messages": [{"role": "user", "content": "Continue the line: " + " ".join(words[:half])},
                                     {"role": "assistant", "content": " ".join(words[half:])}]})
    if not records:
        raise DataError(f"no line of verse found in {prepared_dir} to build the demo's instruction pairs")
    out_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    return out_file
