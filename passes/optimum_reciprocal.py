"""Div(1, x) -> Reciprocal(x): the TorchScript exporter's form of `torch.rsqrt` in RMSNorm.

optimum-onnx exports Llama-family RMSNorm (`x * torch.rsqrt(mean(x^2) + eps)`) as

    Div(1.0, Sqrt(Add(ReduceMean(Pow(x, 2)), eps)))

while onnxscript's `RmsNormFusion` (ort_fusions/rms_normalization.py) matches the dynamo
exporter's `Reciprocal(Sqrt(...))`. Both compute 1 / x; ORT's CPU kernels round them differently
by about an ulp (seen: max relative difference 1e-7 in float32), below any fusion tolerance.
Dtypes: float32, float16, bfloat16, double.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import _ir_utils, pattern

_FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})


class DivOneToReciprocal(pattern.RewriteRuleClassBase):
    def pattern(self, op, one, x):
        return op.Div(one, x)

    def check(self, context, one, x, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if not _ir_utils.is_singleton_value(one, 1.0, rtol=0.0):
            return result.fail("The numerator is not the constant 1.", one)
        if x.dtype not in _FLOAT_TYPES:
            return result.fail(f"The denominator is {x.dtype}, not a float type.", x)
        if one.shape is not None and x.shape is not None and len(one.shape) > len(x.shape):
            return result.fail("The constant 1 has a higher rank than x (Div would broadcast).", one)
        return result

    def rewrite(self, op, x, **_):
        return op.Reciprocal(x)


def rules() -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet([DivOneToReciprocal.rule()])
