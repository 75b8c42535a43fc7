"""QKV packing into GroupQueryAttention on tiny scripted attention blocks: positive and negative graphs."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnxscript.rewriter import MatchingTracer

from onnxopt.passes import pack_qkv

NUM_HEADS, KV_NUM_HEADS, HEAD_SIZE, H, MAX_SEQ = 4, 2, 16, 64, 32  # ORT CPU GQA with rotary: head_size % 16 == 0
FLOAT = ir.DataType.FLOAT


def _attention(*, bias=False, bias_first=False, const_k=True, shared_input=True, v_dtype=FLOAT) -> ir.Model:
    """GQA(x @ w_q [+ b_q], x @ w_k [+ b_k], x2 @ w_v [+ b_v], past_key, past_value, seqlens_k, total, cos, sin)."""
    rng = np.random.default_rng(0)
    t = ir.tape.Tape()

    def const(name, shape, dtype=np.float32):
        return t.initializer(ir.tensor(rng.standard_normal(shape).astype(dtype), name=name))

    x = ir.Value(name="x", type=ir.TensorType(FLOAT), shape=ir.Shape(["B", "S", H]))
    past_key, past_value = (
        ir.Value(name=n, type=ir.TensorType(FLOAT), shape=ir.Shape(["B", KV_NUM_HEADS, "P", HEAD_SIZE]))
        for n in ("past_key", "past_value")
    )
    seqlens_k = ir.Value(name="seqlens_k", type=ir.TensorType(ir.DataType.INT32), shape=ir.Shape(["B"]))
    total = ir.Value(name="total_sequence_length", type=ir.TensorType(ir.DataType.INT32), shape=ir.Shape([]))
    inputs = [x, past_key, past_value, seqlens_k, total]
    w_q = const("w_q", (H, NUM_HEADS * HEAD_SIZE))
    if const_k:
        w_k = const("w_k", (H, KV_NUM_HEADS * HEAD_SIZE))
    else:
        w_k = ir.Value(name="w_k", type=ir.TensorType(FLOAT), shape=ir.Shape([H, KV_NUM_HEADS * HEAD_SIZE]))
        inputs.append(w_k)
    w_v = const("w_v", (H, KV_NUM_HEADS * HEAD_SIZE), v_dtype.numpy())
    x_v = x
    if not shared_input:
        x_v = ir.Value(name="x2", type=ir.TensorType(FLOAT), shape=ir.Shape(["B", "S", H]))
        inputs.append(x_v)
    projections = []
    for name, x_in, w in (("q", x, w_q), ("k", x, w_k), ("v", x_v, w_v)):
        y = t.op("MatMul", [x_in, w])
        if bias:
            b = const(f"b_{name}", (w.shape[1],))
            y = t.op("Add", [b, y] if bias_first else [y, b])
        projections.append(y)
    cos, sin = (const(n, (MAX_SEQ, HEAD_SIZE // 2)) for n in ("cos", "sin"))
    outputs = t.op_multi_out(
        "GroupQueryAttention",
        [*projections, past_key, past_value, seqlens_k, total, cos, sin],
        {"num_heads": NUM_HEADS, "kv_num_heads": KV_NUM_HEADS, "do_rotary": 1},
        domain="com.microsoft",
        num_outputs=3,
    )
    for value, name in zip(outputs, ("attention", "present_key", "present_value")):
        value.name = name
    graph = ir.Graph(
        inputs, outputs, nodes=t.nodes, initializers=t.initializers, opset_imports={"": 20, "com.microsoft": 1}
    )
    return ir.Model(graph, ir_version=10)


def _prefill_feeds(batch=2, seq=3) -> dict:
    empty = np.zeros((batch, KV_NUM_HEADS, 0, HEAD_SIZE), np.float32)  # past length 0
    return {
        "x": np.random.default_rng(1).standard_normal((batch, seq, H)).astype(np.float32),
        "past_key": empty,
        "past_value": empty,
        "seqlens_k": np.full((batch,), seq - 1, np.int32),
        "total_sequence_length": np.array(seq, np.int32),
    }


def _run(model: ir.Model, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _failure_reasons(model: ir.Model) -> list[str]:
    tracer = MatchingTracer()
    assert pack_qkv.rules().apply_to_model(model, tracer=tracer) == 0
    return [info.match_result.reason for infos in tracer.best_matches_map.values() for info in infos]


@pytest.mark.parametrize(
    ("flags", "nodes_after"),
    [
        ({}, ["MatMul", "GroupQueryAttention"]),  # 4 nodes -> 2
        ({"bias": True}, ["MatMul", "Add", "GroupQueryAttention"]),  # 7 nodes -> 3 (Qwen2)
        ({"bias": True, "bias_first": True}, ["MatMul", "Add", "GroupQueryAttention"]),
    ],
)
def test_packs_into_gqa_with_equal_outputs(flags, nodes_after):
    model = _attention(**flags)
    feeds = _prefill_feeds()
    expected = _run(model, feeds)

    assert pack_qkv.rules().apply_to_model(model) == 1
    ir.passes.common.RemoveUnusedNodesPass()(model)
    assert [n.op_type for n in model.graph] == nodes_after
    (gqa,) = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert gqa.inputs[1] is None and gqa.inputs[2] is None  # packed: key and value omitted
    assert gqa.inputs[0].producer().op_type == nodes_after[-2]
    assert gqa.attributes.get_int("do_rotary") == 1 and gqa.attributes.get_int("kv_num_heads") == KV_NUM_HEADS
    (matmul,) = [n for n in model.graph if n.op_type == "MatMul"]
    assert matmul.inputs[1].shape == ir.Shape([H, (NUM_HEADS + 2 * KV_NUM_HEADS) * HEAD_SIZE])

    for got, want in zip(_run(model, feeds), expected):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        ({"const_k": False}, "Weight w_k is not a constant initializer"),
        ({"v_dtype": ir.DataType.FLOAT16}, "Dtypes differ"),
        ({"shared_input": False}, "x_BSH bound to two different values"),
    ],
)
def test_rejects_with_reason(flags, reason):
    model = _attention(**flags)
    reasons = _failure_reasons(model)
    assert any(reason in r for r in reasons), reasons
    assert pack_qkv.rules().apply_to_model(model) == 0
    assert sum(n.op_type == "MatMul" for n in model.graph) == 3


@pytest.mark.parametrize(("bias", "nodes_after"), [(False, 3), (True, 6)])
def test_sibling_matmuls_pack_into_matmul_split(bias, nodes_after):
    model = _attention(bias=bias)
    feeds = _prefill_feeds()
    expected = _run(model, feeds)

    packing = pack_qkv.PackSiblingMatMuls()
    assert packing(model).modified
    ir.passes.common.RemoveUnusedNodesPass()(model)
    ops = [n.op_type for n in model.graph]
    assert ops[:2] == ["MatMul", "Split"] and ops.count("MatMul") == 1 and len(ops) == nodes_after
    for got, want in zip(_run(model, feeds), expected):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_sibling_split_then_gqa_rule_packs_gqa():
    model = _attention()
    feeds = _prefill_feeds()
    expected = _run(model, feeds)
    pack_qkv.PackSiblingMatMuls()(model)
    assert pack_qkv.rules().apply_to_model(model) == 1  # SplitQKVIntoGQA
    ir.passes.common.RemoveUnusedNodesPass()(model)
    assert [n.op_type for n in model.graph] == ["MatMul", "GroupQueryAttention"]
    for got, want in zip(_run(model, feeds), expected):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        ({"const_k": False}, "weight w_k is not a constant initializer"),
        ({"v_dtype": ir.DataType.FLOAT16}, "dtypes differ"),
        ({"shared_input": False}, None),  # two MatMuls read x, one reads x2: no group of three
    ],
)
def test_sibling_matmuls_rejected(flags, reason):
    model = _attention(**flags)
    packing = pack_qkv.PackSiblingMatMuls()
    assert not packing(model).modified
    if reason is None:
        assert packing.rejected == []
    else:
        assert any(reason in r for _, r in packing.rejected), packing.rejected
    assert sum(n.op_type == "MatMul" for n in model.graph) == 3
