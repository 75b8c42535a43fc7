"""ReduceMean with the default `noop_with_empty_axes` written out, as the dynamo exporter emits it.

onnxscript's `RmsNormFusion` (ort_fusions/rms_normalization.py) matches
`ReduceMean(x, [-1], keepdims=1, noop_with_empty_axes=0)`, and its matcher requires every attribute
named in the pattern to be present on the node ("Attribute noop_with_empty_axes not found in node").
The TorchScript exporter (optimum-onnx) omits it. The ONNX spec (ReduceMean-18) defines the default
noop_with_empty_axes=0, so adding it explicitly changes nothing; `keepdims` is written out the same
way (default 1). Dtypes: any.
"""

from __future__ import annotations

from onnxscript.rewriter import pattern


class ReduceMeanDefaultAttributes(pattern.RewriteRuleClassBase):
    def pattern(self, op, x, axes):
        return op.ReduceMean(x, axes, _allow_other_attributes=True, _outputs=["mean"])

    def check(self, context, mean, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        attributes = mean.producer().attributes
        if "noop_with_empty_axes" in attributes:
            return result.fail("noop_with_empty_axes is already set.", mean)
        if set(attributes) - {"keepdims"}:
            return result.fail(f"Unexpected attributes {sorted(attributes)}.", mean)
        self._keepdims = attributes.get_int("keepdims", 1)
        return result

    def rewrite(self, op, x, axes, **_):
        return op.ReduceMean(x, axes, keepdims=self._keepdims, noop_with_empty_axes=0)


def rules() -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet([ReduceMeanDefaultAttributes.rule()])
