"""Data preparation at the tokenizer's limit: `llamalite prepare` against raw batch encoding, GPT-2's vocabulary.

Writes a JSON Lines corpus (`--mb` MB of text: documents of 1-8 KB joining paragraphs of ../shared/data/corpus/*.txt
drawn with a fixed seed, FineWeb's `text` field), then runs each contender as a whole process, the same number of
cores each (`--cores`, default 2), in rounds that alternate the order:

- `llamalite prepare`: jsonl -> dedup, filters, split, tokenize (num_workers = cores), shards on disk;
- raw `tokenizers`: read the jsonl, `Tokenizer.encode_batch_fast` over all texts (its own threads = cores);
- raw `tiktoken`: read the jsonl, `Encoding.encode_ordinary_batch` (num_threads = cores), the encoding built from
  the same local vocab.json + merges.txt (nothing downloaded);
- the paper's fineweb.py way: tiktoken in a multiprocessing pool of `cores` workers, each document to a uint16 array.

MB/s is text bytes over wall time (process start to exit, reading included). Every contender must produce the same
ids: each one prints an order-free digest of its documents' ids (prepare's are read back from its shards), checked
here. Timings on a shared machine are indicative: compare the ratios within one run.

    .venv/bin/python benchmarks/prepare_throughput.py [--mb 20] [--rounds 3] [--cores 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared" / "data"
GPT2 = SHARED / "tokenizers" / "gpt2"
SEED = 0
CONTENDERS = ("llamalite prepare", "raw tokenizers", "raw tiktoken", "fineweb.py way")


# ------------------------------------------------------------------------------------------------ the corpus
def write_corpus(path: Path, megabytes: float) -> tuple[int, int]:
    """(documents, text bytes) written to `path` as JSON Lines."""
    pool = []
    for source in sorted((SHARED / "corpus").glob("*.txt")):
        text = source.read_text(encoding="utf-8")
        pool += [p.strip() for p in re.split(r"\n\s*\n", text) if len(p.strip()) >= 80]
    if not pool:
        raise SystemExit(f"no paragraphs in {SHARED / 'corpus'}: this benchmark needs ../shared/data")
    rng, count, size = random.Random(SEED), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < megabytes * 1e6:
            target, parts, length = rng.randint(1000, 8000), [], 0
            while length < target:
                parts.append(rng.choice(pool))
                length += len(parts[-1]) + 2
            text = "\n\n".join(parts) + f"\n\n(document {count})"  # unique: deduplication keeps every one
            f.write(json.dumps({"text": text, "id": count}, ensure_ascii=False) + "\n")
            count, size = count + 1, size + len(text.encode("utf-8"))
    return count, size


# ------------------------------------------------------------------------------------------------ contenders
def digest(documents_ids) -> str:
    """Order-free digest of the documents' ids: prepare shuffles nothing, but splits train / val by hash."""
    import numpy as np

    hashes = sorted(hashlib.sha256(np.asarray(ids, dtype="<u4").tobytes()).digest() for ids in documents_ids)
    return hashlib.sha256(b"".join(hashes)).hexdigest()[:12]


def read_texts(corpus: Path) -> list[str]:
    with open(corpus, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def run_prepare(corpus: Path, out_dir: Path, cores: int) -> Path:
    from llamalite.config import Config, DataConfig, SourceConfig, TokenizerConfig
    from llamalite.data.prepare import prepare

    data = DataConfig(sources=[SourceConfig(type="jsonl", path=str(corpus))], out_dir=str(out_dir),
                      val_fraction=0.01, num_workers=cores, min_chars=0, shard_tokens=50_000_000)
    prepare(Config(data=data, tokenizer=TokenizerConfig(path=str(GPT2))))
    return out_dir


def prepared_documents(out_dir: Path) -> list:
    """Each document's ids, read back from the shards (every document starts with the end-of-text id)."""
    import numpy as np

    from llamalite.data.loader import read_manifest
    from llamalite.data.shards import read_shard

    manifest = read_manifest(out_dir)
    documents = []
    for split in manifest["splits"].values():
        tokens = np.concatenate([read_shard(out_dir / s["file"]) for s in split["shards"]]).astype(np.int64)
        starts = np.flatnonzero(tokens == manifest["tokenizer"]["eos_id"]).tolist() + [len(tokens)]
        documents += [tokens[a + 1:b] for a, b in zip(starts, starts[1:])]
    return documents


def tiktoken_encoding():
    import tiktoken

    from llamalite.tiktoken_bpe import GPT2_PATTERN, merge_ranks

    vocab = json.loads((GPT2 / "vocab.json").read_text(encoding="utf-8"))
    merges = [line for line in (GPT2 / "merges.txt").read_text(encoding="utf-8").splitlines()[1:] if line]
    ranks, rank_to_id = merge_ranks({"vocab": vocab, "merges": merges}, {"<|endoftext|>"})
    assert all(rank == index for rank, index in enumerate(rank_to_id)), "GPT-2's ids are its merge ranks"
    return tiktoken.Encoding("gpt2-local", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})


def run_raw_tokenizers(corpus: Path, cores: int) -> list:
    os.environ["RAYON_NUM_THREADS"] = str(cores)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.BPE.from_file(str(GPT2 / "vocab.json"), str(GPT2 / "merges.txt")))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return [e.ids for e in tokenizer.encode_batch_fast(read_texts(corpus), add_special_tokens=False)]


def run_raw_tiktoken(corpus: Path, cores: int) -> list:
    return tiktoken_encoding().encode_ordinary_batch(read_texts(corpus), num_threads=cores)


_encoding = None


def _fineweb_tokenize(text: str):
    import numpy as np

    return np.array(_encoding.encode_ordinary(text), dtype=np.uint16)


def _fineweb_init() -> None:
    global _encoding
    _encoding = tiktoken_encoding()


def run_fineweb_way(corpus: Path, cores: int) -> list:
    import multiprocessing

    with multiprocessing.Pool(cores, initializer=_fineweb_init) as pool:
        return list(pool.imap(_fineweb_tokenize, read_texts(corpus), chunksize=16))


def contender(name: str, corpus: Path, out_dir: Path, cores: int):
    """Run one contender; returns what its ids can be read from (a list of id sequences, or prepare's folder)."""
    if name == "llamalite prepare":
        return run_prepare(corpus, out_dir, cores)
    if name == "raw tokenizers":
        return run_raw_tokenizers(corpus, cores)
    if name == "raw tiktoken":
        return run_raw_tiktoken(corpus, cores)
    return run_fineweb_way(corpus, cores)


def timed_process(name: str, corpus: Path, out_dir: Path, cores: int) -> tuple[float, str]:
    """Wall seconds of the contender's whole process, less the time its digest took, and the digest."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, __file__, "--run", name, "--corpus", str(corpus), "--out", str(out_dir),
                             "--cores", str(cores)], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    record = json.loads(result.stdout.strip().splitlines()[-1])
    return wall - record["digest_seconds"], record["digest"]


def child(args: argparse.Namespace) -> None:
    output = contender(args.run, Path(args.corpus), Path(args.out), args.cores)
    started = time.perf_counter()  # the digest (and prepare's read-back) is not part of the work
    value = digest(prepared_documents(output) if isinstance(output, Path) else output)
    print(json.dumps({"digest": value, "digest_seconds": time.perf_counter() - started}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=20.0, help="megabytes of text")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--run", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        return child(args)
    if not (GPT2 / "vocab.json").is_file():
        raise SystemExit(f"GPT-2's tokenizer is not at {GPT2}: this benchmark needs ../shared/data")

    import tiktoken
    import tokenizers

    with tempfile.TemporaryDirectory(prefix="prepare_throughput_") as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        documents, text_bytes = write_corpus(corpus, args.mb)
        print(f"{documents:,} documents, {text_bytes / 1e6:.1f} MB of text (JSON Lines); python "
              f"{platform.python_version()}, {os.cpu_count()} cores, {args.cores} used by each contender, load "
              f"average {os.getloadavg()[0]:.2f} at start; tokenizers {tokenizers.__version__}, tiktoken "
              f"{tiktoken.__version__}; GPT-2's vocab.json + merges.txt from {GPT2.resolve()}\n")
        seconds: dict[str, list[float]] = {name: [] for name in CONTENDERS}
        digests: dict[str, set[str]] = {name: set() for name in CONTENDERS}
        for round_index in range(args.rounds):
            order = CONTENDERS if round_index % 2 == 0 else tuple(reversed(CONTENDERS))
            for name in order:
                out_dir = Path(tmp) / f"prepared_{round_index}"
                wall, value = timed_process(name, corpus, out_dir, args.cores)
                seconds[name].append(wall)
                digests[name].add(value)
            print(f"round {round_index + 1}: " + ", ".join(f"{n} {seconds[n][-1]:.1f} s" for n in CONTENDERS))

    reference = statistics.median(seconds["raw tiktoken"])
    print("\n| contender | median s | MB/s | vs raw tiktoken | ids digest |\n|---|---:|---:|---:|---|")
    for name in CONTENDERS:
        median = statistics.median(seconds[name])
        print(f"| {name} | {median:.2f} | {text_bytes / 1e6 / median:.2f} | {reference / median:.2f}x "
              f"| {', '.join(sorted(digests[name]))} |")
    same = len(set().union(*digests.values())) == 1
    print(f"\nsame ids from every contender: {'yes' if same else 'NO'}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
