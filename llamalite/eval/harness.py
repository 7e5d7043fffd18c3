"""Batched log-likelihood scoring and the metrics of lm-evaluation-harness.

Every (context, continuation) pair of every example is scored as lm-evaluation-harness scores it alone, but
without computing anything twice: the pairs' token windows are sorted, and windows that start alike (the choices
of one example, examples with a common preamble) share one row in which each token is computed once, after its
prefix, at its own position, attending to its own prefix only (a tree in depth-first order); short windows fill
a row together. Rows are sorted by length, right-padded and scored many at a time, the logits computed once at
each position that is read. Tokenization, left truncation to the model's context,
acc (argmax of summed log-likelihood), acc_norm (divided by the choice's length in characters), the standard
error of the mean, LAMBADA's accuracy (greedy continuation) and perplexity (exp of minus the mean
log-likelihood) follow lm-evaluation-harness 0.4 (`HFLM._encode_pair`, `_loglikelihood_tokens`,
`ConfigurableTask.process_results`).
"""

from __future__ import annotations

import array
import contextlib
import itertools
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from llamalite.errors import EvalError
from llamalite.eval.tasks import LOGLIKELIHOOD, Example, TaskSpec
from llamalite.tokenizer import Tokenizer

# The model, compiled or not: (tokens (B, T), output_positions=(B, K)) -> logits (B, K, V) at those positions. A
# model with `output_logits` (a Llama) is asked for hidden states (head=False) instead, so that its output layer
# runs at the read positions alone, not at the padding of rows that read fewer.
LogitsFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class TaskResult:
    task: str
    n: int
    metrics: dict[str, float]  # acc, acc_stderr, acc_norm, acc_norm_stderr, perplexity
    chance: float  # the expected accuracy of guessing


# ------------------------------------------------------------------------------------------------ tokenization
def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, split as lm-evaluation-harness splits them.

    Trailing spaces of the context move to the continuation, the whole string is encoded once as the start of a
    sequence (with the tokenizer's BOS where it adds one, as `add_special_tokens` does there), and the continuation
    is what follows the context's own encoding; an empty context becomes the BOS token (lm-evaluation-harness's
    prefix_token_id: the end-of-text token for GPT-2-style tokenizers).
    """
    return encode_pairs(tokenizer, [(context, continuation)])[0]


def encode_pairs(tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """encode_pair of every pair, each distinct text encoded once, all in one batch."""
    moved = [_move_trailing_spaces(context, continuation) if context else (None, continuation)
             for context, continuation in pairs]
    texts = list(dict.fromkeys(text for context, continuation in moved if context is not None
                               for text in (context, context + continuation)))
    ids = dict(zip(texts, tokenizer.encode_sequences(texts)))
    encoded = []
    for context, continuation in moved:
        if context is None:
            encoded.append(_after_empty_context(tokenizer, continuation))
        else:
            context_ids = ids[context]
            encoded.append((context_ids, ids[context + continuation][len(context_ids):]))
    return encoded


def _move_trailing_spaces(context: str, continuation: str) -> tuple[str, str]:
    spaces = len(context) - len(context.rstrip())
    return (context[:-spaces], context[-spaces:] + continuation) if spaces else (context, continuation)


def _after_empty_context(tokenizer: Tokenizer, continuation: str) -> tuple[list[int], list[int]]:
    continuation_ids = tokenizer.encode(continuation)
    if continuation_ids and continuation_ids[0] == tokenizer.bos_id:
        return continuation_ids[:1], continuation_ids[1:]
    return [tokenizer.bos_id], continuation_ids


def example_requests(tokenizer: Tokenizer, examples: Sequence[Example]) -> list[tuple[list[int], list[int]]]:
    return encode_pairs(tokenizer, [(ctx, cont) for ex in examples for ctx, cont in zip(ex.contexts, ex.continuations)])


# ------------------------------------------------------------------------------------------------ rows
# The cost of a token in a batch padded to width W, relative to a token's linear layers, is 1 + W / ATTENTION_WIDTH:
# its attention grows with the width (measured on the tiny preset; the wider a model, the less attention weighs).
ATTENTION_WIDTH = 1000.0


@dataclass(frozen=True)
class _Scored:
    """One request inside a row: the row's output slots whose logits predict its continuation, and the continuation."""

    index: int
    slots: list[int]
    targets: list[int]


@dataclass(frozen=True)
class _Row:
    """One sequence of a forward pass: the windows of one or more requests as a forest of shared prefixes.

    A request's window is lm-evaluation-harness's row, (context + continuation)[-(max_length + 1):][:-1]. Windows
    that start alike share those tokens: each token is stored once, after its prefix (depth first), sits at its
    position in its own window and attends to its own prefix only, so its hidden state, and every log-likelihood,
    is the one it gets in a row of its own. A multiple-choice context is computed once instead of once per choice,
    choices that start alike share their first tokens, examples that start alike share those, and short windows
    fill a row instead of padding."""

    inputs: list[int]
    positions: list[int]  # each token's position in its own window
    ends: list[int]  # one past each token's subtree: queries ends[k] and later cannot see key k
    outputs: list[int]  # the row indices whose logits are read, each once
    scored: list[_Scored]

    @property
    def chain(self) -> bool:
        """One window: causal attention at positions 0, 1, ..."""
        return self.positions[-1] == len(self.inputs) - 1


class _RowBuilder:
    """Adds windows in sorted order, each after the tokens it shares with the window added before it."""

    def __init__(self) -> None:
        self.inputs: list[int] = []
        self.positions: list[int] = []
        self.ends: list[int] = []  # final once a token leaves the path; tokens on the path end with the row
        self.path: list[int] = []  # the row indices of the last window's tokens
        self.slots: dict[int, int] = {}  # row index -> output slot
        self.scored: list[_Scored] = []

    def add(self, index: int, window: list[int], continuation: list[int], shared: int) -> None:
        """Add request `index`, whose window begins with `shared` tokens of the window added last."""
        start = len(self.inputs)
        for node in self.path[shared:]:  # the subtrees this window branches away from are complete
            self.ends[node] = start
        self.inputs += window[shared:]
        self.positions += range(shared, len(window))
        self.ends += [0] * (len(window) - shared)
        self.path = self.path[:shared] + list(range(start, len(self.inputs)))
        predicting = self.path[len(window) - len(continuation):]
        self.scored.append(_Scored(index, [self.slots.setdefault(node, len(self.slots)) for node in predicting],
                                   continuation))

    def row(self) -> _Row:
        for node in self.path:
            self.ends[node] = len(self.inputs)
        return _Row(self.inputs, self.positions, self.ends, list(self.slots), self.scored)


def _check_request(index: int, continuation: list[int], max_length: int) -> None:
    if not continuation:
        raise ValueError(f"request {index} has an empty continuation")
    if len(continuation) > max_length:
        raise EvalError(f"a continuation of {len(continuation)} tokens exceeds the model's context of {max_length}: "
                        "evaluate this task with a model of a longer context (model.max_seq_len)")


def _windows(requests: Sequence[tuple[list[int], list[int]]], max_length: int) -> list[list[int]]:
    """Each request's model input: context + continuation but its last token, left-truncated to the context."""
    windows = []
    for index, (context, continuation) in enumerate(requests):
        _check_request(index, continuation, max_length)
        windows.append((context + continuation)[-(max_length + 1):][:-1])
    return windows


def _common_prefix(a: list[int], b: list[int]) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


def _row_ranges(lengths: list[int], shared: list[int], width: int) -> list[range]:
    """Runs of the sorted windows (their `lengths`; `shared[k]` tokens in common with window k - 1), one row each, of
    at most `width` tokens (a longer window has a row of its own): the fewest tokens in all, then the fewest rows,
    so a row ends where its windows share least."""
    new = [length - common for length, common in zip(lengths, shared)]
    best, start = [0.0] * (len(lengths) + 1), [0] * (len(lengths) + 1)
    for end in range(1, len(lengths) + 1):
        best[end], later = math.inf, 0  # later: the new tokens of windows first + 1 .. end - 1
        for first in range(end - 1, -1, -1):
            tokens = lengths[first] + later
            if tokens > width and first < end - 1:
                break
            cost = best[first] + tokens + 0.5  # half a token a row: of equal token counts, fewer rows
            if cost < best[end]:
                best[end], start[end] = cost, first
            later += new[first]
    ranges, end = [], len(lengths)
    while end > 0:
        ranges.append(range(start[end], end))
        end = start[end]
    return ranges[::-1]


def _forward_cost(row_lengths: list[int], batch_size: int) -> float:
    """The estimated cost, in tokens, of scoring rows longest first, `batch_size` at a time, each padded to the
    longest of its batch."""
    lengths = sorted(row_lengths, reverse=True)
    return sum(len(lengths[i:i + batch_size]) * lengths[i] * (1 + lengths[i] / ATTENTION_WIDTH)
               for i in range(0, len(lengths), batch_size))


def _row_widths(max_length: int) -> list[int]:
    """Row widths to try: 32, 48, 64, 96, ... up to the model's context."""
    widths = [width for power in range(5, 20) for width in (2 ** power, 3 * 2 ** (power - 1)) if width < max_length]
    return [*widths, max_length]


def _cheapest_plan(lengths: list[int], shared: list[int], max_length: int, batch_size: int) -> list[range]:
    """_row_ranges at the row width of the least _forward_cost, trying widths upwards until two in a row cost more
    than the best so far."""
    best: tuple[float, list[range]] = (math.inf, [])
    worse = 0
    for width in _row_widths(max_length):
        plan = _row_ranges(lengths, shared, width)
        cost = _forward_cost([lengths[run.start] + sum(lengths[k] - shared[k] for k in run[1:]) for run in plan],
                             batch_size)
        best, worse = ((cost, plan), 0) if cost < best[0] else (best, worse + 1)
        if worse == 2:
            break
    return best[1]


def _rows(requests: Sequence[tuple[list[int], list[int]]], max_length: int, batch_size: int = 1,
          share_prefixes: bool = True) -> list[_Row]:
    """The rows that score `requests`. With `share_prefixes`, the windows in sorted order are split into runs that
    share their common prefixes in one row each (`_row_ranges`), at the row width of the least estimated cost
    (`_forward_cost`); without, every window is a row of its own."""
    windows = _windows(requests, max_length)
    if share_prefixes:
        order = sorted(range(len(windows)), key=windows.__getitem__)
        shared = [0] + [_common_prefix(windows[a], windows[b]) for a, b in itertools.pairwise(order)]
        lengths = [len(windows[i]) for i in order]
        ranges = _cheapest_plan(lengths, shared, max_length, batch_size)
    else:
        order, shared = list(range(len(windows))), [0] * len(windows)
        ranges = [range(k, k + 1) for k in order]
    rows = []
    for run in ranges:
        builder = _RowBuilder()
        for k in run:
            builder.add(order[k], windows[order[k]], requests[order[k]][1], shared[k] if k > run.start else 0)
        rows.append(builder.row())
    return rows


def _sorted_rows(requests: Sequence[tuple[list[int], list[int]]], max_length: int, batch_size: int,
                 share_prefixes: bool) -> list[_Row]:
    """_rows, longest first (ties in request order): the order in which they are batched."""
    return sorted(_rows(requests, max_length, batch_size, share_prefixes),
                  key=lambda row: (-len(row.inputs), row.scored[0].index))


def forward_work(requests: Sequence[tuple[list[int], list[int]]], max_length: int, batch_size: int,
                 share_prefixes: bool = True) -> tuple[int, int]:
    """What scoring `requests` with a Llama computes: tokens through the transformer layers (padding included) and
    positions through the output layer."""
    rows = _sorted_rows(requests, max_length, batch_size, share_prefixes)
    batches = [rows[start:start + batch_size] for start in range(0, len(rows), batch_size)]
    return sum(len(batch) * len(batch[0].inputs) for batch in batches), sum(len(row.outputs) for row in rows)


def _batch_tensors(batch: list[_Row]) -> dict[str, torch.Tensor | None]:
    """Right-padded tokens (B, T) and the positions whose logits are read (B, K); RoPE positions and the additive
    attention mask (B, 1, T, T) unless every row is a single window (then causal attention does)."""
    width = max(len(row.inputs) for row in batch)
    tensors: dict[str, torch.Tensor | None] = {"tokens": _padded([row.inputs for row in batch], width, 0),
                                               "outputs": _padded([row.outputs for row in batch], None, 0),
                                               "positions": None, "attn_mask": None}
    if not all(row.chain for row in batch):
        tensors["positions"] = _padded([row.positions for row in batch], width, 0)
        query, key = torch.arange(width)[:, None], torch.arange(width)[None, :]
        ends = _padded([row.ends for row in batch], width, 0)  # a token's subtree ends after it: 0 is padding,
        ends = torch.where(ends > 0, ends, key + 1)  # which sees itself only
        tensors["attn_mask"] = additive_mask(((key <= query) & (query < ends[:, None, :])).unsqueeze(1))
    return tensors


def _padded(lists: list[list[int]], width: int | None, fill: int) -> torch.Tensor:
    """The lists as rows of one int64 tensor, right-padded with `fill` to `width` (None: the longest).

    Built in an array of machine integers: torch.tensor converts a nested list element by element, ten times
    slower."""
    width = width if width is not None else max(map(len, lists))
    flat = array.array("q")
    for values in lists:
        flat.extend(values)
        flat.extend(itertools.repeat(fill, width - len(values)))
    if not flat:  # no buffer to read: no rows, or rows of width 0
        return torch.full((len(lists), width), fill, dtype=torch.long)
    return torch.asarray(flat, dtype=torch.long, copy=True).view(len(lists), width)


def additive_mask(allowed: torch.Tensor) -> torch.Tensor:
    """A boolean attention mask as the float mask SDPA adds to the scores (0 where allowed, -inf elsewhere): the same
    attention, bit for bit, without the conversion SDPA would otherwise make in every layer."""
    return torch.where(allowed, 0.0, -math.inf)


def _shard_for_rank(rows: list[_Row]) -> list[_Row]:
    if dist.is_available() and dist.is_initialized():
        return rows[dist.get_rank()::dist.get_world_size()]
    return rows


def _gather_from_ranks(scores: dict[int, tuple[float, bool | None]]) -> dict[int, tuple[float, bool | None]]:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, scores)
        return {index: score for part in gathered for index, score in part.items()}
    return scores


@torch.inference_mode()
def score_requests(
    logits_fn: LogitsFn,
    requests: Sequence[tuple[list[int], list[int]]],
    max_length: int,
    batch_size: int,
    device: torch.device,
    autocast: Any = None,
    progress: str | None = None,
    share_prefixes: bool = True,
    greedy: bool = True,
) -> list[tuple[float, bool | None]]:
    """(sum of log-probabilities of the continuation, whether greedy decoding would produce it) per request; with
    greedy=False (a multiple-choice task reads the sums only) no argmax is taken and the second item is None.

    With `share_prefixes`, requests share the tokens their windows start with (see `_Row`); rows are sorted
    longest first and scored `batch_size` at a time; under torch.distributed each rank scores a share and all ranks
    receive every score. With `progress` (its label) and a terminal, a bar counts the requests (one per choice of
    each example) with an ETA.
    """
    mine = _shard_for_rank(_sorted_rows(requests, max_length, batch_size, share_prefixes))
    scores: dict[int, tuple[float, bool | None]] = {}
    show = progress is not None and sys.stderr.isatty()
    bar = tqdm(total=sum(len(row.scored) for row in mine), desc=progress, unit="req", disable=not show, leave=False,
               dynamic_ncols=True)
    for start in range(0, len(mine), batch_size):
        batch = mine[start:start + batch_size]
        scores.update(_score_batch(logits_fn, batch, device, autocast, greedy))
        bar.update(sum(len(row.scored) for row in batch))
    bar.close()
    scores = _gather_from_ranks(scores)
    return [scores[i] for i in range(len(requests))]


def _score_batch(logits_fn: LogitsFn, batch: list[_Row], device: torch.device, autocast: Any,
                 greedy: bool) -> dict[int, tuple[float, bool | None]]:
    tensors = {name: t.to(device) for name, t in _batch_tensors(batch).items() if t is not None}
    tokens, outputs = tensors.pop("tokens"), tensors.pop("outputs")
    read = (torch.arange(outputs.shape[1]) < torch.tensor([len(row.outputs) for row in batch])[:, None]).to(device)
    output_logits = getattr(logits_fn, "output_logits", None)
    autocast = autocast if autocast is not None else contextlib.nullcontext()
    with autocast:
        if output_logits is not None:
            read_rows = logits_fn(tokens, output_positions=outputs, head=False, **tensors)[read]
        else:
            read_rows = logits_fn(tokens, output_positions=outputs, **tensors)[read]
    scored, picks, targets = _picks_and_targets(batch)
    picks, targets = picks.to(device), targets.to(device)
    valid = targets >= 0
    target_logits, normalisers, greedy_ids = _read_logits(read_rows, output_logits, autocast, picks[valid],
                                                          targets[valid], greedy)
    token_log_probs = torch.zeros(picks.shape, device=device)
    token_log_probs[valid] = target_logits - normalisers[picks[valid]]
    token_ll = token_log_probs.sum(-1).tolist()
    if greedy_ids is None:
        return {s.index: (ll, None) for s, ll in zip(scored, token_ll)}
    matches = ((greedy_ids[picks] == targets) | ~valid).all(-1).tolist()
    return {s.index: (ll, match) for s, ll, match in zip(scored, token_ll, matches)}


def _picks_and_targets(batch: list[_Row]) -> tuple[list[_Scored], torch.Tensor, torch.Tensor]:
    """The batch's requests, and per request (padded with -1 targets) the read positions, counted over the batch's
    read positions row after row, that predict its continuation's tokens, and those tokens."""
    offsets = itertools.accumulate((len(row.outputs) for row in batch), initial=0)
    scored = [(offset, s) for offset, row in zip(offsets, batch) for s in row.scored]
    picks = _padded([[slot + offset for slot in s.slots] for offset, s in scored], None, 0)
    targets = _padded([s.targets for _, s in scored], None, -1)
    return [s for _, s in scored], picks, targets


# Read positions whose logits are made and read together: with a 4,096-id vocabulary a chunk (4 MB in fp32) is read
# back while still in cache; with GPT-2's, the output layer's weights (51 MB) are streamed once per 256 positions
# (HellaSwag, 300 examples, at 32, 256 and 1,024 positions and all at once: 256 was the fastest with the demo's
# vocabulary, 7% faster than all at once, and within 4% of all at once with GPT-2's).
LOGIT_CHUNK_POSITIONS = 256


def _read_logits(read_rows: torch.Tensor, output_logits: Callable | None, autocast: Any, picks: torch.Tensor,
                 targets: torch.Tensor, greedy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The logit of each (read position, target) pair of picks/targets, and at every read position the log-sum-exp
    and (with `greedy`) the greedy token, the logits made (from hidden states, by output_logits) and read a chunk at
    a time. log p = logit - logsumexp: no log-softmax is written."""
    positions = read_rows.shape[0]
    normalisers = torch.empty(positions, device=read_rows.device)
    greedy_ids = torch.empty(positions, dtype=torch.long, device=read_rows.device) if greedy else None
    target_logits = torch.empty(picks.shape, device=read_rows.device)
    order = picks.argsort()
    sorted_picks = picks[order]
    for start in range(0, positions, LOGIT_CHUNK_POSITIONS):
        end = min(start + LOGIT_CHUNK_POSITIONS, positions)
        if output_logits is not None:
            with autocast:
                logits = output_logits(read_rows[start:end])
        else:
            logits = read_rows[start:end]
        logits = logits.float()
        if greedy_ids is not None:
            greedy_ids[start:end] = logits.max(-1).indices  # argmax's first maximum, faster
        normalisers[start:end] = torch.logsumexp(logits, dim=-1)
        first, last = torch.searchsorted(sorted_picks, torch.tensor([start, end], device=picks.device)).tolist()
        chunk_pairs = order[first:last]
        target_logits[chunk_pairs] = logits[picks[chunk_pairs] - start, targets[chunk_pairs]]
    return target_logits, normalisers, greedy_ids


# ------------------------------------------------------------------------------------------------ metrics
def mean_stderr(values: Sequence[float]) -> float:
    """Sample standard deviation over sqrt(n), lm-evaluation-harness's stderr for means."""
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # the first of equal maxima, as numpy's argmax


def task_metrics(spec: TaskSpec, examples: Sequence[Example],
                 scores: Sequence[tuple[float, bool | None]]) -> TaskResult:
    """acc / acc_norm (with standard errors) or LAMBADA's acc / perplexity from per-request scores."""
    per_metric: dict[str, list[float]] = {name: [] for name in spec.metrics}
    position = 0
    for example in examples:
        example_scores = scores[position:position + len(example.continuations)]
        position += len(example.continuations)
        lls = [ll for ll, _ in example_scores]
        if spec.kind == LOGLIKELIHOOD:
            per_metric["acc"].append(float(example_scores[0][1]))
            per_metric["perplexity"].append(lls[0])
            continue
        per_metric["acc"].append(float(_argmax(lls) == example.gold))
        if "acc_norm" in per_metric:
            normalised = [ll / len(choice) for ll, choice in zip(lls, example.choices)]
            per_metric["acc_norm"].append(float(_argmax(normalised) == example.gold))
    metrics: dict[str, float] = {}
    for name, values in per_metric.items():
        if name == "perplexity":
            metrics[name] = math.exp(-sum(values) / len(values))
        else:
            metrics[name] = sum(values) / len(values)
            metrics[f"{name}_stderr"] = mean_stderr(values)
    chance = 0.0 if spec.kind == LOGLIKELIHOOD else sum(1 / len(e.choices) for e in examples) / len(examples)
    return TaskResult(spec.name, len(examples), metrics, chance)


# ------------------------------------------------------------------------------------------------ validation
@torch.inference_mode()
def validation_metrics(
    logits_fn: LogitsFn,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    byte_lengths: Sequence[int] | None,
    device: torch.device,
    autocast: Any = None,
) -> dict[str, float]:
    """Per-token loss, perplexity and bits per byte over fixed held-out batches.

    The loss is the mean over tokens of the batches (equal-sized batches, so it equals the mean of batch
    means); bits per byte divides the summed loss in bits by the UTF-8 bytes the target tokens spell, which
    makes runs with different tokenizers comparable.
    """
    total_nats, total_tokens, total_bytes = 0.0, 0, 0
    lengths = torch.tensor(byte_lengths, dtype=torch.long) if byte_lengths is not None else None
    for inputs, targets in batches:
        with autocast if autocast is not None else contextlib.nullcontext():
            logits = logits_fn(inputs.to(device))
        losses = F.cross_entropy(logits.float().flatten(0, 1), targets.to(device).flatten(), reduction="sum")
        counted = targets[targets != -100]  # SFT-style masked targets are not scored
        total_nats += float(losses)
        total_tokens += counted.numel()
        if lengths is not None:
            total_bytes += int(lengths[counted.clamp(max=len(lengths) - 1)].sum())
    loss = total_nats / total_tokens
    metrics = {"val/loss": loss, "val/perplexity": math.exp(min(loss, 700.0))}
    if total_bytes:
        metrics["val/bits_per_byte"] = total_nats / math.log(2) / total_bytes
    return metrics


def flat_metrics(results: dict[str, TaskResult]) -> dict[str, float]:
    """eval/<task>/<metric> names, as in metrics.jsonl and TensorBoard."""
    return {f"eval/{task}/{name}": value for task, result in results.items() for name, value in result.metrics.items()}
