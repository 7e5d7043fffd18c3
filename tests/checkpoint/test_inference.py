"""load_for_inference: the one loader of every command that reads a checkpoint."""

import pytest
import torch

from llamalite.checkpoint import format as checkpoint_format
from llamalite.checkpoint.format import save_checkpoint, verify_checkpoint
from llamalite.checkpoint.inference import load_for_inference
from llamalite.config import Config, DataConfig
from llamalite.errors import CheckpointError
from llamalite.model.llama import Llama, ModelConfig
from llamalite.tokenizer import Tokenizer

WORDS = "the king queen lord lady speak night day love war crown sword".split()


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train([" ".join(WORDS * 20)], vocab_size=300)


def training_checkpoint(folder, tokenizer: Tokenizer, tie: bool = False):
    """A checkpoint as training writes one: weights, AdamW state, RNG, trainer state; the tokenizer in data.out_dir."""
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=tokenizer.padded_vocab_size(64), n_layer=2, d_model=32, n_head=4,
                              n_kv_head=2, ffn_hidden=64, max_seq_len=16, tie_embeddings=tie))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    optimizer.step()
    data_dir = folder / "data"
    data_dir.mkdir(parents=True)
    tokenizer.save(data_dir / "tokenizer.json")
    config = Config(name="t", model=model.config, data=DataConfig(out_dir=str(data_dir)))
    state = {"step": 3, "tokens_seen": 96, "config": config.to_dict(), "tokenizer_fingerprint": tokenizer.fingerprint}
    return save_checkpoint(folder / "run" / "checkpoints", 3, model, optimizer, state), model


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_the_loaded_model_gives_the_saved_logits_without_touching_the_global_rng(tmp_path, tokenizer, tie):
    checkpoint, model = training_checkpoint(tmp_path, tokenizer, tie)
    rng_before = torch.get_rng_state()
    loaded = load_for_inference(tmp_path / "run")  # a run directory: its newest checkpoint
    assert torch.equal(torch.get_rng_state(), rng_before)  # built on the meta device: no random init drawn
    assert loaded.path == checkpoint and loaded.step == 3 and loaded.tokens_seen == 96
    assert loaded.config.model == model.config and not loaded.model.training
    assert not any(t.is_meta for t in [*loaded.model.parameters(), *loaded.model.buffers()])
    if tie:
        assert loaded.model.lm_head.weight is loaded.model.embed_tokens.weight
    tokens = torch.tensor([tokenizer.encode("the king and the queen")])
    with torch.no_grad():
        assert torch.equal(loaded.model(tokens), model.eval()(tokens))


def test_each_file_inference_reads_is_hashed_once_and_the_optimizer_state_never(tmp_path, tokenizer, monkeypatch):
    checkpoint, _ = training_checkpoint(tmp_path, tokenizer)
    hashed = []
    real = checkpoint_format.sha256_file
    monkeypatch.setattr(checkpoint_format, "sha256_file", lambda path: hashed.append(path.name) or real(path))
    load_for_inference(checkpoint)
    assert sorted(hashed) == ["model.safetensors", "trainer_state.json"]
    hashed.clear()
    verify_checkpoint(checkpoint)  # what a training resume checks: everything
    assert sorted(hashed) == ["model.safetensors", "optimizer.pt", "rng.pt", "trainer_state.json"]


@pytest.mark.parametrize("damaged", ["model.safetensors", "trainer_state.json"])
def test_a_damaged_file_is_refused_naming_it(tmp_path, tokenizer, damaged):
    checkpoint, _ = training_checkpoint(tmp_path, tokenizer)
    path = checkpoint / damaged
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{path} does not match its checksum"):
        load_for_inference(checkpoint)


def test_a_missing_checkpoint_and_a_wrong_tokenizer_are_refused(tmp_path, tokenizer):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_for_inference(tmp_path / "nothing")
    checkpoint, _ = training_checkpoint(tmp_path, tokenizer)
    other = tmp_path / "other.json"
    Tokenizer.train([" ".join(reversed(WORDS)) * 10], vocab_size=280).save(other)
    with pytest.raises(CheckpointError, match="fingerprint differs"):
        load_for_inference(checkpoint, tokenizer_path=other)
