"""passes/w8a8_integer.py: the int8 scheme's Q/DQ MatMuls as MatMulInteger + scaling compute what the
Q/DQ graph computes (the same integers; only the float scaling rounds differently)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from conftest import shared_input_matmuls

from onnxopt.calibration.observers import TensorObserver
from onnxopt.passes import w8a8_integer
from onnxopt.quantize import quantize_model


def _w8a8(rng, alpha, fmt="int8"):
    model, _ = shared_input_matmuls(rng)
    obs = TensorObserver(96)
    x = rng.standard_normal((512, 96)).astype(np.float32)
    x[:, [3, 17]] *= 30
    obs.update(x)
    quantize_model(model, bits=8, block_size=32, method="smoothquant", alpha=alpha,
                   table={"tensors": {"X": obs.to_json()}}, progress=False, fmt=fmt)
    return model


def _run(model, x):
    import onnxruntime as ort

    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"X": x})


@pytest.mark.parametrize("alpha", [0.0, 0.9])
def test_integer_form_equals_the_qdq_graph(alpha):
    rng = np.random.default_rng(0)
    model = _w8a8(rng, alpha)
    x = rng.standard_normal((7, 96)).astype(np.float32)
    want = _run(model, x)
    assert w8a8_integer.apply(model) == 2
    ops = [n.op_type for n in model.graph]
    assert ops.count("MatMulInteger") == 2 and "MatMul" not in ops and "DequantizeLinear" not in ops
    assert ops.count("QuantizeLinear") == 1  # one int8 quantization of the shared input
    q = next(n for n in model.graph if n.op_type == "QuantizeLinear")
    assert q.inputs[2].const_value.numpy().dtype == np.int8
    got = _run(model, x)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6 * float(np.abs(w).max()))


def test_fp8_and_float_matmuls_are_left_alone():
    rng = np.random.default_rng(1)
    assert w8a8_integer.apply(_w8a8(rng, 0.0, fmt="fp8")) == 0
    model, _ = shared_input_matmuls(rng)
    assert w8a8_integer.apply(model) == 0


def test_float16_graph_scales_in_float32_and_casts_back():
    """int32 sums pass float16's range (65504): the accumulator is scaled in float32, then cast."""
    rng = np.random.default_rng(2)
    model, _ = shared_input_matmuls(rng)
    for value in (*model.graph.inputs, *model.graph.outputs):
        value.type = ir.TensorType(ir.DataType.FLOAT16)
    for value in model.graph.initializers.values():
        value.const_value = ir.Tensor(value.const_value.numpy().astype(np.float16), name=value.name)
        value.type = ir.TensorType(ir.DataType.FLOAT16)
    obs = TensorObserver(96)
    obs.update(rng.standard_normal((512, 96)).astype(np.float32) * 40)
    quantize_model(model, bits=8, block_size=32, method="smoothquant", alpha=0.0,
                   table={"tensors": {"X": obs.to_json()}}, progress=False)
    x = (rng.standard_normal((5, 96)) * 40).astype(np.float16)
    want = _run(model, x)
    assert w8a8_integer.apply(model) == 2
    casts = [n for n in model.graph if n.op_type == "Cast"]
    assert [c.attributes.get_int("to") for c in casts].count(ir.DataType.FLOAT16) == 2
    got = _run(model, x)
    for w, g in zip(want, got):
        assert g.dtype == np.float16
        np.testing.assert_allclose(g.astype(np.float32), w.astype(np.float32), rtol=2e-3, atol=2e-3 * float(np.abs(w).max()))
