"""Gather(Shape(x), k) -> Gather(Shape(input), m): read a symbolic dim from the graph input that declares it.

The TorchScript exporter (optimum-onnx) sizes the causal mask by the key length read off the
repeated key, `Slice(mask, ..., Gather(Shape(key_BHTDh), 2))`, which ties the mask to the whole
attention path of its layer (projections, rotary, the previous layer's output). The mask then
cannot be evaluated on its own (gqa_mask_window.py probes it) nor removed with the attention it
fed. When shape inference gives x.shape[k] a named symbolic dim that a graph input also declares
(T = "past_sequence_length + sequence_length" is attention_mask's dim 1 in optimum's export), both
are the same run-time value by the exporter's declaration, so reading it from the input is exact.
Static dims are left to optimum_shape_gather; unnamed ("unk__") dims are never matched.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from onnxopt.passes.optimum_shape_gather import GatherStaticDim, gathered_dim


def _named(dim) -> str | None:
    if isinstance(dim, ir.SymbolicDim) and dim.value and not dim.value.startswith("unk__"):
        return dim.value
    return None


class ShapeDimFromGraphInput(GatherStaticDim):  # the same Gather(Shape(x), k) pattern
    def check(self, context, x, index, shape, dim, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if x.is_graph_input():
            return result.fail("x is already a graph input.", x)
        d, why = gathered_dim(x, index, shape, dim)
        if why is not None:
            return result.fail(why, x)
        name = _named(d)
        if name is None:
            return result.fail("The dimension of x is not a named symbolic dim.", x)
        for value in context.graph_or_function.inputs:
            for m, other in enumerate(value.shape or ()):
                if _named(other) == name:
                    self._source = (value, m)
                    return result
        return result.fail(f"No graph input declares the dim {name!r}.", x)

    def rewrite(self, op, **_):
        value, m = self._source
        return op.Gather(op.Shape(value), op.Constant(value=ir.tensor(m, dtype=ir.DataType.INT64)), axis=0)


def rules() -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet([ShapeDimFromGraphInput.rule()])
