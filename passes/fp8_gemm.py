"""W8A8 fp8 for GPUs: the `fp8` scheme's Q/DQ MatMuls as com.microsoft GemmFloat8 (cuBLASLt FP8 GEMM).

Abbreviations: M rows (B * S), K input channels, N output channels.

`onnxopt quantize --scheme fp8` writes ONNX Q/DQ (calibration/smoothquant.py, fmt "fp8"): activations
float8e4m3fn per tensor, weights float8e4m3fn per output column, both symmetric (zero point 0):

    x_q  = QuantizeLinear(x_BSK, s_x, 0)                           E4M3, s_x one scale (x's dtype)
    y    = MatMul(DequantizeLinear(x_q, s_x), DequantizeLinear(W_q_KN, s_w_N, axis=1))

ORT's CUDA EP runs that as written: the DequantizeLinear of every weight in float on every run, then a
float16 GEMM. This pass rewrites each such MatMul into

    x_q_MK = QuantizeLinear(Reshape(x_BSK, [-1, K]), s_x, 0)        the same E4M3 values; one per input
    acc_MN = GemmFloat8(x_q_MK, W_q_NK, scaleA=a, scaleB=1, transB=1)   = a * x_q @ W_q, out dtype below
    y_BSN  = Reshape(Cast(Mul(acc_MN, c_N)), [B, S, N])             back to x's dtype and shape

ORT's GemmFloat8 (com.microsoft, CUDA EP only; contrib_ops/cuda/math/gemm_float8.{cc,cu}) calls
cublasLtMatmul: Y = alpha * scaleA * scaleB * op(A) op(B), A and B 2-D, scaleA/scaleB float32 read as one
value each (tensor-wide; a per-column [N] scale cannot go there, hence the Mul). For float8 inputs it
runs column-major with the operands swapped, and cuBLASLt's FP8 GEMM on sm_89/sm_90 takes only the
"TN" layout, which is transA=0, transB=1 with B stored [N, K] (ORT's own FP8 test uses exactly that):
the weight is stored transposed at load. cuBLASLt wants 16-byte aligned leading dimensions, so K and N
must be multiples of 16 (other MatMuls stay Q/DQ). Output dtype, `out_dtype`:
- "float32" (default, the combination ORT's test covers): a = s_x, c = s_w (float32), then Cast.
- "float16": a = s_x * max(s_w), c = s_w / max(s_w) in float16, no Cast; half the bytes written and
  read after the GEMM. The intermediate a * acc is y * max(s_w) / s_w[n], never smaller than y, and is
  bounded by a * 448 * sum_k |W_q[k, n]| (x_q saturates at 448); a MatMul whose bound passes float16's
  65504, or whose c underflows to float16's subnormals, takes the float32 form instead.
  ORT picks the cuBLAS compute type by output dtype; some ORT versions ask CUBLAS_COMPUTE_32F_FAST_TF32
  for fp8 -> float16, which cuBLASLt may refuse (CUBLAS_STATUS_NOT_SUPPORTED): tests/gpu checks both.

Arithmetic against the Q/DQ graph: the E4M3 operands are the same bits (the same QuantizeLinear, the
weight only transposed), and a product of two E4M3 values is exact in float32. What rounds: the Q/DQ
graph rounds each dequantized operand to x's dtype (x_q * s_x and W_q * s_w, float16 in a float16
package) before its float16 GEMM; here the scales are applied to the float32 sum (a * acc rounds once,
then * c and the Cast). cuBLASLt sums in float32 (CUBLAS_COMPUTE_32F), but ORT sets
CUBLASLT_MATMUL_DESC_FAST_ACCUM=1, under which Hopper's FP8 tensor cores keep fewer accumulator bits than
float32 over long K. So: equal up to float rounding, not bit for bit.

Decode (M = 1) goes through the same graph. In the ORT sources read (gemm_float8.cu), every GemmFloat8
call runs cudaStreamSynchronize, cublasLtCreate, a cublasLt heuristic query, and cudaMalloc/cudaFree of
a 32 MiB workspace. That costs a host round trip per GEMM, worst at M = 1 where the GEMM itself takes
microseconds, and a synchronizing call cannot be captured, so the CUDA runtime's captured decode step
fails with this pass applied. A `min_rows` choice is therefore needed, but not inside the graph: an `If`
on M is refused by runtime/segments.split. It belongs in the runtime (this pass for prefill only, the
Q/DQ graph for decode), or decode runs eager (cuda_graph=False).

The CUDA runtime would apply this pass at load, as it does passes/w8a8_integer.py, so a package stays
portable Q/DQ on disk. ORT's CPU EP has no GemmFloat8 kernel: the rewritten graph runs on CUDA only.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass
from onnxopt.passes.w8a8_integer import add_initializer, matched_matmuls, qdq_matmul, replace_matmul

FP16_MAX = 65504.0
FP16_MIN_NORMAL = 2.0**-14
FP8_MAX = 448.0
ALIGN = 16  # cuBLASLt FP8: leading dimensions a multiple of 16 bytes (1-byte operands: K, N % 16)
OUT_DTYPES = ("float32", "float16")


class Fp8GemmPass(ir.passes.InPlacePass):
    """Rewrite fp8 Q/DQ MatMuls into GemmFloat8 + scaling (module docstring); `rewired` counts them,
    `float16_outputs` those that took the float16 form."""

    def __init__(self, out_dtype: str = "float32"):
        super().__init__()
        if out_dtype not in OUT_DTYPES:
            raise ValueError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype!r}")
        self.out_dtype = out_dtype
        self.rewired = 0
        self.float16_outputs = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        shared: dict[int, tuple] = {}  # id of the Q/DQ graph's QuantizeLinear -> (x_q_MK, x's leading dims)
        self.rewired = self.float16_outputs = 0
        for node, parts in matched_matmuls(graph, _match):
            quant, x, s_x, w_q, s_w = parts
            out = node.outputs[0]
            base = node.name or out.name
            dtype = x.dtype
            k, n = w_q.shape
            if id(quant) not in shared:
                shared[id(quant)] = _quantize_2d(graph, quant, x, k)
            x_q, lead = shared[id(quant)]
            fp16 = self.out_dtype == "float16" and dtype == ir.DataType.FLOAT16 and _fits_float16(s_x, w_q, s_w)
            if fp16:
                a = np.float32(s_x) * np.float32(s_w.max())
                c = (s_w.astype(np.float32) / np.float32(s_w.max())).astype(np.float16)
                acc_dtype = ir.DataType.FLOAT16
            else:
                a, c, acc_dtype = np.float32(s_x), s_w.astype(np.float32), ir.DataType.FLOAT
            new_nodes = []

            def add(op, inputs, out_type, name, attributes=(), domain=""):
                new = ir.Node(domain, op, inputs, list(attributes), name=f"{base}_{name}", num_outputs=1)
                new.outputs[0].name = f"{base}.{name}"
                new.outputs[0].type = ir.TensorType(out_type)
                new_nodes.append(new)
                return new.outputs[0]

            w_nk = add_initializer(graph, f"{base}.w_fp8_nk", np.ascontiguousarray(w_q.T))
            scale_a = add_initializer(graph, f"{base}.fp8_scale_a", np.asarray(a, dtype=np.float32))
            one = add_initializer(graph, f"{base}.fp8_scale_b", np.asarray(1.0, dtype=np.float32))
            acc = add("GemmFloat8", [x_q, w_nk, None, scale_a, one], acc_dtype, "fp8_gemm",
                      [ir.AttrInt64("transA", 0), ir.AttrInt64("transB", 1), ir.AttrInt64("dtype", acc_dtype),
                       ir.AttrFloat32("alpha", 1.0)], domain="com.microsoft")
            scale_c = add_initializer(graph, f"{base}.fp8_scale_c", c)
            y = add("Mul", [acc, scale_c], acc_dtype, "fp8_scaled")
            if acc_dtype != dtype:
                y = add("Cast", [y], dtype, "fp8_cast_back", [ir.AttrInt64("to", dtype)])
            if lead is not None:  # [M, N] -> x's leading dims + [N]
                n_value = add_initializer(graph, f"{base}.fp8_n", np.asarray([n], dtype=np.int64))
                shape = add("Concat", [lead, n_value], ir.DataType.INT64, "fp8_out_shape", [ir.AttrInt64("axis", 0)])
                y = add("Reshape", [y, shape], dtype, "fp8_reshape_back")
            replace_matmul(graph, node, new_nodes, y, dtype)
            self.rewired += 1
            self.float16_outputs += fp16
        if self.rewired:
            model.opset_imports.setdefault("com.microsoft", 1)
            RemoveUnusedNodesPass()(model)  # the Q/DQ weights, their DequantizeLinear and the old x_q
        return ir.passes.PassResult(model, modified=self.rewired > 0)


def _quantize_2d(graph: ir.Graph, quant: ir.Node, x: ir.Value, k: int) -> tuple[ir.Value, ir.Value | None]:
    """(x_q_MK, Shape(x)[:-1] or None for a 2-D x): the Q/DQ graph's QuantizeLinear (same scale, zero
    point, attributes) on x as [-1, K]."""
    qname = quant.name or quant.outputs[0].name
    x2, lead = x, None
    nodes = []
    if len(x.shape) != 2:
        shape = add_initializer(graph, f"{qname}.fp8_rows_k", np.asarray([-1, k], dtype=np.int64))
        reshape = ir.Node("", "Reshape", [x, shape], name=f"{qname}_fp8_2d", num_outputs=1)
        x2 = reshape.outputs[0]
        x2.name, x2.type = f"{qname}.x_2d", ir.TensorType(x.dtype)
        shape_node = ir.Node("", "Shape", [x], [ir.AttrInt64("end", -1)], name=f"{qname}_lead_shape", num_outputs=1)
        lead = shape_node.outputs[0]
        lead.name, lead.type = f"{qname}.lead_shape", ir.TensorType(ir.DataType.INT64)
        nodes += [reshape, shape_node]
    attributes = [ir.Attr(attr.name, attr.type, attr.value) for attr in quant.attributes.values()]
    q = ir.Node("", "QuantizeLinear", [x2, *quant.inputs[1:]], attributes,
                name=f"{qname}_fp8_2d_q", num_outputs=1)
    q.outputs[0].name = f"{quant.outputs[0].name}.fp8_2d"
    q.outputs[0].type = ir.TensorType(ir.DataType.FLOAT8E4M3FN)
    nodes.append(q)
    graph.insert_after(quant, nodes)
    return q.outputs[0], lead


def _match(node: ir.Node):
    """(QuantizeLinear, x, s_x float, W_q [K, N] E4M3, s_w [N]) for an fp8 Q/DQ MatMul that GemmFloat8
    can run (module docstring), else None."""
    parts = qdq_matmul(node)
    if parts is None or parts.z_x.dtype != ml_dtypes.float8_e4m3fn or parts.wq.dtype != ml_dtypes.float8_e4m3fn:
        return None
    quant, x, s_x, wq, sw = parts.quant, parts.x, parts.s_x, parts.wq, parts.sw
    if float(parts.z_x.astype(np.float32).reshape(())) != 0.0 or quant.attributes.get_int("saturate", 1) != 1:
        return None
    if x.dtype not in (ir.DataType.FLOAT16, ir.DataType.FLOAT) or x.shape is None or len(x.shape) < 2:
        return None
    k, n = wq.shape
    if k % ALIGN or n % ALIGN or (isinstance(x.shape[-1], int) and x.shape[-1] != k):
        return None
    return quant, x, float(s_x.astype(np.float32).reshape(())), wq, sw.astype(np.float32)


def _fits_float16(s_x: float, w_q: np.ndarray, s_w: np.ndarray) -> bool:
    """Whether the float16 form's intermediate cannot overflow and its column factors stay normal."""
    top = float(s_w.max())
    if top <= 0:
        return False
    bound = s_x * top * FP8_MAX * np.abs(w_q.astype(np.float32)).sum(axis=0).max()
    return bool(bound <= FP16_MAX and (s_w / top).min() >= FP16_MIN_NORMAL)


def count(graph: ir.Graph) -> int:
    """How many MatMuls of `graph` the pass would rewrite (nothing is changed)."""
    return sum(1 for _ in matched_matmuls(graph, _match))


def apply(model: ir.Model, out_dtype: str = "float32") -> int:
    """Run the pass on `model` in place; returns how many MatMuls it rewrote."""
    rewrite = Fp8GemmPass(out_dtype)
    rewrite(model)
    return rewrite.rewired
