"""Preallocated KV-cache buffers and the per-step feeds of each KV-cache layout.

The manifest's `io.kv_cache.layout` names the layout; `make_kv_layout` builds its class. Both share
one interface for the generation loop (runtime/generator.py):

    input_ids = kv.start(prompts, max_new_tokens, pad)   # [B, S] prefill ids, padded as the layout wants
    kv.bind(binding, bind)                               # every input but input_ids, every KV output
    session.run_with_iobinding(binding)
    last = kv.last_index()                               # [B] position in logits of each row's last token
    kv.advance()                                         # the next step feeds one token per row

`concat` (the export): each layer reads `past` [B, Hkv, P, D] and writes a new `present`
[B, Hkv, P+S, D] = concat(past, new). Prompts are left-padded; attention_mask is 0 on padding and
position_ids count real tokens. We preallocate two arenas per KV tensor, each big enough for
[B, Hkv, Tmax, D], and alternate: step n reads its past from one arena and ORT writes its present
straight into the other, which step n+1 then reads. Nothing is allocated per token.

`gqa-shared` (after `onnxopt optimize`): GroupQueryAttention reads and writes one
[B, Hkv, Tmax, D] buffer per KV tensor, bound as both past and present (ORT shares the buffer when
both point to the same data). Prompts are right-padded; seqlens_k[b] = (row b's tokens after this
step) - 1 and total_sequence_length = max_b (seqlens_k[b] + 1) (ORT ContribOperators.md,
GroupQueryAttention).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

LAYOUTS = ("concat", "gqa-shared")
Bind = Callable[..., None]  # bind(binding, name, array, output=False)


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


class _Layout:
    def __init__(self, names: dict[str, list[str]], num_kv_heads: int, head_size: int, dtype, *, position_ids: bool):
        self.names, self.heads, self.head, self.dtype = names, num_kv_heads, head_size, np.dtype(dtype)
        self.position_ids = position_ids


class ConcatLayout(_Layout):
    def start(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad: int) -> np.ndarray:
        batch, seq = len(prompts), max(len(p) for p in prompts)
        input_ids = np.full((batch, seq), pad, dtype=np.int64)
        self._mask = np.zeros((batch, seq + max_new_tokens), dtype=np.int64)  # [B, Tmax], used by slicing
        for b, ids in enumerate(prompts):
            input_ids[b, seq - len(ids) :] = ids
            self._mask[b, seq - len(ids) : seq] = 1
        self._positions = np.maximum(np.cumsum(self._mask[:, :seq], axis=1) - 1, 0)  # [B, S]
        self._new = seq
        self.cache = ConcatKVCache(len(self.names["past"]), batch, self.heads, seq + max_new_tokens, self.head, self.dtype)
        return input_ids

    def bind(self, binding, bind: Bind) -> None:
        total = self.cache.length + self._new
        # [B, T]; a small per-step copy (B*T int64) because a column slice is not contiguous
        self._step_mask = np.ascontiguousarray(self._mask[:, :total])
        bind(binding, "attention_mask", self._step_mask)
        if self.position_ids:
            bind(binding, "position_ids", self._positions)
        for i, (past_name, present_name) in enumerate(zip(self.names["past"], self.names["present"])):
            bind(binding, past_name, self.cache.past(i))
            bind(binding, present_name, self.cache.present(i, self._new), output=True)

    def last_index(self) -> np.ndarray:
        return np.full(self.cache.batch, self._new - 1)  # left-padded: every row ends at the right edge

    def advance(self) -> None:
        self.cache.advance(self._new)
        self._mask[:, self.cache.length] = 1
        self._positions = self._positions[:, -1:] + 1  # [B, 1]
        self._new = 1


class SharedLayout(_Layout):
    def start(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad: int) -> np.ndarray:
        batch, seq = len(prompts), max(len(p) for p in prompts)
        input_ids = np.full((batch, seq), pad, dtype=np.int64)
        for b, ids in enumerate(prompts):
            input_ids[b, : len(ids)] = ids  # right-padded
        # kv[i]: [B, Hkv, Tmax, D], past and present of tensor i. Zeroed so unwritten slots are finite.
        self._kv = np.zeros((len(self.names["past"]), batch, self.heads, seq + max_new_tokens, self.head), self.dtype)
        self._cached = np.zeros(batch, dtype=np.int32)  # tokens of each row already in the cache
        self._new = np.array([len(p) for p in prompts], dtype=np.int32)  # tokens each row adds this step
        # Bound once, updated in place: ORT reads bound host buffers at each run, and none of these
        # change shape or address during a generation, so the per-token loop rebinds nothing here.
        self._seqlens_k = np.zeros(batch, dtype=np.int32)  # [B]
        self._total = np.zeros((), dtype=np.int32)  # []
        self._bound = False
        return input_ids

    def bind(self, binding, bind: Bind) -> None:
        lengths = self._cached + self._new
        self._seqlens_k[:] = lengths - 1
        self._total[...] = lengths.max()
        if self._bound:
            return
        bind(binding, "seqlens_k", self._seqlens_k)
        bind(binding, "total_sequence_length", self._total)
        for i, (past_name, present_name) in enumerate(zip(self.names["past"], self.names["present"])):
            bind(binding, past_name, self._kv[i])
            bind(binding, present_name, self._kv[i], output=True)  # the same memory: ORT writes in place
        self._bound = True

    def last_index(self) -> np.ndarray:
        return self._new - 1 if self._cached.max() == 0 else np.zeros_like(self._new)

    def advance(self) -> None:
        self._cached += self._new
        self._new = np.ones_like(self._new)


def make_kv_layout(layout: str, names, num_kv_heads: int, head_size: int, dtype, *, position_ids: bool) -> _Layout:
    cls = {"concat": ConcatLayout, "gqa-shared": SharedLayout}[layout]
    return cls(names, num_kv_heads, head_size, dtype, position_ids=position_ids)
