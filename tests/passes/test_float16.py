"""ConvertToFloat16 on a tiny scripted decoder step: what becomes float16, what stays float32, and that
ONNX Runtime CPU runs the result within fp16 rounding of the float32 graph."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import onnxruntime as ort

from onnxopt.passes.float16 import ConvertToFloat16

V, H = 16, 8
FLOAT, FLOAT16, INT64 = ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.INT64


def _step() -> ir.Model:
    """h = RMSNorm(embed[ids]) * cos(pos * inv_freq) @ W; present = concat(past, h); logits = h @ W_out."""
    rng = np.random.default_rng(0)
    ids = ir.Value(name="input_ids", type=ir.TensorType(INT64), shape=ir.Shape(["B", "S"]))
    pos = ir.Value(name="position_ids", type=ir.TensorType(INT64), shape=ir.Shape(["B", "S"]))
    past = ir.Value(name="past_key_values.0.key", type=ir.TensorType(FLOAT), shape=ir.Shape(["B", "P", H]))
    b = ir.tape.Tape()

    def weight(name, *shape):
        return b.initializer(ir.tensor(rng.standard_normal(shape).astype(np.float32), name=name))

    h = b.op("Gather", [weight("embed", V, H), ids], attributes={"axis": 0})
    h = b.op("RMSNormalization", [h, weight("norm", H)], attributes={"epsilon": 1e-6, "stash_type": 1})
    # Position math: float32 angles from int64 positions (must stay float32).
    axis = b.initializer(ir.tensor(np.array([2], np.int64), name="axis"))
    positions = b.op("Unsqueeze", [b.op("Cast", [pos], attributes={"to": FLOAT}), axis])  # [B, S, 1]
    angle = b.op("Mul", [positions, weight("inv_freq", H)])
    h = b.op("MatMul", [b.op("Mul", [h, b.op("Cos", [angle])]), weight("w", H, H)])
    present = b.op("Concat", [past, h], attributes={"axis": 1})
    present.name = "present.0.key"
    logits = b.op("MatMul", [present, weight("w_out", H, V)])
    logits.name = "logits"
    graph = ir.Graph([ids, pos, past], [logits, present], nodes=b.nodes, initializers=b.initializers, opset_imports={"": 23})
    model = ir.Model(graph, ir_version=10)
    common_passes.ShapeInferencePass()(model)  # the pass reads dtypes, as the pipeline's graphs have them
    return model


def _run(model: ir.Model, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _feeds(dtype) -> dict:
    rng = np.random.default_rng(1)
    return {
        "input_ids": rng.integers(0, V, (2, 3)),
        "position_ids": np.array([[1000, 1001, 1002], [5, 6, 7]], np.int64),
        "past_key_values.0.key": rng.standard_normal((2, 4, H)).astype(dtype),
    }


def test_types_after_conversion():
    model = _step()
    pass_ = ConvertToFloat16()
    assert pass_(model).modified and pass_.rewired > 0
    graph = model.graph
    inputs, outputs = {v.name: v for v in graph.inputs}, {v.name: v for v in graph.outputs}
    assert inputs["past_key_values.0.key"].dtype == FLOAT16 and outputs["present.0.key"].dtype == FLOAT16
    assert outputs["logits"].dtype == FLOAT and outputs["logits"].producer().op_type == "Cast"
    for name in ("embed", "norm", "w", "w_out"):
        assert graph.initializers[name].dtype == FLOAT16
    assert graph.initializers["inv_freq"].dtype == FLOAT  # read by the position math only
    cos = next(n for n in graph if n.op_type == "Cos")
    assert cos.outputs[0].dtype == FLOAT  # angles and cos in float32 ...
    assert [(n.op_type, n.attributes["to"].as_int()) for n in cos.outputs[0].consumers()] == [("Cast", FLOAT16)]  # ... cast once
    norm = next(n for n in graph if n.op_type == "RMSNormalization")
    assert norm.attributes["stash_type"].as_int() == FLOAT


def test_runs_in_onnxruntime_within_fp16_rounding():
    reference = _run(_step(), _feeds(np.float32))
    model = _step()
    ConvertToFloat16()(model)
    logits, present = _run(model, _feeds(np.float16))
    assert logits.dtype == np.float32 and present.dtype == np.float16
    # Relative to the output scale: a few fp16 roundings (2^-11 each) of weights and activations. The angles
    # near position 1000 would be off by up to 0.25 rad in float16, far beyond this bound.
    for want, got in ((reference[0], logits), (reference[1], present)):
        scale = float(np.abs(want).max())
        assert float(np.abs(got.astype(np.float32) - want).max()) <= 4e-3 * scale


def test_float16_graph_is_left_alone():
    model = _step()
    ConvertToFloat16()(model)
    again = ConvertToFloat16()
    assert not again(model).modified and again.rewired == 0
