"""W8A8 with SmoothQuant: the Q/DQ graph ORT runs against the NumPy integer reference."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import shared_input_matmuls

from onnxopt.calibration import smoothquant
from onnxopt.calibration.observers import TensorObserver
from onnxopt.quantize import quantize_model


def _activations(rng, rows, k):
    x = rng.standard_normal((rows, k))
    x[:, [3, 17, 40, 77]] *= 30  # outlier channels, as in LLM activations
    return x.astype(np.float32)


def _quantized_pair(rng, alpha, **kwargs):
    """Two MatMuls on one input, calibrated on 512 rows and quantized W8A8: (model, weights, observer)."""
    model, ws = shared_input_matmuls(rng)
    obs = TensorObserver(96)
    obs.update(_activations(rng, 512, 96))
    summary = quantize_model(model, bits=8, block_size=32, method="smoothquant", alpha=alpha,
                             table={"tensors": {"X": obs.to_json()}}, progress=False, **kwargs)
    assert summary["matmuls"] == 2
    return model, ws, obs


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_w8a8_graph_matches_integer_reference(alpha):
    import onnx_ir as ir
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    model, ws, obs = _quantized_pair(rng, alpha)
    ops = sorted(n.op_type for n in model.graph)
    assert ops.count("QuantizeLinear") == 1 and ops.count("MatMul") == 2 and ("Mul" in ops) == (alpha > 0)

    x = _activations(rng, 6, 96)
    x = np.clip(x, obs.channel_min.astype(np.float32), obs.channel_max.astype(np.float32))  # inside the calibrated range
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"X": x})

    absmax = np.maximum(np.abs(obs.channel_min), np.abs(obs.channel_max))
    s = smoothquant.smooth_scales(absmax, ws, alpha) if alpha > 0 else np.ones(96, np.float32)
    a_scale, a_zp = smoothquant.activation_qparams(obs.channel_min, obs.channel_max, s)
    xs = x * (1.0 / s).astype(np.float32) if alpha > 0 else x
    xq = np.clip(np.rint(xs / a_scale) + int(a_zp), 0, 255)
    x_dq = (xq - int(a_zp)) * np.float64(a_scale)
    for w, y in zip(ws, got):
        wq, w_scale = smoothquant.weight_qparams(w * s[:, None])
        want = x_dq @ (wq.astype(np.float64) * w_scale)
        # Integer products summed exactly; a tie rounded the other way moves one input by one step.
        tol = float(a_scale) * np.abs(wq * w_scale).max() * 2 + 1e-5 * np.abs(want).max()
        np.testing.assert_allclose(y, want, rtol=0, atol=tol)
        # And it approximates the float product (8-bit steps of the whole range).
        assert np.linalg.norm(y - x @ w) < 0.05 * np.linalg.norm(x @ w)


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_fp8_graph_matches_e4m3_reference(alpha):
    """fmt fp8: float8e4m3fn Q/DQ in ORT against NumPy's E4M3 (ml_dtypes) rounding of the same scales."""
    import ml_dtypes
    import onnx_ir as ir
    import onnxruntime as ort

    rng = np.random.default_rng(2)
    model, ws, obs = _quantized_pair(rng, alpha, fmt="fp8")
    fp8 = [v for v in model.graph.initializers.values() if v.const_value.dtype == ir.DataType.FLOAT8E4M3FN]
    assert len(fp8) == 3  # two weights and the activations' zero point

    x = _activations(rng, 6, 96)
    x[0, 3] = obs.channel_max[3] * 4  # past the calibrated range: saturates at 448 steps, never NaN
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"X": x})

    absmax = np.maximum(np.abs(obs.channel_min), np.abs(obs.channel_max))
    s = smoothquant.smooth_scales(absmax, ws, alpha) if alpha > 0 else np.ones(96, np.float32)
    a_scale = smoothquant.fp8_activation_scale(obs.channel_min, obs.channel_max, s)
    assert a_scale == pytest.approx(float(np.max(absmax / s)) / 448, rel=1e-6)
    xs = (x * (1.0 / s).astype(np.float32)) if alpha > 0 else x
    x_dq = smoothquant.to_fp8(xs / a_scale).astype(np.float64) * a_scale
    for w, y in zip(ws, got):
        wq, w_scale = smoothquant.fp8_weight_qparams(w * s[:, None])
        assert wq.dtype == ml_dtypes.float8_e4m3fn and np.abs(wq.astype(np.float32)).max() == 448
        want = x_dq @ (wq.astype(np.float64) * w_scale)
        # E4M3 products are exact in fp32; only fp32 summation differs (seen ~1e-7 relative).
        np.testing.assert_allclose(y, want, rtol=0, atol=1e-5 * np.abs(want).max())
        assert np.all(np.isfinite(y))
        # E4M3 keeps ~6 % relative steps at every magnitude, so the inliers (rows 1-5) stay close.
        assert np.linalg.norm(y[1:] - x[1:] @ w) < 0.06 * np.linalg.norm(x[1:] @ w)


def test_fp8_cast_saturates_and_rounds_to_nearest_even():
    values = np.array([0.0, 1.0, 1.0625, 1.1875, 500.0, -1e9, 448.0, 2.0**-9, 2.0**-11], np.float32)
    got = smoothquant.to_fp8(values).astype(np.float32)
    # 1.0625 ties between 1.0 and 1.125 (even mantissa: 1.0); 1.1875 ties between 1.125 and 1.25 (1.25);
    # 2^-9 is E4M3's smallest subnormal, 2^-11 rounds to 0.
    np.testing.assert_array_equal(got, [0.0, 1.0, 1.0, 1.25, 448.0, -448.0, 448.0, 2.0**-9, 0.0])


def test_smoothing_shrinks_activation_range():
    rng = np.random.default_rng(1)
    x = _activations(rng, 256, 96)
    w = rng.standard_normal((96, 32)).astype(np.float32) * 0.05
    absmax = np.abs(x).max(axis=0)
    s = smoothquant.smooth_scales(absmax, [w], 0.5)
    # With alpha 0.5 channel k's activation range becomes sqrt(max|X_k| * max|W_k|): outliers flatten.
    np.testing.assert_allclose(absmax / s, np.sqrt(absmax * np.abs(w).max(axis=1)), rtol=1e-5)
    assert (absmax / s).max() / np.median(absmax / s) < absmax.max() / np.median(absmax)


def test_alpha_search_prefers_smoothing_for_outlier_channels():
    rng = np.random.default_rng(2)
    x = _activations(rng, 1024, 96)
    obs = TensorObserver(96)
    obs.update(x)
    stats = {"channel_min": obs.channel_min, "channel_max": obs.channel_max, "mean_square": obs.mean_square}
    w = rng.standard_normal((96, 32)).astype(np.float32) * 0.05
    alpha = smoothquant.search_alpha([w], stats)
    assert alpha > 0
    assert smoothquant.expected_error([w], stats, alpha) < smoothquant.expected_error([w], stats, 0.0)


def test_massive_activation_groups_stay_weight_only():
    """--outlier-limit: an input whose max|x| is far beyond its 99.99th percentile keeps MatMulNBits."""
    rng = np.random.default_rng(3)
    model, ws = shared_input_matmuls(rng)
    calib = _activations(rng, 20000, 96)
    calib[7, 5] = 5000.0  # one massive activation: max|x| / p99.99 is in the hundreds
    obs = TensorObserver(96)
    obs.update(calib)
    table = {"tensors": {"X": obs.to_json()}}
    summary = quantize_model(model, bits=8, block_size=32, method="smoothquant", table=table, outlier_limit=32,
                             accuracy_level=0, progress=False)
    assert summary["weight_only_inputs"] == ["X"]
    assert sorted(n.op_type for n in model.graph) == ["MatMulNBits", "MatMulNBits"]
    model, _ = shared_input_matmuls(np.random.default_rng(3))
    summary = quantize_model(model, bits=8, block_size=32, method="smoothquant", table=table, outlier_limit=1e6, progress=False)
    assert "weight_only_inputs" not in summary and "QuantizeLinear" in {n.op_type for n in model.graph}


@pytest.mark.parametrize("method", ["smoothquant", "gptq"])
def test_named_inputs_stay_weight_only(method):
    """weight_only (`--weight-only-input`): mixed precision by name, with either W8A8 method."""
    rng = np.random.default_rng(4)
    model, _ = shared_input_matmuls(rng)
    x = _activations(rng, 512, 96)
    obs = TensorObserver(96)
    obs.update(x)
    table = {"tensors": {"X": obs.to_json()}}
    hessians = {"X": x.T.astype(np.float64) @ x / len(x)}
    summary = quantize_model(model, bits=8, block_size=32, method=method, table=table, weight_only=["X"], fmt="fp8",
                             hessians=hessians, accuracy_level=0, progress=False)
    assert summary["weight_only_inputs"] == ["X"] and "gptq" not in summary
    assert sorted(n.op_type for n in model.graph) == ["MatMulNBits", "MatMulNBits"]
    model, _ = shared_input_matmuls(np.random.default_rng(4))
    summary = quantize_model(model, bits=8, block_size=32, method=method, table=table, weight_only=["Y"], fmt="fp8",
                             hessians=hessians, progress=False)
    assert "weight_only_inputs" not in summary and "QuantizeLinear" in {n.op_type for n in model.graph}


def _outlier_case(rng, fmt, alpha, method, outlier_channels):
    """Two MatMuls on X with four large channels, quantized W8A8 with `outlier_channels` kept in float:
    (model, weights, observer, hessian, summary)."""
    model, ws = shared_input_matmuls(rng)
    calib = _activations(rng, 512, 96)
    obs = TensorObserver(96)
    obs.update(calib)
    hessian = calib.T.astype(np.float64) @ calib / len(calib)
    summary = quantize_model(model, bits=8, block_size=32, method=method, alpha=alpha, fmt=fmt, hessians={"X": hessian},
                             table={"tensors": {"X": obs.to_json()}}, outlier_channels=outlier_channels, progress=False)
    return model, ws, obs, hessian, summary


@pytest.mark.parametrize("fmt,alpha", [("fp8", 0.0), ("fp8", 0.5), ("int8", 0.5)])
@pytest.mark.parametrize("method", ["smoothquant", "gptq"])
def test_outlier_channels_match_the_decomposition(fmt, alpha, method):
    """outlier_channels n: Y = DQ(Q(X' masked)) DQ(W'_q) + X[:, idx] W_float, against NumPy."""
    import onnx_ir as ir
    import onnxruntime as ort

    rng = np.random.default_rng(5)
    model, ws, obs, hessian, summary = _outlier_case(rng, fmt, alpha, method, 4)
    ops = [n.op_type for n in model.graph]
    assert ops.count("Gather") == 1 and ops.count("MatMul") == 4 and ops.count("Add") == 2  # the Gather is shared
    assert [v.name for v in model.graph.outputs] == ["Y0", "Y1"]

    absmax = np.maximum(np.abs(obs.channel_min), np.abs(obs.channel_max))
    s = smoothquant.smooth_scales(absmax, ws, alpha) if alpha > 0 else np.ones(96, np.float32)
    idx = np.sort(np.argsort(-(absmax / s))[:4])
    if alpha == 0:
        np.testing.assert_array_equal(idx, [3, 17, 40, 77])  # _activations' large channels
    assert summary["outlier_channel_index"] == {"X": idx.tolist()}
    kept = np.setdiff1d(np.arange(96), idx)

    x = _activations(rng, 6, 96)
    x[0, 3] = obs.channel_max[3] * 4  # an outlier past its calibrated range: exact in the float part
    x[1:] = np.clip(x[1:], obs.channel_min.astype(np.float32), obs.channel_max.astype(np.float32))
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"X": x})

    xs = (x * (1.0 / s).astype(np.float32))[:, kept]  # X' without the outlier channels
    lo, hi = obs.channel_min[kept] / s[kept], obs.channel_max[kept] / s[kept]
    if fmt == "fp8":
        a_scale = np.float32(max(np.abs(lo).max(), np.abs(hi).max()) / 448)
        x_dq = smoothquant.to_fp8(xs / a_scale).astype(np.float64) * a_scale
        weight_q = smoothquant.fp8_weight_qparams
    else:
        a_scale, a_zp = smoothquant.activation_qparams(lo, hi, np.ones(len(kept), np.float32))
        x_dq = (np.clip(np.rint(xs / a_scale) + int(a_zp), 0, 255) - int(a_zp)) * np.float64(a_scale)
        weight_q = smoothquant.weight_qparams
    if method == "gptq":
        quantized, _ = smoothquant.gptq_weights(ws, s, hessian, fmt, float_rows=idx)
    else:
        quantized = [(*weight_q((w * s[:, None])[kept]), (w * s[:, None])[idx]) for w in ws]
    for w, y, (wq, w_scale, rows) in zip(ws, got, quantized):
        if method == "gptq":
            wq = wq[kept]
        want = x_dq @ (wq.astype(np.float64) * w_scale) + x[:, idx].astype(np.float64) @ (rows / s[idx, None])
        # 8-bit products are exact in fp32 (int8: integers); fp32 summation and the float rows' cast
        # to fp32 remain (~1e-7 relative). int8: a tie rounded the other way moves one input by one step.
        tol = 1e-5 * np.abs(want).max() + (float(a_scale) * np.abs(wq * w_scale).max() * 2 if fmt == "int8" else 0)
        np.testing.assert_allclose(y, want, rtol=0, atol=tol)
        assert np.all(np.isfinite(y))


def test_outlier_channels_lower_the_fp8_error_and_zero_keeps_the_graph():
    """Taking the large channels out of the E4M3 product lowers the error; n = 0 is the graph of before."""
    import onnx_ir as ir
    import onnxruntime as ort

    errors = {}
    x = _activations(np.random.default_rng(6), 64, 96)
    for n in (0, 4):
        model, ws, *_ = _outlier_case(np.random.default_rng(5), "fp8", 0.0, "gptq", n)
        session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
        errors[n] = sum(np.linalg.norm(y - x @ w) for y, w in zip(session.run(None, {"X": x}), ws))
    assert errors[4] < 0.5 * errors[0], errors

    for method in ("smoothquant", "gptq"):
        default, _ = shared_input_matmuls(np.random.default_rng(5))
        zero, _, obs, hessian, summary = _outlier_case(np.random.default_rng(5), "fp8", 0.0, method, 0)
        quantize_model(default, bits=8, block_size=32, method=method, alpha=0.0, fmt="fp8", hessians={"X": hessian},
                       table={"tensors": {"X": obs.to_json()}}, progress=False)
        assert "outlier_channel_index" not in summary
        assert {n.op_type for n in zero.graph} == {"QuantizeLinear", "DequantizeLinear", "MatMul"}
        assert ir.to_proto(zero).SerializeToString() == ir.to_proto(default).SerializeToString()
