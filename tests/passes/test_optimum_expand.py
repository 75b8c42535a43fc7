"""optimum_expand: torch's expand(-1) idiom (Where(Equal(s, -1), 1, s)) becomes a plain Expand."""

from __future__ import annotations

import numpy as np

from conftest import apply_rules, onnx_model, run_onnx

from onnxopt.passes import optimum_expand

HEADER = '<ir_version: 10, opset_import: ["" : 20]>\n'

EXPAND = HEADER + """
g (float[1, 8, 1] f, int64[B, S] ids) => (float[B, 8, 1] y) {
    shape = Shape(ids)
    i0 = Constant <value = int64 {0}> ()
    b = Gather <axis = 0> (shape, i0)
    zero = Constant <value = int64[1] {0}> ()
    b1 = Unsqueeze(b, zero)
    rest = Constant <value = int64[2] {-1, 1}> ()
    s = Concat <axis = 0> (b1, rest)
    n = Constant <value = int64[1] {3}> ()
    ones = ConstantOfShape <value = int64[1] {1}> (n)
    minus = Constant <value = int64 {%s}> ()
    neg = Mul(ones, minus)
    eq = Equal(s, neg)
    target = Where(eq, ones, s)
    y = Expand(f, target)
}
"""


def test_torch_expand_idiom_becomes_plain_expand():
    model = onnx_model(EXPAND % "-1")
    feeds = {"f": np.arange(8, dtype=np.float32).reshape(1, 8, 1), "ids": np.zeros((3, 2), np.int64)}
    want = run_onnx(model, feeds)[0]
    assert apply_rules(optimum_expand.rules(), model) == 1
    assert "Where" not in [n.op_type for n in model.graph if n.outputs[0].uses()]
    np.testing.assert_array_equal(run_onnx(model, feeds)[0], want)


def test_where_that_replaces_other_values_stays():
    model = onnx_model(EXPAND % "-2")
    assert apply_rules(optimum_expand.rules(), model) == 0
