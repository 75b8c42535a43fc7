"""gqa_mask_window.probe_window on scripted masks: it accepts causal and sliding-window causal
masks (with left padding) and rejects every other mask with the reason; and the rule sets
local_window_size on real graphs (tests/test_optimum_optimize.py, Mistral with sliding_window 8)."""

from __future__ import annotations

import onnx
import onnx_ir as ir
import pytest

from conftest import needs_torch
from onnxopt.passes.gqa_mask_window import _Unsupported, probe_window

# mask[b, 0, i, j] = 0 where key j is visible to query row i (q = P + i), else -inf.
MASK = """
<ir_version: 10, opset_import: ["" : 20]>
g (int64[B, S] input_ids, int64[B, T] attention_mask) => (float[B, 1, S, T] mask) {
    ids_shape = Shape(input_ids)
    mask_shape = Shape(attention_mask)
    i1 = Constant <value = int64 {1}> ()
    s = Gather <axis = 0> (ids_shape, i1)
    t = Gather <axis = 0> (mask_shape, i1)
    p = Sub(t, s)
    zero = Constant <value = int64 {0}> ()
    one = Constant <value = int64 {1}> ()
    q_range = Range(p, t, one)
    col = Constant <value = int64[2] {-1, 1}> ()
    q = Reshape(q_range, col)
    j = Range(zero, t, one)
    causal = LessOrEqual(j, q)
    window = Constant <value = int64 {%(window)d}> ()
    lower = Sub(q, window)
    in_window = Greater(j, lower)
    keep_st = %(keep)s
    axes = Constant <value = int64[2] {1, 2}> ()
    padding = Unsqueeze(attention_mask, axes)
    valid = Cast <to = 9> (padding)
    axis0 = Constant <value = int64[2] {0, 1}> ()
    keep_11st = Unsqueeze(keep_st, axis0)
    keep = And(keep_11st, valid)
    zero_f = Constant <value = float {%(zero)s}> ()
    minus_inf = Constant <value = float {-inf}> ()
    mask = Where(keep, zero_f, minus_inf)
}
"""


def _probe(window=1 << 30, keep="And(causal, in_window)", zero="0.0"):
    model = ir.from_proto(onnx.parser.parse_model(MASK % {"window": window, "keep": keep, "zero": zero}))
    mask = model.graph.outputs[0]
    return probe_window(model, model.graph, mask)


def test_causal_mask_has_no_window():
    assert _probe() is None


@pytest.mark.parametrize("window", [1, 5, 8, 100, 4096])
def test_sliding_window_is_measured(window):
    assert _probe(window) == window


def test_bidirectional_mask_is_rejected():
    with pytest.raises(_Unsupported, match="not causal"):
        _probe(keep="Or(causal, in_window)")  # every key visible


def test_additive_bias_is_rejected():
    with pytest.raises(_Unsupported, match="bias"):
        _probe(zero="0.5")


def test_mask_on_another_input_is_rejected():
    text = MASK.replace("int64[B, T] attention_mask)", "int64[B, T] attention_mask, int64[B, T] segment_ids)").replace(
        "valid = Cast <to = 9> (padding)",
        "segments = Unsqueeze(segment_ids, axes)\n    both = Mul(padding, segments)\n    valid = Cast <to = 9> (both)",
    )
    model = ir.from_proto(onnx.parser.parse_model(text % {"window": 4, "keep": "Identity(causal)", "zero": "0.0"}))
    with pytest.raises(_Unsupported, match="segment_ids"):
        probe_window(model, model.graph, model.graph.outputs[0])


@needs_torch
def test_non_default_attention_scale_is_carried_into_gqa(tiny_package):
    """q and k scaled by 0.6 each (not 1/sqrt(sqrt(16)) = 0.5): GQA gets scale = 0.36, which
    onnxscript's rewrite would drop (measured: logits off by 3.4e-3 at prefill without it)."""
    import numpy as np

    from onnxopt.passes.pipeline import run_pipeline

    model = ir.load(tiny_package / "model.onnx")
    scaled = 0
    for node in model.graph:
        for i, value in enumerate(node.inputs):
            const = value.const_value if node.op_type == "Mul" and value is not None else None
            if const is not None and const.size == 1 and float(const.numpy()) == 0.5:
                factor = ir.Value(name=f"scale_{scaled}", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([]))
                factor.const_value = ir.tensor(np.array(0.6, np.float32))
                model.graph.initializers[factor.name] = factor
                node.replace_input_with(i, factor)
                scaled += 1
    assert scaled == 4  # q and k of two layers
    run_pipeline(model, "cpu", num_layers=2, stop_after="gqa")
    scales = [n.attributes.get_float("scale", None) for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert scales == pytest.approx([0.36, 0.36])
