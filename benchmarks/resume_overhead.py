"""Cost of resuming: seconds from process start to the first finished training step, fresh versus resumed.

Each trial starts `llamalite train` on the demo config (tiny preset) in a new process: once fresh, stopping at step
2 with a checkpoint, then again in the same run directory, resuming at step 2 (checksums verified, weights,
AdamW state, loader and RNG restored). The time of a step is when its metrics record is written.

    .venv/bin/python benchmarks/resume_overhead.py [--trials 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llamalite.files import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["train.eval_interval=0", "train.sample_interval=0", "train.log_interval=1", "train.save_interval=0",
          "train.progress=false", "train.compile=false", "train.max_steps=100"]


def seconds_to_step(run_dir: Path, data_dir: str, step: int, stop_at: int) -> float:
    started = time.time()
    command = [sys.executable, "-m", "llamalite", "train", str(ROOT / "configs" / "demo.yaml"), *COMMON,
               f"data.out_dir={data_dir}", f"train.run_dir={run_dir}", f"train.stop_at_step={stop_at}"]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    record = next(m for m in read_jsonl(run_dir / "metrics.jsonl") if m["step"] == step and "train/loss" in m)
    return record["time"] - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--data", default="data/demo",
                        help="prepared demo corpus (`llamalite prepare configs/demo.yaml`)")
    args = parser.parse_args()
    fresh, resumed = [], []
    for trial in range(args.trials):
        run_dir = Path(tempfile.mkdtemp(prefix="resume_overhead_")) / "run"
        fresh.append(seconds_to_step(run_dir, args.data, step=1, stop_at=2))
        resumed.append(seconds_to_step(run_dir, args.data, step=3, stop_at=4))
        print(f"trial {trial + 1}: fresh {fresh[-1]:.2f} s, resumed {resumed[-1]:.2f} s", flush=True)
    fresh_s, resumed_s = statistics.median(fresh), statistics.median(resumed)
    print("\n| start | seconds to first step (median) | ratio |")
    print("|---|---:|---:|")
    print(f"| fresh | {fresh_s:.2f} | 1.00x |")
    print(f"| resumed from checkpoint | {resumed_s:.2f} | {resumed_s / fresh_s:.2f}x |")


if __name__ == "__main__":
    main()
