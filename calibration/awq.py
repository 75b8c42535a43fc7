"""Activation-aware weight quantization (AWQ; Lin et al. 2023, arXiv:2306.00978), scale search only.

For MatMuls that share one input x [.., K] (q/k/v, or gate/up), with weights W_j [K, N_j]:

    Y_j = x W_j = (x diag(1/s)) (diag(s) W_j)                     exact for any s > 0
        ~ (x diag(1/s)) Q(diag(s) W_j)                            what the quantized graph computes

Scaling an input channel k up by s_k shrinks its relative rounding error, at the cost of the other
channels of its blocks. AWQ picks s = a^alpha from the per-channel mean |x_k| (a, from the
calibration table), normalized so that max(s) * min(s) = 1, and grid-searches alpha in [0, 1]
for the least output error. We measure that error with the per-channel second moment m_k = E[x_k^2]
(also from the table) instead of re-running the calibration activations:

    err(alpha) = sum_j sum_k m_k * || W_j[k, :] - diag(1/s) Q(diag(s) W_j)[k, :] ||^2

which is E||x W - x W_hat||^2 when the input channels are uncorrelated (the cross terms E[x_k x_l]
are dropped: they would need a K x K matrix per input). alpha = 0 is plain round-to-nearest, so the
search never does worse than RTN on this measure. The 1/s goes into the graph as one Mul on x, shared
by the group (onnxopt/quantize.py says why it is not folded into the preceding op).

Then, as AWQ's second step, each block's range is clipped: with W' = diag(s) W the error above splits
into a sum over blocks, e(n, b) = sum_{k in b} (m_k / s_k^2) (W'[k, n] - Q_r(W')[k, n])^2, where Q_r
quantizes the block with its range [lo, hi] shrunk to [r lo, r hi]; r is chosen per block from CLIP_GRID.
r = 1 is no clipping, so this step cannot raise the error either.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onnxopt.calibration.blockwise import fake_quantize

GRID = 20  # alpha in {0, 1/20, ..., 1}, as in AWQ's reference implementation
CLIP_GRID = np.linspace(1.0, 0.5, 21)  # AWQ's auto_clip searches max-value shrink ratios down to 0.5


@dataclasses.dataclass
class ScaleSearch:
    scales: np.ndarray  # s [K], float32; the weights are multiplied by s, the input by 1/s
    alpha: float
    clips: list  # per weight: [N, k_blocks] range ratios for blockwise.quantize(..., clip=)
    error_rtn: float  # err(0)
    error: float  # err(alpha)


def weighted_error(weights, mean_square: np.ndarray, s: np.ndarray, bits: int, block_size: int) -> float:
    total = 0.0
    for w in weights:
        w_hat = fake_quantize(w * s[:, None], bits, block_size) / s[:, None]
        total += float(mean_square @ np.square(w - w_hat, dtype=np.float64).sum(axis=1))
    return total


def search_scales(weights, abs_mean: np.ndarray, mean_square: np.ndarray, *, bits: int, block_size: int,
                  grid: int = GRID) -> ScaleSearch:
    """The best s = a^alpha for the weights [K, N_j] sharing one input (see the module docstring)."""
    a = np.maximum(np.asarray(abs_mean, dtype=np.float64), 1e-8)
    m = np.asarray(mean_square, dtype=np.float64)
    weights = [np.asarray(w, dtype=np.float32) for w in weights]
    best = None
    error_rtn = None
    for i in range(grid + 1):
        alpha = i / grid
        s = a**alpha
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        err = weighted_error(weights, m, s, bits, block_size)
        if i == 0:
            error_rtn = err
        if best is None or err < best[0]:
            best = (err, alpha, s)
    err, alpha, s = best
    clips, clipped_error = [], 0.0
    for w in weights:
        clip, e = search_clip(w * s[:, None], m / np.square(s.astype(np.float64)), bits, block_size)
        clips.append(clip)
        clipped_error += e
    return ScaleSearch(scales=s, alpha=alpha, clips=clips, error_rtn=error_rtn, error=min(err, clipped_error))


def search_clip(w_scaled: np.ndarray, weight_k: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, float]:
    """Per-block clip ratios [N, k_blocks] minimizing sum_k weight_k (W' - Q_r(W'))^2; and that error."""
    k, n = w_scaled.shape
    k_blocks = -(-k // block_size)
    padded_weight = np.zeros(k_blocks * block_size)
    padded_weight[:k] = weight_k
    blocks = np.zeros((n, k_blocks * block_size), np.float32)
    blocks[:, :k] = w_scaled.T
    blocks = blocks.reshape(n, k_blocks, block_size)
    wk = padded_weight.reshape(1, k_blocks, block_size)
    best_err = np.full((n, k_blocks), np.inf)
    best_clip = np.ones((n, k_blocks), np.float32)
    for r in CLIP_GRID:
        ratio = np.full((n, k_blocks), r, np.float32)
        w_hat = fake_quantize(w_scaled, bits, block_size, clip=ratio)
        diff = np.zeros((n, k_blocks * block_size))
        diff[:, :k] = (w_scaled - w_hat).T
        err = (np.square(diff).reshape(n, k_blocks, block_size) * wk).sum(axis=-1)
        better = err < best_err
        best_err[better], best_clip[better] = err[better], r
    return best_clip, float(best_err.sum())
