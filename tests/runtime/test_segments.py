"""runtime/segments.py: a `--target cuda` graph split at its onnxopt nodes (GroupQueryAttention and SwiGLU
per layer) into ORT segments and op launches computes what the same graph with them decomposed computes
(CPU: ORT segments and the NumPy reference of each op)."""

import numpy as np
import onnx_ir as ir
import pytest

from onnxopt.custom_ops import registry
from onnxopt.runtime import segments

LAYERS = 2
TMAX = 16


@pytest.fixture(scope="module")
def cuda_fp32(tiny_package, tmp_path_factory):
    import onnxopt

    out = tmp_path_factory.mktemp("seg") / "cuda32"
    onnxopt.optimize(tiny_package, out, target="cuda", dtype="fp32", progress=False)
    return out / "model.onnx"


def _decomposed_run(path, feeds):
    import onnxruntime as ort

    model = ir.load(path)
    registry.decompose(model)
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds)))


def _feeds(model_path, rng, *, batch=2, seq=5, past=None, past_len=0, lengths=None):
    model = ir.load(model_path)
    inputs = {v.name: v for v in model.graph.inputs}
    feeds = {"input_ids": rng.integers(0, 320, (batch, seq))}
    total = past_len + seq
    if "attention_mask" in inputs:
        feeds["attention_mask"] = np.ones((batch, total), np.int64)
        for row, n in enumerate(lengths or ()):  # right-padded rows
            feeds["attention_mask"][row, n:] = 0
    else:
        feeds["seqlens_k"] = np.full(batch, total - 1, np.int32)
        feeds["total_sequence_length"] = np.array(total, np.int32)
    for name, value in inputs.items():
        if name.startswith("past_key_values."):
            shape = (batch, value.shape[1], TMAX, value.shape[3])
            feeds[name] = past[name.replace("past_key_values", "present")] if past else np.zeros(shape, np.float32)
    return feeds


def test_split_makes_a_segment_between_custom_nodes(cuda_fp32):
    plan = segments.split(ir.load(cuda_fp32))
    kinds = [p.kind for p in plan.parts]
    assert kinds == ["ort", "op", "ort", "op"] * LAYERS + ["ort"]
    assert [p.op.OP_TYPE for p in plan.parts if p.kind == "op"] == ["GroupQueryAttention", "SwiGLU"] * LAYERS
    attention = next(p for p in plan.parts if p.kind == "op")
    assert [a[0] if a else None for a in attention.args] == ["value", None, None, "value", "value", "value", "value", "const", "const"]
    assert attention.attributes["do_rotary"] == 1 and attention.types["present.0.key"][0] == "tensor(float)"
    # every value a part reads is a graph input or made by an earlier part
    known = set(plan.inputs)
    for part in plan.parts:
        assert set(part.inputs) <= known, (part.kind, set(part.inputs) - known)
        known |= set(part.outputs)
    assert set(plan.outputs) <= known
    # each layer's KV cache is read and written by its attention op only
    for i in range(LAYERS):
        readers = [p for p in plan.parts if f"past_key_values.{i}.key" in p.inputs]
        assert len(readers) == 1 and readers[0].kind == "op" and f"present.{i}.key" in readers[0].outputs
    for part in plan.segments:
        assert not registry.custom_nodes(part.model.graph)


def test_split_graph_computes_the_decomposed_graph(cuda_fp32):
    rng = np.random.default_rng(0)
    prefill = _feeds(cuda_fp32, rng)
    want = _decomposed_run(cuda_fp32, prefill)
    got = segments.run_reference(segments.split(ir.load(cuda_fp32)), prefill)
    assert set(got) == set(want)
    for name in want:
        assert np.allclose(got[name], want[name], atol=1e-5, rtol=1e-5), (name, float(np.abs(got[name] - want[name]).max()))
    decode = _feeds(cuda_fp32, rng, seq=1, past=want, past_len=5)
    want = _decomposed_run(cuda_fp32, decode)
    got = segments.run_reference(segments.split(ir.load(cuda_fp32)), decode)
    assert float(np.abs(got["logits"] - want["logits"]).max()) <= 1e-5


def test_split_graph_right_padded_prefill(cuda_fp32):
    """Rows of different lengths: each row's last-token logits and its written cache agree."""
    feeds = _feeds(cuda_fp32, np.random.default_rng(1), batch=3, seq=6, lengths=[6, 2, 4])
    want = _decomposed_run(cuda_fp32, feeds)
    got = segments.run_reference(segments.split(ir.load(cuda_fp32)), feeds)
    assert float(np.abs(got["logits"] - want["logits"]).max()) <= 1e-5
    for row, n in enumerate([6, 2, 4]):
        assert np.allclose(got["present.1.value"][row, :, :n], want["present.1.value"][row, :, :n], atol=1e-5)


def test_graph_without_custom_nodes_is_one_segment(tiny_package):
    plan = segments.split(ir.load(tiny_package / "model.onnx"))
    assert [p.kind for p in plan.parts] == ["ort"] and plan.boundaries == []
    assert plan.parts[0].inputs and set(plan.parts[0].outputs) == set(plan.outputs)


def test_segments_read_external_data(cuda_fp32, tmp_path):
    """Packages keep their weights in model.onnx.data: each segment carries the ones it reads inline."""
    model = ir.load(cuda_fp32)
    ir.save(model, tmp_path / "model.onnx", external_data="model.onnx.data", size_threshold_bytes=0)
    reloaded = ir.load(tmp_path / "model.onnx")
    assert any(isinstance(v.const_value, ir.ExternalTensor) for v in reloaded.graph.initializers.values())
    feeds = _feeds(cuda_fp32, np.random.default_rng(3))
    want = _decomposed_run(cuda_fp32, feeds)
    got = segments.run_reference(segments.split(reloaded), feeds)
    assert float(np.abs(got["logits"] - want["logits"]).max()) <= 1e-5
