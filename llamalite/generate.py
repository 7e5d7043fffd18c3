"""Sampling continuations from a model: prefill once, then decode one token at a time with a KV cache.

- Sampling: greedy (temperature 0), temperature, top-k, top-p (nucleus); a seedable torch.Generator.
- Stops, per row: the end-of-text token ("eos"), a stop string in the decoded text ("stop"; the stop
  string and what follows are cut from the text), `max_new_tokens` ("length"), and the model's
  context ("context": prompt + new tokens never exceed model.config.max_seq_len).
- A prompt that leaves no room for a new token (max_seq_len or more tokens) is truncated from the left
  to max_seq_len - 1 tokens with a warning; `Generation.prompt_truncated` says how many were dropped.
- Batches: prompts of different lengths are left-padded; each row gets its own RoPE positions and a
  mask that hides the padding, so every row decodes as if it ran alone, and stops on its own.
- Streaming: `iter_generate` yields text pieces as they are decoded. A piece never ends inside a
  multi-byte UTF-8 character, and text that could be the start of a stop string is held back until
  it is known not to be one.
- `use_cache=False` recomputes the whole sequence at every step (the baseline of
  benchmarks/generate_throughput.py); `compile=True` runs every step after the prefill as one compiled graph of
  fixed shapes over a StaticKVCache (StaticDecoder), falling back to the same step run eagerly if compiling fails.

Model code stays free of all this: it only takes positions, a mask and a cache (llamalite/model/llama.py).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from llamalite.errors import CheckpointError, ConfigError
from llamalite.model.kv_cache import KVCache, StaticKVCache
from llamalite.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

FINISH_REASONS = ("eos", "stop", "length", "context")


@dataclass
class SamplingOptions:
    max_new_tokens: int = 128
    temperature: float = 0.8  # 0: greedy (argmax)
    top_k: int | None = None  # keep the k most likely tokens; None or 0: all
    top_p: float | None = None  # keep the smallest set of tokens whose probability reaches p; None or 1: all
    stop: Sequence[str] = ()  # stop strings, checked on the decoded text of the new tokens

    def validate(self) -> None:
        """Comparisons written so that NaN fails them; a non-integer count is refused, not truncated."""
        if not _is_count(self.max_new_tokens):
            raise ConfigError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature < math.inf:
            raise ConfigError(f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature!r}")
        if self.top_k is not None and not _is_count(self.top_k):
            raise ConfigError(f"top_k must be an integer >= 0 (0 keeps every token), got {self.top_k!r}")
        if self.top_p is not None and (not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1):
            raise ConfigError(f"top_p must be in (0, 1], e.g. 0.9, got {self.top_p!r}")
        if any(not s for s in self.stop):
            raise ConfigError("stop strings must not be empty")


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass
class Generation:
    """One row's result. tokens: every sampled id (the EOS included when finish_reason is "eos");
    text: their decoded text without the EOS, cut before the stop string when finish_reason is "stop"."""

    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # eos | stop | length | context
    prompt_truncated: int = 0  # tokens dropped from the left of the prompt to fit the context


@dataclass
class Piece:
    """A streamed event: `text` newly decoded for row `row`; `done` is set with the row's final result."""

    row: int
    text: str
    done: Generation | None = None


# ------------------------------------------------------------------------------------------------- sampling
def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus; logits are (..., vocab)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = mass_before >= top_p  # the tokens before already reach p; the first token is always kept
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


NON_FINITE_LOGITS = ("the model produced NaN or infinite logits (non-finite weights, or values that overflow in "
                     "bf16): use fp32 weights (generate and chat: --dtype fp32) or an earlier checkpoint")


def pick_tokens(
    logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row of logits (B, vocab): argmax when temperature is 0, else sampled."""
    if temperature <= 0:
        # max's indices are argmax's (the first maximum), at a quarter of argmax's time on a CPU in bf16
        return logits.max(dim=-1).indices
    probs = torch.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)
    if not bool(torch.isfinite(probs).all()):  # NaN or +inf logits: torch.multinomial would raise a RuntimeError
        raise CheckpointError(NON_FINITE_LOGITS)
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ------------------------------------------------------------------------------------------------- decoders
def last_position(tokens: torch.Tensor) -> torch.Tensor:
    """output_positions selecting each row's last position: only its logits are computed."""
    return torch.full((tokens.shape[0], 1), tokens.shape[1] - 1, device=tokens.device)


class CachedDecoder:
    """Prefill the left-padded prompts into a KV cache, then feed one token per row per step."""

    def __init__(self, model: nn.Module, prompts: list[list[int]], new_positions: int):
        self.model = model
        device = next(model.parameters()).device
        longest = max(len(p) for p in prompts)
        self.pad = torch.tensor([longest - len(p) for p in prompts], device=device)
        self.padded = bool(self.pad.any())
        self.cache = KVCache(model.config.n_layer, len(prompts), longest + new_positions)
        tokens = torch.tensor([[0] * (longest - len(p)) + p for p in prompts], device=device)
        slots = torch.arange(self.cache.max_len, device=device)
        self.key_valid = slots[None, :] >= self.pad[:, None]  # (B, max_len): False on the left padding
        self.prompt_tokens = tokens

    def prefill(self) -> torch.Tensor:
        tokens = self.prompt_tokens
        if not self.padded:
            return self.model(tokens, cache=self.cache, output_positions=last_position(tokens))[:, -1]
        seq = tokens.shape[1]
        slots = torch.arange(seq, device=tokens.device)
        positions = (slots[None, :] - self.pad[:, None]).clamp(min=0)
        causal = slots[None, :] <= slots[:, None]
        # A padding query attends to itself only, so no row of the mask is empty.
        mask = (causal & self.key_valid[:, None, :seq]) | torch.eye(seq, dtype=torch.bool, device=tokens.device)
        return self.model(tokens, positions=positions, attn_mask=mask[:, None], cache=self.cache,
                          output_positions=last_position(tokens))[:, -1]

    def step(self, next_tokens: torch.Tensor) -> torch.Tensor:
        if not self.padded:
            return self.model(next_tokens[:, None], cache=self.cache)[:, -1]
        length = self.cache.length
        # A finished row keeps being fed a filler; its position is clamped so it never leaves the RoPE table.
        positions = (length - self.pad).clamp(max=self.model.config.max_seq_len - 1)[:, None]
        mask = self.key_valid[:, None, None, :length + 1]
        return self.model(next_tokens[:, None], positions=positions, attn_mask=mask, cache=self.cache)[:, -1]


def static_cache_length(needed: int, max_seq_len: int) -> int:
    """Slots of a static cache: the next power of two (at least 256) that holds `needed`, at most max_seq_len, so
    that prompts of many lengths share a few compiled shapes."""
    return min(max_seq_len, max(256, 1 << (needed - 1).bit_length()))


def static_step(model: nn.Module, cache: StaticKVCache, key_valid: torch.Tensor, pad: torch.Tensor,
                tokens: torch.Tensor) -> torch.Tensor:
    """Logits (B, vocab) after feeding `tokens` (B,) at slot cache.write_at, every shape fixed: the compiled step.

    In fp32, attention runs as plain math (SDPA's MATH backend), which the compiler fuses into its own loops; for
    one query over a few hundred keys that is faster than the flash kernel (tiny: 8%). In bf16 those loops convert
    every cached key and value to fp32, and the flash kernel, where it runs (CPU), is faster (124m: 8%).
    """
    slot = cache.write_at
    positions = (slot - pad).clamp(max=model.config.max_seq_len - 1)[:, None]
    slots = torch.arange(cache.max_len, device=tokens.device)
    mask = (key_valid & (slots <= slot))[:, None, None, :]
    backends = [SDPBackend.MATH] if cache.keys[0].dtype == torch.float32 else [SDPBackend.FLASH_ATTENTION,
                                                                                SDPBackend.MATH]
    with sdpa_kernel(backends):
        return model(tokens[:, None], positions=positions, attn_mask=mask, cache=cache)[:, -1]


# The autotuner's timing tables stay quiet: the first compile is announced, with its cost, by StaticDecoder.
CPU_INDUCTOR_SETTINGS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
                         "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}
_COMPILED_STEPS: dict[str, Callable] = {}
_COMPILED_SHAPES: set[tuple] = set()  # the shapes already compiled in this process, to announce a first compile


def compiled_step(device_type: str) -> Callable:
    """static_step through torch.compile, one wrapper per device type (torch keeps a graph per shape and model).

    CPU: inductor with `freezing`, which folds the weights into the graph as constants and prepacks them (a second
    copy of the weights in memory), and `max_autotune` for its C++ GEMM template: each matrix product is timed as
    a generated AMX/AVX-512 micro-kernel against oneDNN's and the faster kept (the generated one reads bf16 weights
    1.3-2x faster on a Sapphire Rapids CPU, fp32 up to 1.3x). The inductor settings are read from its global config
    when a graph compiles, so each call sets them for its own duration.
    CUDA: mode="reduce-overhead", which can replay the step as a CUDA graph (never run here: no GPU so far).
    """
    if device_type not in _COMPILED_STEPS:
        if device_type == "cuda":
            _COMPILED_STEPS[device_type] = torch.compile(static_step, fullgraph=True, dynamic=False,
                                                         mode="reduce-overhead")
        else:
            from torch._inductor import config as inductor_config

            compiled = torch.compile(static_step, fullgraph=True, dynamic=False)

            def frozen_step(*args: torch.Tensor) -> torch.Tensor:
                with inductor_config.patch(CPU_INDUCTOR_SETTINGS):
                    return compiled(*args)

            _COMPILED_STEPS[device_type] = frozen_step
    return _COMPILED_STEPS[device_type]


class StaticDecoder:
    """CachedDecoder's results from a compiled step of fixed shapes (a StaticKVCache).

    The prefill runs eagerly exactly as CachedDecoder's (into a growing cache, then copied into the static one), so
    the first token is the same. Every later step runs one compiled graph per (batch, cache slots, dtype, device);
    the first step of a new shape compiles it (logged with its cost). When compiling fails (no C++ compiler, an
    unsupported backend), a warning says why and the same static step runs eagerly.
    """

    def __init__(self, model: nn.Module, prompts: list[list[int]], new_positions: int, compile: bool = True):
        self.model = model
        self.prefiller = CachedDecoder(model, prompts, 0)
        longest = self.prefiller.prompt_tokens.shape[1]
        self.cache = StaticKVCache(model.config.n_layer, len(prompts),
                                   static_cache_length(longest + new_positions, model.config.max_seq_len))
        self.pad = self.prefiller.pad
        slots = torch.arange(self.cache.max_len, device=self.pad.device)
        self.key_valid = slots[None, :] >= self.pad[:, None]
        self.step_fn: Callable = compiled_step(self.pad.device.type) if compile else static_step

    def prefill(self) -> torch.Tensor:
        logits = self.prefiller.prefill()
        prompt_len = self.prefiller.cache.length
        self.cache.write_at = torch.arange(prompt_len, device=logits.device)
        for layer in range(self.model.config.n_layer):
            self.cache.update(layer, self.prefiller.cache.keys[layer][:, :, :prompt_len],
                              self.prefiller.cache.values[layer][:, :, :prompt_len])
        self.prefiller = None  # its cache is copied
        self.cache.write_at = torch.tensor([prompt_len], device=logits.device)
        return logits

    def step(self, next_tokens: torch.Tensor) -> torch.Tensor:
        if self.step_fn is not static_step and self._shape() not in _COMPILED_SHAPES:
            logits = self._first_compiled_step(next_tokens)
        else:
            logits = self.step_fn(self.model, self.cache, self.key_valid, self.pad, next_tokens)
        self.cache.write_at += 1
        return logits

    def _shape(self) -> tuple:
        return (id(self.model), self.cache.batch_size, self.cache.max_len, self.cache.keys[0].dtype, self.pad.device)

    def _first_compiled_step(self, next_tokens: torch.Tensor) -> torch.Tensor:
        logger.info("compiling the decode step for batch %d, %d cache slots (once per process and shape)...",
                    self.cache.batch_size, self.cache.max_len)
        started = time.perf_counter()
        try:
            with warnings.catch_warnings():
                # inductor's autotuner reads a storage size through the deprecated TypedStorage: not the user's concern
                warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
                logits = self.step_fn(self.model, self.cache, self.key_valid, self.pad, next_tokens)
        except Exception as exc:
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                raise
            # Any compiler failure leaves the eager step, which computes the same thing.
            first_line = next(iter(str(exc).splitlines()), "")
            warnings.warn(f"compiling the decode step failed ({type(exc).__name__}: {first_line}); "
                          "decoding without compiling", stacklevel=2)
            self.step_fn = static_step
            return static_step(self.model, self.cache, self.key_valid, self.pad, next_tokens)
        _COMPILED_SHAPES.add(self._shape())
        logger.info("compiled the decode step in %.1f s", time.perf_counter() - started)
        return logits


class RecomputeDecoder:
    """No cache: run the whole sequence (its last `window` tokens) through the model at every step."""

    def __init__(self, model: nn.Module, sequences: list[list[int]], window: int):
        self.model = model
        self.device = next(model.parameters()).device
        self.sequences = [list(s) for s in sequences]
        self.window = window

    def prefill(self) -> torch.Tensor:
        return self._last_logits()

    def step(self, next_tokens: torch.Tensor) -> torch.Tensor:
        for sequence, token in zip(self.sequences, next_tokens.tolist()):
            sequence.append(token)
        return self._last_logits()

    def _last_logits(self) -> torch.Tensor:
        rows = [s[-self.window:] for s in self.sequences]
        longest = max(len(r) for r in rows)
        if all(len(r) == longest for r in rows):
            tokens = torch.tensor(rows, device=self.device)
            return self.model(tokens, output_positions=last_position(tokens))[:, -1]
        pad = torch.tensor([longest - len(r) for r in rows], device=self.device)
        tokens = torch.tensor([[0] * (longest - len(r)) + r for r in rows], device=self.device)
        slots = torch.arange(longest, device=self.device)
        positions = (slots[None, :] - pad[:, None]).clamp(min=0)
        mask = ((slots[None, :] <= slots[:, None]) & (slots[None, None, :] >= pad[:, None, None])) | torch.eye(
            longest, dtype=torch.bool, device=self.device)
        return self.model(tokens, positions=positions, attn_mask=mask[:, None],
                          output_positions=last_position(tokens))[:, -1]


# ------------------------------------------------------------------------------------------------- text
class TextStream:
    """Incremental detokenization of one row with stop strings.

    Decodes all new tokens at each step (byte-level BPE: a prefix of the ids decodes to a prefix of the
    text, except an unfinished UTF-8 character, shown as U+FFFD, which is held back).
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]):
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of self.text already handed out

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; return (text ready to show, whether a stop string was found)."""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids)
        cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            return self._emit(len(self.text)), True
        ready = len(self.text.rstrip("\ufffd"))
        ready -= self._possible_stop_prefix(self.text[:ready])
        return self._emit(ready), False

    def flush(self) -> str:
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        piece = self.text[self.emitted:upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return piece

    def _possible_stop_prefix(self, text: str) -> int:
        """Length of the longest end of `text` that a stop string starts with."""
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest


# ------------------------------------------------------------------------------------------------- driver
def fit_prompt(prompt: list[int], max_seq_len: int, slide: bool) -> tuple[list[int], int]:
    """The prompt cut from the left to what the context allows, and how many tokens were dropped."""
    room = max_seq_len if slide else max_seq_len - 1  # stop mode keeps a slot for at least one new token
    if len(prompt) <= room:
        return prompt, 0
    return prompt[-room:], len(prompt) - room


def iter_generate_ids(
    model: nn.Module,
    prompts: list[list[int]],
    options: SamplingOptions,
    *,
    eos_id: int | None = None,
    tokenizer: Tokenizer | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    slide: bool = False,
    compile: bool = False,
) -> Iterator[Piece]:
    """Generate continuations of token prompts; yields Pieces (text only when a tokenizer is given).

    compile=True decodes with a compiled step of fixed shapes (StaticDecoder): faster per step, after a first-call
    compile of seconds to a minute per shape. In fp32 it picks the eager path's tokens (tested); in bf16 other
    kernels round differently and can tip a near tie. On the CPU the compiled graph holds the weights as constants:
    a model whose weights then change in place needs torch._dynamo.reset() before compiling again.

    slide=False: a row stops with "context" when prompt + new tokens reach max_seq_len.
    slide=True: the model keeps seeing the last max_seq_len tokens (recomputed without a cache once
    the context is full), as the trainer's sample() always did.
    """
    options.validate()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (start an empty prompt with the end-of-text token)")
    if options.stop and tokenizer is None:
        raise ValueError("stop strings need a tokenizer to decode the text")
    if compile and not use_cache:
        raise ValueError("compile=True needs the KV cache: leave use_cache on")
    context = model.config.max_seq_len
    results, fitted = [], []
    for prompt in prompts:
        kept, dropped = fit_prompt(list(prompt), context, slide)
        if dropped and not slide:
            warnings.warn(f"prompt of {len(prompt)} tokens truncated from the left to {len(kept)} "
                          f"(the model's context is {context} tokens)", stacklevel=3)
        results.append(Generation(prompt_tokens=kept, prompt_truncated=dropped))
        fitted.append(kept)
    streams = [TextStream(tokenizer, options.stop) if tokenizer is not None else None for _ in prompts]
    # New tokens each row may add before its sequence fills the context (unbounded when sliding).
    rooms = [None if slide else context - len(p) for p in fitted]
    if options.max_new_tokens == 0:
        for row, result in enumerate(results):
            result.finish_reason = "length"
            yield Piece(row, "", result)
        return

    with torch.inference_mode():
        if use_cache:
            most_new = min(options.max_new_tokens, max(context - len(p) for p in fitted))
            decoder: CachedDecoder | StaticDecoder | RecomputeDecoder = (
                StaticDecoder(model, fitted, most_new) if compile else CachedDecoder(model, fitted, most_new))
        else:
            decoder = RecomputeDecoder(model, fitted, context)
        logits = decoder.prefill()
        filler = eos_id if eos_id is not None else 0
        while True:
            chosen = pick_tokens(logits, options.temperature, options.top_k, options.top_p, generator).tolist()
            for row, result in enumerate(results):
                if result.finish_reason is not None:
                    chosen[row] = filler  # finished rows are fed a filler to keep the batch rectangular
                    continue
                yield from _advance_row(row, result, chosen[row], streams[row], eos_id, options.max_new_tokens,
                                        rooms[row])
            active = [r for r in results if r.finish_reason is None]
            if not active:
                return
            if slide and not isinstance(decoder, RecomputeDecoder) and any(
                    len(r.prompt_tokens) + len(r.tokens) >= context for r in active):
                # The cache holds at most max_seq_len positions: from here on, recompute the last window.
                decoder = RecomputeDecoder(model, [r.prompt_tokens + r.tokens for r in results], context)
                logits = decoder.prefill()
                continue
            logits = decoder.step(torch.tensor(chosen, device=logits.device))


def _advance_row(
    row: int, result: Generation, token: int, stream: TextStream | None, eos_id: int | None, max_new_tokens: int,
    room: int | None,
) -> Iterator[Piece]:
    result.tokens.append(token)
    if token == eos_id:
        result.finish_reason = "eos"
    elif stream is not None:
        piece, stopped = stream.push(token)
        if piece:
            yield Piece(row, piece)
        if stopped:
            result.finish_reason = "stop"
    if result.finish_reason is None:
        if len(result.tokens) >= max_new_tokens:
            result.finish_reason = "length"
        elif room is not None and len(result.tokens) >= room:
            result.finish_reason = "context"
    if result.finish_reason is not None:
        if stream is not None:
            tail = stream.flush()
            if tail:
                yield Piece(row, tail)
            result.text = stream.text
        yield Piece(row, "", result)


# ------------------------------------------------------------------------------------------------- text API
def encode_prompts(tokenizer: Tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt, as the start of a sequence (the tokenizer's BOS rule); an empty prompt starts from
    the BOS id (the end-of-text token for GPT-2-style tokenizers: a document boundary)."""
    return [tokenizer.encode_sequence(p) for p in prompts]


def iter_generate(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    options: SamplingOptions,
    *,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    compile: bool = False,
) -> Iterator[Piece]:
    """Stream continuations of text prompts: Pieces of text per row, then each row's Generation."""
    yield from iter_generate_ids(model, encode_prompts(tokenizer, prompts), options, eos_id=tokenizer.eos_id,
                                 tokenizer=tokenizer, generator=generator, use_cache=use_cache, compile=compile)


def generate(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    options: SamplingOptions,
    *,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    compile: bool = False,
    on_text: Callable[[int, str], None] | None = None,
) -> list[Generation]:
    """Continuations of text prompts, one Generation per prompt in order; on_text(row, piece) streams."""
    results: list[Generation | None] = [None] * len(prompts)
    for piece in iter_generate(model, tokenizer, prompts, options, generator=generator, use_cache=use_cache,
                               compile=compile):
        if piece.text and on_text is not None:
            on_text(piece.row, piece.text)
        if piece.done is not None:
            results[piece.row] = piece.done
    return results


def generate_ids(
    model: nn.Module,
    prompts: list[list[int]],
    options: SamplingOptions,
    **kwargs,
) -> list[Generation]:
    """Continuations of token prompts (keyword arguments as iter_generate_ids)."""
    results: list[Generation | None] = [None] * len(prompts)
    for piece in iter_generate_ids(model, prompts, options, **kwargs):
        if piece.done is not None:
            results[piece.row] = piece.done
    return results


def sample(
    model: nn.Module,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = 50,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Extend `prompt` by up to max_new_tokens sampled tokens (stops after eos_id). Returns the new tokens.

    The model sees the last max_seq_len tokens: a KV cache while the sequence fits its context, then
    a recomputed sliding window.
    """
    options = SamplingOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k)
    result = generate_ids(model, [list(prompt)], options, eos_id=eos_id, generator=generator, slide=True)[0]
    return result.tokens
