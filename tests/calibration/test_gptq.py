"""GPTQ on the E4M3 and int8 grids against a step-by-step NumPy reference, and its defining properties."""

from __future__ import annotations

import numpy as np
import pytest

from onnxopt.calibration import gptq, smoothquant

GRIDS = {  # (largest grid value, rounding in units of the scale)
    "fp8": (smoothquant.FP8_MAX, lambda v: smoothquant.to_fp8(v).astype(np.float32)),
    "int8": (127.0, lambda v: np.clip(np.rint(v), -127, 127).astype(np.float32)),
}


def _correlated_inputs(rng, rows: int, k: int, seed: int = 0) -> np.ndarray:
    """Inputs whose channels are correlated (a shared low-rank part) and of unequal size, as after
    RMSNorm; the distribution is fixed by `seed`, the draws come from `rng`."""
    structure = np.random.default_rng(seed)
    mix, size = structure.standard_normal((8, k)), structure.uniform(0.2, 3.0, k)
    return (rng.standard_normal((rows, k)) + rng.standard_normal((rows, 8)) @ mix) * size


def _case(rng, k: int, n: int, fmt: str):
    w = rng.standard_normal((k, n)) * 0.05
    w[:, 0] *= 20  # one column of another magnitude: the scale is per column
    scale = (np.abs(w).max(axis=0) / GRIDS[fmt][0]).astype(np.float32)
    return w, scale


def reference_gptq(w, h, scale, grid, damp=gptq.DAMP, rounded=None):
    """Optimal Brain Quantization in its plain form (GPTQ paper, eq. 2-3 without the Cholesky and lazy
    batches): quantize row k, move the others by -err * H^-1[:, k] / H^-1[k, k], and remove k from H^-1.
    With `rounded` r, only the first r rows are rounded: returns (g, the updated weights) then."""
    w = np.array(w, dtype=np.float64)
    h = np.array(h, dtype=np.float64)
    h[np.diag_indices_from(h)] += damp * np.mean(np.diag(h))
    h_inv = np.linalg.inv(h)
    g = np.zeros(w.shape, np.float32)
    for k in range(len(w) if rounded is None else rounded):
        g[k] = grid(w[k] / scale)
        err = (w[k] - g[k] * scale) / h_inv[k, k]
        w[k + 1:] -= np.outer(h_inv[k + 1:, k], err)
        h_inv -= np.outer(h_inv[:, k], h_inv[k, :]) / h_inv[k, k]
    return g if rounded is None else (g, w)


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
@pytest.mark.parametrize("k,n,block_size", [(77, 33, 16), (64, 5, 128), (100, 40, 7)])
def test_matches_step_by_step_reference(fmt, k, n, block_size):
    rng = np.random.default_rng(k + n)
    w, scale = _case(rng, k, n, fmt)
    x = _correlated_inputs(rng, 4 * k, k)
    h = x.T @ x / len(x)
    got = gptq.gptq(w, h, scale, GRIDS[fmt][1], block_size=block_size)
    want = reference_gptq(w, h, scale, GRIDS[fmt][1])
    # The two differ only in float rounding of the updates; an element near a rounding boundary may
    # land on the neighbouring grid point, after which the rows below legitimately diverge a little.
    assert np.mean(got == want) > 0.99
    np.testing.assert_allclose(gptq.output_error(w, got * scale, h), gptq.output_error(w, want * scale, h), rtol=0.02)


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_identity_hessian_is_round_to_nearest(fmt):
    rng = np.random.default_rng(1)
    w, scale = _case(rng, 96, 24, fmt)
    rtn = GRIDS[fmt][1](w / scale)
    for act_order in (False, True):
        np.testing.assert_array_equal(gptq.gptq(w, np.eye(96), scale, GRIDS[fmt][1], block_size=32, act_order=act_order), rtn)


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
@pytest.mark.parametrize("act_order", [False, True])
def test_lowers_output_error_and_stays_on_the_grid(fmt, act_order):
    rng = np.random.default_rng(2)
    k, n = 128, 48
    w, scale = _case(rng, k, n, fmt)
    x = _correlated_inputs(rng, 2048, k)
    h = x.T @ x / len(x)
    g = gptq.gptq(w, h, scale, GRIDS[fmt][1], block_size=32, act_order=act_order)
    rtn = GRIDS[fmt][1](w / scale)
    # On the grid: every value is its own rounding, within the saturation limit.
    np.testing.assert_array_equal(GRIDS[fmt][1](g), g)
    assert np.abs(g).max() <= GRIDS[fmt][0]
    if fmt == "fp8":
        np.testing.assert_array_equal(smoothquant.to_fp8(g).astype(np.float32), g)
    # The measured output error on the calibration inputs themselves, not only the H-weighted proxy.
    err = np.square(x @ w - x @ (g * scale)).mean()
    err_rtn = np.square(x @ w - x @ (rtn * scale)).mean()
    assert err < 0.7 * err_rtn, (err, err_rtn)
    # And on held-out draws of the same distribution.
    x2 = _correlated_inputs(np.random.default_rng(3), 2048, k)
    assert np.square(x2 @ w - x2 @ (g * scale)).mean() < 0.8 * np.square(x2 @ w - x2 @ (rtn * scale)).mean()


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_float_rows_absorb_the_rounding_error(fmt):
    """gptq_float_rows (the outlier decomposition): the rows kept in float are swept last and never
    rounded, as the plain reference run on the permuted problem stopped before them."""
    rng = np.random.default_rng(5)
    k, n = 80, 24
    w, scale = _case(rng, k, n, fmt)
    x = _correlated_inputs(rng, 4 * k, k)
    h = x.T @ x / len(x)
    float_rows = np.array([3, 41, 77])
    g, rows = gptq.gptq_float_rows(w, h, scale, GRIDS[fmt][1], float_rows, block_size=16)
    assert np.all(g[float_rows] == 0) and rows.shape == (3, n)

    perm = np.concatenate([np.setdiff1d(np.arange(k), float_rows), float_rows])
    want_g, want_w = reference_gptq(w[perm], h[np.ix_(perm, perm)], scale, GRIDS[fmt][1], rounded=k - 3)
    kept = perm[:k - 3]
    assert np.mean(g[kept] == want_g[:k - 3]) > 0.99  # as in test_matches_step_by_step_reference
    w_hat = g * scale
    w_hat[float_rows] = rows
    want_hat = want_g * scale
    want_hat[k - 3:] = want_w[k - 3:]
    err = gptq.output_error(w, w_hat, h)
    np.testing.assert_allclose(err, gptq.output_error(w[perm], want_hat, h[np.ix_(perm, perm)]), rtol=0.02)
    # Better than rounding the other rows to nearest and keeping the float rows as they were.
    rtn = GRIDS[fmt][1](w / scale) * scale
    rtn[float_rows] = w[float_rows]
    assert err < 0.8 * gptq.output_error(w, rtn, h)
    # No float rows: gptq itself.
    np.testing.assert_array_equal(gptq.gptq_float_rows(w, h, scale, GRIDS[fmt][1], [], block_size=16)[0],
                                  gptq.gptq(w, h, scale, GRIDS[fmt][1], block_size=16))


def test_dead_input_channels_become_zero():
    rng = np.random.default_rng(4)
    w, scale = _case(rng, 40, 8, "fp8")
    x = _correlated_inputs(rng, 400, 40)
    x[:, [5, 30]] = 0.0  # never active: H's row and column are 0
    g = gptq.gptq(w, x.T @ x / len(x), scale, GRIDS["fp8"][1], block_size=16)
    assert np.all(np.isfinite(g)) and np.all(g[[5, 30]] == 0)


def test_rejects_a_hessian_of_the_wrong_size():
    with pytest.raises(ValueError, match="Hessian of shape"):
        gptq.gptq(np.zeros((8, 4)), np.eye(9), np.ones(4), GRIDS["int8"][1])
