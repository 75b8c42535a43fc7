"""`onnxopt::LinearFp8` (opset 1): a W8A8 float8 E4M3 projection with its neighbours fused in -- the
`fp8` scheme's Q/DQ MatMul (calibration/smoothquant.py) with the RMSNorm before it, its outlier
channels, the bias, the SwiGLU and the residual add after it, as `onnxopt::Linear` (custom_ops/linear.py)
does for float weights.

Why: ORT's CUDA EP runs the Q/DQ graph as written, dequantizing every weight on every run, and
com.microsoft GemmFloat8 synchronizes and re-plans on every call (0.46-0.50x of fp16 prefill on an H100,
docs/QUANTIZATION.md). The CUDA runtime rewrites the Q/DQ MatMuls of a cuda-target package into this op
when it loads one (passes/linear_fp8.py); the package on disk stays portable Q/DQ.

Spec
----
Inputs   X               [..., K]   float16 or float32 ([..., 2K], gate | up, with input_activation "swiglu")
         W               [N, K]     float8e4m3fn, the weight transposed (row n is output n's weights);
                                    on the GPU its bytes (uint8)
         gamma           [K]        optional, X's dtype: RMSNorm of X scaled by gamma, before the product
         residual        [..., Ny]  optional, X's dtype: added to the output
         bias            [N]        optional, X's dtype
         w_scale         [N]        float32: per output column
         x_scale         []         float32: the activation's static per-tensor scale
         outlier_index   [n]        optional int64 in [0, K): channels multiplied in float
         outlier_weight  [N, n]     with outlier_index, X's dtype: their weights, transposed as W
Output   Y               [..., Ny]  X's dtype; Ny = N, or N / 2 with activation "swiglu" (W's rows gate | up)
Attrs    activation ("" or "swiglu"), epsilon (the RMSNorm's), input_activation ("" or "swiglu": X is the
         packed gate | up product, and the product's input is SwiGLU(X) as onnxopt::SwiGLU computes it:
         silu(gate) * up in float32, rounded to the dtype; not with gamma)

Semantics, per row x of X, in float32, rounded once to the dtype at the end:
    a  = round_dtype(x / sqrt(mean(x^2) + epsilon) * gamma)        with gamma (the norm's output, as the
                                                                     unfused graph holds it); with input
                                                                     "swiglu" round_dtype(silu(x[:K]) x[K:]);
                                                                     else x
    q  = saturate_E4M3(round_half_even(a / x_scale))                 QuantizeLinear(a, x_scale, 0), saturate=1:
                                                                     float32 division, nearest even, +-448
    z  = x_scale * w_scale[n] * sum_k q[k] W[n, k]                   E4M3 products are exact in float32; float32 sums
    z += sum_j a[idx_j] outlier_weight[n, j] + bias[n]               where given
    z  = silu(z[:N/2]) * z[N/2:]                                     with "swiglu"
    y  = round_dtype(z + residual)
The quantizer zeroes W's outlier rows, so q's saturated outlier entries meet zero weights. This is the
Q/DQ graph's function; that graph also rounds the dequantized operands, the product and the sums to the
dtype (float16: a few units in the last place apart, tests bound it).

Realisations (../shared/DESIGN.md, "Custom ops"):
- NumPy reference: `reference`.
- Decomposition: `decompose`, the graph the quantizer wrote (QuantizeLinear/DequantizeLinear, MatMul with
  the weight's DequantizeLinear transposed back, Gather/MatMul/Add of the outlier channels), with the norm,
  bias, SwiGLU and residual as linear.decompose writes them, and the SwiGLU input as onnxopt::SwiGLU's
  ONNX-only decomposition (Split, Sigmoid, Mul, Mul); the scales are cast to X's dtype, as the
  quantizer's graph holds them (exact for a graph the pass rewrote, whose scales came from it).
- CuPy (`cuda`, custom_ops/linear_fp8_kernels.py): decode rows through an FP8-weight GEMV in half2
  arithmetic; more rows through a quantize kernel, cuBLASLt's FP8 GEMM (nvmath-python) and an epilogue.
  Needs compute capability 8.9+ (E4M3 conversions and FP8 tensor cores).
"""

from __future__ import annotations

import functools
import os
import types

import numpy as np
import onnx_ir as ir

from onnxopt.custom_ops import linear

DOMAIN = "onnxopt"
WEIGHT_ARG = 1  # the input another op part may prefetch into L2 (runtime/device_graph.py)
OP_TYPE = "LinearFp8"
VERSION = 1
DTYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16})
ACTIVATIONS = ("", "swiglu")
INPUT_ACTIVATIONS = ("", "swiglu")
INPUTS = ("x", "weight", "gamma", "residual", "bias", "w_scale", "x_scale", "outlier_index", "outlier_weight")
FP8_MAX = 448.0


def e4m3(weight) -> np.ndarray:
    """W as float8e4m3fn (its bytes, uint8, are reinterpreted)."""
    import ml_dtypes

    weight = np.asarray(weight)
    if weight.dtype == np.uint8:
        return weight.view(ml_dtypes.float8_e4m3fn)
    if weight.dtype != ml_dtypes.float8_e4m3fn:
        raise ValueError(f"LinearFp8: W must be float8e4m3fn (or its uint8 bytes), got {weight.dtype}")
    return weight


def normalized(x, gamma=None, epsilon: float = 1e-5, input_activation: str = "") -> np.ndarray:
    """a of the spec as float32: x, its RMSNorm times gamma rounded to x's dtype, or SwiGLU(x)."""
    if input_activation == "swiglu":
        from onnxopt.custom_ops import swiglu

        return swiglu.reference(x).astype(np.float32)
    a = x.astype(np.float32)
    if gamma is None:
        return a
    a = a / np.sqrt(np.mean(a * a, axis=-1, keepdims=True) + np.float32(epsilon)) * gamma.astype(np.float32)
    return a.astype(x.dtype).astype(np.float32)


def quantized(a, x_scale) -> np.ndarray:
    """q of the spec: QuantizeLinear(a, x_scale, zero point 0 of E4M3), saturate=1 (float8e4m3fn)."""
    import ml_dtypes

    v = np.asarray(a, np.float32) / np.float32(np.asarray(x_scale).reshape(()))
    return np.clip(v, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)  # NaN stays NaN


def _check_input_activation(input_activation: str, gamma) -> None:
    if input_activation not in INPUT_ACTIVATIONS:
        raise ValueError(f"LinearFp8: input_activation {input_activation!r} (expected one of {INPUT_ACTIVATIONS})")
    if input_activation and gamma is not None:
        raise ValueError("LinearFp8: input_activation 'swiglu' and gamma (a norm) do not go together")


def reference(x, weight, gamma=None, residual=None, bias=None, w_scale=None, x_scale=None, outlier_index=None,
              outlier_weight=None, *, activation: str = "", epsilon: float = 1e-5, input_activation: str = ""):
    """Y as the module docstring defines it (NumPy)."""
    w = e4m3(weight)
    n, k = w.shape
    if activation not in ACTIVATIONS:
        raise ValueError(f"LinearFp8: activation {activation!r} (expected one of {ACTIVATIONS})")
    _check_input_activation(input_activation, gamma)
    if x.shape[-1] != (2 * k if input_activation else k) or (activation == "swiglu" and n % 2):
        raise ValueError(f"LinearFp8: input last axis {x.shape[-1]} does not fit weight [N, K] = {w.shape}")
    if w_scale is None or x_scale is None or np.asarray(w_scale).shape != (n,) or np.asarray(x_scale).size != 1:
        raise ValueError(f"LinearFp8: needs w_scale [{n}] and a scalar x_scale")
    if (outlier_index is None) != (outlier_weight is None):
        raise ValueError("LinearFp8: outlier_index and outlier_weight go together")
    a = normalized(x, gamma, epsilon, input_activation)
    q = quantized(a, x_scale).astype(np.float32)
    scale = np.float32(np.asarray(x_scale).reshape(())) * np.asarray(w_scale, np.float32)
    z = (q @ w.astype(np.float32).T) * scale
    if outlier_index is not None:
        index = np.asarray(outlier_index, np.int64)
        if np.asarray(outlier_weight).shape != (n, index.size):
            raise ValueError(f"LinearFp8: outlier_weight must be [N, n] = [{n}, {index.size}]")
        z = z + a[..., index] @ np.asarray(outlier_weight, np.float32).T
    return linear.reference_epilogue(z, bias, residual, activation=activation, dtype=x.dtype)


def attributes_of(node: ir.Node) -> dict:
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    return {"activation": attrs.get("activation", ""), "epsilon": float(attrs.get("epsilon", 1e-5)),
            "input_activation": attrs.get("input_activation", "")}


def infer_node(node: ir.Node) -> None:
    """Type Y: X's dtype, X's shape with the last axis N (N / 2 with "swiglu"; N from W)."""
    x, w = node.inputs[0], node.inputs[1]
    y = node.outputs[0]
    if x is not None and x.dtype is not None:
        if x.dtype not in DTYPES:
            raise ValueError(f"LinearFp8 accepts X of {sorted(d.name for d in DTYPES)}, got {x.dtype.name}")
        y.dtype = x.dtype
    n = w.shape[0] if w is not None and w.shape is not None and len(w.shape) == 2 else None
    if isinstance(n, int) and attributes_of(node)["activation"] == "swiglu":
        n //= 2
    if x is not None and x.shape is not None and len(x.shape) >= 1:
        y.shape = ir.Shape([*x.shape[:-1], n if isinstance(n, int) else None])


def make_node(x: ir.Value, weight_t: ir.Value, w_scale: ir.Value, x_scale: ir.Value, *, gamma=None, residual=None,
              bias=None, outlier_index=None, outlier_weight=None, activation: str = "", epsilon: float = 1e-5,
              input_activation: str = "", name: str | None = None) -> ir.Node:
    """A LinearFp8 node (inputs in the spec's order; absent optional inputs trimmed from the end)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"LinearFp8: activation {activation!r} (expected one of {ACTIVATIONS})")
    _check_input_activation(input_activation, gamma)
    if w_scale is None or x_scale is None or (outlier_index is None) != (outlier_weight is None):
        raise ValueError("LinearFp8: w_scale and x_scale are required; outlier_index and outlier_weight go together")
    inputs = [x, weight_t, gamma, residual, bias, w_scale, x_scale, outlier_index, outlier_weight]
    while inputs[-1] is None:
        inputs.pop()
    attrs = [ir.AttrString("activation", activation), ir.AttrFloat32("epsilon", float(epsilon))]
    if input_activation:
        attrs.append(ir.AttrString("input_activation", input_activation))
    node = ir.Node(DOMAIN, OP_TYPE, inputs, attrs, num_outputs=1, version=VERSION, name=name)
    infer_node(node)
    return node


def decompose(node: ir.Node) -> tuple[list[ir.Node], ir.Value]:
    """Standard-op nodes (ORT contrib ops allowed) computing the LinearFp8 node's Y: (nodes, their Y)."""
    import ml_dtypes

    tape = ir.tape.Tape()
    x, weight_t, gamma, residual, bias, w_scale, x_scale, index, outlier_w = list(node.inputs) + [None] * (9 - len(node.inputs))
    attrs = attributes_of(node)
    dtype = x.dtype or node.outputs[0].dtype
    a = x
    if gamma is not None:
        a = tape.op("SimplifiedLayerNormalization", [a, gamma], {"axis": -1, "epsilon": attrs["epsilon"], "stash_type": 1})
    if attrs["input_activation"] == "swiglu":  # onnxopt::SwiGLU's decomposition (custom_ops/swiglu.py)
        gate, up = tape.op_multi_out("Split", [a], {"axis": -1, "num_outputs": 2}, num_outputs=2)
        a = tape.op("Mul", [tape.op("Mul", [gate, tape.op("Sigmoid", [gate])]), up])

    def in_dtype(scale):
        return scale if dtype == ir.DataType.FLOAT else tape.op("Cast", [scale], {"to": dtype})

    zero = tape.op("Constant", [], {"value": ir.tensor(np.zeros((), ml_dtypes.float8_e4m3fn), name="zero")})
    s_x = in_dtype(x_scale)
    a_dq = tape.op("DequantizeLinear", [tape.op("QuantizeLinear", [a, s_x, zero], {"saturate": 1}), s_x, zero])
    w_dq = tape.op("DequantizeLinear", [weight_t, in_dtype(w_scale)], {"axis": 0})  # [N, K]
    y = tape.op("MatMul", [a_dq, tape.op("Transpose", [w_dq], {"perm": [1, 0]})])
    if index is not None:
        side = tape.op("MatMul", [tape.op("Gather", [a, index], {"axis": -1}),
                                  tape.op("Transpose", [outlier_w], {"perm": [1, 0]})])
        y = tape.op("Add", [y, side])
    y = linear.decompose_epilogue(tape, y, bias, residual, attrs["activation"])
    return list(tape.nodes), y


# -- CUDA ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _compute_capability(device: int) -> int:
    from onnxopt.custom_ops.cuda import cupy

    return int(cupy().cuda.Device(device).compute_capability)


def _ptr(array):
    """A kernel argument for an optional input: the array, or a null pointer."""
    return np.uint64(0) if array is None else array


def _checked(cp, x, weight, gamma, residual, bias, w_scale, x_scale, outlier_index, outlier_weight, act, out,
             input_swiglu: bool = False):
    """Check the device inputs against X [..., K] ([..., 2K] with the SwiGLU input) and W [N, K]; returns
    (rows, out) with `out` the given C-contiguous [..., Ny] array or a new one."""
    n, k = weight.shape
    if x.dtype not in (cp.float16, cp.float32):
        raise ValueError(f"LinearFp8: x must be float16 or float32, got {x.dtype}")
    kx = 2 * k if input_swiglu else k
    if weight.dtype != cp.uint8 or weight.ndim != 2 or x.shape[-1] != kx or k % 16 or (act and n % 2):
        raise ValueError(f"LinearFp8: W must be the uint8 bytes of E4M3 [N, K] with K = x's last axis (2K with the "
                         f"SwiGLU input), a multiple of 16 (an even N with swiglu); got W {weight.dtype} {weight.shape}, "
                         f"x {x.shape}")
    if w_scale is None or w_scale.dtype != cp.float32 or w_scale.size != n or x_scale is None \
            or x_scale.dtype != cp.float32 or x_scale.size != 1:
        raise ValueError(f"LinearFp8: w_scale must be float32 [{n}] and x_scale one float32")
    if (outlier_index is None) != (outlier_weight is None) or (outlier_index is not None and (
            outlier_index.dtype != cp.int64 or outlier_weight.dtype != x.dtype
            or tuple(outlier_weight.shape) != (n, outlier_index.size))):
        raise ValueError(f"LinearFp8: outlier_index int64 [n] and outlier_weight {x.dtype} [{n}, n] go together")
    return linear.checked_out(cp, x, n, k, act, gamma, residual, bias, out, op="LinearFp8")


def cuda(x, weight, gamma=None, residual=None, bias=None, w_scale=None, x_scale=None, outlier_index=None,
         outlier_weight=None, *, activation: str = "", epsilon: float = 1e-5, input_activation: str = "", out=None):
    """LinearFp8 on the GPU (launches only): CuPy arrays as in the spec, W as uint8; `out` (optional) a
    C-contiguous [..., Ny] array written in place. Decode rows take the GEMV, more rows the FP8 GEMM
    (custom_ops/linear_fp8_kernels.py)."""
    from onnxopt.custom_ops import linear_fp8_kernels as kernels
    from onnxopt.custom_ops.cuda import GpuUnavailable, cupy, device_id, launch

    cp = cupy()
    if activation not in ACTIVATIONS:
        raise ValueError(f"LinearFp8: activation {activation!r} (expected one of {ACTIVATIONS})")
    if _compute_capability(device_id()) < 89:
        raise GpuUnavailable(f"LinearFp8 needs compute capability 8.9+ (E4M3 conversions, FP8 tensor cores); "
                             f"device {device_id()} has {_compute_capability(device_id())}")
    _check_input_activation(input_activation, gamma)
    act, input_swiglu = activation == "swiglu", input_activation == "swiglu"
    rows, out = _checked(cp, x, weight, gamma, residual, bias, w_scale, x_scale, outlier_index, outlier_weight, act,
                         out, input_swiglu)
    if rows == 0:
        return out
    n, k = weight.shape
    n_out = 0 if outlier_index is None else int(outlier_index.size)
    # the kernels' input mode: 0 x as it is, 1 RMSNorm times gamma, 2 SwiGLU of x [rows, 2K]
    mode = 1 if gamma is not None else 2 if input_swiglu else 0
    x = cp.ascontiguousarray(x).reshape(rows, 2 * k if input_swiglu else k)
    # cuBLASLt plans are cached per weight and scale pointer: only for arrays given contiguous (a copy made
    # here lives for one call, and a plan keyed on it would be rebuilt, and keep the copy, every call)
    cached = all(a is None or a.flags.c_contiguous for a in (weight, w_scale, x_scale, outlier_weight))
    weight, w_scale, x_scale = (cp.ascontiguousarray(a) for a in (weight, w_scale, x_scale))
    gamma, residual, bias, outlier_index, outlier_weight = (
        None if a is None else cp.ascontiguousarray(a) for a in (gamma, residual, bias, outlier_index, outlier_weight))
    suffix = "half_bits" if x.dtype == cp.float16 else "float"
    m = kernels.gemv_rows(rows, k)
    if m is not None:  # decode
        launch(kernels.function(f"linear_fp8_gemv<{suffix}, {m}, {int(act)}>"), (kernels.gemv_grid(n, act),),
               (kernels.THREADS,),
               (x, weight, w_scale, x_scale, _ptr(gamma), _ptr(residual), _ptr(bias), _ptr(outlier_index),
                _ptr(outlier_weight), out, np.int32(rows), np.int32(k), np.int32(n), np.int32(n_out),
                np.int32(mode), np.float32(epsilon)),
               shared_mem=rows * k * 2, dependent=True)
        return out
    if n % 4:
        raise ValueError(f"LinearFp8: {rows} rows take the FP8 GEMM, whose float32 output needs N a multiple of 4 "
                         f"(16-byte rows for cuBLASLt); got N = {n}")
    buffer = _buffers(cp, rows)
    q, a_out = _quantize(x, gamma, x_scale, outlier_index, rows, k, mode, epsilon, buffer)
    return _products(q, a_out, weight, w_scale, x_scale, residual, bias, outlier_weight, act, out, rows, cached,
                     buffer)


def _buffers(cp, rows: int):
    """The prefill's temporaries: a batch decode step of more rows than the GEMV takes (it may be
    captured) gets persistent buffers, one per kind and shape; a prefill allocates (it runs eagerly)."""
    from onnxopt.custom_ops.cuda import persistent

    small = rows <= 64

    def buffer(kind, shape, dtype):
        return persistent(f"linear_fp8_{kind}", shape, dtype) if small else cp.empty(shape, dtype=dtype)
    return buffer


def _quantize(x, gamma, x_scale, outlier_index, rows: int, k: int, mode: int, epsilon: float, buffer):
    """Prefill's first kernel: x [rows, K] ([rows, 2K] in mode 2) normalized / through SwiGLU and
    quantized to E4M3 codes q [rows, K] (bytes), and its outlier channels a_out [rows, n] (or None)."""
    from onnxopt.custom_ops import linear_fp8_kernels as kernels
    from onnxopt.custom_ops.cuda import cupy

    cp = cupy()
    n_out = 0 if outlier_index is None else int(outlier_index.size)
    suffix = "half_bits" if x.dtype == cp.float16 else "float"
    q = buffer("codes", (rows, k), cp.uint8)
    a_out = buffer("outlier_inputs", (rows, n_out), x.dtype) if n_out else None
    slices = next((v for v in kernels.QUANTIZE_WARP_SLICES if k <= 256 * v), None)
    if kernels.QUANTIZE == "warp" and mode != 2 and x.dtype == cp.float16 and slices is not None:
        kernels.function(f"linear_fp8_quantize_warp<{slices}>")(
            (-(-rows // 8),), (256,),
            (x, _ptr(gamma), x_scale, _ptr(outlier_index), q, _ptr(a_out), np.int32(rows), np.int32(k),
             np.int32(n_out), np.int32(mode), np.float32(epsilon)))
    else:
        kernels.function(f"linear_fp8_quantize<{suffix}>")(
            (rows,), (kernels.THREADS,),
            (x, _ptr(gamma), x_scale, _ptr(outlier_index), q, _ptr(a_out), np.int32(k), np.int32(n_out),
             np.int32(mode), np.float32(epsilon)))
    return q, a_out


def _swiglu_path(act: bool, n: int, n_out: int, out, outlier_weight) -> str | None:
    """linear_fp8_kernels.SWIGLU for a projection with SwiGLU: "mma" where its kernel takes the shapes
    and pointers (16- and 4-byte accesses), else "epilogue" in its place; None without SwiGLU."""
    from onnxopt.custom_ops import linear_fp8_kernels as kernels

    path = kernels.SWIGLU if act else None
    if path == "mma" and (n_out % 2 or (n // 2) % 8 or out.data.ptr % 16 or (n_out and outlier_weight.data.ptr % 4)):
        path = "epilogue"
    return path


def _fused_plan(weight, w_scale, x_scale, rows: int, dtype, bias, residual, act: bool, swiglu_path, cached: bool):
    """The cuBLASLt FP8 GEMM with w_scale inside and float16 D (linear_fp8_gemm.Fp8Gemm), where the
    prefill takes it (linear_fp8_kernels.FUSED_SCALES, float16, no bias, no residual with SwiGLU); else None."""
    from onnxopt.custom_ops import linear_fp8_gemm as lt
    from onnxopt.custom_ops import linear_fp8_kernels as kernels
    from onnxopt.custom_ops.cuda import cupy

    cp = cupy()
    n = weight.shape[0]
    if not (kernels.FUSED_SCALES and swiglu_path != "epilogue" and dtype == cp.float16 and w_scale.dtype == cp.float32
            and bias is None and n % 8 == 0 and not (act and residual is not None)):
        return None
    return lt.gemm(weight, x_scale, rows, w_scale, cache=cached)


def _swiglu_outliers(quant: int, d, a_out, outlier_weight, rows: int, n: int, y=None, x_scale2=None, index2=None,
                     q2=None, a2=None):
    """linear_fp8_swiglu_outliers<quant> on d [rows, N] (module linear_fp8_kernels)."""
    from onnxopt.custom_ops import linear_fp8_kernels as kernels
    from onnxopt.custom_ops.cuda import launch

    n_out = 0 if a_out is None else int(a_out.shape[1])
    n2 = 0 if index2 is None else int(index2.size)
    launch(kernels.function(f"linear_fp8_swiglu_outliers<{quant}>"), (-(-(n // 2) // 32), -(-rows // 64)), (128,),
           (d, _ptr(a_out), _ptr(outlier_weight), _ptr(y), np.int32(rows), np.int32(n), np.int32(n_out), _ptr(x_scale2),
            _ptr(index2), _ptr(q2), _ptr(a2), np.int32(n2)))


def _products(q, a_out, weight, w_scale, x_scale, residual, bias, outlier_weight, act: bool, out, rows: int,
              cached: bool, buffer):
    """Prefill after the quantize kernel: the FP8 GEMM, the outlier product, the epilogue (w_scale, bias,
    SwiGLU, residual) into `out` [.., Ny]; the paths of linear_fp8_kernels' docstring."""
    from onnxopt.custom_ops import linear_fp8_gemm as lt
    from onnxopt.custom_ops import linear_fp8_kernels as kernels
    from onnxopt.custom_ops import swiglu
    from onnxopt.custom_ops.cuda import cupy

    cp = cupy()
    n = weight.shape[0]
    dtype = out.dtype
    n_out = 0 if a_out is None else int(a_out.shape[1])
    swiglu_path = _swiglu_path(act, n, n_out, out, outlier_weight)
    fused = _fused_plan(weight, w_scale, x_scale, rows, dtype, bias, residual, act, swiglu_path, cached)
    if fused is not None and swiglu_path == "mma":
        # float16 D = x_scale w_scale q.W, then outlier product (tensor cores) + SwiGLU in one pass over D
        d = buffer("d", (rows, n), dtype)
        fused(q, d)
        _swiglu_outliers(0, d, a_out, outlier_weight, rows, n, y=out.reshape(rows, n // 2))
        return out
    if fused is not None:  # float16 D = x_scale w_scale q.W + C in cuBLASLt (linear_fp8_gemm docstring)
        d = buffer("d", (rows, n), dtype) if act else out.reshape(rows, n)
        # (no swiglu with a residual): the first GEMM into D reads the residual as its C (C and D may
        # differ in cuBLASLt), the second adds D; no copy of the residual into D first
        c = None if residual is None else residual.reshape(rows, n)
        if n_out:  # the outlier product into D (plus the residual), as a cuBLASLt GEMM
            side = lt.half_gemm(outlier_weight, rows) if cached else None
            if side is not None:
                side(a_out, d, c)
            elif c is not None:
                cp.add(c, cp.matmul(a_out, outlier_weight.T), out=d)
            else:
                cp.matmul(a_out, outlier_weight.T, out=d)
            c = d
        fused(q, d, c)
        if act:
            swiglu.cuda(d, out=out.reshape(rows, n // 2))
        return out
    acc = buffer("acc", (rows, n), cp.float32)
    lt.gemm(weight, x_scale, rows, cache=cached)(q, acc)
    side = None
    if n_out:
        # The outlier product [rows, n] x [n, N] as a cuBLAS GEMM (tensor cores, microseconds) into a
        # temporary the epilogue adds: its cost is that [rows, N] write and read, about what computing
        # the n products of every output inside the epilogue costs on the FMA units (n = 32, llama-8b
        # shapes: ~2.8 G FMAs per layer at 2048 rows), and the epilogue stays elementwise.
        side = buffer("outlier_product", (rows, n), dtype)
        plan = lt.half_gemm(outlier_weight, rows) if cached and dtype == cp.float16 else None
        if plan is not None:  # a cached cuBLASLt plan: a fraction of cupy.matmul's host time
            plan(a_out, side)
        else:
            cp.matmul(a_out, outlier_weight.T, out=side)
    ny = n // 2 if act else n
    suffix = "half_bits" if dtype == cp.float16 else "float"
    kernels.function(f"linear_fp8_epilogue<{suffix}, {int(act)}>")(
        (rows, -(-ny // kernels.THREADS)), (kernels.THREADS,),
        (acc, w_scale, _ptr(side), _ptr(bias), _ptr(residual), out.reshape(rows, ny), np.int32(n)))
    return out


# -- gate/up and down as one launch sequence ----------------------------------------------------------

MLP_PAIR = os.environ.get("ONNXOPT_FP8_MLP_PAIR", "1") != "0"


def pairs(first_attributes: dict, second_attributes: dict) -> bool:
    """Whether two LinearFp8 nodes, the first's output the second's X and read by nothing else, run as
    `cuda_mlp`: gate/up without activation, then down with the SwiGLU input (passes/linear_fp8.py
    swiglu_input) -- the runtime's pairing (runtime/device_graph.py); off with ONNXOPT_FP8_MLP_PAIR=0."""
    return (MLP_PAIR and first_attributes.get("activation", "") == "" and first_attributes.get("input_activation", "") == ""
            and second_attributes.get("input_activation", "") == "swiglu")


def cuda_mlp(gate_up: list, down: list, *, gate_up_attributes: dict, down_attributes: dict, out=None):
    """gate/up's LinearFp8 then down's (input_activation "swiglu") on the GPU, the first's output the
    second's X: `gate_up` and `down` are their inputs in the spec's order (down's X ignored), the
    attributes their nodes'. Returns down's Y, the same values as the two `cuda` calls up to float16
    roundings.

    For prefill rows (neither op's decode GEMV), float16, gate/up without bias or residual, down's K a
    multiple of 8 and an even number of gate/up's outlier channels: gate/up's FP8 GEMM writes its
    product D without the outlier channels, and `linear_fp8_swiglu_outliers<1>` adds their product on
    the tensor cores, applies SwiGLU, rounds to float16 and quantizes with down's x_scale, writing
    down's codes and outlier channels; down's GEMMs follow. So gate/up's outlier product makes no pass
    over its [rows, 2K] output (its own GEMM and D as the FP8 GEMM's C: 235 MB a layer for llama-8b at
    2048 rows), and down's quantize kernel is that kernel. Otherwise the two `cuda` calls."""
    from onnxopt.custom_ops import linear_fp8_kernels as kernels
    from onnxopt.custom_ops.cuda import GpuUnavailable, cupy, device_id, persistent

    cp = cupy()
    if _compute_capability(device_id()) < 89:
        raise GpuUnavailable(f"LinearFp8 needs compute capability 8.9+; device {device_id()} has "
                             f"{_compute_capability(device_id())}")
    gate_up = list(gate_up) + [None] * (len(INPUTS) - len(gate_up))
    down = list(down) + [None] * (len(INPUTS) - len(down))
    x, weight, gamma, residual, bias, w_scale, x_scale, index, outlier_weight = gate_up
    n1, k1 = weight.shape
    rows = int(np.prod(x.shape[:-1], dtype=np.int64))
    k2 = down[1].shape[1]
    fits = (x.dtype == cp.float16 and bias is None and residual is None and n1 == 2 * k2 and k2 % 8 == 0
            and (index is None or index.size % 2 == 0) and rows > 0 and x.flags.c_contiguous
            and kernels.gemv_rows(rows, k1) is None and kernels.gemv_rows(rows, k2) is None
            and all(a is None or a.flags.c_contiguous for a in gate_up[1:] + down[1:])
            and (outlier_weight is None or outlier_weight.data.ptr % 4 == 0))
    plan = _fused_plan(weight, w_scale, x_scale, rows, x.dtype, None, None, False, None, True) if fits else None
    if plan is None:
        mid_shape = (*x.shape[:-1], n1)
        mid = persistent("linear_fp8_mlp_mid", mid_shape, x.dtype) if rows <= 64 else cp.empty(mid_shape, x.dtype)
        cuda(*gate_up, out=mid, **gate_up_attributes)
        return cuda(mid, *down[1:], out=out, **down_attributes)
    _, w2, gamma2, residual2, bias2, w_scale2, x_scale2, index2, outlier_weight2 = down
    activation2 = down_attributes.get("activation", "")
    _check_input_activation(down_attributes.get("input_activation", ""), gamma2)
    packed = types.SimpleNamespace(shape=(*x.shape[:-1], n1), dtype=x.dtype)  # gate/up's output, never made
    _, out = _checked(cp, packed, w2, gamma2, residual2, bias2, w_scale2, x_scale2, index2, outlier_weight2,
                      activation2 == "swiglu", out, True)
    buffer = _buffers(cp, rows)
    q, a_out = _quantize(x.reshape(rows, k1), gamma, x_scale, index, rows, k1, 1 if gamma is not None else 0,
                         float(gate_up_attributes.get("epsilon", 1e-5)), buffer)
    d = buffer("mlp_d", (rows, n1), x.dtype)
    plan(q, d)
    n2 = 0 if index2 is None else int(index2.size)
    q2 = buffer("mlp_codes", (rows, k2), cp.uint8)
    a2 = buffer("mlp_outlier_inputs", (rows, n2), x.dtype) if n2 else None
    _swiglu_outliers(1, d, a_out, outlier_weight, rows, n1, x_scale2=x_scale2, index2=index2, q2=q2, a2=a2)
    return _products(q2, a2, w2, w_scale2, x_scale2, residual2, bias2, outlier_weight2, activation2 == "swiglu", out,
                     rows, True, buffer)
