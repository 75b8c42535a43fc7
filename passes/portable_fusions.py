"""onnxscript's opset-23 fusion rule sets (onnxscript/rewriter/rules/fusion/), reused as target `portable` steps.

The model must import opset 23 first (`portable_opset.ConvertOpset`): the fused ops are standard ONNX ops
of that opset, so any ONNX runtime with opset 23 can load the result.

- RMSNormalization (https://onnx.ai/onnx/operators/onnx__RMSNormalization.html):
      y = x / sqrt(mean(x^2, axis=-1) + epsilon) * scale,   computed in `stash_type` (float32; the
  rule refuses a lower precision), from the Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul/Mul the exporter emits.
  The residual Add stays a separate node (ONNX has no skip-RMSNorm).
- RotaryEmbedding (https://onnx.ai/onnx/operators/onnx__RotaryEmbedding.html), non-interleaved:
      y = x * cos + rotate_half(x) * sin,   rotate_half([x1, x2]) = [-x2, x1] on the head axis,
  with cos/sin of shape [B, S, D/2] computed from position_ids in the graph (one Cos and one Sin,
  shared by every layer after CSE). x is [B, H, S, D].
Dtypes: float32, float16 (ORT CPU has kernels for both).
"""

from __future__ import annotations

from onnxscript.rewriter import RewriteRuleSet
from onnxscript.rewriter.rules.fusion import _rms_normalization, _rotary_embedding


def rms_normalization_rules() -> RewriteRuleSet:
    return _rms_normalization.rms_normalization_ruleset


def rotary_embedding_rules() -> RewriteRuleSet:
    return _rotary_embedding.rotary_embedding_rules
