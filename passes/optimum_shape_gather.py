"""Gather(Shape(x), k) -> Constant(x.shape[k]) where that dimension is static.

The TorchScript exporter (optimum-onnx) reads single dimensions as `Gather(Shape(x), k)` with a
0-D index, e.g. the rotary half size `Div(Gather(Shape(q_BHSDh), 3), 2)` that bounds the
rotate_half Slices. onnxscript's constant folder evaluates only 1-D indices into a shape
(optimizer/_constant_folding.py, `gather`), so the Slice bounds stay dynamic and the rotary rule
(ort_fusions/rotary_embedding.py) cannot check that x is split into halves. With a static dim the
Gather is that int (scalar int64 as Shape yields), and the folder then folds the arithmetic on it.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern


class GatherStaticDim(pattern.RewriteRuleClassBase):
    def __init__(self):
        # The Shape node may feed other Gathers: keep it; cleanup removes it once unused.
        super().__init__(remove_nodes=False)

    def pattern(self, op, x, index):
        shape = op.Shape(x, _allow_other_attributes=True, _outputs=["shape"])
        return op.Gather(shape, index, _allow_other_attributes=True, _outputs=["dim"])

    def check(self, context, x, index, shape, dim, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        d, why = gathered_dim(x, index, shape, dim)
        if why is not None:
            return result.fail(why, x)
        if not isinstance(d, int):
            return result.fail("The dimension is not static.", x)
        self._value = d
        return result

    def rewrite(self, op, **_):
        return op.Constant(value=ir.tensor(self._value, dtype=ir.DataType.INT64))


def gathered_dim(x: ir.Value, index: ir.Value, shape: ir.Value, dim: ir.Value):
    """The dimension of x that Gather(Shape(x, start, end), index) reads (int or ir.SymbolicDim) and
    None, or None and why it cannot be known at optimize time."""
    if dim.producer().attributes.get_int("axis", 0) != 0:
        return None, "Gather axis is not 0."
    k = ir.convenience.get_const_tensor(index)
    if k is None or k.shape != ():
        return None, "The index is not a constant scalar."
    if x.shape is None:
        return None, "The input's shape is unknown."
    node = shape.producer()
    dims = list(x.shape)[node.attributes.get_int("start", 0) : node.attributes.get_int("end", None)]
    i = int(k.numpy())
    if not -len(dims) <= i < len(dims):
        return None, f"Index {i} is outside the shape."
    return dims[i], None


def rules() -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet([GatherStaticDim.rule()])
