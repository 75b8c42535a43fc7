"""GPTQ (Frantar et al. 2022, arXiv:2210.17323): error-compensating rounding of a weight matrix on a
fixed grid, given the second moment of its input.

For Y = X W with W [K, N] (K input channels, N output channels) and H = E[x x^T] [K, K] over the
calibration tokens, GPTQ minimizes the output error

    E||x W - x W_hat||^2 = sum_n (W - W_hat)[:, n]^T H (W - W_hat)[:, n]

one input channel at a time (the paper's "columns" are our rows k, since our W is the transpose of
torch's Linear weight): round row k, then spread its error over the rows not yet rounded through the
inverse Hessian, so that those can absorb it. With U the upper Cholesky factor of H^-1 (H^-1 = U^T U):

    err_k = (W[k] - Q(W[k])) / U[k, k]
    W[j] -= U[k, j] * err_k                          for j > k

done lazily in blocks of `block_size` rows (the reference implementation's `blocksize`, 128), with
dampening `damp` x mean(diag H) on the diagonal (its `percdamp`, 0.01) and rows whose input is always
0 set to 0. `act_order` sweeps the rows by decreasing H[k, k] (the reference's `--act-order`). The
output columns are independent, so MatMuls sharing an input are swept as one [K, sum N_j] matrix.

The grid is fixed before the sweep: per output column n, W_hat[k, n] = scale[n] * g with g from
`grid(values)` (E4M3 values, or integers in [-127, 127]); scales are not re-fitted to the updated
weights (values past the grid's end saturate). With H = I nothing is spread (U is diagonal), and the
result is round-to-nearest (tests/calibration/test_gptq.py checks both properties).

`float_rows` (the outlier decomposition of calibration/smoothquant.py) names rows that stay in float:
they are swept last and never rounded, so they keep absorbing the rounding error of all the others
(the same update, stopped before them); `gptq_float_rows` returns them beside the grid values.
"""

from __future__ import annotations

import numpy as np

DAMP = 0.01  # percdamp of the reference implementation (IST-DASLab/gptq, gptq.py, GPTQ.fasterquant)
BLOCK_SIZE = 128


def inverse_cholesky(h: np.ndarray, damp: float = DAMP) -> tuple[np.ndarray, np.ndarray]:
    """(U upper triangular with (H + damp * mean(diag H) I)^-1 = U^T U, dead [K] bool): rows whose input
    is always 0 (H[k, k] == 0) get H[k, k] = 1, as in the reference."""
    h = np.array(h, dtype=np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damp * float(np.mean(np.diag(h)))
    # torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True) in the reference: invert through
    # the Cholesky factor L of H, then factor H^-1 = U^T U.
    lower = np.linalg.cholesky(h)
    eye = np.eye(len(h))
    inv_lower = np.linalg.solve(lower, eye)
    h_inv = inv_lower.T @ inv_lower
    return np.linalg.cholesky(h_inv).T, dead


def gptq(w: np.ndarray, h: np.ndarray, scale: np.ndarray, grid, *, block_size: int = BLOCK_SIZE,
         damp: float = DAMP, act_order: bool = False) -> np.ndarray:
    """Grid values g [K, N] (float32, exactly representable in the target type) with W_hat = g * scale,
    chosen by GPTQ for the input second moment `h` [K, K]. `grid(v)` rounds values (in units of the
    column's scale) to the nearest grid point, saturating."""
    return gptq_float_rows(w, h, scale, grid, (), block_size=block_size, damp=damp, act_order=act_order)[0]


def gptq_float_rows(w: np.ndarray, h: np.ndarray, scale: np.ndarray, grid, float_rows, *,
                    block_size: int = BLOCK_SIZE, damp: float = DAMP,
                    act_order: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """`gptq` with the rows `float_rows` (indices) kept in float: (g [K, N] with zeros at those rows,
    those rows [len(float_rows), N] float64 after absorbing the other rows' rounding error)."""
    w = np.array(w, dtype=np.float64)
    k, n = w.shape
    if h.shape != (k, k):
        raise ValueError(f"Hessian of shape {h.shape} for a weight of shape {w.shape}")
    scale = np.asarray(scale, dtype=np.float64)
    h = np.asarray(h, dtype=np.float64)
    float_rows = np.asarray(float_rows, dtype=np.int64)
    rounded = np.setdiff1d(np.arange(k), float_rows)
    if act_order:
        rounded = rounded[np.argsort(-np.diag(h)[rounded], kind="stable")]
    perm = np.concatenate([rounded, float_rows])  # the float rows last: every update reaches them
    k_round = len(rounded)
    w = w[perm]
    u, dead = inverse_cholesky(h[np.ix_(perm, perm)], damp)
    w[dead] = 0.0
    g = np.zeros((k, n), dtype=np.float32)
    for i1 in range(0, k_round, block_size):
        i2 = min(i1 + block_size, k_round)
        w1 = w[i1:i2]  # a view: the in-block updates land in w
        u1 = u[i1:i2, i1:i2]
        err1 = np.empty((i2 - i1, n))
        for i in range(i2 - i1):
            q = np.asarray(grid(w1[i] / scale), dtype=np.float32)
            g[i1 + i] = q
            err = (w1[i] - q * scale) / u1[i, i]
            w1[i + 1:] -= np.outer(u1[i, i + 1:], err)
            err1[i] = err
        w[i2:] -= u[i1:i2, i2:].T @ err1  # the lazy batch update of the rows after the block
    out = np.empty_like(g)
    out[perm] = g
    return out, w[k_round:]


def output_error(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray) -> float:
    """E||x W - x W_hat||^2 per token = trace((W - W_hat)^T H (W - W_hat))."""
    d = np.asarray(w, dtype=np.float64) - np.asarray(w_hat, dtype=np.float64)
    return float(np.sum(d * (np.asarray(h, dtype=np.float64) @ d)))  # a BLAS product; einsum would loop in C
