"""GQASharedBufferInterface on the fused graph of the tiny Llama: the rewrite, the lengths it derives
from attention_mask (run in ORT), and every case where it must leave the graph unchanged."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from conftest import needs_torch

pytestmark = needs_torch


@pytest.fixture()
def fused(tiny_package):
    """The tiny Llama's graph right before gqa_interface (GQA fused in both layers, concat interface)."""
    from onnxopt.passes.pipeline import run_pipeline

    model = ir.load(tiny_package / "model.onnx")
    run_pipeline(model, "cpu", num_layers=2, stop_after="cleanup_gqa")
    return model


def _signature(model):
    graph = model.graph
    return (
        [(v.name, str(v.shape)) for v in graph.inputs],
        [(v.name, str(v.shape)) for v in graph.outputs],
        [(n.op_type, [v.name if v is not None else "" for v in n.inputs]) for n in graph],
    )


def test_rewires_every_layer_to_attention_mask_and_shared_buffers(fused):
    from onnxopt.passes.gqa_interface import GQASharedBufferInterface, gqa_nodes, seqlens_k

    gqa_pass = GQASharedBufferInterface(num_layers=2)
    assert gqa_pass(fused).modified
    assert gqa_pass.rewired == 2 and gqa_pass.miss is None
    graph = fused.graph
    inputs = {v.name: v for v in graph.inputs}
    assert "position_ids" not in inputs and "seqlens_k" not in inputs
    assert inputs["attention_mask"].dtype == ir.DataType.INT64 and len(inputs["attention_mask"].shape) == 2
    lengths = seqlens_k(graph)
    assert lengths is not None and lengths.dtype == ir.DataType.INT32
    for node in gqa_nodes(graph):
        assert node.inputs[5] is lengths and node.inputs[6].name == "total_sequence_length"
        assert str(node.inputs[3].shape[2]) == "max_sequence_length"
    for out in graph.outputs:
        if out.name.startswith("present."):
            assert str(out.shape[2]) == "max_sequence_length"
    assert not any(n.op_type == "ReduceMax" for n in graph)  # the position_ids-derived lengths are gone
    # genai's form: ReduceSum -> Sub -> Cast and Shape -> Gather -> Cast, straight from the mask.
    assert [n.op_type for n in inputs["attention_mask"].consumers()] == ["ReduceSum", "Shape"]


def test_lengths_from_the_mask_in_onnxruntime():
    """The subgraph alone: seqlens_k = ones per row - 1, total_sequence_length = the mask's width."""
    import onnxruntime as ort

    from onnxopt.passes.gqa_interface import _lengths_from_mask

    mask = ir.Value(name="attention_mask", shape=ir.Shape(["B", "T"]), type=ir.TensorType(ir.DataType.INT64))
    nodes = _lengths_from_mask(mask)
    graph = ir.Graph([mask], [nodes[-2].outputs[0], nodes[-1].outputs[0]], nodes=nodes, opset_imports={"": 20})
    proto = ir.serde.serialize_model(ir.Model(graph, ir_version=10))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=np.int64)  # right-padded
    seqlens, total = session.run(None, {"attention_mask": feed})
    assert seqlens.dtype == np.int32 and seqlens.tolist() == [4, 1, 3]
    assert total.dtype == np.int32 and total.shape == () and int(total) == 5


def test_unchanged_when_a_layer_did_not_fuse(fused):
    from onnxopt.passes.gqa_interface import GQASharedBufferInterface

    before = _signature(fused)
    gqa_pass = GQASharedBufferInterface(num_layers=3)  # one layer more than fused: a missed fusion
    assert not gqa_pass(fused).modified
    assert gqa_pass.miss == "GroupQueryAttention fused in 2 of 3 decoder layers"
    assert _signature(fused) == before


def test_unchanged_when_position_ids_has_another_consumer(fused):
    from onnxopt.passes.gqa_interface import GQASharedBufferInterface

    position_ids = next(v for v in fused.graph.inputs if v.name == "position_ids")
    extra = ir.node("Identity", [position_ids], name="extra_consumer")
    extra.outputs[0].name = "positions_out"
    fused.graph.append(extra)
    fused.graph.outputs.append(extra.outputs[0])
    before = _signature(fused)
    gqa_pass = GQASharedBufferInterface(num_layers=2)
    assert not gqa_pass(fused).modified
    assert "position_ids" in gqa_pass.miss and "beyond GroupQueryAttention" in gqa_pass.miss
    assert _signature(fused) == before


def test_unchanged_without_group_query_attention(tiny_package):
    from onnxopt.passes.gqa_interface import GQASharedBufferInterface

    model = ir.load(tiny_package / "model.onnx")
    before = _signature(model)
    gqa_pass = GQASharedBufferInterface(num_layers=2)
    assert not gqa_pass(model).modified
    assert gqa_pass.miss == "GroupQueryAttention fused in 0 of 2 decoder layers"
    assert _signature(model) == before


def test_unchanged_when_already_rewired(fused):
    from onnxopt.passes.gqa_interface import GQASharedBufferInterface

    assert GQASharedBufferInterface(num_layers=2)(fused).modified
    before = _signature(fused)
    again = GQASharedBufferInterface(num_layers=2)
    assert not again(fused).modified
    assert "already reads 'seqlens_k'" in again.miss
    assert _signature(fused) == before


def test_unchanged_without_an_attention_mask_input(fused):
    from onnxopt.passes.gqa_interface import GQASharedBufferInterface

    mask = next(v for v in fused.graph.inputs if v.name == "attention_mask")
    assert not mask.uses()  # the fused graph no longer reads it: dropping it leaves a valid graph
    fused.graph.inputs.remove(mask)
    before = _signature(fused)
    gqa_pass = GQASharedBufferInterface(num_layers=2)
    assert not gqa_pass(fused).modified
    assert gqa_pass.miss == "the graph has no int64 [B, T] 'attention_mask' input"
    assert _signature(fused) == before


def test_unchanged_when_attention_mask_has_another_consumer(fused):
    """A mask read elsewhere (left-padded semantics) must not silently change meaning."""
    from onnxopt.passes.gqa_interface import GQASharedBufferInterface

    mask = next(v for v in fused.graph.inputs if v.name == "attention_mask")
    extra = ir.node("Identity", [mask], name="extra_consumer")
    extra.outputs[0].name = "mask_out"
    fused.graph.append(extra)
    fused.graph.outputs.append(extra.outputs[0])
    before = _signature(fused)
    gqa_pass = GQASharedBufferInterface(num_layers=2)
    assert not gqa_pass(fused).modified
    assert "attention_mask" in gqa_pass.miss and "beyond GroupQueryAttention" in gqa_pass.miss
    assert _signature(fused) == before
