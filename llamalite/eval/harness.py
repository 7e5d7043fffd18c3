"""Batched log-likelihood scoring and the metrics of lm-evaluation-harness.

Every (context, continuation) pair of every example becomes one row. Rows are sorted by length, right-padded
and scored many at a time, so the choices of many examples share a forward pass; right padding never changes
a causal model's logits at the positions that are read. Tokenization, left truncation to the model's context,
acc (argmax of summed log-likelihood), acc_norm (divided by the choice's length in characters), the standard
error of the mean, LAMBADA's accuracy (greedy continuation) and perplexity (exp of minus the mean
log-likelihood) follow lm-evaluation-harness 0.4 (`HFLM._encode_pair`, `_loglikelihood_tokens`,
`ConfigurableTask.process_results`).
"""

from __future__ import annotations

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

# The model, compiled or not: (tokens (B, T), output_positions=(B, K)) -> logits (B, K, V) at those positions.
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
    if context == "":
        continuation_ids = tokenizer.encode(continuation)
        if continuation_ids and continuation_ids[0] == tokenizer.bos_id:
            return continuation_ids[:1], continuation_ids[1:]
        return [tokenizer.bos_id], continuation_ids
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode_sequence(context + continuation)
    context_ids = tokenizer.encode_sequence(context)
    return context_ids, whole[len(context_ids):]


def example_requests(tokenizer: Tokenizer, examples: Sequence[Example]) -> list[tuple[list[int], list[int]]]:
    pairs = [(ctx, cont) for ex in examples for ctx, cont in zip(ex.contexts, ex.continuations)]
    return [encode_pair(tokenizer, ctx, cont) for ctx, cont in pairs]


# ------------------------------------------------------------------------------------------------ scoring
@dataclass(frozen=True)
class _Scored:
    """One request inside a row: the row positions whose logits predict its continuation, and the continuation."""

    index: int
    outputs: list[int]
    targets: list[int]


@dataclass(frozen=True)
class _Row:
    """One sequence of a forward pass: a context and the continuations scored against it.

    A single continuation is lm-evaluation-harness's row, (context + continuation)[-(max_length + 1):][:-1]. Several
    continuations of one context share it: the context once, then each continuation but its last token, each
    attending to the context and to itself only, at the positions it would have alone (`segments` says which piece
    each token belongs to: 0 the context, i the i-th continuation). Every log-likelihood is the one the request would
    get alone; the context is computed once instead of once per choice."""

    inputs: list[int]
    scored: list[_Scored]
    positions: list[int] | None = None  # None: 0, 1, ... (a single continuation)
    segments: list[int] | None = None  # None: causal over the whole row

    @property
    def shared(self) -> bool:
        return self.segments is not None


def _check_request(index: int, continuation: list[int], max_length: int) -> None:
    if not continuation:
        raise ValueError(f"request {index} has an empty continuation")
    if len(continuation) > max_length:
        raise EvalError(f"a continuation of {len(continuation)} tokens exceeds the model's context of {max_length}: "
                        "evaluate this task with a model of a longer context (model.max_seq_len)")


def _single_row(index: int, context: list[int], continuation: list[int], max_length: int) -> _Row:
    window = (context + continuation)[-(max_length + 1):]  # left truncation, as lm-evaluation-harness does
    inputs = window[:-1]
    end = len(inputs)
    return _Row(inputs, [_Scored(index, list(range(end - len(continuation), end)), continuation)])


def _shared_row(context: list[int], requests: list[tuple[int, list[int]]]) -> _Row:
    inputs, positions, segments = list(context), list(range(len(context))), [0] * len(context)
    scored = []
    for segment, (index, continuation) in enumerate(requests, start=1):
        start = len(inputs)
        piece = continuation[:-1]  # the last token is only ever predicted
        inputs += piece
        positions += range(len(context), len(context) + len(piece))
        segments += [segment] * len(piece)
        scored.append(_Scored(index, [len(context) - 1, *range(start, start + len(piece))], continuation))
    return _Row(inputs, scored, positions, segments)


def _rows(requests: Sequence[tuple[list[int], list[int]]], max_length: int, share_contexts: bool = True) -> list[_Row]:
    """The rows that score `requests`: requests with the same context share one row where it fits the model's
    context without truncation, else each gets its own."""
    by_context: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    for index, (context, continuation) in enumerate(requests):
        _check_request(index, continuation, max_length)
        by_context.setdefault(tuple(context), []).append((index, continuation))
    rows = []
    for context, group in by_context.items():
        shared_length = len(context) + sum(len(continuation) - 1 for _, continuation in group)
        if share_contexts and len(group) > 1 and shared_length <= max_length:
            rows.append(_shared_row(list(context), group))
        else:
            rows += [_single_row(index, list(context), continuation, max_length) for index, continuation in group]
    return rows


def _attention_mask(row: _Row, width: int) -> torch.Tensor:
    """(width, width) True where a query may attend a key: earlier tokens of the context and of its own piece;
    padding attends to itself only."""
    segments = torch.full((width,), -1, dtype=torch.long)
    segments[:len(row.inputs)] = torch.tensor(row.segments if row.segments is not None else [0] * len(row.inputs))
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same_piece = (segments[:, None] == segments[None, :]) | (segments[None, :] == 0)
    padding = segments < 0
    return (causal & same_piece & ~padding[:, None]) | torch.diag(padding)


def _batch_tensors(batch: list[_Row]) -> dict[str, torch.Tensor | None]:
    """Right-padded tokens (B, T); per row, the positions whose logits predict a continuation (B, K), the ids there
    and the request each belongs to (-1 past the row's last); RoPE positions and masks where a row is shared."""
    width = max(len(row.inputs) for row in batch)
    count = max(sum(len(s.targets) for s in row.scored) for row in batch)
    tokens = torch.zeros(len(batch), width, dtype=torch.long)
    outputs = torch.zeros(len(batch), count, dtype=torch.long)
    targets = torch.full((len(batch), count), -1, dtype=torch.long)
    owners = torch.full((len(batch), count), -1, dtype=torch.long)
    for i, row in enumerate(batch):
        tokens[i, :len(row.inputs)] = torch.tensor(row.inputs)
        flat_outputs = [p for s in row.scored for p in s.outputs]
        outputs[i, :len(flat_outputs)] = torch.tensor(flat_outputs)
        targets[i, :len(flat_outputs)] = torch.tensor([t for s in row.scored for t in s.targets])
        owners[i, :len(flat_outputs)] = torch.tensor([s.index for s in row.scored for _ in s.targets])
    tensors: dict[str, torch.Tensor | None] = {"tokens": tokens, "outputs": outputs, "targets": targets,
                                               "owners": owners, "positions": None, "attn_mask": None}
    if any(row.shared for row in batch):
        positions = torch.zeros(len(batch), width, dtype=torch.long)
        for i, row in enumerate(batch):
            positions[i, :len(row.inputs)] = torch.tensor(row.positions or range(len(row.inputs)))
        tensors["positions"] = positions
        tensors["attn_mask"] = torch.stack([_attention_mask(row, width) for row in batch]).unsqueeze(1)
    return tensors


def _shard_for_rank(rows: list[_Row]) -> list[_Row]:
    if dist.is_available() and dist.is_initialized():
        return rows[dist.get_rank()::dist.get_world_size()]
    return rows


def _gather_from_ranks(scores: dict[int, tuple[float, bool]]) -> dict[int, tuple[float, bool]]:
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
    share_contexts: bool = True,
) -> list[tuple[float, bool]]:
    """(sum of log-probabilities of the continuation, whether greedy decoding would produce it) per request.

    Requests with one context share a row (`share_contexts`); rows are sorted longest first and scored
    `batch_size` at a time; under torch.distributed each rank scores a share and all ranks receive every score.
    With `progress` (its label) and a terminal, a bar counts the requests (one per choice of each example) with an
    ETA.
    """
    rows = sorted(_rows(requests, max_length, share_contexts), key=lambda r: (-len(r.inputs), r.scored[0].index))
    mine = _shard_for_rank(rows)
    scores: dict[int, tuple[float, bool]] = {}
    show = progress is not None and sys.stderr.isatty()
    bar = tqdm(total=sum(len(row.scored) for row in mine), desc=progress, unit="req", disable=not show, leave=False,
               dynamic_ncols=True)
    for start in range(0, len(mine), batch_size):
        batch = mine[start:start + batch_size]
        scores.update(_score_batch(logits_fn, _batch_tensors(batch), device, autocast))
        bar.update(sum(len(row.scored) for row in batch))
    bar.close()
    scores = _gather_from_ranks(scores)
    return [scores[i] for i in range(len(requests))]


def _score_batch(logits_fn: LogitsFn, tensors: dict[str, torch.Tensor | None], device: torch.device,
                 autocast: Any) -> dict[int, tuple[float, bool]]:
    extra = {name: tensors[name].to(device) for name in ("positions", "attn_mask") if tensors[name] is not None}
    targets, owners = tensors["targets"].to(device), tensors["owners"]
    with autocast if autocast is not None else contextlib.nullcontext():
        logits = logits_fn(tensors["tokens"].to(device), output_positions=tensors["outputs"].to(device), **extra)
    log_probs = F.log_softmax(logits.float(), dim=-1)
    token_ll = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1).cpu()
    token_greedy = (log_probs.argmax(-1) == targets).cpu()
    scores = {}
    for row, row_owners in enumerate(owners.tolist()):  # each request's tokens are contiguous within its row
        start = 0
        for index, group in itertools.groupby(row_owners):
            end = start + len(list(group))
            if index >= 0:
                scores[index] = (float(token_ll[row, start:end].sum()), bool(token_greedy[row, start:end].all()))
            start = end
    return scores


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


def task_metrics(spec: TaskSpec, examples: Sequence[Example], scores: Sequence[tuple[float, bool]]) -> TaskResult:
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
