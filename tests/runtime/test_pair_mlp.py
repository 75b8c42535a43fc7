"""runtime/device_graph.py pair_mlp: which gate/up + down LinearFp8 parts run as one (linear_fp8_prefill.cuda_mlp)."""

from __future__ import annotations

import pytest

from onnxopt.custom_ops import linear, linear_fp8, linear_fp8_prefill
from onnxopt.runtime.device_graph import _Part, pair_mlp

GATE_UP = {"activation": "", "epsilon": 1e-5, "input_activation": ""}
DOWN = {"activation": "", "epsilon": 1e-5, "input_activation": "swiglu"}


def _op(inputs, output, attributes, op=linear_fp8, x=None):
    args = [("value", x or inputs[0])] + [("const", f"{output}.w")] + [None] * 3 + [("const", f"{output}.s")] * 2
    return _Part("op", list(inputs), [output], op=op, args=args, attributes=dict(attributes))


def _layer(i):
    return [
        _op([f"h{i}"], f"gu{i}", GATE_UP),
        _op([f"gu{i}", f"h{i}"], f"h{i + 1}", DOWN),  # down: X = gate | up, the residual h_i
    ]


@pytest.fixture(autouse=True)
def _pairing_on(monkeypatch):
    monkeypatch.setattr(linear_fp8_prefill, "MLP_PAIR", True)


def test_each_gate_up_and_its_down_become_one_part():
    parts = [_Part("ort", ["ids"], ["h0"])] + _layer(0) + _layer(1) + [_Part("ort", ["h2"], ["logits"])]
    merged, paired = pair_mlp(parts, {"logits"})
    assert paired == 2 and len(merged) == 4
    pair = merged[1]
    assert pair.inputs == ["h0"] and pair.outputs == ["h1"] and pair.attributes == {}
    assert pair.op.split == 7 and pair.op.attributes == (GATE_UP, DOWN)
    assert pair.args[:7] == parts[1].args and pair.args[7:] == parts[2].args[1:]  # down's X left out


def test_no_pair_where_the_product_is_read_elsewhere_or_the_ops_do_not_fit(monkeypatch):
    layer = _layer(0)
    # the packed product is also a graph output, or read by a later part
    assert pair_mlp(layer, {"gu0"})[1] == 0
    assert pair_mlp(layer + [_Part("ort", ["gu0"], ["y"])], {"y"})[1] == 0
    # down without the SwiGLU input, gate/up with an activation, a float Linear, not adjacent
    assert pair_mlp([layer[0], _op(["gu0"], "h1", GATE_UP)], set())[1] == 0
    assert pair_mlp([_op(["h0"], "gu0", {**GATE_UP, "activation": "swiglu"}), layer[1]], set())[1] == 0
    assert pair_mlp([_op(["h0"], "gu0", GATE_UP, op=linear), layer[1]], set())[1] == 0
    assert pair_mlp([layer[0], _Part("ort", ["h0"], ["z"]), layer[1]], {"z"})[1] == 0
    # ONNXOPT_FP8_MLP_PAIR=0
    monkeypatch.setattr(linear_fp8_prefill, "MLP_PAIR", False)
    assert pair_mlp(layer, set())[1] == 0
