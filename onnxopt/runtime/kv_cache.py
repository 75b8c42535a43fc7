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
both point to the same data). The graph takes onnxruntime-genai's right-padded attention_mask
[B, T]: mask[b, :n_b] = 1, where n_b = row b's tokens after this step and T = max_b n_b; the graph
derives seqlens_k = n_b - 1 and total_sequence_length = T from it (passes/gqa_interface.py).
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
        max_len = seq + max_new_tokens
        input_ids = np.full((batch, seq), pad, dtype=np.int64)
        for b, ids in enumerate(prompts):
            input_ids[b, : len(ids)] = ids  # right-padded
        # kv[i]: [B, Hkv, Tmax, D], past and present of tensor i. Zeroed so unwritten slots are finite.
        # Bound once: none of them changes shape or address during a generation.
        self._kv = np.zeros((len(self.names["past"]), batch, self.heads, max_len, self.head), self.dtype)
        self._cached = np.zeros(batch, dtype=np.int64)  # tokens of each row already in the cache
        self._new = np.array([len(p) for p in prompts], dtype=np.int64)  # tokens each row adds this step
        # The mask [B, T] is the first B*T entries of one buffer, rewritten and rebound each step
        # (T grows by one per token): the only per-token feed, in a buffer allocated once here.
        self._mask_buffer = np.zeros(batch * max_len, dtype=np.int64)
        self._positions = np.arange(max_len, dtype=np.int64)  # [Tmax]
        self._bound = False
        return input_ids

    def bind(self, binding, bind: Bind) -> None:
        lengths = self._cached + self._new  # n_b: row b's tokens after this step
        total = int(lengths.max())
        mask = self._mask_buffer[: len(lengths) * total].reshape(len(lengths), total)  # [B, T]
        np.less(self._positions[:total], lengths[:, None], out=mask, casting="unsafe")  # mask[b, t] = t < n_b
        bind(binding, "attention_mask", mask)
        if self._bound:
            return
        for i, (past_name, present_name) in enumerate(zip(self.names["past"], self.names["present"])):
            bind(binding, past_name, self._kv[i])
            bind(binding, present_name, self._kv[i], output=True)  # the same memory: ORT writes in place
        self._bound = True

    def last_index(self) -> np.ndarray:
        return self._new - 1 if self._cached.max() == 0 else np.zeros_like(self._new)

    def advance(self) -> None:
        self._cached += self._new
        self._new = np.ones_like(self._new)


def unsupported_interface(io: dict) -> str | None:
    """Why this runtime cannot feed a graph with the manifest's `io` section, or None."""
    layout = io.get("kv_cache", {}).get("layout")
    if layout not in LAYOUTS:
        return f"KV-cache layout {layout!r} is not supported by this runtime"
    if layout == "gqa-shared" and "attention_mask" not in io.get("inputs", ()):
        return (
            "optimized by an older onnxopt (seqlens_k inputs, no attention_mask); "
            "re-run `onnxopt optimize` on the exported package"
        )
    return None


def make_kv_layout(layout: str, names, num_kv_heads: int, head_size: int, dtype, *, position_ids: bool) -> _Layout:
    cls = {"concat": ConcatLayout, "gqa-shared": SharedLayout}[layout]
    return cls(names, num_kv_heads, head_size, dtype, position_ids=position_ids)
