"""ai.onnxruntime._fusion::SDPA -> standard ops, for attention the GQA fusion did not take.

onnxscript's `sdpa` rule (ort_fusions/sdpa.py) replaces the attention core with an intermediate
SDPA node that only the GQA/MHA rules consume; no runtime implements it. Where GQA does not fuse
(a mask that is not causal, an architecture the rules do not know), the SDPA node would be left
in the graph and ORT could not load it. This rule writes it back as

    weights_BHST    = Softmax(MatMul(query_BHSDh, key_BHDhT) * scale + mask), NaN -> 0
    attention_BHSDv = MatMul(weights_BHST, value_BHTDv)

with key_BHDhT = Transpose(key) (perm [0,1,3,2] for key_format "BHSd", [0,2,3,1] for "BSHd") and
scale = the node's `scale`, else 1/sqrt(Dh). The NaN guard is the exporters' `masked_fill` of fully
masked rows, which the SDPA pattern absorbed. Dtypes: float32, float16 (scale as a tensor of q's dtype).
"""

from __future__ import annotations

import math

import onnx_ir as ir
from onnxscript.rewriter import pattern

_PERM = {"BHSd": [0, 1, 3, 2], "BSHd": [0, 2, 3, 1]}


class DecomposeSDPA(pattern.RewriteRuleClassBase):
    def __init__(self, name: str, *, with_mask: bool):
        super().__init__(name)
        self._with_mask = with_mask

    def pattern(self, op, query, key, value, mask):
        inputs = [query, key, value, mask] if self._with_mask else [query, key, value]
        return op.SDPA(*inputs, _domain="ai.onnxruntime._fusion", _allow_other_attributes=True, _outputs=["attention"])

    def check(self, context, query, attention, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        attributes = attention.producer().attributes
        self._key_format = attributes.get_string("key_format", "BHSd")
        if self._key_format not in _PERM:
            return result.fail(f"Unknown key_format {self._key_format!r}.", attention)
        scale = attributes.get_float("scale", None)
        if scale is None:
            head_size = query.shape[-1] if query.shape is not None and len(query.shape) == 4 else None
            if not isinstance(head_size, int):
                return result.fail("No scale and the query's head size is not static.", query)
            scale = 1.0 / math.sqrt(head_size)
        if query.dtype is None:
            return result.fail("The query's dtype is unknown.", query)
        self._scale = ir.tensor(scale, dtype=query.dtype)
        return result

    def rewrite(self, op, query, key, value, mask=None, **_):
        key_t = op.Transpose(key, perm=_PERM[self._key_format])
        scores = op.Mul(op.MatMul(query, key_t), op.Constant(value=self._scale))
        if self._with_mask:
            scores = op.Add(scores, mask)
        weights = op.Softmax(scores, axis=-1)
        zero = op.Constant(value=ir.tensor(0.0, dtype=query.dtype))
        weights = op.Where(op.IsNaN(weights), zero, weights)
        return op.MatMul(weights, value)


def rules() -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet(
        [DecomposeSDPA.rule("DecomposeSDPA-mask", with_mask=True), DecomposeSDPA.rule("DecomposeSDPA", with_mask=False)]
    )
