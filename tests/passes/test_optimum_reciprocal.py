"""optimum_reciprocal and optimum_reduce_mean: the two RMSNorm form rewrites, on an RMSNorm graph in the
TorchScript exporter's form (Div(1, Sqrt(...)), ReduceMean without noop_with_empty_axes)."""

from __future__ import annotations

import numpy as np

from conftest import apply_rules, onnx_model, run_onnx

from onnxopt.passes import optimum_reciprocal, optimum_reduce_mean

HEADER = '<ir_version: 10, opset_import: ["" : 20]>\n'

RMS_DIV = HEADER + """
g (float[B, S, 8] x) => (float[B, S, 8] y) {
    two = Constant <value = float {2.0}> ()
    axes = Constant <value = int64[1] {-1}> ()
    eps = Constant <value = float {1e-6}> ()
    one = Constant <value = float {%s}> ()
    p = Pow(x, two)
    m = ReduceMean <keepdims = 1> (p, axes)
    a = Add(m, eps)
    r = Sqrt(a)
    d = Div(one, r)
    y = Mul(x, d)
}
"""


def test_div_one_becomes_reciprocal_and_reduce_mean_gets_its_default():
    model = onnx_model(RMS_DIV % "1.0")
    x = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32)
    want = run_onnx(model, {"x": x})[0]
    assert apply_rules(optimum_reciprocal.rules(), model) == 1 and apply_rules(optimum_reduce_mean.rules(), model) == 1
    ops = [n.op_type for n in model.graph]
    assert "Reciprocal" in ops and "Div" not in ops
    mean = next(n for n in model.graph if n.op_type == "ReduceMean")
    assert mean.attributes.get_int("noop_with_empty_axes") == 0 and mean.attributes.get_int("keepdims") == 1
    # ORT's Reciprocal and Div kernels round 1/x differently by about an ulp.
    np.testing.assert_allclose(run_onnx(model, {"x": x})[0], want, rtol=1e-6, atol=0)


def test_div_by_other_numerator_stays():
    model = onnx_model(RMS_DIV % "2.0")
    assert apply_rules(optimum_reciprocal.rules(), model) == 0 and "Div" in [n.op_type for n in model.graph]
