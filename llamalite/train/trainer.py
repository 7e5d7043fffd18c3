"""The training loop: gradient accumulation to a token batch, autocast, clipping, the LR schedule,
periodic validation, samples and checkpoints, metrics and a progress bar."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm

from llamalite import __version__
from llamalite.checkpoint.format import (
    WEIGHTS_FILE,
    Checkpoint,
    checkpoint_name,
    checkpoint_step,
    describe_write_failure,
    is_sharded,
    list_checkpoints,
    load_checkpoint,
    load_model_tensors,
    newest_valid_checkpoint,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
    temp_dir_of,
)
from llamalite.checkpoint.sharded import load_full_state, load_sharded, save_sharded_checkpoint
from llamalite.config import Config, save_config
from llamalite.data.loader import TokenLoader, read_manifest, validation_batches
from llamalite.errors import ConfigError, LlamaliteError, TrainError, did_you_mean
from llamalite.eval.harness import validation_metrics
from llamalite.eval.suite import EVALS_FILE, BenchmarkSuite
from llamalite.files import claim_output, folder_lock, remove_own_files
from llamalite.generate import sample
from llamalite.model.llama import Llama, ModelConfig
from llamalite.model.presets import training_flops_per_token
from llamalite.runtime import (
    autocast_context,
    barrier,
    broadcast_from_main,
    configure_device,
    init_distributed,
    mean_across_ranks,
    resolve_device,
    resolve_dtype,
)
from llamalite.tokenizer import Tokenizer
from llamalite.train import distributed
from llamalite.train.callbacks import (
    BenchmarkCallback,
    Callback,
    RunContext,
    SamplesCallback,
    ValidationCallback,
)
from llamalite.train.metrics import (
    CHECKPOINT_EVENT,
    MetricsLogger,
    NullLogger,
    checkpoints_recorded,
    device_peak_flops,
    last_step,
    truncate_jsonl_after,
)
from llamalite.train.optim import (
    SCHEDULE_CHANGES,
    build_optimizer,
    changed_schedule,
    schedule_of,
    scheduled_lr,
    set_learning_rate,
)
from llamalite.train.stability import StabilityGuard
from llamalite.train.step import build_loss_fn
from llamalite.train.trackers import WANDB_DIR, WANDB_ID_FILE, PriorRun, check_logging, open_trackers

logger = logging.getLogger(__name__)
# What a training run writes into its run directory, and all that train.overwrite=true deletes (files.remove_own_files):
# its records, its checkpoint directories (and their temporaries and `latest`), the event files of its TensorBoard
# writer and its W&B files. A user's file anywhere else, or one whose name only resembles these, stays; so does
# report/, the report command's output.
RUN_FILES = re.compile("|".join([
    r"(metrics|events|evals|samples)\.jsonl",
    WANDB_ID_FILE,
    r"checkpoints/(\.tmp_(pruned_)?)?step_\d{7,}",
    r"checkpoints/latest",
    r"checkpoints/\.latest\.\d+\.[0-9a-f]+\.tmp",  # files.atomic_write's temporary
    r"tb/events\.out\.tfevents\.[^/]+",  # torch SummaryWriter's files, directly in tb/
    rf"{WANDB_DIR}/((offline-)?run-[^/]+|latest-run|debug(-internal)?\.log)",
]))
RUN_FOLDERS = ("checkpoints", "tb", WANDB_DIR)  # removed by train.overwrite=true when nothing else is left in them


def refuse_a_run_whose_checkpoints_are_gone(run_dir: Path) -> None:
    """A run directory without checkpoints restarts only if its own records say it never wrote one: one whose
    checkpoints were deleted (or moved) is not taken for a run that stopped before its first."""
    recorded = checkpoints_recorded(run_dir / "events.jsonl")
    if recorded:
        raise TrainError(
            f"{run_dir} wrote checkpoints (newest recorded: {max(recorded)}) but none is left in "
            f"{run_dir / 'checkpoints'}: restore them to resume, or pass train.overwrite=true to delete the run's "
            "records and start over, or pick another name (name=...)"
        )


def accumulation_steps(batch_tokens: int, micro_batch_size: int, seq_len: int, world_size: int = 1) -> int:
    per_micro_step = micro_batch_size * seq_len * world_size
    if batch_tokens % per_micro_step or batch_tokens < per_micro_step:
        raise TrainError(
            f"train.batch_tokens={batch_tokens} is not a multiple of micro_batch_size x seq_len x world_size "
            f"= {micro_batch_size} x {seq_len} x {world_size} = {per_micro_step}: "
            f"set train.batch_tokens to a multiple of {per_micro_step}"
        )
    return batch_tokens // per_micro_step


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    tokens: int
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: Path | None = None
    tokens_per_s: float = 0.0
    stopped_by: str | None = None  # the signal that ended the run early


class Trainer:
    activity = "trained"  # what a second process is told the run directory is being
    run_purpose = "run"  # the output policy's name for the run directory this trainer makes

    def __init__(self, config: Config):
        self.config = config
        self.train_cfg = config.train
        if self.train_cfg.threads:
            torch.set_num_threads(self.train_cfg.threads)
        self.device = resolve_device(self.train_cfg.device)
        self.dist = init_distributed(self.device.type)  # rank 0 of 1 without torchrun
        if self.dist.active and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.parallel = distributed.resolve_parallel(self.train_cfg.parallel, self.dist.world_size)
        distributed.require_process_group(self.parallel, "sft" if self.run_purpose == "sft-run" else "train")
        configure_device(self.device)
        self.dtype = resolve_dtype(self.train_cfg.dtype, self.device)  # bf16 | fp32
        torch.manual_seed(self.train_cfg.seed)

        self.data_dir = Path(config.data.out_dir)
        self.tokenizer = self.build_tokenizer()
        self._resolve_vocab()
        self.seq_len = self.train_cfg.seq_len or config.model.max_seq_len
        if self.seq_len > config.model.max_seq_len:
            raise TrainError(f"train.seq_len {self.seq_len} exceeds model.max_seq_len {config.model.max_seq_len}")
        self.accum_steps = accumulation_steps(self.train_cfg.batch_tokens, self.train_cfg.micro_batch_size,
                                              self.seq_len, self.dist.world_size)

        self.model = self.build_model().to(self.device)
        self.loss_fn, self.sync_module = self._parallelize()
        # After FSDP made the parameters DTensors
        self.optimizer = build_optimizer(self.model, config.optim, self.device.type, self.parallel)
        self.loader, self.val_batches = self.build_data()
        self.token_byte_lengths = self.tokenizer.token_byte_lengths()  # for val/bits_per_byte
        self.validation = ValidationCallback(self.train_cfg.eval_interval)
        self.samples = SamplesCallback(self.train_cfg.sample_interval if self.train_cfg.sample_prompts else 0)
        self.callbacks: list[Callback] = [self.validation]
        if config.eval.tasks and config.eval.interval > 0:
            # Tasks read, tokenized and checked against the context now: a document that cannot be scored stops the
            # run before its first step (or, with eval.skip_too_long, is left out with a warning), never mid-run.
            suite = BenchmarkSuite(config.eval, self.tokenizer, max_length=config.model.max_seq_len)
            for task, count in suite.skipped.items():
                if count:
                    logger.warning(f"{task}: {count} documents with a continuation longer than model.max_seq_len "
                                   f"{config.model.max_seq_len} are left out of the benchmark (eval.skip_too_long)")
            self.callbacks.append(BenchmarkCallback(suite, config.eval.interval, config.eval.limit))
        self.callbacks.append(self.samples)
        self.flops_per_token = training_flops_per_token(config.model, self.seq_len)
        self.peak_flops = device_peak_flops(self.device, self.train_cfg.peak_flops)
        self.guard = StabilityGuard(self.train_cfg.spike_zscore, self.train_cfg.spike_window,
                                    self.train_cfg.max_skipped_steps)
        self.step = 0
        self.tokens_seen = 0
        self.rewarmup_from: int | None = None  # the step of an optimizer reset, while its re-warmup applies
        self.schedule = schedule_of(config.to_dict()["optim"], self.train_cfg.max_steps)
        self.schedule_override: dict[str, Any] | None = None  # a schedule change chosen on resume (changed_schedule)
        if self.train_cfg.schedule_change not in (None, *SCHEDULE_CHANGES):
            raise ConfigError(f"unknown train.schedule_change {self.train_cfg.schedule_change!r}: "
                              + did_you_mean(self.train_cfg.schedule_change, SCHEDULE_CHANGES))
        check_logging(config.logging)
        self._stop_signal: int | None = None
        self.skip_reason: str | None = None  # why the stability guard skipped the last update, if it did
        self._first_step = 0  # the step this invocation started from (for the ETA)
        self._last_save = time.monotonic()  # for train.save_interval_minutes
        self._held = contextlib.ExitStack()  # fit() holds the run directory's lock in it
        self._metrics: MetricsLogger | None = None  # rank 0's, opened with the run directory
        self._restarted = False  # the run directory held a run that never wrote a checkpoint: started over

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast_context(self.device, self.dtype)

    # Hooks that fine-tuning (llamalite/sft.py) overrides to bring its base model, tokenizer and data.
    def build_tokenizer(self) -> Tokenizer:
        self.manifest = read_manifest(self.data_dir)
        path = self.data_dir / self.manifest["tokenizer"]["file"]
        tokenizer = Tokenizer.load(path, self.config.tokenizer.eos_token, self.config.tokenizer.bos_token)
        if tokenizer.fingerprint != self.manifest["tokenizer"].get("fingerprint", tokenizer.fingerprint):
            raise TrainError(f"{path} is not the tokenizer the shards of {self.data_dir} were encoded with (its "
                             "fingerprint differs from the manifest's): put the original back, or run "
                             "`llamalite prepare` again to re-encode the data")
        return tokenizer

    def build_model(self) -> torch.nn.Module:
        return Llama(self.config.model)

    def build_data(self) -> tuple[Any, list[Any]]:
        """The training loader (it has state_dict/load_state_dict) and the fixed validation batches."""
        loader = TokenLoader(
            self.data_dir, "train", self.train_cfg.micro_batch_size, self.seq_len, seed=self.train_cfg.seed,
            rank=self.dist.rank, world_size=self.dist.world_size,
        )
        val_batches = (
            validation_batches(self.data_dir, self.train_cfg.micro_batch_size, self.seq_len, self.train_cfg.val_batches)
            if self.train_cfg.eval_interval > 0
            else []
        )
        return loader, val_batches

    def micro_batch_loss(self, batch: Any) -> torch.Tensor:
        """The mean loss of one micro batch from the loader (called under autocast)."""
        inputs, targets = (t.to(self.device, non_blocking=True) for t in batch)
        return self.loss_fn(inputs, targets)

    def _parallelize(self) -> tuple[Any, Any]:
        """(the loss function of micro_batch_loss, the module whose gradient sync is toggled: None on one process).

        One process with the defaults keeps the plain path: the model and loss compiled as one function."""
        cfg = self.train_cfg
        if self.dist.active and type(self).micro_batch_loss is not Trainer.micro_batch_loss:
            raise TrainError(f"{type(self).__name__} computes its own loss and runs on one process for now: "
                             "launch it without torchrun")
        if (self.parallel == "none" and cfg.activation_checkpointing == "none" and cfg.loss_chunk_tokens <= 0
                and cfg.compile_scope == "loss"):
            return build_loss_fn(self.model, cfg.compile), None
        return distributed.parallelize(self.model, self.parallel, self.device, self.dtype, cfg.activation_checkpointing,
                                       cfg.compile, cfg.compile_scope, cfg.loss_chunk_tokens)

    def _resolve_vocab(self) -> None:
        model_cfg = self.config.model
        needed = self.tokenizer.size
        if model_cfg.vocab_size is None:
            model_cfg.vocab_size = self.tokenizer.padded_vocab_size(self.config.tokenizer.pad_vocab_multiple)
        elif model_cfg.vocab_size < needed:
            raise TrainError(
                f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's {needed} tokens "
                f"({self.data_dir}/tokenizer.json): set model.vocab_size to at least {needed}, or null to derive it"
            )

    # ----------------------------------------------------------------------------------------------- run dir
    def _open_run_dir(self) -> tuple[Path, Checkpoint | None, list[tuple[Path, str]]]:
        """The run directory, the checkpoint to resume from (None for a fresh run) and any corrupt ones skipped.

        Rank 0 alone prepares the directory and picks the checkpoint; the other ranks load the one it picked."""
        if not self.dist.active:
            return self._prepare_run_dir()
        found, problem = (None, []), None
        if self.dist.is_main:
            try:
                run_dir, checkpoint, corrupt = self._prepare_run_dir()
                found = (checkpoint.path if checkpoint else None, corrupt)
            except LlamaliteError as exc:
                problem = exc
        found, problem = broadcast_from_main((found, problem))
        if problem is not None:
            raise problem
        path, corrupt = found
        if self.dist.is_main:
            return run_dir, checkpoint, corrupt
        return self.config.run_path(), load_checkpoint(path) if path is not None else None, corrupt

    def run_inputs(self) -> list[Path | str | None]:
        """Hook: what the run reads, which its run directory may not be, lie inside, or hold."""
        return [self.data_dir]

    def on_run_dir_ready(self, run_dir: Path) -> None:
        """Hook: write files of the run directory, which this process now holds (rank 0 only)."""

    def _prepare_run_dir(self) -> tuple[Path, Checkpoint | None, list[tuple[Path, str]]]:
        run_dir = self.config.run_path()
        # The output policy (docs/safety.md), before the first byte: a new or empty folder, or a run's own (resumed,
        # or started over with train.overwrite=true); never the data it reads nor inside another artifact.
        claim_output(run_dir, self.run_purpose, "the run", inputs=self.run_inputs(), force=self.train_cfg.overwrite,
                     force_hint="train.overwrite=true", rerun=True).create()
        self._held.enter_context(folder_lock(run_dir, self.activity))
        holds_run = (any((run_dir / name).exists() for name in ("metrics.jsonl", "events.jsonl"))
                     or any(list_checkpoints(run_dir / "checkpoints")))
        checkpoint, corrupt, prior = None, [], None
        if holds_run and self.train_cfg.overwrite:
            remove_own_files(run_dir, RUN_FILES, empty_folders=RUN_FOLDERS)
        elif holds_run:
            checkpoint = newest_valid_checkpoint(run_dir / "checkpoints",
                                                 on_corrupt=lambda p, why: corrupt.append((p, why)))
            for path, why in corrupt:
                logger.warning(f"checkpoint {path.name} is unusable ({why}): trying the previous one")
            if checkpoint is None and corrupt:
                raise TrainError(
                    f"{run_dir} holds {len(corrupt)} checkpoint(s) and none is usable (newest: {corrupt[0][1]}): "
                    "pick another name (name=...) or pass train.overwrite=true to delete the run and start over"
                )
            if checkpoint is None:
                refuse_a_run_whose_checkpoints_are_gone(run_dir)
            # The steps after the checkpoint will be redone; with no checkpoint at all (stopped before its first one)
            # there is nothing to lose, and the same command starts the run over.
            self._restarted = checkpoint is None
            prior = PriorRun(checkpoint.step if checkpoint else -1, last_step(run_dir / "metrics.jsonl"))
            for name in ("metrics.jsonl", "samples.jsonl", EVALS_FILE):
                truncate_jsonl_after(run_dir / name, checkpoint.step if checkpoint else -1)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.config, run_dir / "config.yaml")
        self.on_run_dir_ready(run_dir)
        self._open_metrics(run_dir, prior)
        return run_dir, checkpoint, corrupt

    def _open_metrics(self, run_dir: Path, prior: PriorRun | None) -> None:
        """Rank 0's metrics logger and trackers, opened here so that a tracker that cannot start (W&B) fails every
        rank; closed when fit() ends, even if it fails before the loop."""
        self._metrics = MetricsLogger(run_dir, open_trackers(run_dir, self.config, prior))
        self._held.callback(self._metrics.close)

    def _resume(self, checkpoint: Checkpoint, run_dir: Path, metrics: MetricsLogger | NullLogger) -> None:
        state = checkpoint.state
        self._check_same_model(checkpoint)
        self._load_model_state(checkpoint)
        if not self._has_optimizer_state(checkpoint) and not self.train_cfg.reset_optimizer:
            raise TrainError(
                f"{checkpoint.path} has no optimizer state: resuming with fresh AdamW moments makes the loss spike "
                "(the lesson of DMaS-LLaMa-Lite). Pass train.reset_optimizer=true to accept a fresh optimizer with a "
                f"{self.train_cfg.rewarmup_steps}-step LR re-warmup (train.rewarmup_steps)"
            )
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.loader.load_state_dict(state["loader"])
        self.guard.load_state_dict(state["stability"])
        self.rewarmup_from = state.get("rewarmup_from")
        if self.train_cfg.reset_optimizer:
            self.rewarmup_from = self.step
            metrics.event(self.step, "optimizer_reset", checkpoint=checkpoint.path.name,
                          had_optimizer_state=self._has_optimizer_state(checkpoint),
                          rewarmup_steps=self.train_cfg.rewarmup_steps)
        else:
            self._check_same_optimizer(checkpoint)
            self._load_optimizer_state(checkpoint)
        self._continue_schedule(checkpoint, metrics)
        if checkpoint.rng is not None:
            restore_rng_state(checkpoint.rng)
        saved_world_size = state.get("world_size", 1)
        metrics.event(self.step, "resume", checkpoint=checkpoint.path.name, tokens_seen=self.tokens_seen,
                      world_size=self.dist.world_size, saved_world_size=saved_world_size)
        if saved_world_size != self.dist.world_size:
            # The loader's position is global and batch_tokens fixed: only the accumulation steps change.
            metrics.event(self.step, "world_size_change", previous_world_size=saved_world_size,
                          world_size=self.dist.world_size, accumulation_steps=self.accum_steps, parallel=self.parallel)
            logger.info(f"world size {saved_world_size} -> {self.dist.world_size}: same global batch of "
                        f"{self.train_cfg.batch_tokens:,} tokens with {self.accum_steps} accumulation steps")
        logger.info(f"resuming {run_dir} from {checkpoint.path.name} (step {self.step:,}, {self.tokens_seen:,} tokens)")

    def _continue_schedule(self, checkpoint: Checkpoint, metrics: MetricsLogger | NullLogger) -> None:
        """The saved run's LR schedule goes on unless the config changed it; a change must be chosen
        (train.schedule_change), never a silent jump of the LR."""
        saved = checkpoint.state["config"]
        old = schedule_of(saved["optim"], saved["train"]["max_steps"])
        self.schedule_override = checkpoint.state.get("schedule_override")
        if old == self.schedule:
            return
        before = scheduled_lr(self.step, old, self.schedule_override)
        changes = ", ".join(f"{key} {old[key]} -> {new}" for key, new in self.schedule.items() if old[key] != new)
        rule = self.train_cfg.schedule_change
        if rule is None:
            jump = scheduled_lr(self.step, self.schedule)
            effect = (f"the LR at step {self.step} would jump from {before:.3g} to {jump:.3g}" if f"{jump:.3g}" !=
                      f"{before:.3g}" else f"from step {self.step} (LR {before:.3g}) the LR would follow another curve")
            raise TrainError(
                f"the LR schedule changed since {checkpoint.path.name} ({changes}): {effect}. "
                f"Choose train.schedule_change=decay (from {before:.3g} down to "
                "optim.min_lr over the remaining steps), =stretch (the new schedule, with that jump) or =keep (the "
                "old schedule and its horizon)"
            )
        self.schedule_override = changed_schedule(rule, self.step, old, self.schedule_override, self.schedule)
        after = scheduled_lr(self.step, self.schedule, self.schedule_override)
        metrics.event(self.step, "schedule_change", rule=rule, changes=changes, lr_before=before, lr_after=after)
        logger.info(f"LR schedule changed ({changes}): {rule}, LR {before:.3g} -> {after:.3g} at step {self.step}")

    def _has_optimizer_state(self, checkpoint: Checkpoint) -> bool:
        return checkpoint.optimizer is not None or is_sharded(checkpoint.path)

    def _load_model_state(self, checkpoint: Checkpoint) -> None:
        if is_sharded(checkpoint.path):
            load_sharded(checkpoint.path, self.model, None)
        elif self.parallel == "fsdp":
            load_full_state(self.model, None, checkpoint.model, None)
        else:
            load_model_tensors(self.model, checkpoint.model, source=checkpoint.path / WEIGHTS_FILE)

    def _load_optimizer_state(self, checkpoint: Checkpoint) -> None:
        if is_sharded(checkpoint.path):
            load_sharded(checkpoint.path, self.model, self.optimizer, load_model=False)
        elif self.parallel == "fsdp":
            load_full_state(self.model, self.optimizer, None, checkpoint.optimizer)
        else:
            self.optimizer.load_state_dict(checkpoint.optimizer)

    def _check_same_optimizer(self, checkpoint: Checkpoint) -> None:
        saved = checkpoint.state["config"]["optim"].get("name", "adamw")
        if saved != self.config.optim.name:
            raise TrainError(
                f"{checkpoint.path} holds {saved} state but the config asks for optim.name={self.config.optim.name}: "
                f"resume with optim.name={saved}, or pass train.reset_optimizer=true to start a fresh optimizer"
            )

    def _check_same_model(self, checkpoint: Checkpoint) -> None:
        saved = checkpoint.state["config"]["model"]
        current = self.config.to_dict()["model"]
        defaults = dataclasses.asdict(ModelConfig())  # keys added since the checkpoint was written keep their defaults
        differences = [f"{k}: {saved.get(k, defaults[k])!r} -> {current[k]!r}" for k in current
                       if k != "preset" and saved.get(k, defaults[k]) != current[k]]
        if differences:
            raise TrainError(
                f"the config's model differs from the checkpoint's ({'; '.join(differences)}): "
                "resume with the model settings of the saved run"
            )
        if checkpoint.state.get("tokenizer_fingerprint") != self.tokenizer.fingerprint:
            raise TrainError(
                f"{checkpoint.path} was trained with another tokenizer than {self.data_dir}/tokenizer.json: "
                "resume with the prepared data of the saved run"
            )

    # ----------------------------------------------------------------------------------------------- steps
    def current_lr(self) -> float:
        lr = scheduled_lr(self.step, self.schedule, self.schedule_override)
        rewarmup = self.train_cfg.rewarmup_steps
        if self.rewarmup_from is not None and rewarmup > 0:
            lr *= min(1.0, (self.step - self.rewarmup_from + 1) / rewarmup)
        return lr

    def train_step(self) -> tuple[float, float]:
        """One update over accum_steps micro batches. Returns (mean loss, grad norm before clipping).

        The stability guard may skip the update (non-finite values, loss spikes); the step and its data count anyway.
        """
        self.model.train()
        set_learning_rate(self.optimizer, self.current_lr())
        total_loss = torch.zeros((), device=self.device)
        for index in range(self.accum_steps):
            batch = self.loader.next_batch()
            # Gradients are reduced across ranks on the last micro step only.
            with distributed.gradient_sync(self.sync_module, self.parallel, index == self.accum_steps - 1):
                with self.autocast():
                    loss = self.micro_batch_loss(batch) / self.accum_steps
                loss.backward()
            total_loss += loss.detach()
        grad_norm = self._clip_gradients()
        loss_value = float(mean_across_ranks(total_loss))
        self.skip_reason = self.guard.check(loss_value, grad_norm)
        if self.skip_reason is None:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += self.train_cfg.batch_tokens
        return loss_value, grad_norm

    def _clip_gradients(self) -> float:
        clip = self.config.optim.grad_clip
        max_norm = clip if clip > 0 else math.inf
        return distributed.clip_grad_norm(list(self.model.parameters()), max_norm)

    def validation_metrics(self) -> dict[str, float]:
        """val/loss, val/perplexity and val/bits_per_byte on the fixed held-out batches."""
        self.model.eval()
        return validation_metrics(self.model, self.val_batches, self.token_byte_lengths, self.device, self.autocast())

    def generate_samples(self) -> list[dict[str, Any]]:
        self.model.eval()
        generator = torch.Generator().manual_seed(self.train_cfg.seed)  # never touches the training RNG
        records = []
        for prompt in self.train_cfg.sample_prompts:
            with self.autocast():
                new = sample(
                    self.model,
                    self.tokenizer.encode_sequence(prompt),
                    self.train_cfg.sample_tokens,
                    temperature=self.train_cfg.sample_temperature,
                    top_k=self.train_cfg.sample_top_k,
                    eos_id=self.tokenizer.eos_id,
                    generator=generator,
                )
            records.append({"step": self.step, "prompt": prompt, "completion": self.tokenizer.decode(new)})
        return records

    def save(self, run_dir: Path) -> Path:
        state = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "world_size": self.dist.world_size,
            "parallel": self.parallel,
            "loader": self.loader.state_dict(),
            "stability": self.guard.state_dict(),
            "rewarmup_from": self.rewarmup_from,
            "schedule_override": self.schedule_override,
            "tokenizer_fingerprint": self.tokenizer.fingerprint,
            "bos": self.tokenizer.bos_record(),
            "config": self.config.to_dict(),
            "code_version": __version__,
        }
        checkpoints_dir = run_dir / "checkpoints"
        path, problem = checkpoints_dir / checkpoint_name(self.step), None
        previous = list_checkpoints(checkpoints_dir)
        try:
            if self.parallel == "fsdp":  # every rank writes its shards (DCP); rank 0 completes the directory
                save_sharded_checkpoint(checkpoints_dir, self.step, self.model, self.optimizer, state)
            elif self.dist.is_main:  # replicated state: rank 0 alone writes it
                save_checkpoint(checkpoints_dir, self.step, self.model, self.optimizer, state)
        except (OSError, RuntimeError, SafetensorError) as exc:
            problem = self._write_failure(exc, path, previous)
        if self.dist.is_main and problem is None:
            prune_checkpoints(checkpoints_dir, self.train_cfg.keep_checkpoints, self.train_cfg.milestone_interval)
            if self._metrics is not None:
                self._metrics.event(self.step, CHECKPOINT_EVENT, checkpoint=path.name)
        if self.parallel != "fsdp":  # no rank runs ahead (or exits) before the checkpoint is complete
            problem = broadcast_from_main(problem)
        barrier()
        if problem is not None:
            raise problem
        self._last_save = time.monotonic()
        return path

    def _write_failure(self, exc: BaseException, path: Path, previous: list[Path]) -> TrainError:
        """The one-line error of a checkpoint write that failed for lack of space (the exception itself otherwise)."""
        reason = describe_write_failure(exc, path.parent)
        if reason is None:
            raise exc
        shutil.rmtree(temp_dir_of(path), ignore_errors=True)  # our partial write: give the space back
        intact = (f"step {checkpoint_step(previous[-1])} (the previous checkpoint) is intact" if previous
                  else "there is no earlier checkpoint, so the rerun starts the run over")
        return TrainError(f"checkpoint at step {self.step} not written: {reason}; the run stopped at step "
                          f"{self.step}; {intact}: free space and rerun the same command")

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """SIGTERM (preemption) and SIGINT finish the current step, save a checkpoint and end the run cleanly."""
        def request_stop(signum, frame):
            self._stop_signal = signum

        previous = {}
        try:
            for signum in (signal.SIGTERM, signal.SIGINT):
                previous[signum] = signal.signal(signum, request_stop)
        except ValueError:  # not the main thread: leave signals alone
            pass
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    # ----------------------------------------------------------------------------------------------- loop
    def fit(self) -> TrainResult:
        """Train to train.max_steps (or a stop), resuming the run directory's newest valid checkpoint if it has one.

        Every rank computes everything; only rank 0 writes run files (the others log nothing either). Rank 0 holds
        the run directory's lock throughout: a second trainer on it is refused."""
        with contextlib.ExitStack() as self._held:
            return self._fit()

    def _fit(self) -> TrainResult:
        run_dir, checkpoint, corrupt = self._open_run_dir()
        cfg = self.train_cfg
        metrics = self._metrics if self.dist.is_main else NullLogger()
        for path, why in corrupt:
            metrics.event(checkpoint_step(path), "checkpoint_corrupted", checkpoint=path.name, reason=why)
        if self._restarted:
            metrics.event(0, "restart", reason="no checkpoint: the previous attempt stopped before its first one")
            logger.warning(f"{run_dir} holds a run that stopped before its first checkpoint: starting it over")
        if checkpoint is not None:
            self._resume(checkpoint, run_dir, metrics)
        else:
            metrics.event(0, "start", world_size=self.dist.world_size, parallel=self.parallel, device=str(self.device),
                         parameters=sum(p.numel() for p in self.model.parameters()),  # global numel under FSDP too
                         accumulation_steps=self.accum_steps, compile=cfg.compile, dtype=self.dtype)
        for callback in self.callbacks:
            callback.start(RunContext(run_dir, metrics, self.dist.is_main))
        result = TrainResult(run_dir=run_dir, steps=0, tokens=0)
        # A live bar on a terminal; plain log lines in files and CI logs, where a bar would be noise.
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", unit="step",
                   disable=not (cfg.progress and sys.stderr.isatty() and self.dist.is_main),
                   dynamic_ncols=True)
        train_time, train_tokens = 0.0, 0
        run_started, self._first_step = time.perf_counter(), self.step
        try:
            with self._stop_on_signals():
                if checkpoint is None:
                    self._run_callbacks(force=True)
                train_time, train_tokens = self._train_loop(run_dir, metrics, result, bar, run_started)
        finally:
            bar.close()
            metrics.close()
            for callback in self.callbacks:
                callback.close()
        result.steps, result.tokens = self.step, self.tokens_seen
        result.val_losses, result.samples = self.validation.history, self.samples.records
        result.tokens_per_s = train_tokens / train_time if train_time else 0.0
        return result

    def _train_loop(
        self, run_dir: Path, metrics: MetricsLogger | NullLogger, result: TrainResult, bar: tqdm, run_started: float,
    ) -> tuple[float, int]:
        """Steps until max_steps or a stop signal. Returns (seconds spent in training steps, tokens they consumed)."""
        cfg = self.train_cfg
        train_time, train_tokens = 0.0, 0
        while self.step < cfg.max_steps:
            started = time.perf_counter()
            loss, grad_norm = self.train_step()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - started
            train_time += elapsed
            train_tokens += cfg.batch_tokens
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{cfg.batch_tokens / elapsed:,.0f}")
            if self.skip_reason is not None:
                self._record_skip(run_dir, metrics, result, loss)
            if self.step % cfg.log_interval == 0 or self.step == cfg.max_steps:
                metrics.log(self.step, self._train_metrics(loss, grad_norm, cfg.batch_tokens / elapsed))
                if cfg.progress and bar.disable:
                    logger.info(self._progress_line(loss, cfg.batch_tokens / elapsed,
                                                    time.perf_counter() - run_started))
            last = self.step == cfg.max_steps
            self._run_callbacks(force=last)
            if cfg.stop_at_step is not None and self.step >= cfg.stop_at_step and not last:
                result.checkpoint = self.save(run_dir)
                metrics.event(self.step, "stopped", reason="train.stop_at_step", checkpoint=result.checkpoint.name)
                break
            stop_signal, save_due = self._agree(self._stop_signal or 0, int(self._checkpoint_due()))
            self._stop_signal = stop_signal or None
            if self._stop_signal is not None and last:
                # Arrived during the last step or its final evaluation: the run is complete, nothing to resume.
                logger.info("%s arrived after the last step: the run is complete",
                            signal.Signals(self._stop_signal).name)
            elif self._stop_signal is not None:
                result.checkpoint = self.save(run_dir)
                name = signal.Signals(self._stop_signal).name
                metrics.event(self.step, "stopped", signal=name, checkpoint=result.checkpoint.name)
                logger.info(f"{name}: saved {result.checkpoint} and stopped")
                result.stopped_by = name
                break
            if last or save_due or (cfg.save_interval and self.step % cfg.save_interval == 0):
                result.checkpoint = self.save(run_dir)
        return train_time, train_tokens

    def _checkpoint_due(self) -> bool:
        minutes = self.train_cfg.save_interval_minutes
        return minutes > 0 and time.monotonic() - self._last_save >= minutes * 60

    def _agree(self, *flags: int) -> list[int]:
        """Each flag's maximum over the ranks, in one all-reduce: any rank's stop signal, or its due checkpoint,
        acts on every rank at the same step."""
        if not self.dist.active:
            return list(flags)
        values = torch.tensor(flags, device=self.device)
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
        return [int(value) for value in values.tolist()]

    def _record_skip(self, run_dir: Path, metrics: MetricsLogger | NullLogger, result: TrainResult,
                     loss: float) -> None:
        metrics.event(self.step, "skipped_step", reason=self.skip_reason, loss=loss,
                     consecutive=self.guard.consecutive_skips)
        if self.guard.exhausted:
            result.checkpoint = self.save(run_dir)
            raise TrainError(
                f"{self.guard.consecutive_skips} updates in a row were skipped (last: {self.skip_reason}) at step "
                f"{self.step}; the run stopped with checkpoint {result.checkpoint.name}. Lower optim.lr or inspect the "
                "data, then run the same command to resume"
            )

    def _progress_line(self, loss: float, tokens_per_s: float, seconds: float) -> str:
        steps_left = self.train_cfg.max_steps - self.step
        eta = seconds / max(1, self.step - self._first_step) * steps_left
        return (f"step {self.step:>6}/{self.train_cfg.max_steps}  loss {loss:.4f}  "
                f"lr {self.optimizer.param_groups[0]['lr']:.2e}  {tokens_per_s:,.0f} tok/s  eta {eta / 60:.1f} min")

    def _train_metrics(self, loss: float, grad_norm: float, tokens_per_s: float) -> dict[str, float]:
        metrics = {
            "train/loss": loss,
            "train/skipped": float(self.skip_reason is not None),
            "train/lr": self.optimizer.param_groups[0]["lr"],
            "train/grad_norm": grad_norm,
            "train/tokens": self.tokens_seen,
            "perf/tokens_per_s": tokens_per_s,
        }
        if self.peak_flops:  # tokens_per_s counts every rank's tokens, so the peak is every device's
            metrics["perf/mfu"] = tokens_per_s * self.flops_per_token / (self.peak_flops * self.dist.world_size)
        if self.device.type == "cuda":  # the peak since the previous record, on this (rank 0's) device
            metrics["perf/peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
        return metrics

    def _run_callbacks(self, force: bool) -> None:
        for callback in self.callbacks:
            callback.maybe_run(self, force)
