"""Input second moments H = E[x x^T] [K, K] of weight MatMuls, for GPTQ (calibration/gptq.py).

    hessians = collect_hessians(package, ["emma.txt"], num_samples=128, seq_len=512)   # {input: HessianObserver}
    h = hessians["mul_319"].hessian                                                     # [K, K] float64

One more pass of token windows through the package's graph (as `onnxopt calibrate` makes, but
keeping sum_t x_t x_t^T instead of per-channel statistics): each window's activations [S, K] add
X^T X (a float32 product over the window's S rows, summed into float64) and S to the token count,
then are dropped. Memory is K^2 doubles per observed input, whatever the amount of data (SmolLM2:
121 inputs, 30 x (3 x 576^2 + 1536^2) doubles, about 0.8 GB); sums merge exactly in any order.

This is a pass of its own rather than part of the calibration table: the table is JSON and stays
small (~9 MB for SmolLM2), while these matrices are K x K per input.
"""

from __future__ import annotations

import logging

import numpy as np

from onnxopt.errors import UserError
from onnxopt.package import ModelPackage
from onnxopt.progress import bar

logger = logging.getLogger(__name__)


class HessianObserver:
    """sum_t x_t x_t^T and the token count of one tensor x [..., K]."""

    def __init__(self, channels: int):
        self.channels = channels
        self.count = 0
        self.sum = np.zeros((channels, channels), dtype=np.float64)

    def update(self, x: np.ndarray) -> None:
        rows = np.asarray(x, dtype=np.float32).reshape(-1, self.channels)
        if not np.isfinite(rows).all():
            raise ValueError("activation holds NaN or infinity")
        self.sum += rows.T @ rows
        self.count += rows.shape[0]

    def merge(self, other: "HessianObserver") -> None:
        if other.channels != self.channels:
            raise ValueError(f"cannot merge {other.channels} channels into {self.channels}")
        self.sum += other.sum
        self.count += other.count

    @property
    def hessian(self) -> np.ndarray:
        """E[x x^T] [K, K] float64."""
        return self.sum / max(self.count, 1)


def collect_hessians(package, data, *, num_samples: int, seq_len: int, model=None, names=None,
                     progress: bool = True) -> dict[str, HessianObserver]:
    """HessianObserver per weight-MatMul input of the package's graph (or of `model`, a graph derived
    from it), over `num_samples` windows of `seq_len` tokens of the text files `data`. `names`
    restricts the observed inputs (default: every one)."""
    from onnxopt.calibration.forward import WindowRunner
    from onnxopt.calibration.reader import token_windows
    from onnxopt.calibration.table import observed_model
    from onnxopt.runtime.tokenizer import TextTokenizer

    package = package if isinstance(package, ModelPackage) else ModelPackage(package)
    model, channels = observed_model(package, model)
    if names is not None:
        missing = sorted(set(names) - set(channels))
        if missing:
            raise UserError(f"no weight MatMul reads {missing[0]!r}; the Hessian pass observes MatMul inputs only")
        channels = {name: channels[name] for name in names}
    observers = {name: HessianObserver(c) for name, c in channels.items()}
    runner = WindowRunner(package, model=model, outputs=list(observers))
    tokenizer = TextTokenizer(package.path, eos_token_ids=[])
    done = 0
    with bar(total=num_samples, desc="hessians", unit="sample", disable=not progress) as pbar:
        for window in token_windows(tokenizer, data, seq_len=seq_len, num_samples=num_samples):
            for name, value in runner(window).items():
                observers[name].update(value)
            done += 1
            pbar.update(1)
    if done < num_samples:
        logger.warning("the data ran out after %d of %d windows of %d tokens", done, num_samples, seq_len)
    return observers
