"""SwiGLU fusion on tiny scripted MLPs: positive (every Mul operand order) and negative graphs."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnxscript.rewriter import MatchingTracer

from onnxopt.passes import swiglu

H, F = 8, 6
FLOAT = ir.DataType.FLOAT


def _mlp(*, gate_first=True, silu_first=True, const_up=True, shared_input=True, up_dtype=FLOAT) -> ir.Model:
    """y = Mul(Mul(g, Sigmoid(g)), u) with g = x @ w_gate, u = x2 @ w_up (operand orders per flags)."""
    rng = np.random.default_rng(0)
    x = ir.Value(name="x", type=ir.TensorType(FLOAT), shape=ir.Shape(["B", "S", H]))
    inputs = [x]
    b = ir.tape.Tape()
    w_gate = b.initializer(ir.tensor(rng.standard_normal((H, F)).astype(np.float32), name="w_gate"))
    w_up_array = rng.standard_normal((H, F)).astype(up_dtype.numpy())
    if const_up:
        w_up = b.initializer(ir.tensor(w_up_array, name="w_up"))
    else:
        w_up = ir.Value(name="w_up", type=ir.TensorType(FLOAT), shape=ir.Shape([H, F]))
        inputs.append(w_up)
    x_up = x
    if not shared_input:
        x_up = ir.Value(name="x2", type=ir.TensorType(FLOAT), shape=ir.Shape(["B", "S", H]))
        inputs.append(x_up)
    gate = b.op("MatMul", [x, w_gate])
    up = b.op("MatMul", [x_up, w_up])
    sig = b.op("Sigmoid", [gate])
    silu = b.op("Mul", [gate, sig] if gate_first else [sig, gate])
    y = b.op("Mul", [silu, up] if silu_first else [up, silu])
    y.name = "y"
    graph = ir.Graph(inputs, [y], nodes=b.nodes, initializers=b.initializers, opset_imports={"": 20})
    return ir.Model(graph, ir_version=10)


def _run(model: ir.Model, feeds: dict) -> np.ndarray:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _failure_reasons(model: ir.Model) -> list[str]:
    tracer = MatchingTracer()
    assert swiglu.rules().apply_to_model(model, tracer=tracer) == 0
    return [info.match_result.reason for infos in tracer.best_matches_map.values() for info in infos]


@pytest.mark.parametrize("gate_first", [True, False])
@pytest.mark.parametrize("silu_first", [True, False])
def test_fuses_then_decomposes_with_equal_outputs(gate_first, silu_first):
    model = _mlp(gate_first=gate_first, silu_first=silu_first)
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 3, H)).astype(np.float32)}
    expected = _run(model, feeds)

    assert swiglu.rules().apply_to_model(model) == 1
    ir.passes.common.RemoveUnusedNodesPass()(model)
    assert [n.op_type for n in model.graph] == ["MatMul", "SwiGLU"]  # 5 nodes -> 2
    (packed,) = [v for v in model.graph.initializers.values()]
    assert packed.shape == ir.Shape([H, 2 * F])
    assert model.graph.outputs[0].shape == ir.Shape(["B", "S", F])  # typed by custom_ops.swiglu.infer_node

    assert swiglu.decompose_rules().apply_to_model(model) == 1
    assert [n.op_type for n in model.graph] == ["MatMul", "Split", "QuickGelu", "Mul"]
    np.testing.assert_allclose(_run(model, feeds), expected, atol=1e-5, rtol=1e-5)


def test_sigmoid_mul_decomposition_uses_only_onnx_ops():
    model = _mlp()
    feeds = {"x": np.random.default_rng(2).standard_normal((1, 4, H)).astype(np.float32)}
    expected = _run(model, feeds)
    swiglu.rules().apply_to_model(model)
    assert swiglu.decompose_rules(quick_gelu=False).apply_to_model(model) == 1
    assert {n.domain for n in model.graph} == {""}
    np.testing.assert_allclose(_run(model, feeds), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        ({"const_up": False}, "not a constant initializer"),
        ({"up_dtype": ir.DataType.FLOAT16}, "Dtypes differ"),
    ],
)
def test_check_rejects_with_reason(flags, reason):
    model = _mlp(**flags)
    reasons = _failure_reasons(model)
    assert any(reason in r for r in reasons), reasons
    assert swiglu.rules().apply_to_model(model) == 0


def test_different_inputs_do_not_match():
    model = _mlp(shared_input=False)
    assert swiglu.rules().apply_to_model(model) == 0
    reasons = _failure_reasons(model)
    assert any("x_BSH bound to two different values" in r for r in reasons), reasons
