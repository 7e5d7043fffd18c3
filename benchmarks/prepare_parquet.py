"""`llamalite prepare` on FineWeb-Edu-schema parquet files: 1 and 2 processes, with a seeded sample and a score filter.

Writes `--files` parquet files in FineWeb-Edu's schema (text, id, dump, url, file_path, language, language_score,
token_count, score, int_score; row groups of 1,000 rows, as FineWeb's datatrove writes them). Each document joins
paragraphs of ../shared/data/corpus/*.txt drawn at random (fixed seed) to 1-8 KB of text, and int_score runs 2-5.
Then prepares them with GPT-2's tokenizer (../shared/data/tokenizers/gpt2), `sample_docs` = half the rows and
`min_score: 3`, once per worker setting, and prints documents/s, tokens/s and the sample. Every setting must write
byte-identical shards (checked and printed).

    .venv/bin/python benchmarks/prepare_parquet.py [--docs 24000] [--files 4]

Timings on a shared machine are indicative: compare the ratios within one run. "CPU s" (this process and its
worker processes) is the work each setting does, whatever else the machine runs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import random
import re
import resource
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import tokenizers

from llamalite.config import Config, DataConfig, SourceConfig, TokenizerConfig
from llamalite.data.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared" / "data"
GPT2 = SHARED / "tokenizers" / "gpt2"
SEED = 0
# One core per worker: tokenizers' own threads (rayon) would make the in-process setting use every core as well.
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# (read_workers, num_workers): reading/decoding/sampling processes, tokenizer processes (1: in the main process)
SETTINGS = [(1, 1), (1, 2), (2, 2)]


def paragraphs() -> list[str]:
    found = []
    for path in sorted((SHARED / "corpus").glob("*.txt")):
        text = path.read_text(encoding="utf-8")
        found += [p.strip() for p in re.split(r"\n\s*\n", text) if len(p.strip()) >= 80]  # wikitext: " \n \n"
    if not found:
        raise SystemExit(f"no paragraphs in {SHARED / 'corpus'}: this benchmark needs ../shared/data")
    return found


def documents(count: int, pool: list[str], rng: random.Random) -> list[str]:
    texts = []
    for _ in range(count):
        target, parts, size = rng.randint(1000, 8000), [], 0
        while size < target:
            parts.append(rng.choice(pool))
            size += len(parts[-1]) + 2
        texts.append("\n\n".join(parts))
    return texts


def write_files(folder: Path, docs: int, files: int) -> int:
    """FineWeb-Edu-schema parquet files; returns the bytes of text written."""
    rng, pool = random.Random(SEED), paragraphs()
    per_file, text_bytes = docs // files, 0
    for index in range(files):
        texts = documents(per_file, pool, rng)
        text_bytes += sum(len(t.encode()) for t in texts)
        first = index * per_file
        scores = [rng.uniform(1.5, 5.0) for _ in texts]
        table = pa.table({
            "text": texts,
            "id": [f"<urn:uuid:{first + i:08x}>" for i in range(len(texts))],
            "dump": ["CC-MAIN-2024-10"] * len(texts),
            "url": [f"https://example.org/{first + i}" for i in range(len(texts))],
            "file_path": ["s3://commoncrawl/crawl-data/CC-MAIN-2024-10/segments/x.warc.gz"] * len(texts),
            "language": ["en"] * len(texts),
            "language_score": [0.95] * len(texts),
            "token_count": [len(t) // 4 for t in texts],
            "score": scores,
            "int_score": [round(s) for s in scores],
        })
        pq.write_table(table, folder / f"{index:03d}_00000.parquet", row_group_size=1000)
    return text_bytes


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children (the pools' workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run(
    folder: Path, out_dir: Path, read_workers: int, num_workers: int, sample_docs: int
) -> tuple[dict, float, float]:
    source = SourceConfig(type="parquet", path=str(folder), sample_docs=sample_docs)
    data = DataConfig(sources=[source], out_dir=str(out_dir), score_field="int_score", min_score=3,
                      val_fraction=0.005, shard_tokens=10_000_000, num_workers=num_workers,
                      read_workers=read_workers, sample_seed=SEED)
    config = Config(data=data, tokenizer=TokenizerConfig(path=str(GPT2)))
    started, cpu = time.perf_counter(), cpu_seconds()
    manifest = prepare(config)
    return manifest, time.perf_counter() - started, cpu_seconds() - cpu


def shards_digest(out_dir: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(out_dir.glob("*.bin")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=24000, help="rows over all files")
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--sample-docs", type=int, default=None, help="default: half the rows")
    args = parser.parse_args()
    if not (GPT2 / "vocab.json").is_file():
        raise SystemExit(f"GPT-2's tokenizer is not at {GPT2}: this benchmark needs ../shared/data")
    sample_docs = args.sample_docs or args.docs // 2

    with tempfile.TemporaryDirectory(prefix="prepare_parquet_") as tmp:
        folder = Path(tmp) / "fineweb-edu"
        folder.mkdir()
        started = time.perf_counter()
        text_bytes = write_files(folder, args.docs, args.files)
        groups = sum(pq.ParquetFile(p).metadata.num_row_groups for p in folder.glob("*.parquet"))
        print(f"{args.files} files, {groups} row groups, {args.docs:,} rows, {text_bytes / 1e6:.1f} MB of text "
              f"(written in {time.perf_counter() - started:.1f} s)")
        print(f"python {platform.python_version()}, {os.cpu_count()} cores, load average "
              f"{os.getloadavg()[0]:.2f} at start, pyarrow {pa.__version__}, tokenizers {tokenizers.__version__}; "
              f"sample_docs={sample_docs:,} seed={SEED}, min_score=3, GPT-2 tokenizer, TOKENIZERS_PARALLELISM=false "
              f"(1 worker = 1 core)\n")

        rows = []
        for read_workers, num_workers in SETTINGS:
            out_dir = Path(tmp) / f"prepared_{read_workers}_{num_workers}"
            manifest, seconds, cpu = run(folder, out_dir, read_workers, num_workers, sample_docs)
            rows.append((read_workers, num_workers, manifest, seconds, cpu, shards_digest(out_dir)))

    base = rows[0][3]
    print("| read_workers | num_workers | seconds | speed-up | CPU s | rows read/s | documents/s | tokens/s "
          "| rows read | kept by sample | fraction | seed | kept after int_score >= 3 | tokens | shards sha256 |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for read_workers, num_workers, manifest, seconds, cpu, digest in rows:
        (sample,) = manifest["sample"]["sources"]
        kept = manifest["documents"]["kept"]
        tokens = sum(split["tokens"] for split in manifest["splits"].values())
        print(f"| {read_workers} | {num_workers} | {seconds:.1f} | {base / seconds:.2f}x | {cpu:.1f} "
              f"| {sample['read'] / seconds:,.0f} | {kept / seconds:,.0f} | {tokens / seconds:,.0f} "
              f"| {sample['read']:,} | {sample['kept']:,} "
              f"| {sample['fraction']:.4f} | {manifest['sample']['seed']} | {kept:,} | {tokens:,} | {digest} |")
    identical = len({row[-1] for row in rows}) == 1
    print(f"\nshards identical across settings: {'yes' if identical else 'NO'}")
    if not identical:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
