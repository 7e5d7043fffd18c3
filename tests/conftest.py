import random
from pathlib import Path

import pytest

from llamalite.config import Config, DataConfig, SourceConfig, TokenizerConfig
from llamalite.model.llama import ModelConfig

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WORDS = "the king queen lord lady speak night day love war crown sword heart fair foul good bad come go now".split()


@pytest.fixture(scope="session", autouse=True)
def private_cache_dir(tmp_path_factory):
    """The shard-verification cache (normally ~/.cache/llamalite) of this test session, its subprocesses included."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLAMALITE_CACHE_DIR", str(tmp_path_factory.mktemp("llamalite-cache")))
        yield


def synthetic_documents(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(150, 400))) + "." for _ in range(count)]


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(synthetic_documents(40)):
        (folder / f"doc{i:02d}.txt").write_text(text)
    return folder


def small_config(corpus: Path, out_dir: Path, run_dir: Path, **train) -> Config:
    """A two-layer model on the synthetic corpus: trains in a second on the CPU."""
    config = Config(
        name="test",
        model=ModelConfig(vocab_size=None, n_layer=2, d_model=32, n_head=4, n_kv_head=2, ffn_hidden=64, max_seq_len=16),
        tokenizer=TokenizerConfig(vocab_size=300),
        data=DataConfig(sources=[SourceConfig(type="text", path=str(corpus))], out_dir=str(out_dir), val_fraction=0.2,
                        num_workers=1),
    )
    config.optim.warmup_steps = 2
    config.optim.lr = 3e-3
    defaults = dict(run_dir=str(run_dir), dtype="fp32", batch_tokens=64, micro_batch_size=4, seq_len=16, max_steps=4,
                    eval_interval=2, val_batches=2, progress=False)
    for key, value in {**defaults, **train}.items():
        setattr(config.train, key, value)
    return config


@pytest.fixture(scope="session")
def prepared_dir(corpus_dir, tmp_path_factory) -> Path:
    from llamalite.data.prepare import prepare

    out_dir = tmp_path_factory.mktemp("prepared")
    prepare(small_config(corpus_dir, out_dir, out_dir / "unused"))
    return out_dir
