"""The training loop: gradient accumulation to a token batch, autocast, clipping, the LR schedule,
periodic validation, samples and checkpoints, metrics and a progress bar."""

from __future__ import annotations

import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from llamalite import __version__
from llamalite.config import Config, save_config
from llamalite.data.loader import TokenLoader, read_manifest, validation_batches
from llamalite.generate import sample
from llamalite.model.llama import Llama
from llamalite.model.presets import training_flops_per_token
from llamalite.tokenizer import Tokenizer
from llamalite.train.checkpoint import save_checkpoint
from llamalite.train.metrics import JsonlWriter, MetricsLogger, device_peak_flops
from llamalite.train.optim import build_optimizer, learning_rate, set_learning_rate
from llamalite.train.step import autocast_context, build_loss_fn, lm_loss

RUN_FILES = ("metrics.jsonl", "events.jsonl", "evals.jsonl", "samples.jsonl", "tb", "checkpoints", "report")


class TrainError(RuntimeError):
    """A problem with the run's set-up, worded for the user."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"train.device={name} but no CUDA GPU is visible: use train.device=cpu or auto")
    return device


def configure_device(device: torch.device) -> None:
    if device.type == "cuda":
        if device.index is not None:
            torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls that autocast leaves


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


class Trainer:
    def __init__(self, config: Config):
        self.config = config
        self.train_cfg = config.train
        if self.train_cfg.threads:
            torch.set_num_threads(self.train_cfg.threads)
        self.device = resolve_device(self.train_cfg.device)
        configure_device(self.device)
        torch.manual_seed(self.train_cfg.seed)

        self.data_dir = Path(config.data.out_dir)
        self.manifest = read_manifest(self.data_dir)
        self.tokenizer = Tokenizer.load(self.data_dir / self.manifest["tokenizer"]["file"], config.tokenizer.eos_token)
        self._resolve_vocab()
        self.seq_len = self.train_cfg.seq_len or config.model.max_seq_len
        if self.seq_len > config.model.max_seq_len:
            raise TrainError(f"train.seq_len {self.seq_len} exceeds model.max_seq_len {config.model.max_seq_len}")
        self.accum_steps = accumulation_steps(self.train_cfg.batch_tokens, self.train_cfg.micro_batch_size, self.seq_len)

        self.model = Llama(config.model).to(self.device)
        self.optimizer = build_optimizer(self.model, config.optim, self.device.type)
        self.loss_fn = build_loss_fn(self.model, self.train_cfg.compile)
        self.loader = TokenLoader(
            self.data_dir, "train", self.train_cfg.micro_batch_size, self.seq_len, seed=self.train_cfg.seed
        )
        self.val_batches = (
            validation_batches(self.data_dir, self.train_cfg.micro_batch_size, self.seq_len, self.train_cfg.val_batches)
            if self.train_cfg.eval_interval > 0
            else []
        )
        self.flops_per_token = training_flops_per_token(config.model, self.seq_len)
        self.peak_flops = device_peak_flops(self.device, self.train_cfg.peak_flops)
        self.step = 0
        self.tokens_seen = 0

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
    def _open_run_dir(self) -> Path:
        run_dir = self.config.run_path()
        if (run_dir / "metrics.jsonl").exists():
            if not self.train_cfg.overwrite:
                raise TrainError(
                    f"{run_dir} already holds a run: pick another name (name=...) or pass train.overwrite=true "
                    "to delete it and start over"
                )
            for entry in RUN_FILES:
                path = run_dir / entry
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.config, run_dir / "config.yaml")
        return run_dir

    # ----------------------------------------------------------------------------------------------- steps
    def train_step(self) -> tuple[float, float]:
        """One optimizer update over accum_steps micro batches. Returns (mean loss, grad norm before clipping)."""
        self.model.train()
        lr = learning_rate(self.step, self.config.optim, self.train_cfg.max_steps)
        set_learning_rate(self.optimizer, lr)
        total_loss = torch.zeros((), device=self.device)
        for _ in range(self.accum_steps):
            inputs, targets = self.loader.next_batch()
            inputs, targets = inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
            with autocast_context(self.device, self.train_cfg.dtype):
                loss = self.loss_fn(inputs, targets) / self.accum_steps
            loss.backward()
            total_loss += loss.detach()
        grad_norm = self._clip_gradients()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += self.train_cfg.batch_tokens
        return float(total_loss), grad_norm

    def _clip_gradients(self) -> float:
        clip = self.config.optim.grad_clip
        max_norm = clip if clip > 0 else math.inf
        return float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))

    @torch.no_grad()
    def validation_loss(self) -> float:
        self.model.eval()
        losses = []
        for inputs, targets in self.val_batches:
            with autocast_context(self.device, self.train_cfg.dtype):
                losses.append(float(lm_loss(self.model(inputs.to(self.device)), targets.to(self.device))))
        return sum(losses) / len(losses)

    def generate_samples(self) -> list[dict[str, Any]]:
        self.model.eval()
        generator = torch.Generator().manual_seed(self.train_cfg.seed)  # never touches the training RNG
        records = []
        for prompt in self.train_cfg.sample_prompts:
            with autocast_context(self.device, self.train_cfg.dtype):
                new = sample(
                    self.model,
                    self.tokenizer.encode(prompt) or [self.tokenizer.eos_id],
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
            "world_size": 1,
            "loader": self.loader.state_dict(),
            "tokenizer_fingerprint": self.tokenizer.fingerprint,
            "config": self.config.to_dict(),
            "code_version": __version__,
        }
        return save_checkpoint(run_dir / "checkpoints", self.step, self.model, self.optimizer, state)

    # ----------------------------------------------------------------------------------------------- loop
    def fit(self) -> TrainResult:
        run_dir = self._open_run_dir()
        cfg = self.train_cfg
        logger = MetricsLogger(run_dir)
        samples_file = JsonlWriter(run_dir / "samples.jsonl")
        result = TrainResult(run_dir=run_dir, steps=0, tokens=0)
        logger.event(0, "start", world_size=1, device=str(self.device), parameters=self.model.num_parameters(),
                     accumulation_steps=self.accum_steps, compile=cfg.compile, dtype=cfg.dtype)
        # A live bar on a terminal; plain log lines in files and CI logs, where a bar would be noise.
        show_bar = cfg.progress and sys.stderr.isatty()
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", unit="step", disable=not show_bar,
                   dynamic_ncols=True)
        train_time, train_tokens = 0.0, 0
        run_started, self._first_step = time.perf_counter(), self.step
        try:
            self._maybe_evaluate(logger, samples_file, result, bar, force=True)
            while self.step < cfg.max_steps:
                started = time.perf_counter()
                loss, grad_norm = self.train_step()
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - started
                train_time += elapsed
                train_tokens += cfg.batch_tokens
                if not math.isfinite(loss):
                    raise TrainError(f"loss became {loss} at step {self.step}: lower optim.lr or check the data")
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{cfg.batch_tokens / elapsed:,.0f}")
                if self.step % cfg.log_interval == 0 or self.step == cfg.max_steps:
                    logger.log(self.step, self._train_metrics(loss, grad_norm, cfg.batch_tokens / elapsed))
                    if cfg.progress and not show_bar:
                        print(self._progress_line(loss, cfg.batch_tokens / elapsed, time.perf_counter() - run_started),
                              flush=True)
                last = self.step == cfg.max_steps
                self._maybe_evaluate(logger, samples_file, result, bar, force=last)
                if last or (cfg.save_interval and self.step % cfg.save_interval == 0):
                    result.checkpoint = self.save(run_dir)
        finally:
            bar.close()
            logger.close()
            samples_file.close()
        result.steps, result.tokens = self.step, self.tokens_seen
        result.tokens_per_s = train_tokens / train_time if train_time else 0.0
        return result

    def _progress_line(self, loss: float, tokens_per_s: float, seconds: float) -> str:
        steps_left = self.train_cfg.max_steps - self.step
        eta = seconds / max(1, self.step - self._first_step) * steps_left
        return (f"step {self.step:>6}/{self.train_cfg.max_steps}  loss {loss:.4f}  "
                f"lr {self.optimizer.param_groups[0]['lr']:.2e}  {tokens_per_s:,.0f} tok/s  eta {eta / 60:.1f} min")

    def _train_metrics(self, loss: float, grad_norm: float, tokens_per_s: float) -> dict[str, float]:
        metrics = {
            "train/loss": loss,
            "train/lr": self.optimizer.param_groups[0]["lr"],
            "train/grad_norm": grad_norm,
            "train/tokens": self.tokens_seen,
            "perf/tokens_per_s": tokens_per_s,
        }
        if self.peak_flops:
            metrics["perf/mfu"] = tokens_per_s * self.flops_per_token / self.peak_flops
        return metrics

    def _maybe_evaluate(
        self, logger: MetricsLogger, samples_file: JsonlWriter, result: TrainResult, bar: tqdm, force: bool
    ) -> None:
        cfg = self.train_cfg
        if cfg.eval_interval > 0 and (force or self.step % cfg.eval_interval == 0):
            started = time.perf_counter()
            val_loss = self.validation_loss()
            seconds = time.perf_counter() - started
            logger.log(self.step, {"val/loss": val_loss, "train/tokens": self.tokens_seen, "val/seconds": seconds})
            result.val_losses.append((self.step, val_loss))
            bar.write(f"step {self.step:>6}  val/loss {val_loss:.4f}  ({seconds:.1f}s)", file=sys.stdout)
        wants_samples = cfg.sample_prompts and cfg.sample_interval > 0
        if wants_samples and (force or self.step % cfg.sample_interval == 0):
            for record in self.generate_samples():
                samples_file.write(record)
                result.samples.append(record)
