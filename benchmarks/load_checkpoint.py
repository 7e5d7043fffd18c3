"""Time from call to a ready model: load_for_inference on a 124m training checkpoint, the code of main before the
checkpoint refactor (commit 8693b42, llamalite.train.checkpoint) next to the working tree (llamalite.checkpoint),
interleaved in one run.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 .venv/bin/python benchmarks/load_checkpoint.py [--rounds 5]

Why: eval, generate, chat, export and merge all start with load_for_inference. The old loader verified the sha256 of
every file of the checkpoint, and did so twice (once in the loader, once more in load_model_from_checkpoint):
model.safetensors, optimizer.pt (AdamW's exp_avg and exp_avg_sq, twice the weights) and rng.pt, which is about six
times the bytes of the weights for a checkpoint that keeps its optimizer state. The new loader hashes only the files
inference reads (weights, trainer state, tokenizer), once, and builds the model on the meta device, so the loaded
tensors are taken as they are instead of overwriting a random initialisation.

The fixture is a realistic training checkpoint, written once by the working tree's save_checkpoint: the 124m preset
(fp32, tied embeddings, GPT-2's vocabulary padded to 50,304), AdamW state after one step, the RNG, trainer_state.json
naming <work>/data/tokenizer.json (GPT-2's tokenizer). The baseline's llamalite/ comes from `git archive`. Each
measurement is a fresh Python process (PYTHONPATH = the baseline's folder or the repository root; each process checks
where llamalite was imported from) that counts the bytes passed to the loader's sha256_file and times
load_for_inference plus a check that every parameter is materialised (imports are not timed). One untimed warm-up per
side first (it checks that the old code reads the new checkpoint, compiles the baseline's .pyc files and puts the
checkpoint in the page cache: the timings are of warm files, hashing and building, not of a cold disk). The order of
the two sides alternates from round to round, so a drift in the machine's load hits both. Both processes get the same
environment (malloc settings included) and, with --threads, the same torch intra-op thread count.

Needs ../shared/data (GPT-2's tokenizer files) and about 2 GB of disk for the checkpoint (--work DIR keeps and reuses
it; without it a temporary folder is removed at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from llamalite.checkpoint.format import save_checkpoint
from llamalite.config import Config, DataConfig
from llamalite.model.llama import Llama
from llamalite.model.presets import get_preset
from llamalite.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
PRESET = "124m"
STEP = 1
TARGET = 0.6  # after/before of the median seconds

# (label, module with load_for_inference, module whose global sha256_file the loader calls)
BEFORE = ("before", "llamalite.train.checkpoint", "llamalite.train.checkpoint")
AFTER = ("after", "llamalite.checkpoint.inference", "llamalite.checkpoint.format")

# Run with `python -c CHILD loader_module hash_module checkpoint expected_root threads` in a fresh process.
CHILD = """
import importlib, json, os, sys, time
from pathlib import Path

loader_name, hash_name, checkpoint, expected_root, threads = sys.argv[1:6]
import torch
if threads:
    torch.set_num_threads(int(threads))
import llamalite
found = Path(llamalite.__file__).resolve().parent
if found != Path(expected_root).resolve() / "llamalite":
    sys.exit(f"llamalite was imported from {found}, not from {expected_root}: PYTHONPATH did not take precedence")
loader = importlib.import_module(loader_name)
hashing = importlib.import_module(hash_name)
original = hashing.sha256_file
hashed = {"bytes": 0, "calls": 0}

def counting_sha256_file(path, *args, **kwargs):
    hashed["bytes"] += os.path.getsize(path)
    hashed["calls"] += 1
    return original(path, *args, **kwargs)

hashing.sha256_file = counting_sha256_file
dynamo_before = "torch._dynamo" in sys.modules
started = time.perf_counter()
loaded = loader.load_for_inference(Path(checkpoint))
params = list(loaded.model.parameters())
if not params or any(p.is_meta for p in params) or loaded.model.training or loaded.tokenizer is None:
    sys.exit("load_for_inference returned a model that is not ready (no parameters, meta tensors or training mode)")
seconds = time.perf_counter() - started
weights_sum = sum(float(t.sum(dtype=torch.float64)) for t in [*params, *loaded.model.buffers()])
print(json.dumps({"seconds": seconds, "bytes_hashed": hashed["bytes"], "hash_calls": hashed["calls"],
                  "llamalite": llamalite.__file__, "loader": loader.__file__, "threads": torch.get_num_threads(),
                  "parameters": sum(p.numel() for p in params), "weights_sum": weights_sum,
                  "dynamo_imported": "torch._dynamo" in sys.modules and not dynamo_before}))
"""


# ------------------------------------------------------------------------------------------------- fixture
def save_tokenizer(data_dir: Path) -> Tokenizer:
    """GPT-2's tokenizer as <data_dir>/tokenizer.json, read back from that file (the fingerprint the loaders check)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    Tokenizer.load(SHARED / "tokenizers" / "gpt2").save(data_dir / "tokenizer.json")
    return Tokenizer.load(data_dir / "tokenizer.json")


def trained_model_and_optimizer(config: Config) -> tuple[Llama, torch.optim.AdamW]:
    """The model after one AdamW step on a fake gradient, so the optimizer holds exp_avg and exp_avg_sq."""
    torch.manual_seed(0)
    model = Llama(config.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, betas=tuple(config.optim.betas),
                                  weight_decay=config.optim.weight_decay)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def build_checkpoint(work: Path) -> Path:
    """A 124m training checkpoint under <work>/run/checkpoints (reused when --work already holds one)."""
    checkpoints = work / "run" / "checkpoints"
    if (checkpoints / "latest").is_file():
        path = checkpoints / (checkpoints / "latest").read_text().strip()
        print(f"fixture: reusing {path}")
        return path
    tokenizer = save_tokenizer(work / "data")
    config = Config(model=get_preset(PRESET), data=DataConfig(out_dir=str(work / "data")))
    if tokenizer.padded_vocab_size(config.tokenizer.pad_vocab_multiple) != config.model.vocab_size:
        raise SystemExit(f"GPT-2's tokenizer ({tokenizer.size} tokens) does not fit the {PRESET} preset's vocabulary")
    model, optimizer = trained_model_and_optimizer(config)
    state = {"step": STEP, "tokens_seen": STEP * config.train.batch_tokens, "config": config.to_dict(),
             "tokenizer_fingerprint": tokenizer.fingerprint}
    path = save_checkpoint(checkpoints, STEP, model, optimizer, state)
    print(f"fixture: wrote {path}")
    return path


def describe_checkpoint(path: Path) -> str:
    sizes = {f.name: f.stat().st_size for f in sorted(path.iterdir()) if f.is_file()}
    return ", ".join(f"{name} {size / 1e6:,.1f} MB" for name, size in sizes.items())


# ------------------------------------------------------------------------------------------------- measuring
def extract_baseline(commit: str, dest: Path) -> Path:
    """The baseline commit's llamalite/ package under dest (git archive | tar -x)."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "llamalite"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def measure(variant: tuple[str, str, str], code_root: Path, checkpoint: Path, threads: int | None,
            cwd: Path) -> dict:
    """One load in a fresh process importing llamalite from code_root; its JSON report."""
    label, loader_module, hash_module = variant
    env = {**os.environ, "PYTHONPATH": str(code_root)}
    command = [sys.executable, "-c", CHILD, loader_module, hash_module, str(checkpoint), str(code_root),
               str(threads or "")]
    # cwd is the work folder, never the repository root: `python -c` puts the working directory first on sys.path.
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the {label} load failed (exit {done.returncode}):\n{done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_rounds(variants: dict, checkpoint: Path, rounds: int, threads: int | None, cwd: Path) -> dict[str, list]:
    """`rounds` loads per side, the order alternating each round."""
    results: dict[str, list] = {label: [] for label in variants}
    labels = list(variants)
    for index in range(rounds):
        order = labels if index % 2 == 0 else labels[::-1]
        for label in order:
            variant, code_root = variants[label]
            results[label].append(measure(variant, code_root, checkpoint, threads, cwd))
        times = ", ".join(f"{label} {results[label][-1]['seconds']:.2f} s" for label in order)
        print(f"round {index + 1}/{rounds}: {times}", flush=True)
    return results


# ------------------------------------------------------------------------------------------------- report
def print_table(results: dict[str, list], names: dict[str, str], weights_bytes: int) -> float:
    """The table; returns after/before of the median seconds."""
    median = {label: statistics.median(r["seconds"] for r in runs) for label, runs in results.items()}
    print(f"\n| {'code':<28} | median s | min s | {'sha256 bytes':>13} | x weights | files hashed | vs before |")
    print(f"|{'-' * 30}|---------:|------:|{'-' * 14}:|----------:|-------------:|----------:|")
    for label, runs in results.items():
        hashed = {r["bytes_hashed"] for r in runs}
        calls = {r["hash_calls"] for r in runs}
        shown = max(hashed)
        note = "" if len(hashed) == 1 else " (varies)"
        print(f"| {names[label]:<28} | {median[label]:>8.2f} | {min(r['seconds'] for r in runs):>5.2f} | "
              f"{shown:>13,}{note} | {shown / weights_bytes:>8.2f}x | {max(calls):>12} | "
              f"{median[label] / median['before']:>8.2f}x |")
    return median["after"] / median["before"]


def check_same_model(results: dict[str, list]) -> None:
    """Both sides must build the same model: parameter count and the sum of every weight and buffer."""
    first = {label: (runs[0]["parameters"], runs[0]["weights_sum"]) for label, runs in results.items()}
    (before_n, before_sum), (after_n, after_sum) = first["before"], first["after"]
    same = before_n == after_n and abs(before_sum - after_sum) <= 1e-9 * max(1.0, abs(before_sum))
    print(f"same model: {'yes' if same else 'NO'} ({before_n:,} vs {after_n:,} parameters, weight sums "
          f"{before_sum:.6f} vs {after_sum:.6f})")


def compare(args: argparse.Namespace, checkpoint: Path, variants: dict, names: dict[str, str], cwd: Path) -> None:
    """Warm-ups, the interleaved rounds, the table and the target."""
    for label, (variant, code_root) in variants.items():  # untimed: the old code must read the new checkpoint
        warm = measure(variant, code_root, checkpoint, args.threads, cwd)
        print(f"warm-up {label}: {variant[1]}.load_for_inference from {Path(warm['loader']).parent} "
              f"read the checkpoint in {warm['seconds']:.2f} s")
    malloc = {k: os.environ.get(k, "unset") for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")}
    print(f"torch {torch.__version__}, {warm['threads']} threads, malloc: {malloc}")
    print(f"checkpoint ({PRESET}, fp32, AdamW state): {describe_checkpoint(checkpoint)}")
    print(f"{args.rounds} rounds, each load in a fresh process, order alternating\n", flush=True)
    results = run_rounds(variants, checkpoint, args.rounds, args.threads, cwd)
    ratio = print_table(results, names, (checkpoint / "model.safetensors").stat().st_size)
    print()
    check_same_model(results)
    print_dynamo_note(results)
    print(f"target: after/before <= {TARGET}x: {'met' if ratio <= TARGET else 'NOT met'} ({ratio:.2f}x)")


def print_dynamo_note(results: dict[str, list]) -> None:
    """torch._dynamo, imported on first use (seconds in a fresh process), e.g. by nn.init on meta tensors."""
    imported = {label: any(r["dynamo_imported"] for r in runs) for label, runs in results.items()}
    print("torch._dynamo imported during the timed load: "
          + ", ".join(f"{label} {'yes' if flag else 'no'}" for label, flag in imported.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="loads per side, interleaved (default: 5)")
    parser.add_argument("--baseline", default="8693b42", help="commit whose llamalite/ is the before side")
    parser.add_argument("--work", type=Path, default=None, help="folder for the checkpoint, kept and reused")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if not (SHARED / "tokenizers" / "gpt2" / "vocab.json").is_file():
        raise SystemExit(f"{SHARED} not present: this benchmark needs GPT-2's tokenizer files "
                         "(../shared/data/tokenizers/gpt2/vocab.json and merges.txt)")
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="load_checkpoint_") as tmp:
        work = args.work.resolve() if args.work else Path(tmp) / "work"
        work.mkdir(parents=True, exist_ok=True)
        checkpoint = build_checkpoint(work)
        before_root = extract_baseline(args.baseline, Path(tmp) / "before")
        variants = {"before": (BEFORE, before_root), "after": (AFTER, ROOT)}
        names = {"before": f"before ({args.baseline})", "after": "after (working tree)"}
        compare(args, checkpoint, variants, names, cwd=work)


if __name__ == "__main__":
    main()
