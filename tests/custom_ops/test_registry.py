"""The registry of `onnxopt` ops: every op module has the full interface, and typing reaches each node."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from onnxopt.custom_ops import registry


@pytest.mark.parametrize("op_type", sorted(registry.OPS))
def test_op_modules_have_the_interface(op_type):
    module = registry.OPS[op_type]
    assert module.DOMAIN == registry.DOMAIN and module.OP_TYPE == op_type and module.VERSION >= 1
    for name in ("DTYPES", "reference", "infer_node", "decompose"):
        assert hasattr(module, name), f"{op_type} lacks {name}"


def test_infer_types_and_unknown_op():
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT16), shape=ir.Shape(["N", 10]))
    node = ir.node("SwiGLU", [x], domain=registry.DOMAIN)
    graph = ir.Graph([x], node.outputs, nodes=[node])
    assert registry.infer_types(graph) == 1
    assert node.outputs[0].shape == ir.Shape(["N", 5]) and node.outputs[0].dtype == ir.DataType.FLOAT16
    unknown = ir.node("NoSuchOp", [x], domain=registry.DOMAIN)
    with pytest.raises(ValueError, match="Unknown op onnxopt::NoSuchOp"):
        registry.op_module(unknown)
    assert registry.op_module(ir.node("Relu", [x])) is None
