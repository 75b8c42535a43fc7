"""Output shapes of fused RotaryEmbedding nodes (com.microsoft and ONNX-23), left unknown by inference.

ONNX shape inference does not know ORT's contrib ops, so a fused node's output keeps whatever
shape the value it replaced had. On the TorchScript exporter's graphs (optimum-onnx) that shape is
partly unknown (the replaced `x*cos + rotate_half(x)*sin` broadcast against a cos of unknown
batch), while the SDPA and GQA rules bind B, H, S, Dh across query and key (ort_fusions/sdpa.py,
`check_shape`). RotaryEmbedding returns its input's shape (ORT docs/ContribOperators.md,
"com.microsoft.RotaryEmbedding": output "tensor with same shape as input"; ONNX RotaryEmbedding-23
likewise returns Y of X's shape), so this pass copies input 0's shape to output 0 where the input's
shape is the more specific one.
"""

from __future__ import annotations

import onnx_ir as ir


def _known(shape: ir.Shape | None) -> int:
    if shape is None:
        return -1
    return sum(1 for d in shape if isinstance(d, int) or (d.value is not None and not d.value.startswith("unk__")))


class RotaryEmbeddingShapes(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in model.graph:
            if node.op_type != "RotaryEmbedding" or node.domain not in ("com.microsoft", "", "ai.onnx"):
                continue
            x, y = node.inputs[0], node.outputs[0]
            if x is not None and _known(x.shape) > _known(y.shape):
                y.shape = ir.Shape(list(x.shape))
                modified = True
        return ir.passes.PassResult(model, modified=modified)
