"""optimum_shape_gather: Gather(Shape(x), k) of a static dim becomes that int; a symbolic dim stays."""

from __future__ import annotations

import numpy as np

from conftest import apply_rules, onnx_model, run_onnx

from onnxopt.passes import optimum_shape_gather

HEADER = '<ir_version: 10, opset_import: ["" : 20]>\n'


def test_gather_of_a_static_dim_becomes_a_constant_and_a_symbolic_one_stays():
    text = HEADER + """
    g (float[B, 4, S, 16] x) => (int64 h, int64 s) {
        shape = Shape(x)
        i3 = Constant <value = int64 {3}> ()
        i2 = Constant <value = int64 {2}> ()
        hd = Gather <axis = 0> (shape, i3)
        sd = Gather <axis = 0> (shape, i2)
        h = Identity(hd)
        s = Identity(sd)
    }
    """
    model = onnx_model(text)
    assert apply_rules(optimum_shape_gather.rules(), model) == 1
    x = np.zeros((2, 4, 5, 16), np.float32)
    assert [int(v) for v in run_onnx(model, {"x": x})] == [16, 5]
