"""optimum_forms.TorchScriptForms: the step that applies every optimum_* rule to a fixed point (each rule
has its own test file, tests/passes/test_optimum_<rule>.py; the step on real optimum exports is in
tests/test_optimum_optimize.py)."""

from __future__ import annotations

from conftest import onnx_model

from onnxopt.passes.optimum_forms import TorchScriptForms, rules

RMS_NORM = """
<ir_version: 10, opset_import: ["" : 20]>
g (float[B, S, 8] x) => (float[B, S, 8] y) {
    two = Constant <value = float {2.0}> ()
    axes = Constant <value = int64[1] {-1}> ()
    eps = Constant <value = float {1e-6}> ()
    p = Pow(x, two)
    m = ReduceMean <keepdims = 1, noop_with_empty_axes = 0> (p, axes)
    a = Add(m, eps)
    r = Sqrt(a)
    d = Reciprocal(r)
    y = Mul(x, d)
}
"""


def test_every_rule_module_is_in_the_step():
    names = {rule.name for rule in rules().rules}
    assert {"DivOneToReciprocal", "ReduceMeanDefaultAttributes", "TorchExpandIdiom", "ReshapeToConstantShape",
            "GatherStaticDim", "ShapeDimFromGraphInput", "WhereScalarTrue", "WhereScalarFalse"} <= names


def test_forms_pass_leaves_a_graph_without_torchscript_forms_unchanged():
    model = onnx_model(RMS_NORM)
    before = sorted(n.op_type for n in model.graph if n.op_type != "Constant")
    forms = TorchScriptForms()
    forms(model)
    assert forms.rewired == 0 and sorted(n.op_type for n in model.graph if n.op_type != "Constant") == before
