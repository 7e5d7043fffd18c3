import torch

from llamalite.checkpoint.format import save_checkpoint
from llamalite.config import Config, DataConfig
from llamalite.export.hf import export_checkpoint
from llamalite.model.llama import Llama, ModelConfig
from llamalite.tokenizer import Tokenizer
from tests.conftest import SHARED_DATA

GPT2_DIR = SHARED_DATA / "tokenizers" / "gpt2"


def random_gpt2_model(max_seq_len: int = 192, seed: int = 0) -> Llama:
    """A small random model over GPT-2's vocabulary; init_std 0.3 gives O(1) logits, so choices score apart."""
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=50304, n_layer=2, d_model=32, n_head=4, n_kv_head=2, ffn_hidden=64,
                         max_seq_len=max_seq_len, init_std=0.3)
    return Llama(config).eval()


def export_random_model(tmp_path, max_seq_len: int = 192):
    """(checkpoint dir, transformers folder, model): the same random weights in both formats."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    tokenizer = Tokenizer.load(GPT2_DIR)
    tokenizer.save(data_dir / "tokenizer.json")
    model = random_gpt2_model(max_seq_len)
    config = Config(name="eval-test", model=model.config, data=DataConfig(out_dir=str(data_dir)))
    state = {"step": 10, "tokens_seen": 640, "tokenizer_fingerprint": tokenizer.fingerprint, "config": config.to_dict()}
    checkpoint = save_checkpoint(tmp_path / "run" / "checkpoints", 10, model, None, state)
    return checkpoint, export_checkpoint(checkpoint, tmp_path / "hf"), model
