"""The end-to-end demo: Shakespeare's plays -> BPE tokenizer -> shards -> a tiny LLaMA trained on the CPU."""

from __future__ import annotations

import time
from pathlib import Path

from llamalite.config import ConfigError, load_config
from llamalite.train.trainer import TrainResult

BAR_WIDTH = 40


def default_demo_config() -> Path:
    """configs/demo.yaml of the source checkout this package was installed from (pip install -e .)."""
    return Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def run_demo(config_path: str | None = None, overrides: list[str] | tuple[str, ...] = (),
             sft_overrides: list[str] | tuple[str, ...] = ()) -> TrainResult:
    from llamalite.data.prepare import prepare
    from llamalite.train.trainer import Trainer

    path = Path(config_path) if config_path else default_demo_config()
    if not path.is_file():
        raise ConfigError(f"demo config not found at {path}: run from a source checkout or pass --config FILE")
    started = time.perf_counter()
    config = load_config(path, ["train.overwrite=true", *overrides])  # the demo always starts afresh
    print(f"[1/2] preparing the corpus into {config.data.out_dir}/")
    prepare(config)
    print(f"[2/2] training the {config.model.preset or 'custom'} model for {config.train.max_steps} steps")
    result = Trainer(config).fit()
    print_summary(result, time.perf_counter() - started)
    from llamalite.sft import run_demo_sft

    run_demo_sft(result, sft_overrides)
    from llamalite.report import build_report

    print(f"report: {build_report([result.run_dir])}  (open it in a browser; llamalite report {result.run_dir} rebuilds it)")
    return result


def print_summary(result: TrainResult, seconds: float) -> None:
    print(f"\nllamalite demo finished in {seconds / 60:.1f} min "
          f"({result.steps} steps, {result.tokens:,} tokens, {result.tokens_per_s:,.0f} tokens/s while training)")
    print(f"run directory: {result.run_dir}/  (config.yaml, metrics.jsonl, samples.jsonl, tb/, "
          f"checkpoints/{result.checkpoint.name if result.checkpoint else ''})")
    print("\nvalidation loss:")
    print(loss_curve(result.val_losses))
    if len(result.val_losses) >= 2:
        first, last = result.val_losses[0][1], result.val_losses[-1][1]
        print(f"final / step-0 val loss: {last:.3f} / {first:.3f} = {last / first:.2f}")
    final_samples = [s for s in result.samples if s["step"] == result.steps]
    if final_samples:
        print(f"\nsamples at step {result.steps}:")
        for record in final_samples:
            print(f"--- {record['prompt']!r}\n{record['prompt']}{record['completion']}\n")


def loss_curve(points: list[tuple[int, float]]) -> str:
    if not points:
        return "  (no evaluations)"
    top = max(loss for _, loss in points)
    return "\n".join(
        f"  step {step:>6}  {loss:7.4f}  {'#' * max(1, round(BAR_WIDTH * loss / top))}" for step, loss in points
    )
