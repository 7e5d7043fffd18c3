"""Key/value caches for incremental decoding.

KVCache grows: each forward writes after the `length` positions already cached and attends to those only.
StaticKVCache keeps every shape fixed, for a compiled decode step: see its docstring.

Each layer keeps keys and values of shape (batch, n_kv_head, max_len, head_dim): grouped-query attention
stores every KV head once, and the query heads that share it read it through SDPA's `enable_gqa`.
The tensors are allocated at the first write, in the dtype and on the device of the keys written
(under bf16 autocast the cache is bf16).
"""

from __future__ import annotations

import torch


def empty_buffers(keys: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed key and value buffers of `max_len` positions, shaped, typed and placed like `keys` (B, H, T, D)."""
    batch, heads, _, head_dim = keys.shape
    shape = (batch, heads, max_len, head_dim)
    return (torch.zeros(shape, dtype=keys.dtype, device=keys.device),
            torch.zeros(shape, dtype=keys.dtype, device=keys.device))


class KVCache:
    """Keys and values of the first `length` positions of every row, for each of `n_layer` layers.

    All rows share one length: a batch of prompts of different lengths is left-padded, and the padding
    is hidden from attention by the mask the caller passes (see llamalite.generate).
    """

    def __init__(self, n_layer: int, batch_size: int, max_len: int):
        self.n_layer = n_layer
        self.batch_size = batch_size
        self.max_len = max_len
        self.length = 0
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer

    def check_room(self, new_positions: int) -> None:
        if self.length + new_positions > self.max_len:
            raise ValueError(f"KV cache overflow: {self.length} cached + {new_positions} new positions exceed its "
                             f"max_len {self.max_len}; allocate a longer cache")

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, n_kv_head, T, head_dim) keys/values at positions length..length+T; return all cached so far.

        `length` is advanced by `advance` once every layer has written (Llama.forward does it).
        """
        if self.keys[layer] is None:
            self.keys[layer], self.values[layer] = empty_buffers(keys, self.max_len)
        end = self.length + keys.shape[2]
        cached_keys, cached_values = self.keys[layer], self.values[layer]
        cached_keys[:, :, self.length:end] = keys
        cached_values[:, :, self.length:end] = values
        return cached_keys[:, :, :end], cached_values[:, :, :end]

    def advance(self, new_positions: int) -> None:
        self.length += new_positions


class StaticKVCache:
    """Keys and values in buffers of `max_len` slots whose shapes never change, for a compiled decode step.

    A forward writes its T new keys/values at the slots in `write_at` (a (T,) long tensor the caller sets, or
    fills in place between steps) and attends to all max_len slots: the caller's attn_mask must hide the
    slots not yet written, and positions must be given, since the cache keeps no Python-side length (a
    Python int that changed every step would recompile a compiled step every step).
    Buffers are allocated at the first write, in the dtype and on the device of the keys written.
    """

    def __init__(self, n_layer: int, batch_size: int, max_len: int):
        self.n_layer = n_layer
        self.batch_size = batch_size
        self.max_len = max_len
        self.write_at: torch.Tensor | None = None
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer

    def check_room(self, new_positions: int) -> None:
        if new_positions > self.max_len:
            raise ValueError(f"{new_positions} new positions exceed the static KV cache's max_len {self.max_len}")
        if self.write_at is None or self.write_at.shape != (new_positions,):
            raise ValueError(f"set the static KV cache's write_at to the {new_positions} slots to write")

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, n_kv_head, T, head_dim) keys/values at the slots `write_at`; return every slot."""
        if self.keys[layer] is None:
            self.keys[layer], self.values[layer] = empty_buffers(keys, self.max_len)
        self.keys[layer].index_copy_(2, self.write_at, keys)
        self.values[layer].index_copy_(2, self.write_at, values)
        return self.keys[layer], self.values[layer]

    def advance(self, new_positions: int) -> None:
        """Nothing to do: the caller moves `write_at`."""


DecodeCache = KVCache | StaticKVCache
