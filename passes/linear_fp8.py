"""The `fp8` scheme's Q/DQ MatMuls -> onnxopt::LinearFp8 with the norm, outlier channels, bias, SwiGLU and
residual add around them (the CUDA runtime's fp8 projections, custom_ops/linear_fp8.py).

`onnxopt quantize --scheme fp8` writes (calibration/smoothquant.py; X [..., K], W_q [K, N] E4M3, s_x one
scale and s_w [N] in the graph's float dtype, zero points 0 of E4M3, idx [n] the outlier channels):

    y = MatMul(DequantizeLinear(QuantizeLinear(x, s_x, 0), s_x, 0), DequantizeLinear(W_q, s_w, axis=1))
    y = Add(y, MatMul(Gather(x, idx, axis=-1), W_rows))           with outlier channels (W_rows [n, N])

This pass rewrites each into

    y = LinearFp8(x, W_q^T, w_scale=float32(s_w), x_scale=float32(s_x), outlier_index=idx, outlier_weight=W_rows^T)

(the float16 scales of a float16 package are float32 values exactly), removes the Q/DQ nodes, Gathers
and weights left unread, and then folds the norm before, and the bias, SwiGLU and residual add after,
as passes/linear.py does for Linear (`linear.fold_neighbours`): a Llama layer's fp8 projections become
four LinearFp8 launches.

With `swiglu_input` (`SWIGLU_INPUT`, or ONNXOPT_FP8_SWIGLU_INPUT=1 in the environment), a SwiGLU
between two fp8 projections goes into the second one instead of the first: down's LinearFp8 reads the
packed gate | up product and applies SwiGLU as it normalizes and quantizes its input (input_activation
"swiglu"), and gate/up's is a plain projection. The prefill then writes gate/up's product once, in
float16, through the fused-scales path, with no SwiGLU kernel; otherwise gate/up keeps a float32 product
and an epilogue (custom_ops/linear_fp8_kernels.py). The CUDA runtime applies it when it loads a
cuda-target package (with `fp8_linear=True`, runtime/device_graph.py); the package on disk stays
portable Q/DQ. Decode pays for it (down's GEMV stages gate | up and applies SwiGLU in every block: 1-3 %
a step on llama-8b), so the default, ONNXOPT_FP8_SWIGLU_INPUT=prefill, leaves this pass's graph as it is
and lets the runtime run only its prefill in that form (runtime/device_graph.py prefill_form): the same
ops, attributes swapped. On an H100 (2026-12-06, llama-8b, 2048 -> 16) that prefilled in 36.0 ms with the
default's 3.74 ms decode step; "0" keeps both sides in the default form (37.1 ms).

A Q/DQ MatMul of E4M3 is left as it is, with the reason counted in `refused`, when
- its activation zero point is not 0, or QuantizeLinear does not saturate;
- X is not float16/float32, or K or N is not a multiple of 16 (16-byte weight loads; cuBLASLt's FP8
  GEMM wants 16-byte aligned leading dimensions);
- its outlier channels are gathered from another tensor than the quantized one: with SmoothQuant's
  alpha > 0 QuantizeLinear reads x * (1/s) while the Gather reads x (the op has one input; without
  outlier channels such a MatMul is rewritten, reading x * (1/s));
- the outlier part is not of the form above (index and weights constant, the product read only by
  the Add).
Other MatMuls (float, int8 Q/DQ, MatMulNBits) are not this pass's: passes/linear.py and
passes/w8a8_integer.py take them.
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

import ml_dtypes
import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxopt.custom_ops import linear_fp8, swiglu
from onnxopt.passes import linear as linear_pass
from onnxopt.passes.w8a8_integer import add_initializer, const_array, qdq_matmul

ALIGN = 16  # K and N: 16 E4M3 bytes a load; cuBLASLt FP8 leading dimensions
# ONNXOPT_FP8_SWIGLU_INPUT (module docstring): "1" this pass's swiglu_input for every call; "prefill" only
# for prefill (the default since 2026-12-06), where the runtime runs its parts in that form and decode keeps
# gate/up's SwiGLU (runtime/device_graph.py prefill_form); "0" neither
SWIGLU_INPUT_MODES = ("0", "1", "prefill")
_SWIGLU_INPUT_MODE = os.environ.get("ONNXOPT_FP8_SWIGLU_INPUT", "") or "prefill"
if _SWIGLU_INPUT_MODE not in SWIGLU_INPUT_MODES:
    logging.getLogger(__name__).warning("ONNXOPT_FP8_SWIGLU_INPUT=%r is not one of %s; using 'prefill'", _SWIGLU_INPUT_MODE,
                                        SWIGLU_INPUT_MODES)
    _SWIGLU_INPUT_MODE = "prefill"
SWIGLU_INPUT = _SWIGLU_INPUT_MODE == "1"
SWIGLU_INPUT_PREFILL = _SWIGLU_INPUT_MODE == "prefill"
_E4M3 = ml_dtypes.float8_e4m3fn
_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


class Match(NamedTuple):
    """An fp8 Q/DQ MatMul the op can take, with its outlier part when it has one."""

    matmul: ir.Node
    quant: ir.Node  # the QuantizeLinear (shared by the MatMuls of one input)
    x: ir.Value
    dtype: ir.DataType  # x's (QuantizeLinear's scale has it: the quantizer's x * (1/s) is untyped)
    s_x: np.float32
    w_q: ir.Value  # [K, N] E4M3
    s_w: np.ndarray  # [N] float32
    add: ir.Node | None  # the outlier Add, its MatMul and Gather's index and weights
    side: ir.Node | None
    index: ir.Value | None
    rows: ir.Value | None  # W_rows [n, N]


def _sole_reader(value: ir.Value) -> ir.Node | None:
    uses = list(value.uses())
    if value.is_graph_output() or len(uses) != 1:
        return None
    return uses[0].node


def _outlier_part(mm: ir.Node, x: ir.Value, dtype: ir.DataType, k: int, n: int):
    """(Add, outlier MatMul, index, W_rows) when MatMul `mm`'s only reader adds an outlier product;
    None when it has no outlier part; a str (the reason) when it has one this op cannot take."""
    add = _sole_reader(mm.outputs[0])
    if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
        return None
    other = add.inputs[1] if add.inputs[0] is mm.outputs[0] else add.inputs[0]
    side = other.producer() if other is not None else None
    gather = side.inputs[0].producer() if side is not None and side.op_type == "MatMul" and side.inputs[0] is not None else None
    if gather is None or gather.op_type != "Gather":
        return None  # an Add of something else (a bias): not an outlier part
    if gather.inputs[0] is not x:
        return "outlier channels gathered from another tensor than the quantized one (SmoothQuant alpha > 0)"
    index, rows = gather.inputs[1], side.inputs[1]
    idx, w_rows = const_array(index), const_array(rows)
    axis = gather.attributes.get_int("axis", 0)
    if (idx is None or w_rows is None or idx.ndim != 1 or idx.dtype != np.int64 or np.any(idx < 0) or np.any(idx >= k)
            or (axis != -1 and (x.shape is None or axis != len(x.shape) - 1))):
        return "outlier Gather: not a constant int64 index in [0, K) on the last axis"
    if w_rows.shape != (idx.size, n) or rows.dtype != dtype or _sole_reader(other) is not add:
        return "outlier MatMul: weights not a constant [n, N] of x's dtype, or its product read elsewhere"
    return add, side, index, rows


def match(node: ir.Node) -> Match | str | None:
    """The Match of an fp8 Q/DQ MatMul, the reason it is refused (str), or None for another MatMul."""
    parts = qdq_matmul(node)
    if parts is None or parts.z_x.dtype != _E4M3 or parts.wq.dtype != _E4M3:
        return None
    if float(parts.z_x.astype(np.float32).reshape(())) != 0.0 or parts.quant.attributes.get_int("saturate", 1) != 1:
        return "activation zero point not 0, or QuantizeLinear not saturating"
    x = parts.x
    dtype = x.dtype or parts.x_scale.dtype  # QuantizeLinear's x and y_scale share a type (opset 19-21)
    k, n = parts.wq.shape
    if dtype not in _FLOATS or (x.shape is not None and isinstance(x.shape[-1], int) and x.shape[-1] != k):
        return "input not float16/float32 [..., K]"
    if k % ALIGN or n % ALIGN:
        return f"K, N = {k}, {n}: not multiples of {ALIGN}"
    outliers = _outlier_part(node, x, dtype, k, n)
    if isinstance(outliers, str):
        return outliers
    add, side, index, rows = outliers if outliers is not None else (None, None, None, None)
    return Match(node, parts.quant, x, dtype, np.float32(parts.s_x.astype(np.float32).reshape(())), parts.w_q,
                 parts.sw.astype(np.float32), add, side, index, rows)


class FuseLinearFp8(ir.passes.InPlacePass):
    """The rewrite of the module docstring; `rewired` counts LinearFp8 nodes, `folded` what they absorbed
    (with any Linear nodes already in the graph), `refused` the fp8 MatMuls left, by reason."""

    def __init__(self, swiglu_input: bool | None = None):
        super().__init__()
        self.swiglu_input = SWIGLU_INPUT if swiglu_input is None else swiglu_input
        self.rewired = 0
        self.folded: dict[str, int] = {}
        self.refused: dict[str, int] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.rewired, self.folded, self.refused = 0, {}, {}
        x_scales: dict[int, ir.Value] = {}  # per QuantizeLinear: one x_scale for the MatMuls of an input
        for node in list(graph):
            if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or node.graph is not graph:
                continue  # (an outlier MatMul an earlier rewrite removed)
            found = match(node)
            if isinstance(found, str):
                self.refused[found] = self.refused.get(found, 0) + 1
            if not isinstance(found, Match):
                continue
            self._rewrite(graph, found, x_scales)
            self.rewired += 1
        if self.rewired:
            model.opset_imports.setdefault(linear_fp8.DOMAIN, linear_fp8.VERSION)
            # The Q/DQ nodes, Gathers and weights nothing reads now go first: the norm folds require
            # the norm's output to be read by projections only.
            RemoveUnusedNodesPass()(model)
            swiglu_inputs = _fold_swiglu_input(graph) if self.swiglu_input else 0  # before gate/up takes it
            self.folded = linear_pass.fold_neighbours(graph)
            if swiglu_inputs:
                self.folded["swiglu_input"] = swiglu_inputs
        return ir.passes.PassResult(model, modified=bool(self.rewired))

    @staticmethod
    def _rewrite(graph: ir.Graph, m: Match, x_scales: dict) -> None:
        base = m.matmul.name or m.matmul.outputs[0].name
        if m.x.dtype is None:
            m.x.dtype = m.dtype  # the runtime types the values passed to ops (the split's NodeArgs)
        if id(m.quant) not in x_scales:
            x_scales[id(m.quant)] = add_initializer(graph, f"{base}.fp8_x_scale", np.asarray(m.s_x, np.float32))
        w_t = add_initializer(graph, f"{base}.fp8_w_nk", np.ascontiguousarray(const_array(m.w_q).T))
        w_scale = add_initializer(graph, f"{base}.fp8_w_scale", m.s_w)
        outlier_weight = None
        if m.add is not None:  # the index stays the graph's (shared by the input's MatMuls)
            outlier_weight = add_initializer(graph, f"{base}.fp8_outlier_w_nk", np.ascontiguousarray(const_array(m.rows).T))
        made_node = linear_fp8.make_node(m.x, w_t, w_scale, x_scales[id(m.quant)], outlier_index=m.index,
                                         outlier_weight=outlier_weight, name=base)
        last = m.add if m.add is not None else m.matmul
        out, made = last.outputs[0], made_node.outputs[0]
        graph.insert_before(last, made_node)
        made.shape, made.type = out.shape or made.shape, out.type or made.type
        out.replace_all_uses_with(made, replace_graph_outputs=True)
        made.name, out.name = out.name, None
        for dead in (m.add, m.side, m.matmul):  # readers first
            if dead is not None:
                graph.remove(dead, safe=True)


def _fold_swiglu_input(graph: ir.Graph) -> int:
    """SwiGLU(P) -> LinearFp8 (its only reader, X, no norm) becomes LinearFp8(P, input_activation="swiglu"),
    the SwiGLU node removed (module docstring); returns how many."""
    folded = 0
    for node in list(graph):
        if node.domain != swiglu.DOMAIN or node.op_type != swiglu.OP_TYPE:
            continue
        reader, packed = _sole_reader(node.outputs[0]), node.inputs[0]
        if (reader is None or reader.domain != linear_fp8.DOMAIN or reader.op_type != linear_fp8.OP_TYPE
                or reader.inputs[0] is not node.outputs[0] or (len(reader.inputs) > 2 and reader.inputs[2] is not None)
                or linear_fp8.attributes_of(reader)["input_activation"] or packed is None or packed.dtype not in _FLOATS):
            continue
        reader.replace_input_with(0, packed)
        reader.attributes["input_activation"] = ir.AttrString("input_activation", "swiglu")
        graph.remove(node, safe=True)
        folded += 1
    return folded


def count(graph: ir.Graph) -> tuple[int, dict[str, int]]:
    """(fp8 MatMuls the pass would rewrite, those it would refuse by reason); nothing is changed."""
    taken, refused = 0, {}
    for node in graph:
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
            found = match(node)
            if isinstance(found, str):
                refused[found] = refused.get(found, 0) + 1
            taken += isinstance(found, Match)
    return taken, refused


def apply(model: ir.Model) -> int:
    """FuseLinearFp8 on `model` in place; returns how many LinearFp8 nodes it made."""
    fuse = FuseLinearFp8()
    fuse(model)
    return fuse.rewired
