"""The paper's lesson, measured: resume with the optimizer state versus resume with a fresh AdamW.

One trunk run of the tiny preset on the demo corpus stops at the branch step with a checkpoint. Two copies of it
then continue to the same end: (a) a proper resume (weights, AdamW moments, loader, RNG), and (b) the weights and
loader only, with a fresh AdamW and no LR re-warmup, as a resume without optimizer state does. Printed per branch:
the loss just before the branch (mean of the last 10 steps), the spike height (max loss after the branch minus that
loss) and the steps until the 5-step mean loss is back at that level.

    .venv/bin/python benchmarks/optimizer_reset_ablation.py [--branch 100] [--steps 200]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import tempfile
from pathlib import Path

from llamalite.config import load_config
from llamalite.data.prepare import prepare
from llamalite.files import read_jsonl
from llamalite.train.trainer import Trainer

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
BEFORE_WINDOW, SMOOTH_WINDOW = 10, 5


def train(overrides: list[str]) -> None:
    config = load_config(DEMO_CONFIG, overrides)
    with contextlib.redirect_stdout(io.StringIO()):
        Trainer(config).fit()


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in m}


def summarize(curve: dict[int, float], branch: int, end: int) -> tuple[float, float, int | None]:
    before = sum(curve[s] for s in range(branch - BEFORE_WINDOW + 1, branch + 1)) / BEFORE_WINDOW
    after = [curve[s] for s in range(branch + 1, end + 1)]
    spike = max(after) - before
    for offset in range(len(after) - SMOOTH_WINDOW + 1):
        if sum(after[offset : offset + SMOOTH_WINDOW]) / SMOOTH_WINDOW <= before:
            return before, spike, offset + SMOOTH_WINDOW
    return before, spike, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--branch", type=int, default=100, help="step at which the two branches part")
    parser.add_argument("--steps", type=int, default=200, help="total steps (the LR schedule's length)")
    parser.add_argument("--data", default="data/demo", help="prepared demo corpus (made if missing)")
    args = parser.parse_args()

    common = [
        f"data.out_dir={args.data}", f"train.max_steps={args.steps}", "train.batch_tokens=4096",
        "train.micro_batch_size=16", "train.eval_interval=0", "train.sample_interval=0", "train.log_interval=1",
        "train.save_interval=0", "train.progress=false", "train.compile=false", "optim.warmup_steps=20",
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        prepare(load_config(DEMO_CONFIG, common))
    work = Path(tempfile.mkdtemp(prefix="ablation_"))
    trunk = work / "trunk"
    print(f"trunk: {args.branch} of {args.steps} steps of 4,096 tokens (tiny preset, demo corpus) ...", flush=True)
    train([*common, f"train.run_dir={trunk}", f"train.stop_at_step={args.branch}"])
    branches = {
        "(a) resume with optimizer state": [],
        "(b) fresh AdamW, no re-warmup": ["train.reset_optimizer=true", "train.rewarmup_steps=0"],
    }
    rows = []
    for label, extra in branches.items():
        run_dir = work / label[1]
        shutil.copytree(trunk, run_dir)
        print(f"branch {label} ...", flush=True)
        train([*common, f"train.run_dir={run_dir}", *extra])
        rows.append((label, *summarize(losses(run_dir), args.branch, args.steps)))

    print(f"\nbranch at step {args.branch} of {args.steps}; loss before = mean of steps "
          f"{args.branch - BEFORE_WINDOW + 1}-{args.branch}; recovery = {SMOOTH_WINDOW}-step mean back at that level\n")
    print("| branch | loss before | max loss after | spike height | steps to recover |")
    print("|---|---:|---:|---:|---:|")
    for label, before, spike, recover in rows:
        recovered = f"{recover}" if recover is not None else f"> {args.steps - args.branch}"
        print(f"| {label} | {before:.3f} | {before + spike:.3f} | {spike:+.3f} | {recovered} |")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
