"""The pipeline as data: targets, optional steps of modules not written yet, the report."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from conftest import needs_torch
from onnxopt.errors import UserError
from onnxopt.passes import pipeline


def test_every_target_is_declared_and_cpu_names_are_unique():
    assert set(pipeline.PIPELINES) == set(pipeline.TARGETS)
    names = [s.name for s in pipeline.pipeline("cpu")]
    assert len(names) == len(set(names))
    # gqa_interface needs the fused GQA nodes, and packing must not break the GQA pattern.
    assert names.index("gqa") < names.index("gqa_interface") < names.index("pack_qkv")
    assert names.index("swiglu") < names.index("swiglu_decompose")


def test_cuda_keeps_swiglu_and_portable_ends_with_its_check():
    cuda = [s.name for s in pipeline.pipeline("cuda")]
    assert "swiglu" in cuda and "swiglu_decompose" not in cuda
    portable = [s.name for s in pipeline.pipeline("portable")]
    assert portable.index("opset23") < portable.index("rms_normalization23") and portable[-1] == "standard_ops_only"


def test_fp16_appends_the_conversion_last():
    assert [s.name for s in pipeline.pipeline("cpu", "fp16")][-1] == "float16"
    assert "float16" not in [s.name for s in pipeline.pipeline("cpu")]
    with pytest.raises(UserError, match="--dtype 'int3': expected one of fp32, fp16"):
        pipeline.pipeline("cpu", "int3")


def test_unknown_target():
    with pytest.raises(UserError, match="expected one of"):
        pipeline.pipeline("tpu")


def test_missing_module_is_skipped_as_not_available():
    model = ir.Model(ir.Graph([], [], nodes=[]), ir_version=10)
    step = pipeline.Step("future", pipeline._optional_rules("no_such_pass_module"))
    result = pipeline.run_step(model, step, num_layers=2)
    assert result.note == "not available" and result.matches is None


@needs_torch
def test_report_counts_nodes_per_layer(tiny_package):
    model = ir.load(tiny_package / "model.onnx")
    report = pipeline.run_pipeline(model, "cpu", num_layers=2)
    assert report.nodes_before["per_layer"] > report.nodes_after["per_layer"] > 0
    text = report.format_text()
    assert "nodes per decoder layer" in text and "expected fusions that did not fire: none" in text
    assert report.to_json()["steps"][0]["name"] == "cleanup"
