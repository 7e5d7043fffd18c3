"""Ranges of config keys, declared once beside each dataclass field, and a YAML loader that refuses duplicate keys.

A field declares what it accepts in its metadata:

    micro_batch_size: int = field(default=8, metadata=positive(high=MAX_COUNT))
    schedule: str = field(default="cosine", metadata=one_of("cosine", "wsd", "constant"))

`range_problem(value, metadata)` says what is wrong with a value (None when it fits); config.py checks every key it
reads with it, so a zero, negative, non-finite, huge or misspelt value is a one-line error at load time, before
anything runs. Layer 0: used by model/config.py (layer 1) and config.py (layer 2) alike.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from llamalite.errors import did_you_mean

RANGE_KEY = "llamalite_range"

# Sane maxima: far above any real model or run, low enough that no product of them overflows int64 arithmetic or
# asks for an absurd allocation before a check elsewhere could say so.
MAX_COUNT = 1 << 24  # sequences, heads, tokens per sample, workers...
MAX_TOKENS = 1 << 50  # token counts of a run (batch_tokens, shard_tokens)
MAX_STEPS = 1 << 40
MAX_SEED = 2**63 - 1  # torch.manual_seed and numpy's default_rng both take it


@dataclass(frozen=True)
class Range:
    """What a numeric key accepts: low/high bounds (open or closed), or one of `choices` for a string key, or a
    string matching `pattern`. None as a value always passes: a key whose type allows None means "unset"."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    choices: tuple[str, ...] = ()
    pattern: str | None = None
    example: str | None = None  # a valid value to suggest; default: the field's default
    text: str | None = None  # how to describe `pattern` to a user

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.pattern:
            return f"a string of the form {self.text or self.pattern}"
        if self.low == 0 and self.low_open and self.high is None:
            return "a positive " + ("integer" if self.integer else "number")
        if self.low == 0 and not self.low_open and self.high is None:
            return "a non-negative " + ("integer" if self.integer else "number")
        left = "(" if self.low_open else "["
        right = ")" if self.high_open else "]"
        low = "-inf" if self.low is None else _number(self.low)
        high = "inf" if self.high is None else _number(self.high)
        return f"{'an integer' if self.integer else 'a number'} in {left}{low}, {high}{right}"

    def problem(self, value: Any) -> str | None:
        """Why `value` is outside this range (None when it fits)."""
        if value is None:
            return None
        if self.choices:
            if value in self.choices:
                return None
            return f"is not {self.describe()} ({did_you_mean(str(value), self.choices)})"
        if self.pattern:
            return None if re.fullmatch(self.pattern, str(value)) else f"must be {self.describe()}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be {self.describe()}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"is not finite: must be {self.describe()}"
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        return f"is out of range: must be {self.describe()}" if too_low or too_high else None


def _number(value: float) -> str:
    if float(value).is_integer() and abs(value) >= 1 << 16 and int(value) & (int(value) - 1) == 0:
        return f"2**{int(value).bit_length() - 1}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _meta(**kwargs: Any) -> dict[str, Range]:
    return {RANGE_KEY: Range(**kwargs)}


def positive(high: float | None = None, integer: bool = True, example: str | None = None) -> dict[str, Range]:
    """> 0 (and <= high)."""
    return _meta(low=0, low_open=True, high=high, integer=integer, example=example)


def non_negative(high: float | None = None, integer: bool = True, example: str | None = None) -> dict[str, Range]:
    """>= 0 (and <= high)."""
    return _meta(low=0, high=high, integer=integer, example=example)


def between(low: float | None, high: float | None, low_open: bool = False, high_open: bool = False,
            integer: bool = False, example: str | None = None) -> dict[str, Range]:
    """In [low, high], each end open when asked: between(0, 1, high_open=True) is [0, 1)."""
    return _meta(low=low, high=high, low_open=low_open, high_open=high_open, integer=integer, example=example)


def finite() -> dict[str, Range]:
    """Any finite number (every float key is finite anyway: this marks a key as checked)."""
    return _meta()


def one_of(*choices: str) -> dict[str, Range]:
    return _meta(choices=tuple(choices))


def matching(pattern: str, text: str) -> dict[str, Range]:
    """A string matching the regular expression `pattern` (whole string), e.g. a device name; `text` describes it."""
    return _meta(pattern=pattern, text=text)


def declared_range(metadata: Mapping[str, Any]) -> Range | None:
    return metadata.get(RANGE_KEY)


def range_problem(value: Any, metadata: Mapping[str, Any]) -> str | None:
    """What is wrong with `value` under the range declared in a field's metadata (None: fine or undeclared).
    A list value is checked item by item."""
    declared = declared_range(metadata)
    if declared is None:
        return None
    for item in value if isinstance(value, list) else [value]:
        problem = declared.problem(item)
        if problem:
            return problem
    return None


# -- YAML -------------------------------------------------------------------------------------------------------


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping that names the same key twice: YAML would silently keep the last one."""

    def __init__(self, key: Any, first_line: int, second_line: int):
        super().__init__(problem=f"duplicate key {key!r}")
        self.key, self.first_line, self.second_line = key, first_line, second_line

    def __str__(self) -> str:
        return (f"key {self.key!r} appears twice in one mapping, at line {self.first_line} and line "
                f"{self.second_line}: keep one (YAML would silently drop the first)")


class _MergeKey:
    """The merge key `<<` of a mapping, apart from a quoted "<<" string key."""

    def __repr__(self) -> str:
        return "'<<'"


MERGE_KEY = _MergeKey()

# libyaml's parser where PyYAML was built with it (about 10x faster); the constructor, and its checks, are Python's
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class UniqueKeyLoader(_SafeLoader):
    """yaml.SafeLoader that refuses a key repeated in one mapping (at any depth), naming both lines."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                key = MERGE_KEY  # several mappings merge as one `<<: [*a, *b]`; a second `<<` drops keys silently
            else:
                key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                continue  # SafeLoader itself refuses an unhashable key, with its own message
            line = key_node.start_mark.line + 1
            if key in seen:
                raise DuplicateKeyError(key, seen[key], line)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """yaml.safe_load, refusing duplicate keys (DuplicateKeyError, a yaml.YAMLError whose str() is one line)."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
