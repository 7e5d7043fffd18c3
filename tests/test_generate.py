import dataclasses

import pytest
import torch

from llamalite.cli import main
from llamalite.errors import ConfigError
from llamalite.generate import (
    CachedDecoder,
    RecomputeDecoder,
    SamplingOptions,
    StaticDecoder,
    TextStream,
    filter_logits,
    generate,
    generate_ids,
    iter_generate,
    pick_tokens,
    sample,
    static_cache_length,
)
from llamalite.model.llama import Llama, ModelConfig
from llamalite.tokenizer import Tokenizer
from llamalite.train.trainer import Trainer
from tests.conftest import small_config, synthetic_documents

GREEDY = dict(temperature=0.0)


def model_config(vocab_size: int, **overrides) -> ModelConfig:
    base = ModelConfig(vocab_size=vocab_size, n_layer=2, d_model=32, n_head=4, n_kv_head=2, ffn_hidden=64,
                       max_seq_len=32)
    return dataclasses.replace(base, **overrides)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(synthetic_documents(10), vocab_size=300)


@pytest.fixture(scope="module")
def model(tokenizer) -> Llama:
    torch.manual_seed(0)
    return Llama(model_config(tokenizer.padded_vocab_size(64))).eval()


def random_prompts(lengths, vocab=97, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=generator).tolist() for n in lengths]


def logits_at_every_step(decoder, continuation: list[list[int]]) -> list[torch.Tensor]:
    """The decoder's logits after its prefill, then after feeding each column of `continuation`."""
    logits = [decoder.prefill()]
    for step in range(len(continuation[0])):
        logits.append(decoder.step(torch.tensor([c[step] for c in continuation])))
    return logits


# ---------------------------------------------------------------------------------------- cache == recompute
def ragged_batch() -> tuple[Llama, list[list[int]], list[list[int]]]:
    """A small model, three prompts of 3, 9 and 6 tokens (left-padded when batched) and 8 tokens to feed each."""
    torch.manual_seed(0)
    return Llama(model_config(97)).eval(), random_prompts([3, 9, 6]), random_prompts([8, 8, 8], seed=1)


@torch.no_grad()
def test_batched_cached_logits_equal_each_prompt_run_alone_at_every_step():
    """Left-padded rows of different lengths: every decode step's logits equal that row's full recompute."""
    model, prompts, continuation = ragged_batch()
    stepped = logits_at_every_step(CachedDecoder(model, prompts, new_positions=8), continuation)
    for step, logits in enumerate(stepped):
        for row, prompt in enumerate(prompts):
            alone = model(torch.tensor([prompt + continuation[row][:step]]))[0, -1]
            torch.testing.assert_close(logits[row], alone, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_batched_recompute_decoder_equals_each_prompt_run_alone():
    torch.manual_seed(0)
    model = Llama(model_config(97)).eval()
    prompts = random_prompts([2, 7])
    logits = RecomputeDecoder(model, prompts, window=32).prefill()
    for row, prompt in enumerate(prompts):
        torch.testing.assert_close(logits[row], model(torch.tensor([prompt]))[0, -1], rtol=1e-5, atol=1e-5)


def test_greedy_cached_equals_greedy_recompute_tokens():
    torch.manual_seed(0)
    model = Llama(model_config(97, max_seq_len=64)).eval()
    prompts = random_prompts([4, 11, 1])
    options = SamplingOptions(max_new_tokens=20, **GREEDY)
    cached = generate_ids(model, prompts, options, use_cache=True)
    recomputed = generate_ids(model, prompts, options, use_cache=False)
    assert [r.tokens for r in cached] == [r.tokens for r in recomputed]
    alone = [generate_ids(model, [p], options)[0].tokens for p in prompts]
    assert [r.tokens for r in cached] == alone
    assert all(len(r.tokens) == 20 and r.finish_reason == "length" for r in cached)


# ---------------------------------------------------------------------------------------- static, compiled decode
@torch.no_grad()
def test_static_cache_step_logits_equal_the_growing_cache_at_every_step():
    """The fixed-shape step (all slots, a mask hiding the unwritten ones) run eagerly: the same logits per step."""
    model, prompts, continuation = ragged_batch()
    static = StaticDecoder(model, prompts, new_positions=8, compile=False)
    assert static.cache.max_len == 32  # the model's context: the power-of-two bucket is capped by it
    static_logits = logits_at_every_step(static, continuation)
    growing_logits = logits_at_every_step(CachedDecoder(model, prompts, new_positions=8), continuation)
    torch.testing.assert_close(static_logits[0], growing_logits[0], rtol=0, atol=0)  # the same eager prefill
    for static_step, growing_step in zip(static_logits[1:], growing_logits[1:]):
        torch.testing.assert_close(static_step, growing_step, rtol=1e-5, atol=1e-5)


def test_static_cache_lengths_are_few_shapes():
    assert [static_cache_length(n, 1024) for n in (1, 200, 256, 257, 600, 1024)] == [256, 256, 256, 512, 1024, 1024]
    assert static_cache_length(300, 288) == 288


def test_a_static_cache_needs_positions_a_mask_and_its_slots():
    from llamalite.model.kv_cache import StaticKVCache

    model = Llama(model_config(97)).eval()
    tokens = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="needs explicit positions and an attn_mask"):
        model(tokens, cache=StaticKVCache(2, 1, 32))
    positions, mask = torch.tensor([[0, 1]]), torch.ones(1, 1, 2, 32, dtype=torch.bool)
    with pytest.raises(ValueError, match="set the static KV cache's write_at to the 2 slots to write"):
        model(tokens, positions=positions, attn_mask=mask, cache=StaticKVCache(2, 1, 32))


def test_compile_needs_the_kv_cache(model):
    with pytest.raises(ValueError, match="compile=True needs the KV cache"):
        generate_ids(model, [[1, 2]], SamplingOptions(max_new_tokens=2, **GREEDY), use_cache=False, compile=True)


def test_compiled_decoding_picks_the_eager_tokens_for_each_model():
    """torch.compile for real (fp32): greedy and seeded sampling give the eager tokens on a padded batch, and a
    second model of the same shapes gets its own tokens, not the first one's compiled weights."""
    prompts = random_prompts([4, 11, 1])
    greedy = SamplingOptions(max_new_tokens=20, **GREEDY)
    sampled = SamplingOptions(max_new_tokens=20, temperature=0.9, top_k=20)
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = Llama(model_config(97, max_seq_len=64)).eval()
        eager = [r.tokens for r in generate_ids(model, prompts, greedy)]
        assert [r.tokens for r in generate_ids(model, prompts, greedy, compile=True)] == eager
        seeded = [torch.Generator().manual_seed(5) for _ in range(2)]
        assert ([r.tokens for r in generate_ids(model, prompts, sampled, generator=seeded[0])]
                == [r.tokens for r in generate_ids(model, prompts, sampled, generator=seeded[1], compile=True)])


def test_a_failing_compile_warns_once_and_decodes_eagerly(monkeypatch):
    import llamalite.generate as generation

    def no_compiler(device_type):
        def fail(*args):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found\nmore details")
        return fail

    monkeypatch.setattr(generation, "compiled_step", no_compiler)
    torch.manual_seed(0)
    model = Llama(model_config(97, max_seq_len=64)).eval()
    prompts = random_prompts([4, 7])
    options = SamplingOptions(max_new_tokens=12, **GREEDY)
    with pytest.warns(UserWarning, match=r"compiling the decode step failed \(RuntimeError: InvalidCxxCompiler: "
                      r"no working C\+\+ compiler found\); decoding without compiling") as warned:
        fallback = generate_ids(model, prompts, options, compile=True)
    assert len([w for w in warned if "compiling" in str(w.message)]) == 1
    assert [r.tokens for r in fallback] == [r.tokens for r in generate_ids(model, prompts, options)]


# ---------------------------------------------------------------------------------------- sampling filters
def test_top_k_keeps_the_k_most_likely():
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3]]))
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[False, True, False, True]]


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]]))
    def kept(p):
        return torch.isfinite(filter_logits(logits, top_p=p)).tolist()[0]
    assert kept(0.4) == [False, True, False, False]
    assert kept(0.75) == [False, True, False, True]
    assert kept(0.85) == [False, True, True, True]
    assert kept(1.0) == [True, True, True, True]


def test_sampling_follows_the_filtered_distribution_and_is_seedable():
    logits = torch.log(torch.tensor([0.05, 0.5, 0.15, 0.3])).expand(4000, 4)
    draws = pick_tokens(logits, 1.0, top_p=0.75, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=4).float() / 4000
    assert counts[0] == counts[2] == 0
    assert abs(counts[1] - 0.5 / 0.8) < 0.03 and abs(counts[3] - 0.3 / 0.8) < 0.03
    again = pick_tokens(logits, 1.0, top_p=0.75, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    assert pick_tokens(logits[:1], 0.0).tolist() == [1]


def test_invalid_options_are_errors(model):
    for bad in (dict(top_p=0.0), dict(temperature=-1.0), dict(max_new_tokens=-1), dict(stop=("",))):
        with pytest.raises(ConfigError):
            generate_ids(model, [[1]], SamplingOptions(**bad))


# ---------------------------------------------------------------------------------------- stops and limits
def test_eos_stops_a_row_and_is_kept_in_its_tokens(model):
    prompts = random_prompts([5, 3])
    free = generate_ids(model, prompts, SamplingOptions(max_new_tokens=6, **GREEDY))
    eos = free[0].tokens[2]
    stopped = generate_ids(model, prompts, SamplingOptions(max_new_tokens=6, **GREEDY), eos_id=eos)
    first = free[0].tokens.index(eos)
    assert stopped[0].tokens == free[0].tokens[:first + 1] and stopped[0].finish_reason == "eos"
    if eos not in free[1].tokens:  # the other row runs on, unaffected
        assert stopped[1].tokens == free[1].tokens and stopped[1].finish_reason == "length"


def test_stop_string_cuts_the_text_and_streaming_never_shows_it(model, tokenizer):
    prompt = "the king and the queen"
    free = generate(model, tokenizer, [prompt], SamplingOptions(max_new_tokens=24, **GREEDY))[0]
    assert len(free.text) > 6
    stop = free.text[3:6]
    pieces = []
    result = generate(model, tokenizer, [prompt], SamplingOptions(max_new_tokens=24, stop=(stop,), **GREEDY),
                      on_text=lambda row, piece: pieces.append(piece))[0]
    cut = free.text.index(stop)
    assert result.finish_reason == "stop" and result.text == free.text[:cut]
    assert "".join(pieces) == result.text


def test_max_new_tokens_and_context_limit(model, tokenizer):
    prompt = random_prompts([10])[0]
    result = generate_ids(model, [prompt], SamplingOptions(max_new_tokens=5, **GREEDY))[0]
    assert len(result.tokens) == 5 and result.finish_reason == "length"
    # max_seq_len is 32: a 10-token prompt leaves room for 22 new tokens.
    result = generate_ids(model, [prompt], SamplingOptions(max_new_tokens=100, **GREEDY))[0]
    assert len(result.tokens) == 22 and result.finish_reason == "context"
    assert generate_ids(model, [prompt], SamplingOptions(max_new_tokens=0))[0].finish_reason == "length"


def test_a_prompt_longer_than_the_context_is_truncated_from_the_left_with_a_warning(model):
    prompt = random_prompts([40])[0]
    with pytest.warns(UserWarning, match="truncated from the left"):
        result = generate_ids(model, [prompt], SamplingOptions(max_new_tokens=4, **GREEDY))[0]
    assert result.prompt_tokens == prompt[-31:] and result.prompt_truncated == 9
    assert len(result.tokens) == 1 and result.finish_reason == "context"


def test_rows_of_a_batch_stop_independently(model):
    prompts = random_prompts([30, 4])
    results = generate_ids(model, prompts, SamplingOptions(max_new_tokens=10, **GREEDY))
    assert [len(r.tokens) for r in results] == [2, 10]
    assert [r.finish_reason for r in results] == ["context", "length"]


def old_sample(model, prompt, max_new_tokens):
    """The pre-cache implementation (greedy): recompute the last max_seq_len tokens at every step."""
    tokens = torch.tensor([prompt])
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(tokens[:, -model.config.max_seq_len:])[0, -1].argmax())
            new.append(token)
            tokens = torch.cat([tokens, torch.tensor([[token]])], dim=1)
    return new


def test_sample_keeps_its_sliding_window_semantics(model):
    """sample() generates past the context (the trainer relies on it) exactly as the recompute loop did."""
    for prompt in random_prompts([5, 32, 40]):
        assert sample(model, prompt, 40, temperature=0.0, top_k=None) == old_sample(model, prompt, 40)
    tokens = sample(model, [1, 2], 3, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert len(tokens) == 3


# ---------------------------------------------------------------------------------------- text streaming
def test_stream_decodes_multibyte_characters_whole(tokenizer):
    text = " café – naïve 日本 ok"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split())  # non-ASCII characters are split across byte tokens
    stream = TextStream(tokenizer, stop=())
    pieces = [stream.push(token)[0] for token in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_stream_holds_back_a_possible_stop_string_prefix(tokenizer):
    stream = TextStream(tokenizer, stop=("\nUser:",))
    shown = ""
    for token in tokenizer.encode("hi there\nUs"):
        piece, stopped = stream.push(token)
        shown += piece
        assert not stopped
    assert shown == "hi there"  # "\nUs" might start the stop string
    for token in tokenizer.encode("x"):
        shown += stream.push(token)[0]
    assert shown == "hi there\nUsx"  # it did not


def test_iter_generate_yields_pieces_then_the_result(model, tokenizer):
    events = list(iter_generate(model, tokenizer, ["the king", ""], SamplingOptions(max_new_tokens=8, **GREEDY)))
    done = {e.row: e.done for e in events if e.done is not None}
    assert set(done) == {0, 1}
    for row in (0, 1):
        assert "".join(e.text for e in events if e.row == row) == done[row].text
    assert done[1].prompt_tokens == [tokenizer.eos_id]  # an empty prompt starts at a document boundary


# ---------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def trained_run(corpus_dir, prepared_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("generate") / "run"
    Trainer(small_config(corpus_dir, prepared_dir, run_dir)).fit()
    return run_dir


def test_cli_generate_streams_one_prompt(trained_run, capsys):
    assert main(["generate", str(trained_run), "--prompt", "the king", "--greedy", "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    from llamalite.checkpoint.inference import load_for_inference

    loaded = load_for_inference(trained_run)
    expected = generate(loaded.model, loaded.tokenizer, ["the king"], SamplingOptions(max_new_tokens=6, **GREEDY))[0]
    assert out == "the king" + expected.text + "\n"
    assert f"finished by {expected.finish_reason}: {len(expected.tokens)} new tokens" in err


def test_cli_generate_batches_several_prompts_in_order(trained_run, capsys):
    args = ["generate", str(trained_run), "--prompt", "the king", "--prompt", "a", "--temperature", "0.9",
            "--top-p", "0.9", "--seed", "3", "--max-new-tokens", "5"]
    assert main(args) == 0
    first = capsys.readouterr()
    assert first.out.startswith("=== 1/2 ===\nthe king") and "=== 2/2 ===\na" in first.out
    assert main(args) == 0
    assert capsys.readouterr().out == first.out  # seeded


def test_cli_generate_reports_a_missing_checkpoint(tmp_path, capsys):
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_cli_generate_compiled_and_in_bf16(trained_run, capsys):
    args = ["generate", str(trained_run), "--prompt", "the king", "--greedy", "--max-new-tokens", "8", "--no-stream"]
    assert main(args) == 0
    eager = capsys.readouterr().out
    assert main(args + ["--compile"]) == 0
    compiled = capsys.readouterr()
    assert compiled.out == eager  # stdout is the text alone: the compile's log lines are on stderr
    assert "compiled the decode step in" in compiled.err
    assert main(args + ["--dtype", "bf16"]) == 0
    from llamalite.checkpoint.inference import load_for_inference

    loaded = load_for_inference(trained_run)
    in_bf16 = generate(loaded.model.to(torch.bfloat16), loaded.tokenizer, ["the king"],
                       SamplingOptions(max_new_tokens=8, **GREEDY))[0]
    assert capsys.readouterr().out == "the king" + in_bf16.text + "\n"
