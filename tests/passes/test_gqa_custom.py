"""passes/gqa_custom.py: com.microsoft GroupQueryAttention <-> onnxopt GroupQueryAttention, node for node."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnxopt.passes.gqa_custom import ToCustom, ToMicrosoft
from onnxopt.passes.gqa_interface import gqa_nodes


@pytest.fixture(scope="module")
def cpu_model_path(tiny_package, tmp_path_factory):
    import onnxopt

    out = tmp_path_factory.mktemp("gqa_custom") / "cpu"
    onnxopt.optimize(tiny_package, out, target="cpu", dtype="fp32", progress=False)
    return out / "model.onnx"


def test_to_custom_swaps_every_layer_and_back(cpu_model_path):
    model = ir.load(cpu_model_path)
    before = [(n.domain, n.op_type, [v.name for v in n.outputs]) for n in model.graph]
    swap = ToCustom()
    swap(model)
    assert swap.rewired == 2 and swap.miss is None
    nodes = gqa_nodes(model.graph)
    assert [n.domain for n in nodes] == ["onnxopt", "onnxopt"]
    assert [v.name for v in nodes[0].outputs][1:] == ["present.0.key", "present.0.value"]
    assert model.opset_imports["onnxopt"] == 1
    back = ToMicrosoft()
    back(model)
    assert back.rewired == 2
    assert [(n.domain, n.op_type, [v.name for v in n.outputs]) for n in model.graph] == before
    # the round trip is the same graph: ORT CPU runs it
    ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])


def test_to_custom_keeps_what_the_op_does_not_take(cpu_model_path):
    model = ir.load(cpu_model_path)
    first = gqa_nodes(model.graph)[0]
    first.attributes["softcap"] = ir.AttrFloat32("softcap", 30.0)
    swap = ToCustom()
    swap(model)
    assert swap.rewired == 1
    assert [n.domain for n in gqa_nodes(model.graph)] == ["com.microsoft", "onnxopt"]
    assert "softcap" in swap.miss and "1 kept as com.microsoft" in swap.miss


def test_cuda_target_emits_custom_attention(tiny_package, tmp_path):
    import onnxopt

    onnxopt.optimize(tiny_package, tmp_path / "cuda", target="cuda", dtype="fp32", progress=False)
    model = ir.load(tmp_path / "cuda" / "model.onnx")
    assert {(n.domain, n.op_type) for n in model.graph if n.domain == "onnxopt"} == {
        ("onnxopt", "GroupQueryAttention"), ("onnxopt", "SwiGLU")}
    assert not [n for n in model.graph if n.domain == "com.microsoft" and n.op_type == "GroupQueryAttention"]
    from onnxopt.package import ModelPackage

    manifest = ModelPackage(tmp_path / "cuda").manifest
    assert manifest["io"]["kv_cache"]["layout"] == "gqa-shared"
    assert manifest["passes"][-1]["group_query_attention"] == 2
    step = next(s for s in manifest["passes"][-1]["steps"] if s["name"] == "gqa_custom")
    assert step["matches"] == 2
    assert np.isfinite(step["seconds"])
