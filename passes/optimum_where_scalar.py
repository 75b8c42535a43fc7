"""Where(c, [v], x) -> Where(c, v, x): a one-element 1-D branch constant becomes a 0-D scalar.

The TorchScript exporter (optimum-onnx) writes `attn_weights.masked_fill(isnan, 0.0)` as
`Where(IsNaN(p), [0.0], p)` with a [1]-shaped constant, where onnxscript's SDPA rule
(ort_fusions/sdpa.py) expects the scalar 0.0 ("is not a scalar, expecting 0.0"). With a condition
or other branch of rank >= 1, broadcasting [1] and [] against it gives the same output shape and
values (ONNX broadcasting, numpy semantics), so the rewrite is exact. Dtypes: any.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern


class WhereScalarBranch(pattern.RewriteRuleClassBase):
    def __init__(self, name: str, *, branch: int):
        super().__init__(name)
        self._branch = branch  # 1: the true branch is the constant; 2: the false branch

    def pattern(self, op, condition, a, b):
        return op.Where(condition, a, b)

    def check(self, context, condition, a, b, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        constant, other = (a, b) if self._branch == 1 else (b, a)
        tensor = ir.convenience.get_const_tensor(constant)
        if tensor is None or tensor.shape != (1,):
            return result.fail("The branch is not a constant of shape [1].", constant)
        ranks = [v.shape.rank() if v.shape is not None else None for v in (condition, other)]
        if not any(r is not None and r >= 1 for r in ranks):
            return result.fail("Neither the condition nor the other branch is known to have rank >= 1.", condition)
        self._scalar = ir.tensor(tensor.numpy().reshape(()))
        return result

    def rewrite(self, op, condition, a, b, **_):
        scalar = op.Constant(value=self._scalar)
        return op.Where(condition, scalar, b) if self._branch == 1 else op.Where(condition, a, scalar)


def rules() -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet(
        [WhereScalarBranch.rule("WhereScalarTrue", branch=1), WhereScalarBranch.rule("WhereScalarFalse", branch=2)]
    )
