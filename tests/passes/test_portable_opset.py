"""The portable contract steps: opset conversion 20 -> 23, and the final check that refuses non-standard ops."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnxopt.errors import UserError
from onnxopt.passes.portable_opset import ConvertOpset, StandardOpsOnly

FLOAT = ir.DataType.FLOAT


def _model(op_type="Relu", domain="", opset=20) -> ir.Model:
    x = ir.Value(name="x", type=ir.TensorType(FLOAT), shape=ir.Shape([2, 3]))
    node = ir.node(op_type, [x], domain=domain)
    node.outputs[0].name = "y"
    imports = {"": opset, **({domain: 1} if domain else {})}
    return ir.Model(ir.Graph([x], node.outputs, nodes=[node], opset_imports=imports), ir_version=10)


def test_converts_to_opset_23_and_runs():
    model = _model()
    assert ConvertOpset(23)(model).modified
    assert model.opset_imports[""] == 23
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.array([[-1, 0, 2], [3, -4, 5]], np.float32)
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], np.maximum(x, 0))
    assert not ConvertOpset(23)(model).modified  # already there


def test_standard_graph_passes_and_loses_unused_imports():
    model = _model(opset=23)
    model.opset_imports["com.microsoft"] = 1
    StandardOpsOnly(23)(model)
    assert dict(model.opset_imports) == {"": 23}


@pytest.mark.parametrize("op_type,domain", [("QuickGelu", "com.microsoft"), ("SwiGLU", "onnxopt")])
def test_non_standard_op_is_refused_by_name(op_type, domain):
    with pytest.raises(UserError, match=f"{domain}::{op_type} x1"):
        StandardOpsOnly(23)(_model(op_type, domain, opset=23))


def test_other_opset_is_refused():
    with pytest.raises(UserError, match="opset 20, expected 23"):
        StandardOpsOnly(23)(_model(opset=20))
