"""QKV packing and SwiGLU on tiny exported Llama / Qwen2 / Mistral, after onnxscript's ORT fusions (GQA).

unfused export -> ort_fusions.optimize_for_ort -> pack_qkv -> swiglu -> swiglu decomposition: ORT outputs of a
prefill run and a decode step equal those of the unfused export, and each decoder layer has 4 MatMuls instead of 7.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import make_hf_dir, needs_torch, tiny_config

from onnxopt.passes import pack_qkv, swiglu

CONFIG = tiny_config()
LAYERS = CONFIG["num_hidden_layers"]
HEAD_SIZE = CONFIG["hidden_size"] // CONFIG["num_attention_heads"]
# Nodes saved per layer: q/k/v MatMuls 3 -> 1 (and Qwen2's bias Adds 3 -> 1); gate/up/silu 5 nodes ->
# MatMul + Split + QuickGelu + Mul after decomposition.
SAVED_PER_LAYER = {"llama": 2 + 1, "mistral": 2 + 1, "qwen2": 2 + 2 + 1}


def _export(tmp_path, family: str, dtype: str = "fp32"):
    import onnxopt

    hf_dir = make_hf_dir(tmp_path / "hf", family)
    if family == "qwen2":  # q/k/v biases initialise to zero: make them random so packing them is tested
        import torch
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir))
        torch.manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(std=0.5)
        model.save_pretrained(str(hf_dir))
    return onnxopt.export(str(hf_dir), tmp_path / "pkg", dtype=dtype, progress=False) / "model.onnx"


def _prefill_feeds(batch=2, seq=5, float_dtype=np.float32) -> dict:
    rng = np.random.default_rng(0)
    feeds = {
        "input_ids": rng.integers(0, CONFIG["vocab_size"], (batch, seq)),
        "attention_mask": np.ones((batch, seq), np.int64),
        "position_ids": np.tile(np.arange(seq), (batch, 1)),
    }
    for i in range(LAYERS):
        for kind in ("key", "value"):  # past length 0: [B, Hkv, 0, D]
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros(
                (batch, CONFIG["num_key_value_heads"], 0, HEAD_SIZE), float_dtype
            )
    return feeds


def _run(model_or_path, feeds) -> dict:
    source = model_or_path if isinstance(model_or_path, str) else ir.to_proto(model_or_path).SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def _projection_matmuls(model: ir.Model) -> int:
    """MatMuls of the decoder layers: constant weight whose rows are the hidden or intermediate size."""
    sizes = (CONFIG["hidden_size"], CONFIG["intermediate_size"])
    return sum(
        n.op_type == "MatMul"
        and n.inputs[1].const_value is not None
        and n.inputs[1].shape[0] in sizes
        and n.outputs[0].name != "logits"
        for n in model.graph
    )


# dtype -> atol of every output against the unfused export (logits are below 1 in magnitude here).
TOLERANCES = {
    "fp32": 1e-4,
    # One float16 ulp at 0.5 is 4.9e-4; packing changes the MatMul blocking, so results may differ by a
    # few ulp (measured max 4.9e-4 on tiny Llama).
    "fp16": 2e-3,
}


@needs_torch
@pytest.mark.parametrize(
    ("family", "dtype"), [("llama", "fp32"), ("qwen2", "fp32"), ("mistral", "fp32"), ("llama", "fp16")]
)
def test_packed_graph_matches_unfused_export(tmp_path, family, dtype):
    from onnxscript.rewriter import ort_fusions

    path = str(_export(tmp_path, family, dtype))
    model, fusions = ort_fusions.optimize_for_ort(ir.load(path))
    assert fusions["gqa"] == LAYERS
    nodes_before = len(model.graph)
    assert _projection_matmuls(model) == 7 * LAYERS

    assert pack_qkv.rules().apply_to_model(model) == LAYERS
    assert swiglu.rules().apply_to_model(model) == LAYERS
    assert swiglu.decompose_rules().apply_to_model(model) == LAYERS
    ir.passes.common.RemoveUnusedNodesPass()(model)

    assert _projection_matmuls(model) == 4 * LAYERS
    assert nodes_before - len(model.graph) == SAVED_PER_LAYER[family] * LAYERS
    assert all(n.domain != "onnxopt" for n in model.graph)

    feeds = _prefill_feeds(float_dtype=np.float16 if dtype == "fp16" else np.float32)
    expected, got = _run(path, feeds), _run(model, feeds)
    _assert_close(got, expected, TOLERANCES[dtype], "prefill")

    # One decode step on the unfused model's cache: packed GQA appends to a past of length 5.
    batch, seq = feeds["input_ids"].shape
    decode = {
        "input_ids": np.full((batch, 1), 7),
        "attention_mask": np.ones((batch, seq + 1), np.int64),
        "position_ids": np.full((batch, 1), seq),
    }
    for i in range(LAYERS):
        for kind in ("key", "value"):
            decode[f"past_key_values.{i}.{kind}"] = expected[f"present.{i}.{kind}"]
    _assert_close(_run(model, decode), _run(path, decode), TOLERANCES[dtype], "decode")


def _assert_close(got: dict, expected: dict, atol: float, phase: str) -> None:
    for name, want in expected.items():
        np.testing.assert_allclose(
            got[name].astype(np.float32), want.astype(np.float32), atol=atol, rtol=0, err_msg=f"{phase}: {name}"
        )
