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

    Trailing spaces of the context move to the continuation, the whole string is encoded once, and the
    continuation is what follows the context's own encoding; an empty context becomes the end-of-text token.
    """
    if context == "":
        continuation_ids = tokenizer.encode(continuation)
        if continuation_ids and continuation_ids[0] == tokenizer.eos_id:
            return continuation_ids[:1], continuation_ids[1:]
        return [tokenizer.eos_id], continuation_ids
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


def example_requests(tokenizer: Tokenizer, examples: Sequence[Example]) -> list[tuple[list[int], list[int]]]:
    pairs = [(ctx, cont) for ex in examples for ctx, cont in zip(ex.contexts, ex.continuations)]
    return [encode_pair(tokenizer, ctx, cont) for ctx, cont in pairs]


# ------------------------------------------------------------------------------------------------ scoring
@dataclass(frozen=True)
class _Row:
    index: int
    inputs: list[int]  # (context + continuation)[-(max_length + 1):][:-1]
    targets: list[int]  # the continuation's ids, predicted by the last len(targets) positions of inputs


def _rows(requests: Sequence[tuple[list[int], list[int]]], max_length: int) -> list[_Row]:
    rows = []
    for index, (context, continuation) in enumerate(requests):
        if not continuation:
            raise ValueError(f"request {index} has an empty continuation")
        if len(continuation) > max_length:
            raise EvalError(f"a continuation of {len(continuation)} tokens exceeds the model's context "
                            f"of {max_length}: "
                            "evaluate this task with a model of a longer context (model.max_seq_len)")
        window = (context + continuation)[-(max_length + 1):]  # left truncation, as lm-evaluation-harness does
        rows.append(_Row(index, window[:-1], continuation))
    return rows


def _batch_tensors(batch: list[_Row]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded tokens (B, T); per row, the positions whose logits predict the continuation (B, K) and the
    continuation's ids there (B, K), -1 past its end."""
    width = max(len(row.targets) for row in batch)
    tokens = torch.zeros(len(batch), len(batch[0].inputs), dtype=torch.long)
    positions = torch.zeros(len(batch), width, dtype=torch.long)
    targets = torch.full((len(batch), width), -1, dtype=torch.long)
    for i, row in enumerate(batch):
        end, count = len(row.inputs), len(row.targets)
        tokens[i, :end] = torch.tensor(row.inputs)
        positions[i, :count] = torch.arange(end - count, end)
        targets[i, :count] = torch.tensor(row.targets)
    return tokens, positions, targets


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
) -> list[tuple[float, bool]]:
    """(sum of log-probabilities of the continuation, whether greedy decoding would produce it) per request.

    Rows are sorted longest first and scored `batch_size` at a time; under torch.distributed each rank
    scores a share and all ranks receive every score. With `progress` (its label) and a terminal, a bar counts the
    requests (one per choice of each example) with an ETA.
    """
    rows = sorted(_rows(requests, max_length), key=lambda r: (-len(r.inputs), r.index))
    mine = _shard_for_rank(rows)
    batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    scores: dict[int, tuple[float, bool]] = {}
    show = progress is not None and sys.stderr.isatty()
    bar = tqdm(total=len(mine), desc=progress, unit="req", disable=not show, leave=False, dynamic_ncols=True)
    for batch in batches:
        tokens, positions, targets = (t.to(device) for t in _batch_tensors(batch))
        with autocast if autocast is not None else contextlib.nullcontext():
            logits = logits_fn(tokens, output_positions=positions)
        log_probs = F.log_softmax(logits.float(), dim=-1)
        scored = targets >= 0  # continuations shorter than the batch's longest are padded with -1
        token_ll = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(~scored, 0.0)
        token_greedy = (log_probs.argmax(-1) == targets) | ~scored
        for row, ll, greedy in zip(batch, token_ll.sum(-1).tolist(), token_greedy.all(-1).tolist()):
            scores[row.index] = (ll, greedy)
        bar.update(len(batch))
    bar.close()
    scores = _gather_from_ranks(scores)
    return [scores[i] for i in range(len(requests))]


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
