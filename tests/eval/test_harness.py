import math
import random

import pytest
import torch
import torch.nn.functional as F

from llamalite.config import EvalConfig
from llamalite.eval import harness
from llamalite.eval.harness import (
    _rows,
    encode_pair,
    encode_pairs,
    mean_stderr,
    score_requests,
    task_metrics,
    validation_metrics,
)
from llamalite.eval.suite import BenchmarkSuite
from llamalite.eval.tasks import TASKS, Example
from llamalite.model.llama import Llama, ModelConfig
from llamalite.tokenizer import Tokenizer
from tests.conftest import SHARED_DATA
from tests.eval.conftest import GPT2_DIR, random_gpt2_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tokenizer():
    words = "the cat sat on a mat and the dog ran to it".split()
    rng = random.Random(0)
    return Tokenizer.train([" ".join(rng.choice(words) for _ in range(50)) for _ in range(40)], vocab_size=300)


def small_model(max_seq_len: int = 24) -> Llama:
    torch.manual_seed(0)
    return Llama(ModelConfig(vocab_size=320, n_layer=2, d_model=32, n_head=4, n_kv_head=2, ffn_hidden=64,
                             max_seq_len=max_seq_len, init_std=0.3)).eval()


def test_trailing_spaces_move_to_the_continuation_and_the_split_comes_from_the_whole(tokenizer):
    context, continuation = encode_pair(tokenizer, "the cat ", "sat")
    assert context == tokenizer.encode("the cat") and context + continuation == tokenizer.encode("the cat sat")


def test_an_empty_context_is_the_end_of_text_token(tokenizer):
    context, continuation = encode_pair(tokenizer, "", " the dog")
    assert context == [tokenizer.eos_id] and continuation == tokenizer.encode(" the dog")


def test_a_bos_adding_tokenizer_starts_every_context_with_its_bos(tokenizer):
    from tokenizers import Tokenizer as HFTokenizer

    from tests.bos_models import add_bos_rule

    bos = Tokenizer.from_json_str(add_bos_rule(HFTokenizer.from_str(tokenizer.to_json_str()), "<s>").to_str())
    context, continuation = encode_pair(bos, "the cat", " sat")
    assert context == [bos.bos_id, *tokenizer.encode("the cat")] and continuation == tokenizer.encode(" sat")
    assert encode_pair(bos, "", " the dog") == ([bos.bos_id], tokenizer.encode(" the dog"))  # lm-eval's prefix


def naive_scores(model, requests, max_length):
    """One request at a time, full logits, no padding: the definition the batched scorer must equal."""
    out = []
    for context, continuation in requests:
        window = (context + continuation)[-(max_length + 1):]
        with torch.no_grad():
            log_probs = F.log_softmax(model(torch.tensor([window[:-1]]))[0].float(), dim=-1)
        tail = log_probs[-len(continuation):]
        targets = torch.tensor(continuation)
        out.append((float(tail.gather(-1, targets[:, None]).sum()), bool((tail.argmax(-1) == targets).all())))
    return out


def random_requests(count: int, seed: int = 0):
    rng = random.Random(seed)
    return [([rng.randrange(300) for _ in range(rng.randint(1, 30))],
             [rng.randrange(300) for _ in range(rng.randint(1, 6))])
            for _ in range(count)]


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_batched_scores_equal_one_at_a_time_with_left_truncation(batch_size):
    model, requests = small_model(), random_requests(40)  # contexts up to 30 tokens: many exceed the 24-token window
    expected = naive_scores(model, requests, 24)
    got = score_requests(model, requests, 24, batch_size, CPU)
    for (ll, greedy), (want_ll, want_greedy) in zip(got, expected):
        assert ll == pytest.approx(want_ll, abs=1e-4) and greedy == want_greedy


def multiple_choice_requests(count: int, seed: int = 0):
    """Examples of 2-4 choices sharing a context, as multiple-choice tasks give them, plus single requests."""
    rng = random.Random(seed)
    requests = []
    for _ in range(count):
        context = [rng.randrange(300) for _ in range(rng.randint(1, 20))]
        requests += [(context, [rng.randrange(300) for _ in range(rng.randint(1, 6))])
                     for _ in range(rng.randint(1, 4))]
    return requests


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_choices_sharing_a_context_score_as_if_alone(batch_size):
    model, requests = small_model(), multiple_choice_requests(30)  # some groups exceed 24 tokens: not shared
    expected = naive_scores(model, requests, 24)
    shared = score_requests(model, requests, 24, batch_size, CPU)
    for (ll, greedy), (want_ll, want_greedy) in zip(shared, expected):
        assert ll == pytest.approx(want_ll, abs=1e-4) and greedy == want_greedy
    unshared = score_requests(model, requests, 24, batch_size, CPU, share_prefixes=False)
    assert [g for _, g in unshared] == [g for _, g in shared]


def prefix_sharing_requests(count: int, seed: int = 0):
    """Requests whose windows start alike in every way tasks make them: choices that begin with the same tokens
    (PIQA), contexts that differ near the end before one continuation (Winogrande), a preamble common to many
    examples, the same window split at another point, and exact duplicates."""
    rng = random.Random(seed)
    preamble = [rng.randrange(300) for _ in range(5)]
    requests = []
    for _ in range(count):
        context = preamble[:rng.randint(0, 5)] + [rng.randrange(300) for _ in range(rng.randint(1, 12))]
        stem = [rng.randrange(300) for _ in range(rng.randint(0, 4))]
        requests += [(context, stem + [rng.randrange(300) for _ in range(rng.randint(1, 3))]) for _ in range(3)]
        ending = [rng.randrange(300) for _ in range(rng.randint(1, 4))]
        requests += [(context[:-1] + [rng.randrange(300)], ending), (context, ending)]
        whole = context + ending
        requests += [(whole[:len(context) + 1], whole[len(context) + 1:] or [5]), requests[-1]]
    return requests


@pytest.mark.parametrize("batch_size", [1, 6, 64])
def test_shared_prefixes_score_as_if_alone(batch_size):
    model, requests = small_model(), prefix_sharing_requests(25)  # some windows exceed 24 tokens: truncated
    expected = naive_scores(model, requests, 24)
    for (ll, greedy), (want_ll, want_greedy) in zip(score_requests(model, requests, 24, batch_size, CPU), expected):
        assert ll == pytest.approx(want_ll, abs=1e-4) and greedy == want_greedy
    # A plain function (no output_logits: logits at every padded output slot) scores the same.
    plain = score_requests(lambda tokens, **kwargs: model(tokens, **kwargs), requests, 24, batch_size, CPU)
    assert [ll for ll, _ in plain] == pytest.approx([ll for ll, _ in expected], abs=1e-4)
    assert [greedy for _, greedy in plain] == [greedy for _, greedy in expected]


def one_pair(tokenizer, context, continuation):
    """lm-evaluation-harness's split, one text at a time (HFLM._encode_pair with the prefix token rule)."""
    if context == "":
        ids = tokenizer.encode(continuation)
        return (ids[:1], ids[1:]) if ids and ids[0] == tokenizer.bos_id else ([tokenizer.bos_id], ids)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, context_ids = tokenizer.encode_sequence(context + continuation), tokenizer.encode_sequence(context)
    return context_ids, whole[len(context_ids):]


def test_encode_pairs_encodes_each_text_once_in_a_batch_with_the_same_ids(tokenizer):
    pairs = [("the cat ", "sat"), ("the cat ", "ran"), ("", " the dog"), ("  ", "mat"), ("the dog", " ran to it"),
             ("the dog", " ran to it"), ("a", "")]
    assert encode_pairs(tokenizer, pairs) == [one_pair(tokenizer, *pair) for pair in pairs]


def test_windows_that_start_alike_share_those_tokens_each_at_its_own_position():
    from llamalite.eval.harness import _batch_tensors

    requests = [([1, 2, 3], [7, 8]), ([1, 2, 3], [9]), ([1, 2, 3], [4, 5, 6]), ([1, 2, 5], [6])]
    (row,) = _rows(requests, max_length=24)
    # windows [1,2,3,7], [1,2,3], [1,2,3,4,5], [1,2,5]: a tree, depth first
    assert row.inputs == [1, 2, 3, 4, 5, 7, 5] and row.positions == [0, 1, 2, 3, 4, 3, 2]
    assert row.outputs == [2, 3, 4, 5, 6]  # every read position once, though three requests read position 2
    by_request = {s.index: ([row.outputs[slot] for slot in s.slots], s.targets) for s in row.scored}
    assert by_request == {0: ([2, 5], [7, 8]), 1: ([2], [9]), 2: ([2, 3, 4], [4, 5, 6]), 3: ([6], [6])}
    additive = _batch_tensors([row, _rows([([1], [2])], 24)[0]])["attn_mask"]
    assert set(additive.unique().tolist()) == {0.0, -math.inf}  # SDPA adds it to the scores
    mask = additive == 0
    assert mask[0, 0, 5].tolist() == [True, True, True, False, False, True, False]  # 7 sees 1 2 3, not 4 5
    assert mask[0, 0, 6].tolist() == [True, True] + [False] * 4 + [True]  # the last 5 sees 1 2 only
    assert mask[1, 0, 3].tolist() == [False] * 3 + [True] + [False] * 3  # padding sees itself only


def test_unrelated_short_windows_fill_a_row_and_long_ones_stay_apart():
    short = [([i, 1], [2]) for i in range(20)]  # 20 windows of 2 tokens, nothing in common but the first
    assert len(_rows(short, max_length=256, batch_size=4)) < 20
    long = [([i] * 200, [2]) for i in range(3)]
    assert len(_rows(long, max_length=256, batch_size=4)) == 3  # 400 tokens would not fit 256
    assert len(_rows(short, max_length=256, share_prefixes=False)) == 20


def test_forward_work_counts_padded_tokens_and_each_read_position_once():
    from llamalite.eval.harness import forward_work

    requests = [([1, 2, 3], [7, 8]), ([1, 2, 3], [9]), ([4, 5], [6])]  # windows [1,2,3,7], [1,2,3], [4,5]
    assert forward_work(requests, 24, batch_size=1, share_prefixes=False) == (4 + 3 + 2, 2 + 1 + 1)
    assert forward_work(requests, 24, batch_size=2, share_prefixes=False) == (2 * 4 + 2, 2 + 1 + 1)
    assert forward_work(requests, 24, batch_size=8) == (4 + 2, 2 + 1)  # one row: 1 2 3 7 | 4 5; position 2 read once


def test_logits_made_and_read_a_few_positions_at_a_time_score_the_same(monkeypatch):
    model, requests = small_model(), prefix_sharing_requests(10, seed=1)
    whole = score_requests(model, requests, 24, 64, CPU)
    plain_model = lambda tokens, **kwargs: model(tokens, **kwargs)  # noqa: E731 (no output_logits)
    monkeypatch.setattr(harness, "LOGIT_CHUNK_POSITIONS", 3)
    for scorer in (model, plain_model):
        chunked = score_requests(scorer, requests, 24, 64, CPU)
        assert [ll for ll, _ in chunked] == pytest.approx([ll for ll, _ in whole], abs=1e-5)
        assert [greedy for _, greedy in chunked] == [greedy for _, greedy in whole]


def greedy_request(model: Llama) -> tuple[list[int], list[int]]:
    """A request whose continuation is the model's argmax after its context."""
    context = [5, 9, 17]
    with torch.no_grad():
        return context, [int(model(torch.tensor([context]))[0, -1].argmax())]


def test_greedy_is_true_when_the_continuation_is_the_argmax():
    model = small_model()
    context, [best] = greedy_request(model)
    (_, greedy), (_, other) = score_requests(model, [(context, [best]), (context, [(best + 1) % 300])], 24, 8, CPU)
    assert greedy and not other


def test_scoring_works_on_a_compiled_model():
    model, requests = small_model(), random_requests(12, seed=3)
    compiled = torch.compile(model, dynamic=True)
    plain = score_requests(model, requests, 24, 4, CPU)
    got = score_requests(compiled, requests, 24, 4, CPU)
    assert [g for _, g in got] == [g for _, g in plain]
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in plain], abs=1e-4)


def test_acc_norm_divides_by_characters_and_can_disagree_with_acc():
    spec = TASKS["piqa"]
    example = Example(("q",) * 2, (" ab", " abcdefgh"), 1, ("ab", "abcdefgh"))
    result = task_metrics(spec, [example], [(-3.0, False), (-4.0, False)])  # per char: -1.5 vs -0.5
    assert result.metrics["acc"] == 0.0 and result.metrics["acc_norm"] == 1.0 and result.chance == 0.5


def test_stderr_is_the_sample_standard_error_and_lambada_reports_perplexity():
    assert mean_stderr([1.0, 0.0, 1.0, 0.0]) == pytest.approx(math.sqrt(1 / 3) / 2)
    spec = TASKS["lambada_openai"]
    examples = [Example(("a",), (" b",), 0, (" b",))] * 2
    result = task_metrics(spec, examples, [(-1.0, True), (-3.0, False)])
    assert result.metrics["acc"] == 0.5 and result.metrics["perplexity"] == pytest.approx(math.exp(2.0))


def test_validation_metrics_loss_perplexity_and_bits_per_byte(tokenizer):
    model = small_model()
    tokens = torch.tensor([tokenizer.encode(" the cat sat on a mat and the dog ran to it the cat")[:17]] * 2)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    metrics = validation_metrics(model, [(inputs, targets)], tokenizer.token_byte_lengths(), CPU)
    with torch.no_grad():
        loss = float(F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten()))
    text_bytes = 2 * len(tokenizer.decode(targets[0].tolist()).encode("utf-8"))
    assert metrics["val/loss"] == pytest.approx(loss, rel=1e-5)
    assert metrics["val/perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert metrics["val/bits_per_byte"] == pytest.approx(loss * targets.numel() / math.log(2) / text_bytes, rel=1e-5)


@pytest.mark.skipif(not (SHARED_DATA / "eval").is_dir(), reason="../shared/data not present")
def test_a_random_model_scores_near_chance_on_every_task():
    model = random_gpt2_model()
    suite = BenchmarkSuite(EvalConfig(tasks=list(TASKS), data_dir=str(SHARED_DATA / "eval"), limit=150),
                           Tokenizer.load(GPT2_DIR))
    results = suite.run(model, model.config.max_seq_len, CPU)
    for name, result in results.items():
        # BoolQ's answers are 62% "yes": a model that always prefers one answer lands 0.12 from 0.5.
        assert abs(result.metrics["acc"] - result.chance) < 0.15, (name, result.metrics, result.chance)
    assert results["lambada_openai"].metrics["perplexity"] > 1000


def _score_on_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, rows_scored = small_model(), []

        def counting_model(tokens, **kwargs):
            rows_scored.append(tokens.shape[0])
            return model(tokens, **kwargs)

        scores = score_requests(counting_model, random_requests(30, seed=7), 24, 4, CPU)
        torch.save((scores, sum(rows_scored)), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ranks_score_shares_and_all_receive_every_score(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_score_on_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    expected = score_requests(small_model(), random_requests(30, seed=7), 24, 4, CPU)
    rows = len(_rows(random_requests(30, seed=7), 24, 4))
    for rank in range(2):
        got, scored = torch.load(tmp_path / f"rank{rank}.pt")
        assert scored == (rows + 1 - rank) // 2  # its share of the rows only
        assert [g for _, g in got] == [g for _, g in expected]
        assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in expected], abs=1e-4)


def test_without_greedy_the_sums_are_the_same_and_no_argmax_is_read():
    model = small_model()
    requests = [greedy_request(model), *random_requests(30, seed=3)]
    with_greedy = score_requests(model, requests, 24, 4, CPU)
    without = score_requests(model, requests, 24, 4, CPU, greedy=False)
    assert [ll for ll, _ in without] == [ll for ll, _ in with_greedy]
    assert {match for _, match in without} == {None} and {match for _, match in with_greedy} == {True, False}


def test_padded_rows_fill_to_the_width_and_an_empty_batch_has_no_buffer_to_read():
    assert harness._padded([[1, 2], [3]], None, -1).tolist() == [[1, 2], [3, -1]]
    assert harness._padded([[1, 2], [3]], 4, 0).tolist() == [[1, 2, 0, 0], [3, 0, 0, 0]]
    assert harness._padded([[], []], None, 7).shape == (2, 0)
