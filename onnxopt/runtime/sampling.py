"""Choosing the next token from logits on the host (NumPy): greedy, temperature, top-k, top-p,
repetition penalty, seeded.

Semantics follow transformers' logits processors, applied in the same order: repetition penalty,
temperature, top-k, top-p (TopKLogitsWarper, TopPLogitsWarper, RepetitionPenaltyLogitsProcessor).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onnxopt.errors import GenerationError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self):
        def bad(option, value, why):
            raise GenerationError(f"{option} {value!r}: {why}")

        if not np.isfinite(self.temperature) or self.temperature < 0:
            bad("--temperature", self.temperature, "must be a finite number >= 0 (0 = greedy)")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            bad("--top-k", self.top_k, "must be an integer >= 0 (0 = off)")
        if not (0.0 < self.top_p <= 1.0):
            bad("--top-p", self.top_p, "must be in (0, 1]")
        if not np.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            bad("--repetition-penalty", self.repetition_penalty, "must be a finite number > 0 (1 = off)")
        if self.seed is not None and (int(self.seed) != self.seed or self.seed < 0):
            bad("--seed", self.seed, "must be an integer >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    """Picks one token per row of [B, V] logits; owns the seeded random generator."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self._rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: list[np.ndarray] | None = None) -> np.ndarray:
        """logits: [B, V]; history: per row, the ids seen so far (for the repetition penalty)."""
        logits = self.warp(logits, history)
        if self.params.greedy:
            return logits.argmax(axis=-1)
        probs = _softmax(logits)
        # Inverse-CDF sampling per row: one uniform draw each, reproducible for a seed.
        u = self._rng.random(probs.shape[0])[:, None]
        cdf = np.cumsum(probs, axis=-1)
        choice = (cdf < u * cdf[:, -1:]).sum(axis=-1)
        return np.minimum(choice, logits.shape[-1] - 1)

    def warp(self, logits: np.ndarray, history: list[np.ndarray] | None = None) -> np.ndarray:
        """The float32 [B, V] logits a token is drawn from: repetition penalty, then (unless greedy)
        temperature, top-k and top-p; tokens they drop are -inf."""
        p = self.params
        logits = logits.astype(np.float32, copy=True)
        if p.repetition_penalty != 1.0 and history is not None:
            for row, seen in enumerate(history):
                ids = np.unique(seen)
                vals = logits[row, ids]
                logits[row, ids] = np.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.greedy:
            return logits
        logits /= p.temperature
        vocab = logits.shape[-1]
        if 0 < p.top_k < vocab:
            kth = np.partition(logits, vocab - p.top_k, axis=-1)[:, vocab - p.top_k : vocab - p.top_k + 1]
            logits[logits < kth] = -np.inf
        if p.top_p < 1.0:
            order = np.argsort(-logits, axis=-1)
            sorted_logits = np.take_along_axis(logits, order, axis=-1)
            probs = _softmax(sorted_logits)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            cum = np.cumsum(probs, axis=-1)
            drop_sorted = (cum - probs) >= p.top_p
            drop = np.zeros_like(drop_sorted)
            np.put_along_axis(drop, order, drop_sorted, axis=-1)
            logits[drop] = -np.inf
        return logits


def _softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - m)
    return e / e.sum(axis=-1, keepdims=True)
