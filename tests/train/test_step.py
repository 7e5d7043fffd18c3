import pytest
import torch

from llamalite.model.llama import Llama, ModelConfig
from llamalite.train.step import LanguageModelLoss, chunked_lm_loss, lm_loss


def tiny_model() -> Llama:
    torch.manual_seed(0)
    return Llama(ModelConfig(vocab_size=97, n_layer=2, d_model=32, n_head=4, n_kv_head=2, ffn_hidden=64,
                             max_seq_len=16))


@pytest.mark.parametrize("chunk_tokens", [1, 7, 24, 1000])
def test_chunked_cross_entropy_equals_the_whole_batch_loss_and_gradients(chunk_tokens):
    model = tiny_model()
    tokens = torch.randint(0, 97, (3, 8), generator=torch.Generator().manual_seed(1))
    targets = tokens.roll(-1, dims=1)
    targets[0, :3] = -100  # ignored positions must not count in the mean

    whole = lm_loss(model(tokens), targets)
    whole.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    chunked = LanguageModelLoss(model, chunk_tokens)(tokens, targets)
    chunked.backward()
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_chunks_never_hold_the_logits_of_the_whole_batch():
    vocab, tokens, chunk = 5000, 256, 32
    hidden = torch.randn(1, tokens, 16, requires_grad=True)
    weight = torch.randn(vocab, 16, requires_grad=True)
    targets = torch.randint(0, vocab, (1, tokens))
    saved = {}  # storage -> elements kept for backward

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes() // tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = chunked_lm_loss(hidden, weight, targets, chunk)
    assert sum(saved.values()) < tokens * vocab / 4  # logits are recomputed in backward, not kept
    loss.backward()
    assert hidden.grad.shape == hidden.shape


def test_without_chunks_the_loss_module_is_the_plain_loss():
    model = tiny_model()
    tokens = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(2))
    targets = tokens.roll(-1, dims=1)
    assert torch.equal(LanguageModelLoss(model)(tokens, targets), lm_loss(model(tokens), targets))
