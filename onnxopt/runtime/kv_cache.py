"""Preallocated KV-cache buffers for graphs of the `concat` layout.

In that layout each layer's attention reads `past` [B, Hkv, P, D] and writes a new `present`
[B, Hkv, P+S, D] = concat(past, new). We preallocate two arenas per KV tensor, each big enough for
[B, Hkv, Tmax, D], and alternate: step n reads its past from one arena and ORT writes its present
straight into the other (bound with IOBinding), which step n+1 then reads as its past. Nothing is
allocated per token and no KV data is copied by us; ORT's concat is the only write.

(The optimizer's GroupQueryAttention graphs share one [B, Hkv, Tmax, D] buffer for past and present
instead; the runtime selects the cache class from the manifest's `kv_cache.layout`.)
"""

from __future__ import annotations

import numpy as np


class ConcatKVCache:
    def __init__(self, num_tensors: int, batch: int, num_kv_heads: int, max_len: int, head_size: int, dtype):
        self.batch, self.heads, self.max_len, self.head = batch, num_kv_heads, max_len, head_size
        self.dtype = np.dtype(dtype)
        per_tensor = batch * num_kv_heads * max_len * head_size
        # arenas[parity]: [num_tensors, B*Hkv*Tmax*D], flat so any [B, Hkv, T, D] prefix is contiguous.
        self._arenas = [np.empty((num_tensors, per_tensor), dtype=self.dtype) for _ in range(2)]
        self._parity = 0
        self.length = 0  # P: tokens cached so far

    def _view(self, parity: int, index: int, length: int) -> np.ndarray:
        n = self.batch * self.heads * length * self.head
        return self._arenas[parity][index, :n].reshape(self.batch, self.heads, length, self.head)

    def past(self, index: int) -> np.ndarray:
        """[B, Hkv, P, D] view read by this step."""
        return self._view(self._parity, index, self.length)

    def present(self, index: int, new_tokens: int) -> np.ndarray:
        """[B, Hkv, P+S, D] view this step's graph writes into."""
        if self.length + new_tokens > self.max_len:
            raise ValueError(f"KV cache full: {self.length} + {new_tokens} > {self.max_len}")
        return self._view(1 - self._parity, index, self.length + new_tokens)

    def advance(self, new_tokens: int) -> None:
        """After a step: its present becomes the next step's past."""
        self._parity = 1 - self._parity
        self.length += new_tokens
