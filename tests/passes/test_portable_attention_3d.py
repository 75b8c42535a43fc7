"""Attention-23 / RotaryEmbedding-23 in 4D with head split and merge -> the 3D form, on a tiny scripted graph
run in ONNX Runtime before and after (positive), and graphs the rule must leave alone (negative)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import onnxruntime as ort
from onnxscript.rewriter import MatchingTracer

from onnxopt.passes import portable_attention_3d

B, S, P, D, HQ, HKV = 2, 3, 4, 8, 4, 2
FLOAT, INT64 = ir.DataType.FLOAT, ir.DataType.INT64


def _value(name, shape, dtype=FLOAT):
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))


def _attention_4d(*, position_ids=False) -> ir.Model:
    """y = merge(Attention(rope(split(q)), rope(split(k)), split(v), mask, past)) as the portable pipeline leaves it."""
    q, k, v = _value("q", ["B", "S", HQ * D]), _value("k", ["B", "S", HKV * D]), _value("v", ["B", "S", HKV * D])
    cos, sin = _value("cos", ["B", "S", D // 2]), _value("sin", ["B", "S", D // 2])
    mask = _value("mask", ["B", 1, "S", "T"])
    past = [_value(f"past_{n}", ["B", HKV, "P", D]) for n in ("key", "value")]
    inputs = [q, k, v, cos, sin, mask, *past]
    rope_extra = []
    if position_ids:
        rope_extra = [_value("position_ids", ["B", "S"], INT64)]
        inputs.append(rope_extra[0])
    b = ir.tape.Tape()

    def split(x, heads):
        shape = b.initializer(ir.tensor(np.array([0, 0, heads, D], np.int64), name=f"{x.name}_heads"))
        reshaped = b.op("Reshape", [x, shape])
        reshaped.shape, reshaped.dtype = ir.Shape(["B", "S", heads, D]), FLOAT
        return b.op("Transpose", [reshaped], attributes={"perm": [0, 2, 1, 3]})

    def rope(x, heads):
        if rope_extra:  # position_ids index a [max_position, D/2] cache
            return b.op("RotaryEmbedding", [x, cache_cos, cache_sin, *rope_extra])
        return b.op("RotaryEmbedding", [x, cos, sin])

    cache_cos = b.initializer(ir.tensor(np.cos(np.arange(64 * D // 2).reshape(64, D // 2)).astype(np.float32), name="cache_cos"))
    cache_sin = b.initializer(ir.tensor(np.sin(np.arange(64 * D // 2).reshape(64, D // 2)).astype(np.float32), name="cache_sin"))
    y, present_key, present_value = b.op_multi_out(
        "Attention", [rope(split(q, HQ), HQ), rope(split(k, HKV), HKV), split(v, HKV), mask, *past], num_outputs=3
    )
    merge = b.initializer(ir.tensor(np.array([0, 0, HQ * D], np.int64), name="merge"))
    y_bse = b.op("Reshape", [b.op("Transpose", [y], attributes={"perm": [0, 2, 1, 3]}), merge])
    y_bse.name, y_bse.shape, y_bse.dtype = "y", ir.Shape(["B", "S", HQ * D]), FLOAT
    present_key.name, present_value.name = "present_key", "present_value"
    graph = ir.Graph(inputs, [y_bse, present_key, present_value], nodes=b.nodes, initializers=b.initializers, opset_imports={"": 23})
    return ir.Model(graph, ir_version=10)


def _feeds(model: ir.Model) -> dict:
    rng = np.random.default_rng(0)
    sizes = {"B": B, "S": S, "P": P, "T": P + S}
    feeds = {}
    for value in model.graph.inputs:
        shape = [sizes.get(str(d), d) if not isinstance(d, int) else d for d in value.shape]
        if value.name == "position_ids":
            feeds[value.name] = np.tile(np.arange(P, P + S), (B, 1))
        elif value.name == "mask":
            feeds[value.name] = np.where(np.tril(np.ones((S, P + S), bool), k=P), 0.0, -np.inf).astype(np.float32)[None, None].repeat(B, 0)
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _run(model: ir.Model, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def test_folds_head_split_and_merge_with_equal_outputs():
    model = _attention_4d()
    feeds = _feeds(model)
    expected = _run(model, feeds)
    assert portable_attention_3d.rules().apply_to_model(model) == 1
    common_passes.RemoveUnusedNodesPass()(model)
    assert sorted(n.op_type for n in model.graph) == ["Attention", "RotaryEmbedding", "RotaryEmbedding"]
    attention = next(n for n in model.graph if n.op_type == "Attention")
    assert attention.attributes["q_num_heads"].as_int() == HQ and attention.attributes["kv_num_heads"].as_int() == HKV
    assert sorted(n.attributes["num_heads"].as_int() for n in model.graph if n.op_type == "RotaryEmbedding") == [HKV, HQ]
    for want, got in zip(expected, _run(model, feeds)):
        np.testing.assert_array_equal(got, want)  # the same kernels on the same numbers (ORT 1.32 CPU)


def test_rotary_with_position_ids_is_left_alone_and_says_why():
    model = _attention_4d(position_ids=True)
    tracer = MatchingTracer()
    assert portable_attention_3d.rules().apply_to_model(model, tracer=tracer) == 0
    reasons = [str(info.match_result.reason) for infos in tracer.best_matches_map.values() for info in infos]
    assert any("Number of inputs (4)" in r for r in reasons), reasons  # the pattern's rotary has 3
