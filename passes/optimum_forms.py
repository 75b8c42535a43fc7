"""Rewrite the TorchScript exporter's op forms (optimum-onnx) into the forms onnxscript's rules match.

One pipeline step, run before the first fusion; on a dynamo export it finds nothing to do. Each
rule keeps the computation (its module says why; all exact except Div -> Reciprocal, which ORT
rounds about an ulp differently) and lives in its own module:

- optimum_reduce_mean  ReduceMean with noop_with_empty_axes=0 written out      (RMSNorm)
- optimum_reciprocal   Div(1, x) -> Reciprocal(x)                              (RMSNorm)
- optimum_expand       torch expand(-1) idiom -> plain Expand                  (rotary cos/sin, repeat_kv, mask)
- optimum_reshape      Reshape to a shape built from Shape ops -> constant     (static head counts)
- optimum_shape_gather Gather(Shape(x), k) -> the static dim                   (rotate_half Slice bounds)
- optimum_shape_source Gather(Shape(x), k) -> same dim of a graph input        (mask sized by the key)
- optimum_where_scalar Where(c, [v], x) -> Where(c, v, x)                      (SDPA's NaN guard)

The rules feed each other through shapes: a constant Reshape gives the head split a static shape
(ONNX shape inference with data propagation), which turns the rotary `Gather(Shape(q), 3)` into 16,
which the folder (`cleanup`) propagates. So the step alternates shape inference, the rules and
cleanup until no rule fires (a few rounds; each round resolves what the previous one exposed).
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.rewriter import pattern

from onnxopt.passes import (
    cleanup,
    optimum_expand,
    optimum_reciprocal,
    optimum_reduce_mean,
    optimum_reshape,
    optimum_shape_gather,
    optimum_shape_source,
    optimum_where_scalar,
)

_MAX_ROUNDS = 8


def rules() -> pattern.RewriteRuleSet:
    modules = (
        optimum_reduce_mean,
        optimum_reciprocal,
        optimum_expand,
        optimum_reshape,
        optimum_shape_gather,
        optimum_shape_source,
        optimum_where_scalar,
    )
    return pattern.RewriteRuleSet([rule for m in modules for rule in m.rules().rules])


class TorchScriptForms(ir.passes.InPlacePass):
    """Apply `rules()` to a fixed point, with shape inference and cleanup between rounds."""

    def __init__(self):
        super().__init__()
        self.rewired = 0  # rewrites made (the report's match count)
        self.miss = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        rule_set = rules()
        for _ in range(_MAX_ROUNDS):
            common_passes.ShapeInferencePass(data_prop=True)(model)
            count = rule_set.apply_to_model(model)
            if not count:
                break
            self.rewired += count
            cleanup.cleanup()(model)
        return ir.passes.PassResult(model, modified=self.rewired > 0)
