"""W8A8 int8 for GPUs: the `int8` scheme's Q/DQ MatMuls as integer MatMulInteger, the same arithmetic.

`onnxopt quantize --scheme int8` writes ONNX Q/DQ (calibration/smoothquant.py): activations uint8 per
tensor, asymmetric, weights int8 per output column, symmetric:

    x_q  = QuantizeLinear(x, s_x, z_x)                         uint8, z_x uint8
    y    = MatMul(DequantizeLinear(x_q, s_x, z_x), DequantizeLinear(W_q, s_w, axis=1))

ORT's CPU EP fuses that into MatMulIntegerToFloat; its CUDA EP has no such fusion and would run the
DequantizeLinear of every weight in float on every step. This pass rewrites each such MatMul into

    x_q8 = QuantizeLinear(x, s_x, z)                           int8, z = z_x - 128 (one per input, shared)
    acc  = MatMulInteger(x_q8, W_q) + (-z * sum_k W_q[k, :])   int32: sum_k (x_q8 - z) * W_q, the offset constant
    y    = Cast(Mul(Cast<float>(acc), s_x * s_w))              [N] float32 scales; back to x's dtype

ORT has a CUDA kernel for MatMulInteger with int8 inputs (../shared/gpu/DEVICE.md). The arithmetic
is the same as the Q/DQ graph's: shifting the uint8 grid and its zero point by 128 leaves
x_q - z_x unchanged (clip(round(x/s) + z, 0, 255) - 128 = clip(round(x/s) + z - 128, -128, 127)), and
the integer products are summed exactly. Only the float scaling differs in rounding. The accumulator is
scaled in float32, since int32 sums pass float16's range. The CUDA runtime applies this pass when it
loads a package (runtime/device_graph.py), so a package stays portable Q/DQ on disk.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass


def const_array(value) -> np.ndarray | None:
    """The NumPy array of a constant value (initializer), None otherwise."""
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


class W8A8IntegerPass(ir.passes.InPlacePass):
    """Rewrite Q/DQ W8A8 MatMuls into MatMulInteger + scaling (module docstring); `rewired` counts them."""

    def __init__(self):
        super().__init__()
        self.rewired = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        shared: dict[int, ir.Value] = {}  # id of the uint8 QuantizeLinear -> its int8 replacement's output
        self.rewired = 0
        for node, parts in matched_matmuls(graph, _match):
            quant, x, x_scale, zp8, w_q, scale, colsum = parts
            if id(quant) not in shared:
                qname = quant.name or quant.outputs[0].name
                zp_value = add_initializer(graph, f"{qname}.zero_point_int8", np.asarray(zp8, dtype=np.int8))
                q8 = ir.Node("", "QuantizeLinear", [x, x_scale, zp_value], name=f"{qname}_int8", num_outputs=1)
                q8.outputs[0].name = f"{quant.outputs[0].name}.int8"
                q8.outputs[0].type = ir.TensorType(ir.DataType.INT8)
                q8.outputs[0].shape = x.shape
                graph.insert_after(quant, q8)
                shared[id(quant)] = q8.outputs[0]
            xq8 = shared[id(quant)]
            base = node.name or node.outputs[0].name
            out = node.outputs[0]
            dtype = out.dtype if out.dtype is not None else ir.DataType.FLOAT
            mm = ir.Node("", "MatMulInteger", [xq8, w_q], name=f"{base}_int", num_outputs=1)
            mm.outputs[0].name = f"{base}.dot"
            mm.outputs[0].type = ir.TensorType(ir.DataType.INT32)
            # - z * sum_k W[k, n], constant: ORT's CUDA MatMulInteger would recompute these column sums
            # of the weight on every call when given a_zero_point (measured: 4.8 ms a token on llama-1b)
            offset = add_initializer(graph, f"{base}.zero_point_offset", (-zp8 * colsum).astype(np.int32))
            add = ir.Node("", "Add", [mm.outputs[0], offset], name=f"{base}_offset", num_outputs=1)
            add.outputs[0].name = f"{base}.acc"
            add.outputs[0].type = ir.TensorType(ir.DataType.INT32)
            cast = ir.Node("", "Cast", [add.outputs[0]], [ir.AttrInt64("to", ir.DataType.FLOAT)], name=f"{base}_acc_float",
                           num_outputs=1)
            cast.outputs[0].name = f"{base}.acc_float"
            cast.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
            scale_value = add_initializer(graph, f"{base}.int_scale", scale.astype(np.float32))
            mul = ir.Node("", "Mul", [cast.outputs[0], scale_value], name=f"{base}_scaled", num_outputs=1)
            mul.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
            new_nodes = [mm, add, cast, mul]
            if dtype != ir.DataType.FLOAT:
                back = ir.Node("", "Cast", [mul.outputs[0]], [ir.AttrInt64("to", dtype)], name=f"{base}_cast_back",
                               num_outputs=1)
                new_nodes.append(back)
            result = new_nodes[-1].outputs[0]
            mul.outputs[0].name = f"{base}.scaled" if result is not mul.outputs[0] else None
            replace_matmul(graph, node, new_nodes, result, dtype)
            self.rewired += 1
        if self.rewired:
            RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=self.rewired > 0)


class QDQMatMul(NamedTuple):
    """The parts of MatMul(DequantizeLinear(QuantizeLinear(x, s_x, z_x), s_x, z_x), DequantizeLinear(W_q, s_w,
    axis=1)) with per-tensor constant activation parameters and a per-column weight scale."""

    quant: ir.Node  # the QuantizeLinear
    x: ir.Value
    x_scale: ir.Value
    x_zp: ir.Value
    s_x: np.ndarray  # one value
    z_x: np.ndarray  # one value, the quantized dtype
    w_q: ir.Value
    wq: np.ndarray  # [K, N]
    sw: np.ndarray  # [N]


def _same(value: ir.Value | None, ref: ir.Value, ref_array: np.ndarray) -> bool:
    """`value` is `ref`, or a constant equal to it; an absent zero point (None) equals a zero one."""
    if value is None:
        return bool(np.all(ref_array.astype(np.float32) == 0))
    if value is ref:
        return True
    array = const_array(value)
    return array is not None and array.shape == ref_array.shape and bool(np.all(array == ref_array))


def qdq_matmul(node: ir.Node) -> QDQMatMul | None:
    """The Q/DQ parts of a MatMul (QDQMatMul), None when it is not of that form. The dtypes of the
    quantized values are the caller's to check (int8 here, E4M3 in passes/fp8_gemm.py)."""
    a, b = node.inputs
    dq_a, dq_b = a.producer(), b.producer()
    if dq_a is None or dq_b is None or dq_a.op_type != "DequantizeLinear" or dq_b.op_type != "DequantizeLinear":
        return None
    quant = dq_a.inputs[0].producer()
    if quant is None or quant.op_type != "QuantizeLinear" or len(quant.inputs) < 3 or len(dq_a.inputs) < 2:
        return None
    x, x_scale, x_zp = quant.inputs[:3]
    s_x, z_x = const_array(x_scale), const_array(x_zp)
    if s_x is None or z_x is None or s_x.size != 1 or z_x.size != 1:
        return None
    if not _same(dq_a.inputs[1], x_scale, s_x) or not _same(dq_a.inputs[2] if len(dq_a.inputs) > 2 else None, x_zp, z_x):
        return None
    w_q = dq_b.inputs[0]
    wq, sw = const_array(w_q), const_array(dq_b.inputs[1])
    if wq is None or sw is None or wq.ndim != 2 or sw.shape != (wq.shape[1],):
        return None
    if dq_b.attributes.get_int("axis", 1) not in (1, -1) or dq_b.attributes.get_int("block_size", 0):
        return None
    if len(dq_b.inputs) > 2 and dq_b.inputs[2] is not None:
        zp_w = const_array(dq_b.inputs[2])
        if zp_w is None or np.any(zp_w.astype(np.float32) != 0):
            return None
    return QDQMatMul(quant, x, x_scale, x_zp, s_x, z_x, w_q, wq, sw)


def _match(node: ir.Node):
    """(uint8 QuantizeLinear, x, s_x, z_x - 128, W_q, s_x * s_w [N], column sums of W_q [N]) for a Q/DQ
    W8A8 MatMul, else None."""
    parts = qdq_matmul(node)
    if parts is None or parts.z_x.dtype != np.uint8 or parts.wq.dtype != np.int8:
        return None
    zp8 = int(parts.z_x.reshape(())) - 128
    scale = parts.s_x.astype(np.float32).reshape(()) * parts.sw.astype(np.float32)
    return parts.quant, parts.x, parts.x_scale, zp8, parts.w_q, scale, parts.wq.astype(np.int64).sum(axis=0)


def matched_matmuls(graph: ir.Graph, match):
    """(MatMul node, match(node)) for each MatMul of `graph` that `match` accepts (not None), from a
    snapshot of the node list, so the caller may rewrite as it goes."""
    for node in list(graph):
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
            parts = match(node)
            if parts is not None:
                yield node, parts


def replace_matmul(graph: ir.Graph, node: ir.Node, new_nodes: list[ir.Node], result: ir.Value,
                   dtype: ir.DataType) -> None:
    """Put `new_nodes` where the MatMul `node` was; `result` (of `dtype`) takes its output's name, shape
    and uses."""
    out = node.outputs[0]
    graph.insert_before(node, new_nodes)
    result.shape, result.type = out.shape, ir.TensorType(dtype)
    name = out.name
    out.name = None
    result.name = name
    out.replace_all_uses_with(result, replace_graph_outputs=True)
    graph.remove(node, safe=True)


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register `array` as initializer `name` of `graph`; returns its value."""
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.Tensor(array, name=name))
    graph.register_initializer(value)
    return value


def count(graph: ir.Graph) -> int:
    """How many MatMuls of `graph` the pass would rewrite (nothing is changed)."""
    return sum(1 for _ in matched_matmuls(graph, _match))


def apply(model: ir.Model) -> int:
    """Run the pass on `model` in place; returns how many MatMuls it rewrote."""
    rewrite = W8A8IntegerPass()
    rewrite(model)
    return rewrite.rewired
