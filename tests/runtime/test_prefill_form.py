"""runtime/device_graph.py prefill_form: with ONNXOPT_FP8_SWIGLU_INPUT=prefill, which gate/up + down
LinearFp8 parts a prefill runs with the SwiGLU moved into down's input (passes/linear_fp8.py swiglu_input)."""

from __future__ import annotations

import os
import subprocess
import sys

from onnxopt.custom_ops import linear, linear_fp8
from onnxopt.runtime.device_graph import _Part, prefill_form

GATE_UP = {"activation": "swiglu", "epsilon": 1e-5, "input_activation": ""}
DOWN = {"activation": "", "epsilon": 1e-5, "input_activation": ""}


def _op(inputs, output, attributes, op=linear_fp8, gamma=None):
    args = [("value", inputs[0]), ("const", f"{output}.w"), gamma, None, None] + [("const", f"{output}.s")] * 2
    return _Part("op", list(inputs), [output], op=op, args=args, attributes=dict(attributes))


def _layer(i):
    return [
        _op([f"h{i}"], f"gu{i}", GATE_UP),
        _op([f"gu{i}", f"h{i}"], f"h{i + 1}", DOWN),  # down: X = SwiGLU(gate | up), the residual h_i
    ]


def test_each_gate_up_writes_its_product_and_down_applies_the_swiglu():
    parts = [_Part("ort", ["ids"], ["h0"])] + _layer(0) + _layer(1) + [_Part("ort", ["h2"], ["logits"])]
    form, moved = prefill_form(parts, {"logits"})
    assert moved == 2 and len(form) == len(parts)
    for i in (1, 3):
        assert form[i].attributes == {**GATE_UP, "activation": ""}
        assert form[i + 1].attributes == {**DOWN, "input_activation": "swiglu"}
        # the same arguments, inputs and outputs: only the attributes differ
        for got, was in ((form[i], parts[i]), (form[i + 1], parts[i + 1])):
            assert (got.args, got.inputs, got.outputs, got.op) == (was.args, was.inputs, was.outputs, was.op)
    assert form[0] is parts[0] and form[-1] is parts[-1]
    assert parts[1].attributes == GATE_UP and parts[2].attributes == DOWN  # the decode step's parts unchanged


def test_parts_that_are_not_such_a_pair_stay():
    layer = _layer(0)
    assert prefill_form(layer, {"gu0"})[1] == 0  # gate/up's product is a graph output
    assert prefill_form(layer + [_Part("ort", ["gu0"], ["y"])], {"y"})[1] == 0  # another reader
    assert prefill_form([_op(["h0"], "gu0", {**GATE_UP, "activation": ""}), layer[1]], set())[1] == 0
    assert prefill_form([layer[0], _op(["gu0"], "h1", {**DOWN, "input_activation": "swiglu"})], set())[1] == 0
    assert prefill_form([layer[0], _op(["gu0"], "h1", DOWN, gamma=("const", "g"))], set())[1] == 0  # down's norm
    assert prefill_form([_op(["h0"], "gu0", GATE_UP, op=linear), layer[1]], set())[1] == 0  # fp16 Linear
    assert prefill_form([layer[0], _Part("ort", ["h0"], ["z"]), layer[1]], {"z"})[1] == 0  # not adjacent


def _modes(value: str | None) -> tuple[list[str], str]:
    env = {k: v for k, v in os.environ.items() if k != "ONNXOPT_FP8_SWIGLU_INPUT"}
    if value is not None:
        env["ONNXOPT_FP8_SWIGLU_INPUT"] = value
    done = subprocess.run([sys.executable, "-c", "from onnxopt.passes import linear_fp8 as p; "
                           "print(p.SWIGLU_INPUT, p.SWIGLU_INPUT_PREFILL)"],
                          env=env, capture_output=True, text=True, check=True, timeout=120)
    return done.stdout.split(), done.stderr


def test_the_environment_picks_the_mode():
    assert _modes(None)[0] == ["False", "True"]  # the default: prefill only
    assert _modes("0")[0] == ["False", "False"]
    assert _modes("1")[0] == ["True", "False"]
    assert _modes("prefill")[0] == ["False", "True"]
    values, stderr = _modes("both")
    assert values == ["False", "True"]
    assert "ONNXOPT_FP8_SWIGLU_INPUT='both'" in stderr and "Traceback" not in stderr
