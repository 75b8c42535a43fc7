"""onnxopt::SwiGLU: the NumPy reference (the definition) against the decomposition run in ORT CPU.

The CuPy kernel joins this sweep when it lands (CUDA runtime issue), as a third column marked `gpu`.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnxopt.custom_ops import swiglu
from onnxopt.passes.swiglu import decompose_rules

# (dtype, decomposition) -> (atol, rtol) of the decomposition against `swiglu.reference`.
TOLERANCES = {
    # float32: ORT's Sigmoid / QuickGelu use MLAS's rational approximation of the logistic (absolute error
    # ~1e-7), multiplied by |gate * up| (up to ~1e2 for these inputs); measured max 1.5e-6 at F = 769.
    ("float32", "quick-gelu"): (5e-6, 1e-5),
    ("float32", "sigmoid-mul"): (5e-6, 1e-5),
    # float16: the reference rounds once (computed in float32); ORT rounds silu(gate) to float16 before
    # the Mul, so up to ~2 ulp (2^-10 relative each) separate them.
    ("float16", "quick-gelu"): (1e-3, 2e-3),
    ("float16", "sigmoid-mul"): (1e-3, 2e-3),
}


def _decomposed_session(dtype: np.dtype, quick_gelu: bool) -> ort.InferenceSession:
    """A one-node model X -> onnxopt::SwiGLU -> Y, decomposed by the CPU rule, in an ORT session."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.from_numpy(dtype)), shape=ir.Shape(["B", "S", "F2"]))
    node = ir.node("SwiGLU", [x], domain=swiglu.DOMAIN, version=swiglu.VERSION)
    swiglu.infer_node(node)
    node.outputs[0].name = "y"
    graph = ir.Graph([x], node.outputs, nodes=[node], opset_imports={"": 20, swiglu.DOMAIN: swiglu.VERSION})
    model = ir.Model(graph, ir_version=10)
    assert decompose_rules(quick_gelu=quick_gelu).apply_to_model(model) == 1
    assert all(n.domain != swiglu.DOMAIN for n in model.graph)
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("variant", ["quick-gelu", "sigmoid-mul"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("f", [1, 7, 769])
def test_decomposition_matches_reference(dtype, variant, f):
    rng = np.random.default_rng(f)
    x = (rng.standard_normal((2, 3, 2 * f)) * 3).astype(dtype)
    expected = swiglu.reference(x)  # the reference first: it is the definition
    session = _decomposed_session(np.dtype(dtype), quick_gelu=variant == "quick-gelu")
    (y,) = session.run(None, {"x": x})
    assert y.dtype == x.dtype and y.shape == (2, 3, f)
    atol, rtol = TOLERANCES[(dtype, variant)]
    np.testing.assert_allclose(y.astype(np.float32), expected.astype(np.float32), atol=atol, rtol=rtol)


def test_reference_is_silu_gate_times_up():
    x = np.array([[1.0, 0.0, 2.0, 5.0]], dtype=np.float32)  # gate [1, 0], up [2, 5]
    np.testing.assert_allclose(swiglu.reference(x), [[2.0 / (1.0 + np.exp(-1.0)), 0.0]], rtol=1e-6)
    with pytest.raises(ValueError, match="even last axis"):
        swiglu.reference(np.zeros((2, 3), np.float32))


def test_infer_output():
    float32 = ir.DataType.FLOAT
    assert swiglu.infer_output(ir.Shape(["B", "S", 14]), float32) == (ir.Shape(["B", "S", 7]), float32)
    shape, dtype = swiglu.infer_output(ir.Shape(["B", "F2"]), ir.DataType.FLOAT16)
    assert shape[0] == ir.SymbolicDim("B") and shape[1].value is None and dtype == ir.DataType.FLOAT16
    assert swiglu.infer_output(None, float32) == (None, float32)
    with pytest.raises(ValueError, match="even last axis"):
        swiglu.infer_output(ir.Shape([3]), float32)
    with pytest.raises(ValueError, match="accepts"):
        swiglu.infer_output(ir.Shape([4]), ir.DataType.INT64)
