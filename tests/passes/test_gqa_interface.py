"""GQASharedBufferInterface on the fused graph of the tiny Llama: the rewrite, and every case where
it must leave the graph unchanged."""

from __future__ import annotations

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


def test_rewires_every_layer_to_explicit_lengths_and_shared_buffers(fused):
    from onnxopt.passes.gqa_interface import GQASharedBufferInterface, gqa_nodes

    gqa_pass = GQASharedBufferInterface(num_layers=2)
    assert gqa_pass(fused).modified
    assert gqa_pass.rewired == 2 and gqa_pass.miss is None
    graph = fused.graph
    inputs = {v.name: v for v in graph.inputs}
    assert "attention_mask" not in inputs and "position_ids" not in inputs
    assert inputs["seqlens_k"].dtype == ir.DataType.INT32 and len(inputs["seqlens_k"].shape) == 1
    assert inputs["total_sequence_length"].dtype == ir.DataType.INT32 and len(inputs["total_sequence_length"].shape) == 0
    for node in gqa_nodes(graph):
        assert node.inputs[5] is inputs["seqlens_k"] and node.inputs[6] is inputs["total_sequence_length"]
        assert str(node.inputs[3].shape[2]) == "max_sequence_length"
    for out in graph.outputs:
        if out.name.startswith("present."):
            assert str(out.shape[2]) == "max_sequence_length"
    assert not any(n.op_type == "ReduceMax" for n in graph)  # the position_ids-derived lengths are gone


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
    assert "already has a 'seqlens_k' input" in again.miss
    assert _signature(fused) == before
