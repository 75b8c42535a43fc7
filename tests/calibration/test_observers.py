"""Observers keep statistics only: exact moments and extrema, an order-independent histogram, bounded state."""

from __future__ import annotations

import json

import numpy as np
import pytest

from onnxopt.calibration.observers import TensorObserver


def _batches(seed=0, n=6, channels=37):
    rng = np.random.default_rng(seed)
    # Growing magnitudes, so the histogram range doubles several times mid-stream.
    return [rng.standard_normal((2, 50, channels)) * 4.0**i for i in range(n)]


def test_statistics_match_numpy():
    batches = _batches()
    obs = TensorObserver(37, bins=256)
    for x in batches:
        obs.update(x.astype(np.float32))
    rows = np.concatenate([x.reshape(-1, 37) for x in batches]).astype(np.float32).astype(np.float64)
    assert obs.count == len(rows)
    np.testing.assert_array_equal(obs.channel_min, rows.min(axis=0))
    np.testing.assert_array_equal(obs.channel_max, rows.max(axis=0))
    np.testing.assert_allclose(obs.abs_mean, np.abs(rows).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(obs.mean_square, np.square(rows).mean(axis=0), rtol=1e-12)
    assert obs.hist.sum() == rows.size
    # The histogram is the one np.histogram gives at the final range.
    want, _ = np.histogram(np.abs(rows), bins=256, range=(0, obs.range))
    np.testing.assert_array_equal(obs.hist, want)
    # A percentile is the upper edge of the bin holding it: at most one bin width above the exact one.
    for q in (50, 99, 99.99):
        exact = np.percentile(np.abs(rows), q, method="inverted_cdf")  # the smallest x with F(x) >= q
        assert exact <= obs.percentile(q) <= exact + obs.range / obs.bins


def test_order_and_resume_independent():
    batches = _batches(seed=1)
    forward, backward = TensorObserver(37, bins=128), TensorObserver(37, bins=128)
    for x in batches:
        forward.update(x)
    for x in reversed(batches):
        backward.update(x)
    np.testing.assert_array_equal(forward.hist, backward.hist)
    assert forward.range == backward.range
    # Stop half way, serialize through JSON, continue: the same state as one run.
    resumed = TensorObserver(37, bins=128)
    for x in batches[:3]:
        resumed.update(x)
    resumed = TensorObserver.from_json(json.loads(json.dumps(resumed.to_json())))
    for x in batches[3:]:
        resumed.update(x)
    for name in ("channel_min", "channel_max", "abs_sum", "square_sum", "hist"):
        np.testing.assert_array_equal(getattr(resumed, name), getattr(forward, name), err_msg=name)


def test_state_is_bounded():
    obs = TensorObserver(16, bins=64)
    sizes = []
    for x in _batches(seed=2, n=5, channels=16):
        obs.update(np.repeat(x, 20, axis=0))
        sizes.append(len(json.dumps(obs.to_json())))
    assert max(sizes) < 1.3 * min(sizes)  # grows with digits, not with rows


def _quantization_error(x: np.ndarray, clip: float, bits: int) -> float:
    levels = 2 ** (bits - 1) - 1
    step = clip / levels
    return float(np.square(x - np.clip(np.rint(x / step), -levels, levels) * step).sum())


@pytest.mark.parametrize("bits", [8, 4])
def test_mse_range_is_near_the_best_clip(bits):
    rng = np.random.default_rng(3)
    x = rng.standard_t(df=3, size=(20000, 8))  # heavy tails: the best clip is well below max|x|
    obs = TensorObserver(8)
    obs.update(x)
    chosen = obs.mse_range(bits)
    grid = [end * obs.range / obs.bins for end in range(obs.bins // 64, obs.bins + 1, obs.bins // 64)]
    best = min(_quantization_error(x, c, bits) for c in grid)
    assert chosen < obs.max
    # The histogram model (bin centres, uniform rounding noise) picks a clip within 10% of the best
    # measured error on the raw data.
    assert _quantization_error(x, chosen, bits) <= 1.1 * best


def test_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        TensorObserver(2).update(np.array([[np.nan, 1.0]]))
