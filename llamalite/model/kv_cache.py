"""A key/value cache for incremental decoding.

Each layer keeps keys and values of shape (batch, n_kv_head, max_len, head_dim): grouped-query attention
stores every KV head once, and the query heads that share it read it through SDPA's `enable_gqa`.
The tensors are allocated at the first write, in the dtype and on the device of the keys written
(under bf16 autocast the cache is bf16).
"""

from __future__ import annotations

import torch


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
            batch, heads, _, head_dim = keys.shape
            shape = (batch, heads, self.max_len, head_dim)
            self.keys[layer] = torch.zeros(shape, dtype=keys.dtype, device=keys.device)
            self.values[layer] = torch.zeros(shape, dtype=values.dtype, device=values.device)
        end = self.length + keys.shape[2]
        cached_keys, cached_values = self.keys[layer], self.values[layer]
        cached_keys[:, :, self.length:end] = keys
        cached_values[:, :, self.length:end] = values
        return cached_keys[:, :, :end], cached_values[:, :, :end]

    def advance(self, new_positions: int) -> None:
        self.length += new_positions
