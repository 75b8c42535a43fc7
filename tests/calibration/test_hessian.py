"""The Hessian observer (sum of x x^T) against X^T X computed directly, and the pass over a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import needs_torch

from onnxopt.calibration.hessian import HessianObserver, collect_hessians

CALIB = "/work/shared/data/emma.txt"


def test_observer_equals_xtx_and_merges_exactly():
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((rows, 3, 37)).astype(np.float32) * 4 for rows in (5, 11, 2)]  # [.., K]: rows flatten
    whole = np.concatenate([p.reshape(-1, 37) for p in parts]).astype(np.float64)
    obs = HessianObserver(37)
    for p in parts:
        obs.update(p)
    assert obs.count == len(whole)
    # float32 products over each update's rows, summed in float64: ~1e-7 relative.
    np.testing.assert_allclose(obs.hessian, whole.T @ whole / len(whole), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(obs.sum, obs.sum.T)
    # Observers of separate parts merged in the same order give exactly the same sums.
    merged = HessianObserver(37)
    for p in parts:
        one = HessianObserver(37)
        one.update(p)
        merged.merge(one)
    np.testing.assert_array_equal(merged.sum, obs.sum)
    assert merged.count == obs.count
    with pytest.raises(ValueError, match="cannot merge"):
        merged.merge(HessianObserver(36))
    with pytest.raises(ValueError, match="NaN"):
        obs.update(np.full((1, 37), np.nan, np.float32))


@needs_torch
def test_pass_matches_the_calibration_tables_moments(tiny_text_package):
    """diag(H) of every MatMul input equals the table's E[x^2] over the same windows (the observers are
    independent code), and H is symmetric positive semi-definite."""
    from onnxopt.calibration.table import calibrate, tensor_stats

    table = calibrate(tiny_text_package, [CALIB], num_samples=3, seq_len=32, progress=False)
    hessians = collect_hessians(tiny_text_package, [CALIB], num_samples=3, seq_len=32, progress=False)
    assert hessians.keys() == table["tensors"].keys()
    for name, obs in hessians.items():
        stats = tensor_stats(table, name)
        assert obs.count == stats["count"] == 3 * 32
        np.testing.assert_allclose(np.diag(obs.hessian), stats["mean_square"], rtol=1e-5)
        assert np.linalg.eigvalsh(obs.hessian).min() > -1e-6 * np.abs(obs.hessian).max()
    some = sorted(hessians)[:2]
    only = collect_hessians(tiny_text_package, [CALIB], num_samples=1, seq_len=32, names=some, progress=False)
    assert sorted(only) == some
