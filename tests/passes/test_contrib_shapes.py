"""contrib_shapes: a fused com.microsoft RotaryEmbedding gets its input's shape (ORT: output shape = input shape)."""

from __future__ import annotations

import onnx_ir as ir

from onnxopt.passes.contrib_shapes import RotaryEmbeddingShapes


def _graph(out_shape):
    x = ir.Value(name="x", shape=ir.Shape(["batch", 4, "seq", 16]), type=ir.TensorType(ir.DataType.FLOAT))
    cos = ir.Value(name="cos", shape=ir.Shape(["T", 8]), type=ir.TensorType(ir.DataType.FLOAT))
    node = ir.node("RotaryEmbedding", [x, cos, cos], domain="com.microsoft", num_outputs=1)
    node.outputs[0].shape = out_shape
    return ir.Model(ir.Graph([x, cos], node.outputs, nodes=[node]), ir_version=10), node


def test_unknown_output_dims_take_the_input_shape():
    model, node = _graph(ir.Shape(["unk__3", 4, "unk__5", 16]))
    assert RotaryEmbeddingShapes()(model).modified
    assert list(node.outputs[0].shape) == list(node.inputs[0].shape)


def test_known_output_shape_is_left_alone():
    model, node = _graph(ir.Shape(["batch", 4, "seq", 16]))
    assert not RotaryEmbeddingShapes()(model).modified
