"""AWQ scale search and its graph form: x * (1/s) -> MatMulNBits(Q(diag(s) W)), checked against NumPy."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import shared_input_matmuls

from onnxopt.calibration import blockwise
from onnxopt.calibration.awq import search_clip, search_scales, weighted_error
from onnxopt.calibration.observers import TensorObserver
from onnxopt.quantize import quantize_model


def _activations(rng, rows: int, k: int) -> np.ndarray:
    """Activations with a few salient channels (50x the others), as LLM activations have."""
    x = rng.standard_normal((rows, k))
    x[:, [3, 17, 40, 77]] *= 50
    return x.astype(np.float32)


def test_search_beats_rtn_on_salient_channels():
    rng = np.random.default_rng(0)
    k, n = 128, 64
    x = _activations(rng, 2048, k)
    weights = [rng.standard_normal((k, n)).astype(np.float32) * 0.02 for _ in range(2)]
    found = search_scales(weights, np.abs(x).mean(axis=0), np.square(x.astype(np.float64)).mean(axis=0), bits=4, block_size=32)
    assert found.alpha > 0
    assert found.error <= found.error_rtn  # alpha = 0 is RTN and is on the grid
    # The measured output error on the activations themselves drops too, not just the proxy.
    def output_error(s):
        return sum(np.square(x @ w - (x / s) @ blockwise.fake_quantize(w * s[:, None], 4, 32)).sum() for w in weights)
    ones = np.ones(k, np.float32)
    assert output_error(found.scales) < 0.7 * output_error(ones)
    assert weighted_error(weights, np.ones(k), ones, 4, 32) > 0


def test_awq_graph_matches_numpy(tmp_path):
    import onnx_ir as ir
    import onnxruntime as ort

    rng = np.random.default_rng(1)
    k, n1, n2 = 96, 40, 24  # K = 3 blocks of 32: an odd count of zero-point nibbles
    model, ws = shared_input_matmuls(rng, k, (n1, n2))

    calib = _activations(rng, 512, k)
    obs = TensorObserver(k)
    obs.update(calib)
    table = {"tensors": {"X": obs.to_json()}}
    summary = quantize_model(model, bits=4, block_size=32, method="awq", table=table, accuracy_level=0, progress=False)
    assert summary["awq"]["groups"] == 1 and summary["matmuls"] == 2
    assert sorted(nd.op_type for nd in model.graph) == ["MatMulNBits", "MatMulNBits", "Mul"]  # one Mul for both

    found = search_scales(ws, obs.abs_mean, obs.mean_square, bits=4, block_size=32)
    assert summary["awq"]["alpha"]["X"] == found.alpha
    x = _activations(rng, 5, k)
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"X": x})
    x_scaled = (x * (1.0 / found.scales).astype(np.float32)).astype(np.float64)  # the graph's Mul, in fp32
    for w, y, clip in zip(ws, got, found.clips):
        w_q = blockwise.dequantize(blockwise.quantize(w * found.scales[:, None], 4, 32, clip=clip)).astype(np.float64)
        np.testing.assert_allclose(y, x_scaled @ w_q, rtol=1e-5, atol=1e-5)
        # And it approximates the unquantized product (4-bit blocks: a few percent of its norm).
        assert np.linalg.norm(x_scaled @ w_q - x @ w) < 0.1 * np.linalg.norm(x @ w)


def test_clip_search_lowers_the_weighted_error_block_by_block():
    rng = np.random.default_rng(2)
    k, n = 96, 16
    w = rng.standard_t(df=2, size=(k, n)).astype(np.float32) * 0.02  # heavy tails: clipping pays
    m = rng.uniform(0.5, 2.0, k)
    clip, err = search_clip(w, m, 4, 32)
    assert clip.shape == (n, 3) and clip.min() < 1.0 and clip.max() <= 1.0
    unclipped = float(m @ np.square(w - blockwise.fake_quantize(w, 4, 32), dtype=np.float64).sum(axis=1))
    clipped = float(m @ np.square(w - blockwise.fake_quantize(w, 4, 32, clip=clip), dtype=np.float64).sum(axis=1))
    assert clipped == pytest.approx(err, rel=1e-9) and clipped < 0.98 * unclipped  # seen 0.951
