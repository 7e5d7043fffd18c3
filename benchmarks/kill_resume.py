"""kill -9 at random moments, biased into checkpoint writes (the first one included), then the same command again:
does every interrupted run finish bitwise identical to an uninterrupted one?

Each trial starts `llamalite train` on the demo corpus (the tiny preset, 6.8M parameters: a checkpoint is ~80 MB of
weights and AdamW state, so a write takes long enough to be hit). It waits until the checkpoint directory of the
trial's target step starts being written (`checkpoints/.tmp_step_N` appears), sleeps a random 0-`--max-delay` seconds
(so the kill lands inside the write, or just after it) and sends SIGKILL. Then it reruns the identical command until
it exits 0 and compares the final weights, the AdamW state and every logged training loss with the uninterrupted run.
Targets cycle through every checkpoint step, so the first checkpoint is hit in one trial out of
max_steps / save_interval.

    .venv/bin/python benchmarks/kill_resume.py [--trials 20] [--data data/demo]
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llamalite.checkpoint.format import list_checkpoints
from llamalite.files import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["train.eval_interval=0", "train.sample_interval=0", "train.log_interval=1", "train.progress=false",
         "train.compile=false", "train.dtype=fp32", "train.batch_tokens=2048", "train.micro_batch_size=8",
         "train.keep_checkpoints=2", "optim.warmup_steps=4"]


def command(config: Path, data_dir: Path, run_dir: Path, max_steps: int, save_interval: int) -> list[str]:
    return [sys.executable, "-m", "llamalite", "train", str(config), *TRAIN, f"data.out_dir={data_dir}",
            f"train.run_dir={run_dir}", f"train.max_steps={max_steps}", f"train.save_interval={save_interval}"]


def fingerprint(run_dir: Path) -> tuple[bytes, bytes, list[tuple[int, float]]]:
    final = list_checkpoints(run_dir / "checkpoints")[-1]
    losses = [(m["step"], m["train/loss"]) for m in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in m]
    return (final / "model.safetensors").read_bytes(), (final / "optimizer.pt").read_bytes(), losses


def kill_during_write(cmd: list[str], run_dir: Path, target: int, max_delay: float, rng: random.Random) -> str:
    """Start the command, SIGKILL it right after the write of checkpoint `target` began; where the kill landed."""
    temp = run_dir / "checkpoints" / f".tmp_step_{target:07d}"
    final = run_dir / "checkpoints" / f"step_{target:07d}"
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while process.poll() is None and not temp.exists() and not final.exists():
        time.sleep(0.0005)
    if process.poll() is not None:
        raise SystemExit(f"the run ended before step {target}: {process.stderr.read().decode()[-2000:]}")
    time.sleep(rng.uniform(0, max_delay))
    process.send_signal(signal.SIGKILL)
    process.wait()
    if final.exists() and not temp.exists():
        return "after the write"
    return "first write" if not list_checkpoints(run_dir / "checkpoints") else "inside a write"


def finish(cmd: list[str]) -> int:
    """Rerun the identical command until it exits 0; the number of reruns."""
    for rerun in range(1, 4):
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if done.returncode == 0:
            return rerun
        print(f"    rerun {rerun} exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}", flush=True)
    return -1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--data", default=None, help="prepared demo corpus (default: prepared into a temporary "
                        "folder with `llamalite prepare configs/demo.yaml`)")
    parser.add_argument("--max-steps", type=int, default=24)
    parser.add_argument("--save-interval", type=int, default=4)
    parser.add_argument("--max-delay", type=float, default=0.25, help="seconds after a write began (default: 0.25)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="kill_resume_"))
    config = ROOT / "configs" / "demo.yaml"
    data_dir = Path(args.data) if args.data else work / "data"
    if not args.data:
        subprocess.run([sys.executable, "-m", "llamalite", "prepare", str(config), f"data.out_dir={data_dir}"],
                       cwd=ROOT, check=True, capture_output=True)
    reference_dir = work / "uninterrupted"
    subprocess.run(command(config, data_dir, reference_dir, args.max_steps, args.save_interval), cwd=ROOT,
                   check=True, capture_output=True)
    reference = fingerprint(reference_dir)

    rng = random.Random(args.seed)
    targets = list(range(args.save_interval, args.max_steps + 1, args.save_interval))
    print(f"{args.trials} trials, kills {args.max_delay * 1000:.0f} ms at most after a write of checkpoint "
          f"{', '.join(map(str, targets))} began (the uninterrupted run took {time.perf_counter() - started:.0f} s "
          "with the preparation)")
    print("| trial | kill at checkpoint | landed | reruns to finish | events | bitwise identical |")
    print("|---:|---:|---|---:|---|---|")
    identical = 0
    for trial in range(args.trials):
        run_dir = work / f"trial_{trial:02d}"
        cmd = command(config, data_dir, run_dir, args.max_steps, args.save_interval)
        target = targets[trial % len(targets)]
        landed = kill_during_write(cmd, run_dir, target, args.max_delay, rng)
        reruns = finish(cmd)
        events = [e["event"] for e in read_jsonl(run_dir / "events.jsonl")]
        same = reruns > 0 and fingerprint(run_dir) == reference
        identical += same
        print(f"| {trial + 1} | {target} | {landed} | {reruns} | {' '.join(events)} | {'yes' if same else 'NO'} |",
              flush=True)
        shutil.rmtree(run_dir)
    print(f"\n{identical}/{args.trials} finished with the same command, bitwise identical to the uninterrupted run "
          f"(weights, AdamW state, every training loss); {time.perf_counter() - started:.0f} s in all")
    shutil.rmtree(work)
    sys.exit(0 if identical == args.trials else 1)


if __name__ == "__main__":
    main()
