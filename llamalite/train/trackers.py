"""Where metrics go besides metrics.jsonl: TensorBoard and Weights & Biases (config section `logging:`).

The MetricsLogger (rank 0 only) hands each tracker the records it writes, under the same names and steps. A resumed
run redoes the steps after its checkpoint, and each tracker shows every step once: TensorBoard hides the earlier
attempt's redone steps (purge_step); W&B, which cannot take a step twice, is rewound to the checkpoint
(logging.wandb_rewind) or keeps the values it already has and is sent only the later steps.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from llamalite.config import Config, LoggingConfig
from llamalite.errors import ConfigError, TrainError, did_you_mean
from llamalite.files import atomic_write_text

logger = logging.getLogger(__name__)
WANDB_MODES = ("online", "offline", "disabled")
WANDB_ID_FILE = "wandb_run_id"  # the run directory's W&B run id, chosen on its first start
WANDB_DIR = "wandb"  # W&B's own files (offline-run-*/ or run-*/) under the run directory
DEFAULT_WANDB_PROJECT = "llamalite"


class Tracker(Protocol):
    def scalars(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class PriorRun:
    """What a run directory that is resumed (or started over) already held."""

    kept_step: int  # the last step whose records are kept: the checkpoint's step; -1 when the run starts over
    logged_step: int | None  # the last step metrics.jsonl held before the redone steps were cut; None: none


def check_logging(cfg: LoggingConfig) -> None:
    """Bad settings fail before training, on every rank (a failure on rank 0 alone would leave the others waiting)."""
    if cfg.wandb_mode is not None and cfg.wandb_mode not in WANDB_MODES:
        raise ConfigError(f"unknown logging.wandb_mode {cfg.wandb_mode!r}: {did_you_mean(cfg.wandb_mode, WANDB_MODES)}")
    if cfg.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("logging.wandb=true needs the wandb package: pip install 'llamalite[wandb]'")


def open_trackers(run_dir: Path, config: Config, prior: PriorRun | None) -> list[Tracker]:
    """The trackers `config.logging` asks for; `prior` is None for a fresh run."""
    cfg = config.logging
    trackers: list[Tracker] = [open_wandb(run_dir, config, prior)] if cfg.wandb else []  # the one that may fail
    if cfg.tensorboard:
        trackers.append(TensorBoardTracker(run_dir / "tb", purge_step=prior.kept_step + 1 if prior else None))
    return trackers


# ----------------------------------------------------------------------------------------------- TensorBoard
class TensorBoardTracker:
    """Scalars under `log_dir`. `purge_step` (on resume): TensorBoard hides the earlier events of steps from it on."""

    def __init__(self, log_dir: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        if purge_step is not None:
            wait_past_event_files(log_dir)
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def scalars(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


def wait_past_event_files(log_dir: Path) -> None:
    """Wait, if need be, into a second later than the newest event file's.

    TensorBoard reads a folder's event files in name order, and a name starts with the second the file was created:
    a resumed run's file must sort after the earlier ones for its purge to apply to them. Only a resume within the
    second its previous attempt started (tests, an instant crash) waits, for under a second."""
    seconds = [int(part) for path in log_dir.glob("events.out.tfevents.*")
               if (part := path.name.split(".")[3]).isdigit()]
    while seconds and int(time.time()) <= max(seconds):
        time.sleep(0.02)


# ----------------------------------------------------------------------------------------------- W&B
class WandbTracker:
    """A W&B run: every scalar at its training step, except steps up to `sent_through`, which W&B already has."""

    def __init__(self, run: Any, sent_through: int | None = None):
        self.run = run
        self.sent_through = sent_through
        self._closed = False

    def scalars(self, step: int, metrics: dict[str, float]) -> None:
        if self.sent_through is None or step > self.sent_through:
            self.run.log(metrics, step=step)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.run.finish()


def open_wandb(run_dir: Path, config: Config, prior: PriorRun | None) -> WandbTracker:
    """Start or continue the run directory's W&B run: one id for its whole life (kept in `wandb_run_id`), the resolved
    config as the run's config, W&B's files under run_dir/wandb."""
    import wandb

    cfg = config.logging
    id_file = run_dir / WANDB_ID_FILE
    known = id_file.is_file()  # else W&B picks the id of a new run
    resume, sent_through = (resume_arguments(id_file.read_text().strip(), prior, cfg.wandb_rewind) if known
                            else ({}, None))
    try:
        run = wandb.init(
            project=cfg.wandb_project or os.environ.get("WANDB_PROJECT") or DEFAULT_WANDB_PROJECT,
            entity=cfg.wandb_entity, name=config.name, tags=cfg.wandb_tags or None, mode=cfg.wandb_mode,
            dir=str(run_dir), config=config.to_dict(), allow_val_change=True, **resume,
        )
    except wandb.errors.Error as exc:
        raise TrainError(f"W&B did not start the run: {exc} (or set logging.wandb_mode=offline, and upload later "
                         "with `wandb sync`)") from None
    if not known:
        atomic_write_text(id_file, run.id + "\n")
    rewound = f", rewound to step {sent_through}" if "resume_from" in resume else ""
    logger.info(f"W&B run {run.id} ({run.settings.mode}{rewound}): {run.url or run.settings.sync_dir}")
    return WandbTracker(run, last_step_held(run, sent_through))


def last_step_held(run: Any, planned: int | None) -> int | None:
    """The last step W&B holds of the run: its server's answer when it resumed the run online (a killed process may
    not have sent its last seconds), else `planned` (metrics.jsonl's last step, or the rewind point)."""
    if run.resumed and run.starting_step:
        return run.starting_step - 1
    return planned


def resume_arguments(run_id: str, prior: PriorRun | None, rewind: bool) -> tuple[dict[str, Any], int | None]:
    """wandb.init's arguments that continue run `run_id`, and the last step not to send again (None: none).

    `prior` is None for a run directory that starts afresh. W&B keeps one value per step: a resume that
    redoes steps it already has either rewinds it to the kept step, its history cut there (`rewind`), or sends it
    only the steps after the last one it has."""
    if prior is None or prior.logged_step is None:
        return {"id": run_id, "resume": "allow"}, None
    kept = max(prior.kept_step, 0)  # a run started over keeps its step-0 records in W&B: they are the same
    if rewind and prior.logged_step > kept:
        return {"resume_from": f"{run_id}?_step={kept}"}, kept
    return {"id": run_id, "resume": "allow"}, prior.logged_step
