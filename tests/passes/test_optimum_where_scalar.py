"""optimum_where_scalar: a [1]-shaped constant Where branch becomes a scalar, only where broadcasting
then gives the same output shape."""

from __future__ import annotations

import numpy as np

from conftest import apply_rules, onnx_model, run_onnx

from onnxopt.passes import optimum_where_scalar

HEADER = '<ir_version: 10, opset_import: ["" : 20]>\n'


def test_where_branch_of_shape_one_becomes_scalar_only_with_a_ranked_operand():
    text = HEADER + """
    g (float[2, 3] p) => (float[2, 3] y) {
        nan = IsNaN(p)
        zero = Constant <value = float[1] {0.0}> ()
        y = Where(nan, zero, p)
    }
    """
    model = onnx_model(text)
    p = np.array([[np.nan, 1, 2], [3, np.nan, 5]], np.float32)
    want = run_onnx(model, {"p": p})[0]
    assert apply_rules(optimum_where_scalar.rules(), model) == 1
    where = next(n for n in model.graph if n.op_type == "Where")
    assert where.inputs[1].const_value.shape == ()
    np.testing.assert_array_equal(run_onnx(model, {"p": p})[0], want)
    scalar = onnx_model(text.replace("float[2, 3] p", "float p").replace("float[2, 3] y", "float y"))
    assert apply_rules(optimum_where_scalar.rules(), scalar) == 0  # [1] vs [] would change the output shape
