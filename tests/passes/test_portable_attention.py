"""SDPA over a concat KV cache -> ONNX Attention-23, on tiny scripted graphs run in ONNX Runtime before and
after (positive: GQA with repeat-kv, equal head counts, no mask; negative: no past, an unknown shape)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import onnxruntime as ort
import pytest
from onnxscript.rewriter import MatchingTracer

from onnxopt.passes import ort_fusions, portable_attention

B, S, P, D = 2, 3, 4, 8
FLOAT = ir.DataType.FLOAT


def _value(name, shape, dtype=FLOAT):
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))


def _attention(*, hq=4, hkv=2, mask=True, past=True) -> ir.Model:
    """softmax(q k^T / sqrt(D) + mask) v with k, v = concat(past, new) repeated to hq heads (the export's form)."""
    q = _value("q", ["B", hq, "S", D])
    k, v = _value("k", ["B", hkv, "S", D]), _value("v", ["B", hkv, "S", D])
    inputs = [q, k, v]
    b = ir.tape.Tape()
    presents = []
    for name, new in (("key", k), ("value", v)):
        if past:
            cache = _value(f"past_{name}", ["B", hkv, "P", D])
            inputs.append(cache)
            new = b.op("Concat", [cache, new], attributes={"axis": -2})
            new.name = f"present_{name}"
            new.shape = ir.Shape(["B", hkv, "T", D])
            presents.append(new)
        if hq != hkv:
            group = b.initializer(ir.tensor(np.array([1, 1, hq // hkv, 1, 1], np.int64), name=f"group_{name}"))
            target = b.initializer(ir.tensor(np.array([0, hq, -1, D], np.int64), name=f"heads_{name}"))
            axis = b.initializer(ir.tensor(np.array([2], np.int64), name=f"axis_{name}"))
            new = b.op("Reshape", [b.op("Expand", [b.op("Unsqueeze", [new, axis]), group]), target])
            new.shape = ir.Shape(["B", hq, "T", D])
        if name == "key":
            k_rep = new
        else:
            v_rep = new
    scale = b.initializer(ir.tensor(np.array(1 / np.sqrt(D), np.float32), name="scale"))
    scores = b.op("Mul", [b.op("MatMul", [q, b.op("Transpose", [k_rep], attributes={"perm": [0, 1, 3, 2]})]), scale])
    if mask:
        m = _value("mask", ["B", 1, "S", "T"])
        inputs.append(m)
        scores = b.op("Add", [scores, m])
    y = b.op("MatMul", [b.op("Softmax", [scores], attributes={"axis": -1}), v_rep])
    y.name = "y"
    graph = ir.Graph(inputs, [y, *presents], nodes=b.nodes, initializers=b.initializers, opset_imports={"": 23})
    return ir.Model(graph, ir_version=10)


def _feeds(model: ir.Model) -> dict:
    rng = np.random.default_rng(0)
    feeds = {}
    for value in model.graph.inputs:
        if value.name == "mask":
            allowed = np.tril(np.ones((S, P + S), bool), k=P)[None, None] & (rng.random((B, 1, 1, P + S)) > 0.2)
            feeds["mask"] = np.where(allowed, 0.0, -np.inf).astype(np.float32)
        else:
            heads = value.shape[1]
            length = P if value.name.startswith("past_") else S
            feeds[value.name] = rng.standard_normal((B, heads, length, D)).astype(np.float32)
    return feeds


def _run(model: ir.Model, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _fuse(model: ir.Model, tracer=None) -> int:
    assert ort_fusions.sdpa_rules().apply_to_model(model) == 1
    return portable_attention.rules().apply_to_model(model, tracer=tracer)


@pytest.mark.parametrize("hq,hkv,mask", [(4, 2, True), (2, 2, True), (4, 2, False), (4, 1, True)])
def test_fuses_to_attention23_with_equal_outputs(hq, hkv, mask):
    model = _attention(hq=hq, hkv=hkv, mask=mask)
    feeds = _feeds(model)
    expected = _run(model, feeds)
    assert _fuse(model) == 1
    common_passes.RemoveUnusedNodesPass()(model)
    assert [n.op_type for n in model.graph] == ["Attention"]
    node = next(iter(model.graph))
    assert node.domain == "" and [v.name if v else "" for v in node.inputs[4:]] == ["past_key", "past_value"]
    assert [v.name for v in model.graph.outputs] == ["y", "present_key", "present_value"]
    got = _run(model, feeds)
    for want, have in zip(expected, got):
        np.testing.assert_allclose(have, want, atol=1e-6, rtol=0)  # fp32: the same sums, another order


def test_fully_masked_rows_give_zeros_not_nan():
    """A left-padded row's padding queries see no key; the export zeroes them (IsNaN/Where), Attention-23 too."""
    model = _attention()
    feeds = _feeds(model)
    feeds["mask"][1, :, 0, :] = -np.inf
    assert _fuse(model) == 1
    y = _run(model, feeds)[0]
    assert np.isfinite(y).all() and not y[1, :, 0].any()


def test_no_past_does_not_fuse():
    model = _attention(past=False)
    assert _fuse(model) == 0


def test_unknown_past_shape_does_not_fuse_and_says_why():
    model = _attention()
    assert ort_fusions.sdpa_rules().apply_to_model(model) == 1
    next(v for v in model.graph.inputs if v.name == "past_key").shape = None
    tracer = MatchingTracer()
    assert portable_attention.rules().apply_to_model(model, tracer=tracer) == 0
    reasons = [str(info.match_result.reason) for infos in tracer.best_matches_map.values() for info in infos]
    assert any("shape of" in r and "past_key" in r for r in reasons), reasons
