"""The report says why an expected fusion did not fire (onnxscript's match tracer, report.why_missed),
prints it, stores it in the manifest, and `onnxopt inspect` shows it."""

from __future__ import annotations

import json

import onnx
import onnx_ir as ir

from conftest import needs_torch
from onnxopt.passes import ort_fusions, pipeline
from onnxopt.passes.report import MissTracer, why_missed

# RMSNorm as the dynamo exporter writes it, but with eps as a tensor input: onnxscript's check
# rejects it with "Epsilon is not a float value." after the whole pattern matched.
RMS_NORM = """
<ir_version: 10, opset_import: ["" : 20]>
g (float[2, 3, 8] x, float eps) => (float[2, 3, 8] y) {
    two = Constant <value = float {2.0}> ()
    axes = Constant <value = int64[1] {-1}> ()
    scale = Constant <value = float[8] {1, 1, 1, 1, 1, 1, 1, 1}> ()
    p = Pow(x, two)
    m = ReduceMean <keepdims = 1, noop_with_empty_axes = 0> (p, axes)
    a = Add(m, %s)
    r = Sqrt(a)
    d = Reciprocal(r)
    n = Mul(x, d)
    y = Mul(scale, n)
}
"""


def _model(eps: str) -> ir.Model:
    return ir.from_proto(onnx.parser.parse_model(RMS_NORM % eps))


def test_missed_fusion_names_the_rule_and_the_failed_check():
    step = pipeline.Step("rms_normalization", lambda L: ort_fusions.rms_normalization_rules(), lambda L: 1)
    result = pipeline.run_step(_model("eps"), step, num_layers=1)
    assert result.missed and result.matches == 0
    assert result.note.startswith("expected 1 matches; RmsNormFusion")
    assert "check failed: Epsilon is not a float value." in result.note
    assert "7 pattern nodes matched" in result.note and len(result.note) < 300


def test_fusion_that_fires_has_no_note():
    model = _model("eps_c")
    model.graph.inputs.pop()  # eps becomes a constant
    const = ir.node("Constant", [], attributes={"value": ir.tensor(1e-6, dtype=ir.DataType.FLOAT)})
    const.outputs[0].name = "eps_c"
    model.graph.insert_before(model.graph.node(0), const)
    add = next(n for n in model.graph if n.op_type == "Add")
    add.replace_input_with(1, const.outputs[0])
    step = pipeline.Step("rms_normalization", lambda L: ort_fusions.rms_normalization_rules(), lambda L: 1)
    result = pipeline.run_step(model, step, num_layers=1)
    assert result.matches == 1 and result.note is None


def test_tracer_keeps_failures_next_to_successes():
    tracer = MissTracer()
    ort_fusions.rms_normalization_rules().apply_to_model(_model("eps"), tracer=tracer)
    assert "Epsilon is not a float value." in why_missed(tracer)
    assert why_missed(MissTracer()) is None


@needs_torch
def test_reason_reaches_report_manifest_and_inspect(tiny_package, tmp_path, monkeypatch):
    """Without the SDPA fusion, GQA misses; the reason is the GQA rule's first mismatch."""
    from onnxopt import optimize
    from onnxopt.inspect_package import describe, format_text

    steps = tuple(s for s in pipeline.CPU if s.name != "sdpa")
    monkeypatch.setitem(pipeline.PIPELINES, "cpu", steps)
    report = optimize(tiny_package, tmp_path / "opt", progress=False)
    note = {s.name: s.note for s in report.missed}["gqa"]
    assert "GQA: pattern mismatch: OpType mismatch: expected SDPA" in note
    assert f"\n  gqa: {note}" in report.format_text()
    manifest = json.loads((tmp_path / "opt" / "onnxopt.json").read_text())
    assert f"gqa: {note}" in manifest["passes"][-1]["missed"]
    assert f"gqa: {note}" in format_text(describe(tmp_path / "opt"))


@needs_torch
def test_architecture_the_pipeline_does_not_know_gets_generic_passes_and_verifies(tmp_path, monkeypatch):
    """Phi-3 (fused qkv_proj and gate_up_proj Linears, sliced apart) is declared nowhere in models/;
    registered for this test only, it exports, and optimize applies what matches (norms, rotary,
    GQA), leaves its gate/up Split unfused (the SwiGLU rule needs two MatMuls), reports per step,
    and the graph verifies against the unfused one."""
    import collections

    import torch
    import transformers

    import onnxopt
    from onnxopt import models
    from onnxopt.models._family import Family

    monkeypatch.setitem(models.FAMILIES, "phi3", Family(name="phi3", model_types=("phi3",)))
    config = transformers.Phi3Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=320, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.Phi3ForCausalLM(config).eval().save_pretrained(str(tmp_path / "hf"))
    base = onnxopt.export(str(tmp_path / "hf"), tmp_path / "base", progress=False)
    report = onnxopt.optimize(base, tmp_path / "opt", progress=False)
    matches = {s.name: s.matches for s in report.steps}
    assert matches["gqa"] == 2 and matches["swiglu"] == 0 and matches["pack_qkv"] == 0
    assert "swiglu                          0" in report.format_text()
    ops = collections.Counter(n.op_type for n in ir.load(tmp_path / "opt" / "model.onnx").graph)
    assert ops["GroupQueryAttention"] == 2 and ops["Sigmoid"] == 2  # SiLU left as standard ops
    assert report.verify["max_abs_diff_prefill"] <= 1e-3 and report.verify["max_abs_diff_decode"] <= 1e-3
