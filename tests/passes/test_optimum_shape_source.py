"""optimum_shape_source: a named symbolic dim is read from the graph input that declares it."""

from __future__ import annotations

from conftest import apply_rules, onnx_model

from onnxopt.passes import optimum_shape_source

HEADER = '<ir_version: 10, opset_import: ["" : 20]>\n'


def test_symbolic_dim_is_read_from_the_graph_input_that_declares_it():
    text = HEADER + """
    g (int64[B, T] attention_mask, float[B, T, 4] k) => (int64 t) {
        r = Relu(k)
        shape = Shape(r)
        i1 = Constant <value = int64 {1}> ()
        t = Gather <axis = 0> (shape, i1)
    }
    """
    model = onnx_model(text)
    assert apply_rules(optimum_shape_source.rules(), model) == 1
    shape = next(n for n in model.graph if n.op_type == "Shape" and n.outputs[0].uses())
    assert shape.inputs[0].name == "attention_mask"
