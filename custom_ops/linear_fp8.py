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
  arithmetic; more rows through a quantize kernel, cuBLASLt's FP8 GEMM (nvmath-python) and an epilogue
  (custom_ops/linear_fp8_prefill.py).
  Needs compute capability 8.9+ (E4M3 conversions and FP8 tensor cores).
"""

from __future__ import annotations

import functools

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
    from onnxopt.custom_ops import linear_fp8_prefill as prefill
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
    buffer = prefill.buffers(cp, rows)
    q, a_out = prefill.quantize(x, gamma, x_scale, outlier_index, rows, k, mode, epsilon, buffer)
    return prefill.products(q, a_out, weight, w_scale, x_scale, residual, bias, outlier_weight, act, out, rows, cached,
                            buffer)
