"""optimum_reshape: a Reshape whose shape is built from Shape ops becomes a constant shape (0 = copy
x's dim, -1 resolved), only where that is provably the same shape."""

from __future__ import annotations

import numpy as np

from conftest import apply_rules, onnx_model, run_onnx

from onnxopt.passes import optimum_reshape

HEADER = '<ir_version: 10, opset_import: ["" : 20]>\n'

RESHAPE = HEADER + """
g (float[B, S, 64] x) => (float[B, S, H, 16] y) {
    shape = Shape(x)
    i0 = Constant <value = int64 {0}> ()
    i1 = Constant <value = int64 {1}> ()
    b = Gather <axis = 0> (shape, i0)
    s = Gather <axis = 0> (shape, i1)
    zero = Constant <value = int64[1] {0}> ()
    b1 = Unsqueeze(b, zero)
    s1 = Unsqueeze(s, zero)
    rest = Constant <value = int64[2] {%s, 16}> ()
    target = Concat <axis = 0> (b1, s1, rest)
    y = Reshape(x, target)
}
"""


def test_reshape_to_dims_of_its_input_becomes_constant_with_resolved_heads():
    model = onnx_model(RESHAPE % "-1")
    x = np.random.default_rng(1).standard_normal((2, 3, 64)).astype(np.float32)
    want = run_onnx(model, {"x": x})[0]
    assert apply_rules(optimum_reshape.rules(), model) == 1
    reshape = next(n for n in model.graph if n.op_type == "Reshape")
    assert reshape.inputs[1].const_value.numpy().tolist() == [0, 0, 4, 16]  # -1 = 64 / 16
    np.testing.assert_array_equal(run_onnx(model, {"x": x})[0], want)


def test_reshape_with_allowzero_stays():
    model = onnx_model(RESHAPE.replace("y = Reshape(x, target)", "y = Reshape <allowzero = 1> (x, target)") % "-1")
    assert apply_rules(optimum_reshape.rules(), model) == 0


def test_reshape_with_a_dim_of_another_tensor_stays():
    text = RESHAPE.replace("shape = Shape(x)", "shape = Shape(z)")
    text = text.replace("(float[B, S, 64] x)", "(float[B, S, 64] x, float[S, B, 64] z)")
    model = onnx_model(text % "-1")
    assert apply_rules(optimum_reshape.rules(), model) == 0  # dim 0 of z is S, not B: copying x's dim 0 would be wrong
