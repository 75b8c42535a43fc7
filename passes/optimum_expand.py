"""Expand(x, Where(Equal(s, -1), 1, s)) -> Expand(x, s'): torch's `expand(-1)` idiom, simplified.

The TorchScript exporter writes `t.expand(B, -1, 1)` (rotary inv_freq, repeat_kv, the causal
mask) as

    ones = ConstantOfShape([n], 1);  s = Concat(parts...)   (optionally Reshape(s, [-1]))
    Expand(x, Where(Equal(s, Mul(ones, -1)), ones, s))

i.e. every -1 entry of the target shape becomes 1, which ONNX Expand (numpy broadcasting) reads as
"keep x's dim" — the meaning of -1 in torch. The rewrite replaces -1 by 1 inside the constant parts
of the Concat and drops the Where. Non-constant parts are run-time dimensions (>= 0, never -1), so
they pass through the Where unchanged; the result is exact. With the Where gone, ONNX shape
inference (with data propagation) gives the Expand a shape, which the rotary and SDPA rules check.
Dtypes: any (only the shape input changes).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern


def _const(value: ir.Value | None) -> np.ndarray | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return None if tensor is None else tensor.numpy()


def _filled_with(value: ir.Value | None, fill: int) -> bool:
    """Whether `value` is all `fill`: a constant, ConstantOfShape(n, fill) (the folder keeps those),
    or Mul(all-ones, fill)."""
    const = _const(value)
    if const is not None:
        return bool((const == fill).all())
    node = value.producer() if value is not None else None
    if node is None or node.domain != "":
        return False
    if node.op_type == "ConstantOfShape":
        attr = node.attributes.get("value")
        return attr is not None and bool((attr.as_tensor().numpy() == fill).all())
    if node.op_type == "Mul":
        a, b = node.inputs
        return any(_filled_with(u, 1) and _filled_with(v, fill) for u, v in ((a, b), (b, a)))
    return False


class TorchExpandIdiom(pattern.RewriteRuleClassBase):
    def pattern(self, op, x, shape, minus_ones, ones):
        return op.Expand(x, op.Where(op.Equal(shape, minus_ones), ones, shape))

    def check(self, context, x, shape, minus_ones, ones, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if not (_filled_with(minus_ones, -1) and _filled_with(ones, 1)):
            return result.fail("The Where does not replace -1 entries by 1.", [minus_ones, ones])
        concat = shape.producer()
        if concat is not None and concat.op_type == "Reshape" and _filled_with(concat.inputs[1], -1):
            concat = concat.inputs[0].producer()
        if concat is None or concat.op_type != "Concat" or concat.attributes.get_int("axis", 0) != 0:
            return result.fail("The target shape is not a Concat of parts.", shape)
        for part in concat.inputs:
            value = _const(part)
            if value is None and (part.shape is None or part.shape.rank() != 1):
                return result.fail("A non-constant part of the shape is not 1-D.", part)
        self._parts = list(concat.inputs)
        return result

    def rewrite(self, op, x, **_):
        parts = []
        for part in self._parts:
            value = _const(part)
            if value is None:
                parts.append(part)  # a run-time dimension: >= 0, left unchanged by the Where
            else:
                parts.append(op.Constant(value=ir.tensor(np.where(value == -1, 1, value).astype(np.int64))))
        return op.Expand(x, op.Concat(*parts, axis=0))


def rules() -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet([TorchExpandIdiom.rule()])
