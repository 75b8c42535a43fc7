"""Reshape(x, <shape computed from Shape ops>) -> Reshape(x, <constant>): static head dimensions.

The TorchScript exporter (optimum-onnx) builds every view's target shape at run time, e.g. the
query split into heads, x_BSD -> x_BSHDh:

    Reshape(x_BSD, Concat(Unsqueeze(Gather(Shape(y_BSD), 0)), Unsqueeze(Gather(Shape(y_BSD), 1)), [-1], [Dh]))

so ONNX shape inference cannot give the result a static head count H, which onnxscript's rotary
and attention rules need (ort_fusions/rotary_embedding.py: "Input dimension 1 is not an integer").
This rule evaluates the shape input symbolically (Concat, Unsqueeze, Shape, Gather, Squeeze,
Reshape [-1], scalar Add/Mul/Div of known ints) and writes it as a constant:

- entry i equal to dim i of x (the same symbolic dimension per shape inference) -> 0, which
  Reshape (allowzero=0) copies from x: [B, S, -1, Dh] -> [0, 0, -1, Dh];
- entries that are static ints stay ints;
- a single -1 is resolved when x's remaining dims cancel: [B, S, H*Dh] -> [0, 0, H, Dh].

Any entry that is neither (a symbolic dim not at the same position of x, an unknown value) makes the
rule reject the node; the Reshape then stays as it is. Dtypes: any (only the shape input changes).
"""

from __future__ import annotations

import math

import onnx_ir as ir
from onnxscript.rewriter import pattern

_Dim = int | ir.SymbolicDim | None  # None: unknown


def _ints(value: ir.Value | None) -> list[int] | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    if tensor is None or tensor.dtype not in (ir.DataType.INT64, ir.DataType.INT32):
        return None
    return [int(v) for v in tensor.numpy().reshape(-1)]


def _shape_dims(value: ir.Value, start: int = 0, end: int | None = None) -> list[_Dim] | None:
    if value.shape is None:
        return None
    return [d if isinstance(d, int) or d.value is not None else None for d in value.shape[start:end]]


def _rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def _scalar(value: ir.Value | None, depth: int = 0) -> _Dim:
    """The value of a 0-D (or one-element) int tensor, symbolically; None when unknown."""
    if value is None or depth > 8:
        return None
    ints = _ints(value)
    if ints is not None:
        return ints[0] if len(ints) == 1 else None
    node = value.producer()
    if node is None or node.domain != "":
        return None
    op, inputs = node.op_type, node.inputs
    if op == "Gather" and node.attributes.get_int("axis", 0) == 0:
        index = _ints(inputs[1])
        dims = _vector(inputs[0], depth + 1) if index is not None and len(index) == 1 else None
        return dims[index[0]] if dims is not None and -len(dims) <= index[0] < len(dims) else None
    if op in ("Squeeze", "Unsqueeze", "Reshape", "Identity", "Cast"):  # one element in, the same out
        if _rank(inputs[0]) == 1:
            dims = _vector(inputs[0], depth + 1)
            return dims[0] if dims is not None and len(dims) == 1 else None
        return _scalar(inputs[0], depth + 1) if _rank(inputs[0]) == 0 else None
    if op in ("Add", "Sub", "Mul", "Div"):
        a, b = _scalar(inputs[0], depth + 1), _scalar(inputs[1], depth + 1)
        if not (isinstance(a, int) and isinstance(b, int)):
            return None
        if op == "Div":
            return a // b if b != 0 and a % b == 0 else None
        return {"Add": a + b, "Sub": a - b, "Mul": a * b}[op]
    return None


def _vector(value: ir.Value | None, depth: int = 0) -> list[_Dim] | None:
    """The entries of a 1-D int tensor built from shapes, symbolically; None when not evaluable."""
    if value is None or depth > 8:
        return None
    ints = _ints(value)
    if ints is not None:
        return list(ints)
    node = value.producer()
    if node is None or node.domain != "":
        return None
    if node.op_type == "Shape":
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end", None)
        return _shape_dims(node.inputs[0], start, end)
    if node.op_type == "Concat" and node.attributes.get_int("axis", 0) == 0:
        parts = [_vector(v, depth + 1) for v in node.inputs]
        return None if any(p is None for p in parts) else [d for p in parts for d in p]
    if node.op_type == "Unsqueeze" and _ints(node.inputs[1]) == [0]:
        return [_scalar(node.inputs[0], depth + 1)]
    if node.op_type in ("Identity", "Cast") or (node.op_type == "Reshape" and _ints(node.inputs[1]) == [-1]):
        return _vector(node.inputs[0], depth + 1)
    return None


class ReshapeToConstantShape(pattern.RewriteRuleClassBase):
    def pattern(self, op, x, shape):
        return op.Reshape(x, shape, _allow_other_attributes=True, _outputs=["reshaped"])

    def check(self, context, x, shape, reshaped, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if shape.const_value is not None:
            return result.fail("The shape is already a constant.", shape)
        if reshaped.producer().attributes.get_int("allowzero", 0) != 0:
            return result.fail("allowzero=1: a 0 entry would not copy the input's dim.", reshaped)
        dims = _vector(shape)
        if dims is None:
            return result.fail("The shape is not built from Shape/Gather/Concat of known values.", shape)
        x_dims = list(x.shape) if x.shape is not None else None
        new: list[int] = []
        for i, d in enumerate(dims):
            if isinstance(d, int):
                new.append(d)
            elif d is not None and x_dims is not None and i < len(x_dims) and x_dims[i] == d:
                new.append(0)  # Reshape copies dim i of x, which equals d
            else:
                return result.fail(f"Shape entry {i} ({d}) is neither static nor x's dim {i}.", shape)
        if new.count(-1) > 1:
            return result.fail("More than one -1 in the shape.", shape)
        self._shape = _resolve_minus_one(new, x_dims)
        return result

    def rewrite(self, op, x, reshaped, **_):
        return op.Reshape(x, op.Constant(value_ints=self._shape))


def _resolve_minus_one(new: list[int], x_dims: list | None) -> list[int]:
    """Replace a -1 by its value when x's dims that are not copied (0 entries) are all static."""
    if -1 not in new or x_dims is None or any(d is None for d in x_dims):
        return new
    rest = [d for i, d in enumerate(x_dims) if not (i < len(new) and new[i] == 0)]
    if not all(isinstance(d, int) for d in rest):
        return new
    known = math.prod(d for d in new if d > 0)
    total = math.prod(rest)
    if known == 0 or total % known:
        return new
    return [total // known if d == -1 else d for d in new]


def rules() -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet([ReshapeToConstantShape.rule()])
