"""LastTokenLogits on the tiny Llama right after gqa_interface: the rewritten graph's [B, 1, V] logits
equal the full graph's logits at each row's last real position (right-padded prefill, then decode),
and every case where the pass must leave the graph unchanged."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from conftest import needs_torch

pytestmark = needs_torch

ATOL = 1e-5  # the same MatMul on the same rows: only the row count differs (seen ~1e-7)


@pytest.fixture()
def shared(tiny_package):
    """The tiny Llama's graph right after gqa_interface (attention_mask interface, logits [B, S, V])."""
    from onnxopt.passes.pipeline import run_pipeline

    model = ir.load(tiny_package / "model.onnx")
    run_pipeline(model, "cpu", num_layers=2, stop_after="gqa_interface")
    return model


def _session(model):
    import onnxruntime as ort

    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])


def _feeds(model, input_ids, lengths, past):
    """Right-padded feeds: attention_mask[b, t] = t < lengths[b]."""
    width = int(max(lengths))
    mask = (np.arange(width)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)
    names = [v.name for v in model.graph.inputs if v.name.startswith("past_key_values.")]
    return {"input_ids": input_ids, "attention_mask": mask, **dict(zip(names, past))}


def _signature(model):
    graph = model.graph
    return (
        [(v.name, str(v.shape)) for v in graph.outputs],
        [(n.op_type, [v.name if v is not None else "" for v in n.inputs]) for n in graph],
    )


def test_prefill_and_decode_logits_equal_the_full_graph_at_each_last_position(shared, tiny_package):
    from onnxopt.passes.last_token_logits import LastTokenLogits, last_token_only
    from onnxopt.passes.pipeline import run_pipeline

    full = ir.load(tiny_package / "model.onnx")
    run_pipeline(full, "cpu", num_layers=2, stop_after="gqa_interface")
    rewrite = LastTokenLogits()
    assert rewrite(shared).modified and rewrite.rewired == 1 and rewrite.miss is None
    assert last_token_only(shared.graph) and not last_token_only(full.graph)
    logits = next(v for v in shared.graph.outputs if v.name == "logits")
    assert logits.shape[1] == 1 and logits.shape[2] == 320

    ref, ours = _session(full), _session(shared)
    rng = np.random.default_rng(0)
    lengths = np.array([5, 2, 7])  # right-padded rows of different lengths
    batch, seq, tmax = len(lengths), int(lengths.max()), 12
    input_ids = rng.integers(0, 320, (batch, seq)).astype(np.int64)
    past = [np.zeros((batch, 2, tmax, 16), np.float32) for _ in range(4)]
    want = ref.run(None, _feeds(full, input_ids, lengths, past))
    got = ours.run(None, _feeds(shared, input_ids, lengths, past))
    assert got[0].shape == (batch, 1, 320)
    np.testing.assert_allclose(got[0][:, 0], want[0][np.arange(batch), lengths - 1], atol=ATOL)
    for a, b in zip(want[1:], got[1:]):  # the KV cache is untouched by the rewrite
        np.testing.assert_array_equal(a, b)

    # Decode: one token per row, each row at its own position (S = 1, index 0).
    step = rng.integers(0, 320, (batch, 1)).astype(np.int64)
    want = ref.run(None, _feeds(full, step, lengths + 1, want[1:]))
    got = ours.run(None, _feeds(shared, step, lengths + 1, got[1:]))
    assert got[0].shape == (batch, 1, 320)
    np.testing.assert_allclose(got[0], want[0], atol=ATOL)


def test_concat_interface_takes_position_s_minus_1(tiny_package):
    """The export's concat interface (portable target, or gqa_interface missed) is left-padded: every
    row ends at S - 1, and the rewrite is a Slice there."""
    from onnxopt.passes.last_token_logits import LastTokenLogits

    full = ir.load(tiny_package / "model.onnx")
    model = ir.load(tiny_package / "model.onnx")
    rewrite = LastTokenLogits()
    assert rewrite(model).modified and rewrite.miss is None
    assert "Slice" in [n.op_type for n in model.graph] and "GatherElements" not in [n.op_type for n in model.graph]
    rng = np.random.default_rng(3)
    lengths = np.array([5, 2, 7])
    batch, seq = len(lengths), int(lengths.max())
    mask = (np.arange(seq)[None, :] >= seq - lengths[:, None]).astype(np.int64)  # left padding
    feeds = {"input_ids": rng.integers(0, 320, (batch, seq)).astype(np.int64), "attention_mask": mask,
             "position_ids": np.maximum(np.cumsum(mask, 1) - 1, 0)}
    names = [v.name for v in full.graph.inputs if v.name.startswith("past_key_values.")]
    feeds.update({name: np.zeros((batch, 2, 0, 16), np.float32) for name in names})
    want = _session(full).run(["logits"], feeds)[0]
    got = _session(model).run(["logits"], feeds)[0]
    assert got.shape == (batch, 1, 320)
    np.testing.assert_allclose(got[:, 0], want[:, -1], atol=ATOL)


def test_unchanged_without_either_interface(tiny_package):
    from onnxopt.passes.last_token_logits import LastTokenLogits

    model = ir.load(tiny_package / "model.onnx")
    next(v for v in model.graph.inputs if v.name == "attention_mask").name = "mask"
    before = _signature(model)
    rewrite = LastTokenLogits()
    assert not rewrite(model).modified
    assert "neither seqlens_k" in rewrite.miss
    assert _signature(model) == before


def test_unchanged_when_already_applied(shared):
    from onnxopt.passes.last_token_logits import LastTokenLogits

    assert LastTokenLogits()(shared).modified
    before = _signature(shared)
    again = LastTokenLogits()
    assert not again(shared).modified
    assert again.miss == "'logits' is already [B, 1, V] (last token only)"
    assert _signature(shared) == before


def test_unchanged_when_logits_are_not_made_by_a_matmul(shared):
    logits = next(v for v in shared.graph.outputs if v.name == "logits")
    matmul = logits.producer()
    scale = ir.node("Softmax", [matmul.outputs[0]], attributes={"axis": -1}, name="extra_softmax")
    shared.graph.insert_after(matmul, scale)
    matmul.outputs[0].name, scale.outputs[0].name = "lm_head_out", "logits"
    shared.graph.outputs[shared.graph.outputs.index(logits)] = scale.outputs[0]
    _assert_miss(shared, "'logits' is made by ai.onnx.Softmax, not an LM-head MatMul")


def test_unchanged_when_the_lm_head_output_has_another_consumer(shared):
    logits = next(v for v in shared.graph.outputs if v.name == "logits")
    extra = ir.node("Identity", [logits], name="extra_consumer")
    extra.outputs[0].name = "logits_copy"
    shared.graph.append(extra)
    shared.graph.outputs.append(extra.outputs[0])
    _assert_miss(shared, "the LM-head output 'logits' has other consumers")


def _assert_miss(model, message):
    from onnxopt.passes.last_token_logits import LastTokenLogits

    before = _signature(model)
    rewrite = LastTokenLogits()
    assert not rewrite(model).modified
    assert message in rewrite.miss
    assert _signature(model) == before
