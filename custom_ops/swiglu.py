"""`onnxopt::SwiGLU` (opset 1): the gated activation of Llama-family MLPs on a packed gate/up tensor.

Spec
----
Input   X  [..., 2F]  gate and up packed along the last axis, gate first: X = concat([gate, up], -1)
Output  Y  [..., F]   Y = silu(gate) * up,   silu(g) = g * sigmoid(g) = g / (1 + exp(-g))
Dtypes  float32, float16 (Y has the dtype of X). The last axis of X must be even.

Producers: `passes/swiglu.py` packs MatMul(X, Wg), MatMul(X, Wu) into MatMul(X, [Wg | Wu]) -> SwiGLU.

Realisations (../shared/DESIGN.md, "Custom ops"):
- NumPy reference: `reference` below is the definition; every other realisation is tested against it.
- Decomposition into standard ops (CPU / portable targets): `decompose` below, applied to a graph by
  `onnxopt.passes.swiglu.decompose_rules()`. Split(X, 2, axis=-1) -> silu(gate) -> Mul(., up), where
  silu is one `com.microsoft::QuickGelu(alpha=1.0)` node (ORT CPU computes x * sigmoid(alpha * x) in one
  kernel, float32 and float16) or, for runtimes without ORT contrib ops, Sigmoid + Mul.
- CuPy kernels: `cuda` below. Where F is a multiple of the 16-byte vector and the buffers are 16-byte
  aligned, `swiglu_vec` (a RawKernel): one thread per 16 bytes of output, gate and up read as 16-byte
  vectors, silu by the SFU's exp and reciprocal (`silu_fast`: `__expf`, `__fdividef`, a few float32 ulps, under
  the float16 rounding; on an H100 the `ElementwiseKernel` it replaces took 140 us per llama-8b layer
  of a 2048-token prefill, 2.4x its bytes at 3 TB/s, with a 64-bit division per element). Otherwise an
  `ElementwiseKernel` over the [..., F] output that reads gate and up from the packed row, computes in
  float32 and rounds once (as `reference`). The CUDA runtime launches
  it between the ORT segments of a graph split at `onnxopt` nodes (onnxopt/runtime/device_graph.py).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

DOMAIN = "onnxopt"
OP_TYPE = "SwiGLU"
VERSION = 1
DTYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16})


def reference(x: np.ndarray) -> np.ndarray:
    """Y = silu(gate) * up for X = [gate | up] on the last axis, computed in float32, returned in X's dtype."""
    if x.shape[-1] % 2:
        raise ValueError(f"SwiGLU input must have an even last axis (gate | up), got shape {x.shape}")
    gate, up = np.split(x.astype(np.float32), 2, axis=-1)
    return (gate / (1.0 + np.exp(-gate)) * up).astype(x.dtype)


# y[i] for output element i = (row, col): gate = x[row, col], up = x[row, F + col] (x contiguous).
_CUDA_BODY = """
const ptrdiff_t row = i / f;
const ptrdiff_t col = i - row * f;
const float g = (float)x[row * 2 * f + col];
const float u = (float)x[row * 2 * f + f + col];
y = (T)(g / (1.0f + expf(-g)) * u);
"""


_MOD = "onnxopt_swiglu_vec"
_EXPRESSIONS = ("swiglu_vec<half_bits>", "swiglu_vec<float>")
_VEC_SOURCE = r"""
// y [rows, F] = silu(x[:, :F]) * x[:, F:] for x [rows, 2F]: thread t of block (bx, row) takes output
// vector v = bx * blockDim + t (16 bytes: 8 float16 or 4 float). F a multiple of the vector, every
// pointer 16-byte aligned (the host checks).
template <typename T>
__global__ void swiglu_vec(const T* __restrict__ x, T* __restrict__ y, long long f) {
    constexpr int VEC = 16 / sizeof(T);
    const long long v = (long long)blockIdx.x * blockDim.x + threadIdx.x, row = blockIdx.y;
    if (v * VEC >= f) return;
    const T* gate = x + row * 2 * f + v * VEC;
    float g[VEC], u[VEC];
    unpack(__ldg(reinterpret_cast<const uint4*>(gate)), g, gate);
    unpack(__ldg(reinterpret_cast<const uint4*>(gate + f)), u, gate);
    #pragma unroll
    for (int e = 0; e < VEC; ++e) g[e] = silu_fast(g[e]) * u[e];
    *reinterpret_cast<uint4*>(y + row * f + v * VEC) = pack(g, gate);
}
"""
VEC_THREADS = 256


def cuda(x, out=None):
    """SwiGLU on the GPU: x a CuPy array [..., 2F] (float16 or float32, any strides) -> [..., F].

    `out` (optional) is a C-contiguous CuPy array of the output shape and dtype, written in place
    (the CUDA runtime passes its preallocated buffers; nothing is allocated then but a contiguous copy
    of a strided x).
    """
    from onnxopt.custom_ops.cuda import cupy, elementwise

    cp = cupy()
    if x.dtype not in (cp.float16, cp.float32):
        raise ValueError(f"SwiGLU accepts float16 and float32, got {x.dtype}")
    if x.ndim == 0 or x.shape[-1] % 2:
        raise ValueError(f"SwiGLU input must have an even last axis (gate | up), got shape {x.shape}")
    x = cp.ascontiguousarray(x)
    f = x.shape[-1] // 2
    shape = (*x.shape[:-1], f)
    if out is None:
        out = cp.empty(shape, dtype=x.dtype)
    elif out.shape != shape or out.dtype != x.dtype or not out.flags.c_contiguous:
        raise ValueError(f"SwiGLU out: expected a C-contiguous {x.dtype} array of shape {shape}, got {out.dtype} {out.shape}")
    vec = 16 // x.dtype.itemsize
    rows = x.size // (2 * f) if f else 0
    if f % vec == 0 and rows and x.data.ptr % 16 == 0 and out.data.ptr % 16 == 0 and rows < 65536:
        from onnxopt.custom_ops.cuda import HALF_PRELUDE, declare_module, raw_function

        declare_module(_MOD, _EXPRESSIONS)
        kernel = raw_function(_MOD, HALF_PRELUDE + _VEC_SOURCE,
                              "swiglu_vec<half_bits>" if x.dtype == cp.float16 else "swiglu_vec<float>")
        vectors = f // vec
        threads = min(VEC_THREADS, -(-vectors // 32) * 32)
        kernel((-(-vectors // threads), rows), (threads,), (x, out, np.int64(f)))
        return out
    kernel = elementwise(
        "swiglu", lambda cp: cp.ElementwiseKernel("raw T x, int64 f", "T y", _CUDA_BODY, "onnxopt_swiglu")
    )
    return kernel(x, f, out)


def infer_output(shape: ir.Shape | None, dtype: ir.DataType | None) -> tuple[ir.Shape | None, ir.DataType | None]:
    """Output (shape, dtype) of SwiGLU for an input of `shape` and `dtype`: [..., 2F] -> [..., F], same dtype.

    A symbolic last axis becomes an unnamed dimension; an unknown rank stays unknown.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"SwiGLU accepts {sorted(d.name for d in DTYPES)}, got {dtype.name}")
    if shape is None or len(shape) == 0:
        return None, dtype
    last = shape[-1]
    if isinstance(last, int):
        if last % 2:
            raise ValueError(f"SwiGLU input must have an even last axis (gate | up), got shape {shape}")
        last = last // 2
    else:
        last = None
    return ir.Shape([*shape[:-1], last]), dtype


def infer_node(node: ir.Node) -> None:
    """Set the output type and shape of an `onnxopt::SwiGLU` node from its input (onnx-ir)."""
    x = node.inputs[0]
    shape, dtype = infer_output(x.shape if x is not None else None, x.dtype if x is not None else None)
    y = node.outputs[0]
    if dtype is not None:
        y.dtype = dtype
    if shape is not None:
        y.shape = shape


def make_node(op, x: ir.Value) -> ir.Value:
    """Emit `onnxopt::SwiGLU(x)` through a rewriter op builder and type its output."""
    y = op.SwiGLU(x, _domain=DOMAIN, _version=VERSION)
    infer_node(y.producer())
    return y


def decompose(op, x: ir.Value, *, quick_gelu: bool = True) -> ir.Value:
    """Standard-op form of SwiGLU(x) built with a rewriter op builder (`op` of a rewrite rule).

    `quick_gelu=True` uses `com.microsoft::QuickGelu(alpha=1.0)` (one node, ORT contrib op);
    `quick_gelu=False` uses only ONNX-domain ops (Sigmoid + Mul). Split with `num_outputs` needs opset 18.
    """
    gate, up = op.Split(x, axis=-1, num_outputs=2, _outputs=2)
    if quick_gelu:
        silu = op.QuickGelu(gate, alpha=1.0, _domain="com.microsoft")
    else:
        silu = op.Mul(gate, op.Sigmoid(gate))
    return op.Mul(silu, up)
