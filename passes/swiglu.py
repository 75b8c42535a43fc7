"""SwiGLU fusion: pack the gate and up projections of a Llama-family MLP into one MatMul + `onnxopt::SwiGLU`.

Abbreviations: B batch, S sequence, H hidden size, F intermediate size.

    gate_BSF = MatMul(x_BSH, w_gate_HF)                  x_BS2F = MatMul(x_BSH, concat([w_gate_HF, w_up_HF], 1))
    up_BSF   = MatMul(x_BSH, w_up_HF)            ==>      y_BSF = onnxopt::SwiGLU(x_BS2F)
    y_BSF    = Mul(Mul(gate_BSF, Sigmoid(gate_BSF)), up_BSF)

y = silu(gate) * up with silu(g) = g * sigmoid(g); spec of the target op in `custom_ops/swiglu.py`.
Both operand orders of each Mul are accepted (the rule set is commuted). The dynamo exporter emits exactly
this Sigmoid/Mul form for `F.silu` (checked on tiny Llama, Qwen2 and Mistral exports).
Dtypes: float32, float16; both weights constant [H, F] of the same dtype as x.

`decompose_rules()` turns `onnxopt::SwiGLU` back into standard ops (custom_ops.swiglu.decompose) for
ORT CPU, which cannot run domain `onnxopt`; the CPU pipeline applies it last.
The replaced weights stay as unused initializers until `RemoveUnusedNodesPass` runs.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from onnxopt.custom_ops import swiglu


class SwiGLUFusion(pattern.RewriteRuleClassBase):
    def pattern(self, op, x_BSH, w_gate_HF, w_up_HF):
        gate_BSF = op.MatMul(x_BSH, w_gate_HF)
        up_BSF = op.MatMul(x_BSH, w_up_HF)
        silu_BSF = op.Mul(gate_BSF, op.Sigmoid(gate_BSF))
        return op.Mul(silu_BSF, up_BSF, _outputs=["y_BSF"])

    def check(self, context, x_BSH, w_gate_HF, w_up_HF, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        for w in (w_gate_HF, w_up_HF):
            if w.const_value is None:
                return result.fail(f"Weight {w.name} is not a constant initializer.", w)
            if w.shape is None or len(w.shape) != 2:
                return result.fail(f"Weight {w.name} is not a matrix: shape {w.shape}.", w)
        if w_gate_HF.dtype != w_up_HF.dtype or w_gate_HF.dtype != x_BSH.dtype:
            return result.fail(
                f"Dtypes differ: x {x_BSH.dtype}, gate {w_gate_HF.dtype}, up {w_up_HF.dtype}.", [w_gate_HF, w_up_HF]
            )
        if w_gate_HF.dtype not in swiglu.DTYPES:
            return result.fail(f"SwiGLU does not accept {w_gate_HF.dtype}.", w_gate_HF)
        if w_gate_HF.shape != w_up_HF.shape:
            return result.fail(f"Gate {w_gate_HF.shape} and up {w_up_HF.shape} weights differ in shape.", w_up_HF)
        return result

    def rewrite(self, op, x_BSH, w_gate_HF, w_up_HF, y_BSF, **_):
        w_H2F = np.concatenate([w_gate_HF.const_value.numpy(), w_up_HF.const_value.numpy()], axis=1)
        name = f"{y_BSF.name}.gate_up_weight"  # the output's name is unique in the graph; weights may be shared
        packed_BS2F = op.MatMul(x_BSH, op.initializer(ir.tensor(w_H2F, name=name), name=name))
        packed_BS2F.dtype = x_BSH.dtype
        if x_BSH.shape is not None:  # typed, so that SwiGLU's output shape can be inferred from it
            packed_BS2F.shape = ir.Shape([*x_BSH.shape[:-1], w_H2F.shape[1]])
        return swiglu.make_node(op, packed_BS2F)


class SwiGLUDecomposition(pattern.RewriteRuleClassBase):
    """onnxopt::SwiGLU(x) -> Split, silu, Mul (custom_ops.swiglu.decompose)."""

    def __init__(self, name: str, *, quick_gelu: bool):
        super().__init__(name)
        self._quick_gelu = quick_gelu

    def pattern(self, op, x):
        return op.SwiGLU(x, _domain=swiglu.DOMAIN)

    def rewrite(self, op, x):
        return swiglu.decompose(op, x, quick_gelu=self._quick_gelu)


def rules() -> pattern.RewriteRuleSet:
    """The SwiGLU fusion, commuted over the operand orders of both Muls."""
    return pattern.RewriteRuleSet([SwiGLUFusion.rule("SwiGLU")], commute=True)


def decompose_rules(*, quick_gelu: bool = True) -> pattern.RewriteRuleSet:
    """onnxopt::SwiGLU -> standard ops; `quick_gelu=False` avoids ORT contrib ops (Sigmoid + Mul)."""
    variant = "quick-gelu" if quick_gelu else "sigmoid-mul"
    return pattern.RewriteRuleSet([SwiGLUDecomposition.rule(f"SwiGLUDecomposition-{variant}", quick_gelu=quick_gelu)])
