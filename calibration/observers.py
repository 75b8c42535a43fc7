"""Streaming statistics of one activation tensor x [..., C] (C channels, the last axis).

Only statistics are kept, never the activations (ORT's MinMaxCalibrater kept every output:
onnxruntime PR #26321), so memory is O(C + bins) per tensor whatever the data size:

    min, max                                 per tensor and per channel
    abs_mean[c]    = E|x_c|                  AWQ's channel salience
    mean_square[c] = E[x_c^2]                AWQ's error weights; SmoothQuant-style ranges
    histogram of |x| over [0, R)             percentile and MSE ranges, per tensor

The histogram has `bins` equal bins over [0, R) with R a power of two. When a value reaches R, R
doubles (as often as needed) and each pair of neighbouring bins merges into one. Because every bin at
range 2R is the union of two bins at range R, the final histogram is the one a single pass at the
final range would give: it does not depend on the order of the data, so a resumed run is exact.
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_BINS = 2048


def _pow2_at_least(value: float) -> float:
    return 2.0 ** math.ceil(math.log2(value)) if value > 0 else 2.0**-24


class TensorObserver:
    def __init__(self, channels: int, *, bins: int = DEFAULT_BINS):
        if bins & (bins - 1):
            raise ValueError(f"bins {bins}: must be a power of two")
        self.channels, self.bins = channels, bins
        self.count = 0  # rows (tokens) seen
        self.channel_min = np.full(channels, np.inf)
        self.channel_max = np.full(channels, -np.inf)
        self.abs_sum = np.zeros(channels)
        self.square_sum = np.zeros(channels)
        self.range = 0.0  # R; 0 until the first update
        self.hist = np.zeros(bins, dtype=np.int64)

    # -- updates ---------------------------------------------------------------------------------
    def update(self, x: np.ndarray) -> None:
        rows = np.asarray(x).reshape(-1, self.channels).astype(np.float64)
        if not np.isfinite(rows).all():
            raise ValueError("activation holds NaN or infinity")
        self.count += rows.shape[0]
        np.minimum(self.channel_min, rows.min(axis=0), out=self.channel_min)
        np.maximum(self.channel_max, rows.max(axis=0), out=self.channel_max)
        magnitude = np.abs(rows)
        self.abs_sum += magnitude.sum(axis=0)
        self.square_sum += np.square(rows).sum(axis=0)
        self._grow(float(magnitude.max()))
        index = np.minimum((magnitude * (self.bins / self.range)).astype(np.int64), self.bins - 1)
        self.hist += np.bincount(index.ravel(), minlength=self.bins)

    def _grow(self, peak: float) -> None:
        if self.range == 0.0:
            # Strictly above the peak, so the peak falls inside [0, R).
            self.range = _pow2_at_least(peak * (1 + 2.0**-20))
            return
        while peak >= self.range:
            self.hist = np.concatenate([self.hist.reshape(-1, 2).sum(axis=1), np.zeros(self.bins // 2, np.int64)])
            self.range *= 2

    # -- results ---------------------------------------------------------------------------------
    @property
    def min(self) -> float:
        return float(self.channel_min.min())

    @property
    def max(self) -> float:
        return float(self.channel_max.max())

    @property
    def abs_mean(self) -> np.ndarray:
        return self.abs_sum / max(self.count, 1)

    @property
    def mean_square(self) -> np.ndarray:
        return self.square_sum / max(self.count, 1)

    def percentile(self, q: float) -> float:
        """The q-th percentile of |x| (0 < q <= 100), rounded up to a bin edge."""
        total = self.hist.sum()
        if total == 0:
            return 0.0
        index = int(np.searchsorted(np.cumsum(self.hist), q / 100 * total))
        return (min(index, self.bins - 1) + 1) * self.range / self.bins

    def mse_range(self, bits: int = 8) -> float:
        """The clip c minimizing the expected squared error of symmetric `bits` quantization of x to
        [-c, c], from the histogram: values below c round (error step^2 / 12, step = c / (2^(bits-1)-1)),
        values above are clipped (error (|x| - c)^2, |x| at its bin's centre)."""
        centers = (np.arange(self.bins) + 0.5) * self.range / self.bins
        levels = 2 ** (bits - 1) - 1
        best, best_c = np.inf, self.range
        for end in range(self.bins // 64, self.bins + 1, self.bins // 64):
            c = end * self.range / self.bins
            clipped = np.square(np.maximum(centers[end:] - c, 0)) @ self.hist[end:]
            err = clipped + self.hist[:end].sum() * (c / levels) ** 2 / 12
            if err < best:
                best, best_c = err, c
        return float(best_c)

    # -- (de)serialization -------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "channels": self.channels,
            "count": self.count,
            "min": self.min,
            "max": self.max,
            "channel_min": self.channel_min.tolist(),
            "channel_max": self.channel_max.tolist(),
            "abs_sum": self.abs_sum.tolist(),
            "square_sum": self.square_sum.tolist(),
            "percentile_99_99": self.percentile(99.99),
            "histogram": {"range": self.range, "counts": self.hist.tolist()},
        }

    @classmethod
    def from_json(cls, data: dict) -> "TensorObserver":
        hist = data["histogram"]
        obs = cls(int(data["channels"]), bins=len(hist["counts"]))
        obs.count = int(data["count"])
        obs.channel_min = np.asarray(data["channel_min"], dtype=np.float64)
        obs.channel_max = np.asarray(data["channel_max"], dtype=np.float64)
        obs.abs_sum = np.asarray(data["abs_sum"], dtype=np.float64)
        obs.square_sum = np.asarray(data["square_sum"], dtype=np.float64)
        obs.range = float(hist["range"])
        obs.hist = np.asarray(hist["counts"], dtype=np.int64)
        return obs
