"""`onnxopt::Linear` (opset 1): a projection with its neighbours fused in: the SwiGLU or RMSNorm before it,
the bias and the residual add after it.

Batch-1 decode reads every weight once per token, so each projection is a matrix-vector product bound
by memory bandwidth; what costs is everything around it. ORT runs a decoder layer as ~10 kernels
(norms, MatMuls, SwiGLU, adds), each a separate trip through memory and a launch of its own. The CUDA
runtime rewrites each fp16/fp32 MatMul with a constant weight into this op when it loads a package
(passes/linear.py), absorbing the (Skip)SimplifiedLayerNormalization, SwiGLU and bias Add around it:
a Llama layer becomes four Linear launches and one attention launch.

Spec
----
Inputs   X         [..., Kx]   Kx = K, or 2K with activation "swiglu" (gate | up packed, gate first)
         W         [N, K]      the weight, transposed (row n is output n's weights: contiguous loads)
         gamma     [K]         optional: RMSNorm of the (activated) input, scaled by gamma
         residual  [..., N]    optional: added to the output
         bias      [N]         optional: added to the output
Output   Y         [..., N]
Attrs    activation ("" or "swiglu"), epsilon (RMSNorm's, default 1e-5)
Dtypes   float16, float32: all inputs and Y share one.

Semantics, per row x of X (float32 arithmetic; "round" is to the dtype, where the unfused graph
stores a tensor):
    a = x                                      or round(silu(gate) * up) with "swiglu"
    a = round(a / sqrt(mean(a^2) + epsilon) * gamma)          with gamma
    y = round(a . W^T + bias + residual)       bias and residual where given

Realisations (../shared/DESIGN.md, "Custom ops"):
- NumPy reference: `reference`.
- Decomposition: `decompose` (Split/QuickGelu/Mul, SimplifiedLayerNormalization, MatMul with
  Transpose(W), Add, Add) -- the nodes the runtime pass absorbed, so ORT CPU runs it.
- CuPy kernels, `cuda`. At most MAX_GEMV_ROWS rows (decode, small batches): `linear_gemv`, one launch.
  Each block first issues its warps' weight loads (one round of 16-byte loads covers a warp's
  share: KS warps split a row's K), then stages the rows' activated, normalized input in shared
  memory (rounded as above), then multiplies and reduces (shuffles, then shared memory across
  the K slices); the epilogue adds bias and residual. More rows (prefill): `linear_prep` (activation and norm, one block per row) and a cuBLAS
  GEMM (cupy.matmul on W's transpose view), then the adds.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

DOMAIN = "onnxopt"
OP_TYPE = "Linear"
VERSION = 1
DTYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16})
ACTIVATIONS = ("", "swiglu")
MAX_GEMV_ROWS = 8  # rows up to which the GEMV kernel runs (decode at batch <= 8); a GEMM past it
THREADS = 256  # GEMV block: 8 warps
LOAD_ROUND = 8  # U in the kernel: 16-byte loads per lane per weight row in one round
SHARED_DEFAULT = 48 * 1024  # past it a launch opts in to more dynamic shared memory
SHARED_MAX = 200 * 1024  # the GEMV's staged rows must fit (H100: 227 KiB per block)


def _silu_mul(x: np.ndarray, k: int) -> np.ndarray:
    gate, up = x[..., :k].astype(np.float32), x[..., k:].astype(np.float32)
    return (gate / (1.0 + np.exp(-gate)) * up).astype(x.dtype)


def reference(x, weight, gamma=None, residual=None, bias=None, *, activation: str = "", epsilon: float = 1e-5):
    """Y as the module docstring defines it (NumPy)."""
    n, k = weight.shape
    dtype = x.dtype
    if activation not in ACTIVATIONS:
        raise ValueError(f"Linear: activation {activation!r} (expected one of {ACTIVATIONS})")
    if x.shape[-1] != (2 * k if activation == "swiglu" else k):
        raise ValueError(f"Linear: input last axis {x.shape[-1]} does not fit weight [N, K] = {weight.shape}")
    a = _silu_mul(x, k) if activation == "swiglu" else x
    if gamma is not None:
        af = a.astype(np.float32)
        inv = 1.0 / np.sqrt(np.mean(af * af, axis=-1, keepdims=True) + np.float32(epsilon))
        a = (af * inv * gamma.astype(np.float32)).astype(dtype)
    y = a.astype(np.float32) @ weight.astype(np.float32).T
    if bias is not None:
        y = y + bias.astype(np.float32)
    if residual is not None:
        y = y + residual.astype(np.float32)
    return y.astype(dtype)


def attributes_of(node: ir.Node) -> dict:
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    return {"activation": attrs.get("activation", ""), "epsilon": float(attrs.get("epsilon", 1e-5))}


def infer_node(node: ir.Node) -> None:
    """Type Y: X's dtype, X's shape with the last axis N (from W)."""
    x, w = node.inputs[0], node.inputs[1]
    y = node.outputs[0]
    dtype = x.dtype if x is not None and x.dtype is not None else (w.dtype if w is not None else None)
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"Linear accepts {sorted(d.name for d in DTYPES)}, got {dtype.name}")
        y.dtype = dtype
    n = w.shape[0] if w is not None and w.shape is not None and len(w.shape) == 2 else None
    if x is not None and x.shape is not None and len(x.shape) >= 1:
        y.shape = ir.Shape([*x.shape[:-1], n if isinstance(n, int) else None])


def make_node(x: ir.Value, weight_t: ir.Value, gamma=None, residual=None, bias=None, *, activation: str = "",
              epsilon: float = 1e-5, name: str | None = None) -> ir.Node:
    """A Linear node (inputs as the spec; absent optional inputs trimmed from the end)."""
    inputs = [x, weight_t, gamma, residual, bias]
    while inputs[-1] is None:
        inputs.pop()
    attrs = [ir.AttrString("activation", activation), ir.AttrFloat32("epsilon", float(epsilon))]
    node = ir.Node(DOMAIN, OP_TYPE, inputs, attrs, num_outputs=1, version=VERSION, name=name)
    infer_node(node)
    return node


def decompose(node: ir.Node) -> tuple[list[ir.Node], ir.Value]:
    """Standard-op nodes (ORT contrib ops allowed) computing the Linear node's Y: (nodes, their Y)."""
    tape = ir.tape.Tape()
    inputs = list(node.inputs) + [None] * (5 - len(node.inputs))
    x, weight_t, gamma, residual, bias = inputs
    attrs = attributes_of(node)
    a = x
    if attrs["activation"] == "swiglu":
        gate, up = tape.op_multi_out("Split", [x], {"axis": -1, "num_outputs": 2}, num_outputs=2)
        silu = tape.op("QuickGelu", [gate], {"alpha": 1.0}, domain="com.microsoft")
        a = tape.op("Mul", [silu, up])
    if gamma is not None:
        a = tape.op("SimplifiedLayerNormalization", [a, gamma], {"axis": -1, "epsilon": attrs["epsilon"], "stash_type": 1})
    y = tape.op("MatMul", [a, tape.op("Transpose", [weight_t], {"perm": [1, 0]})])
    if bias is not None:
        y = tape.op("Add", [y, bias])
    if residual is not None:
        y = tape.op("Add", [y, residual])
    return list(tape.nodes), y


_MOD = "onnxopt_linear"
_SOURCE = r"""
typedef unsigned short half_bits;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(half_bits x) { float f; asm("{ cvt.f32.f16 %0, %1; }" : "=f"(f) : "h"(x)); return f; }
__device__ __forceinline__ void store(float* p, float x) { *p = x; }
__device__ __forceinline__ void store(half_bits* p, float x) { half_bits h; asm("{ cvt.rn.f16.f32 %0, %1; }" : "=h"(h) : "f"(x)); *p = h; }
__device__ __forceinline__ float round_to(float x, const float*) { return x; }
__device__ __forceinline__ float round_to(float x, const half_bits*) { half_bits h; asm("{ cvt.rn.f16.f32 %0, %1; }" : "=h"(h) : "f"(x)); return to_f(h); }

// 16 bytes as VEC = 16 / sizeof(T) floats
__device__ __forceinline__ void unpack(const uint4& raw, float* f, const half_bits*) {
    const unsigned int w[4] = {raw.x, raw.y, raw.z, raw.w};
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = to_f((half_bits)(w[i] & 0xffffu));
        f[2 * i + 1] = to_f((half_bits)(w[i] >> 16));
    }
}
__device__ __forceinline__ void unpack(const uint4& raw, float* f, const float*) {
    f[0] = __uint_as_float(raw.x); f[1] = __uint_as_float(raw.y); f[2] = __uint_as_float(raw.z); f[3] = __uint_as_float(raw.w);
}

__device__ __forceinline__ float block_sum(float v, float* red) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float total = 0.f;
    for (int i = 0; i < warps; ++i) total += red[i];
    __syncthreads();
    return total;
}

// One row's activated, normalized input into dst[0, K) (shared or global), rounded to T as the
// unfused graph stores it, with 16-byte loads and stores (K % VEC == 0). The block's threads share
// the row; red: >= 32 floats of shared memory.
template <typename T>
__device__ void stage_row(const T* __restrict__ xr, const T* __restrict__ gamma, T* dst, int K, int act, int norm,
                          float eps, float* red) {
    constexpr int VEC = 16 / sizeof(T);
    float ss = 0.f;
    for (int k = threadIdx.x * VEC; k < K; k += blockDim.x * VEC) {
        float v[VEC];
        unpack(*reinterpret_cast<const uint4*>(xr + k), v, xr);
        if (act) {
            float u[VEC];
            unpack(*reinterpret_cast<const uint4*>(xr + K + k), u, xr);
            #pragma unroll
            for (int i = 0; i < VEC; ++i) v[i] = round_to(v[i] / (1.f + expf(-v[i])) * u[i], xr);
        }
        #pragma unroll
        for (int i = 0; i < VEC; ++i) {
            ss += v[i] * v[i];
            store(dst + k + i, v[i]);
        }
    }
    if (norm) {
        const float inv = rsqrtf(block_sum(ss, red) / (float)K + eps);
        for (int k = threadIdx.x * VEC; k < K; k += blockDim.x * VEC) {  // the elements this thread wrote
            #pragma unroll
            for (int i = 0; i < VEC; ++i) store(dst + k + i, to_f(dst[k + i]) * inv * to_f(gamma[k + i]));
        }
    }
}

// Prefill: rows of a (activation, norm) into out [rows, K]; grid: rows.
template <typename T>
__global__ void linear_prep(const T* __restrict__ x, const T* __restrict__ gamma, T* __restrict__ out, int K, int act,
                            int norm, float eps) {
    __shared__ float red[32];
    const size_t row = blockIdx.x;
    stage_row(x + row * (size_t)(act ? 2 * K : K), gamma, out + row * (size_t)K, K, act, norm, eps, red);
}

// y[m, n] = a[m] . w[n] (+ bias[n]) (+ residual[m, n]) for rows m < `rows` (a: x staged by stage_row).
// The block's 8 warps: KS slices of K times 8 / KS groups of R weight rows. A chunk is 32 lanes x
// one 16-byte load (STEP elements); the warp of slice s takes chunks s, s + KS, ... and loads U of
// them per row in one round (all its chunks in one round when there are at most U: the host picks
// KS so). The first round is issued before staging, so the weights are on their way while the block
// stages the input. Partial sums: shuffles in the warp, then shared memory across the KS slices.
template <typename T, int M, int R, int KS>
__global__ void __launch_bounds__(256) linear_gemv(
        const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ gamma, const T* __restrict__ residual,
        const T* __restrict__ bias, T* __restrict__ y, int rows, int K, int N, int act, int norm, float eps) {
    constexpr int VEC = 16 / sizeof(T), U = 8, STEP = 32 * VEC, GROUPS = 8 / KS;
    extern __shared__ __align__(16) unsigned char smem[];
    T* xs = reinterpret_cast<T*>(smem);
    __shared__ float red[32];
    __shared__ float part[KS > 1 ? 8 * R * M : 1];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int slice = warp % KS, group = warp / KS;
    const int row0 = (blockIdx.x * GROUPS + group) * R;
    const int chunks = (K + STEP - 1) / STEP;

    uint4 buf[R][U];
    auto load = [&](int round) {
        #pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = (round * U + u) * KS + slice;
            const int k = c * STEP + lane * VEC;
            #pragma unroll
            for (int r = 0; r < R; ++r) {
                const int n = row0 + r;
                buf[r][u] = (c < chunks && k < K && n < N) ? __ldcs(reinterpret_cast<const uint4*>(w + (size_t)n * K + k))
                                                           : make_uint4(0u, 0u, 0u, 0u);
            }
        }
    };
    load(0);
    for (int m = 0; m < M; ++m) {
        if (m < rows) {
            stage_row(x + (size_t)m * (act ? 2 * K : K), gamma, xs + (size_t)m * K, K, act, norm, eps, red);
        } else {
            for (int k = threadIdx.x; k < K; k += blockDim.x) store(xs + (size_t)m * K + k, 0.f);
        }
    }
    __syncthreads();

    float acc[R][M];
    #pragma unroll
    for (int r = 0; r < R; ++r) {
        #pragma unroll
        for (int m = 0; m < M; ++m) acc[r][m] = 0.f;
    }
    const int rounds = (chunks + U * KS - 1) / (U * KS);
    for (int round = 0; round < rounds; ++round) {
        if (round > 0) load(round);
        #pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = (round * U + u) * KS + slice;
            const int k = c * STEP + lane * VEC;
            if (c < chunks && k < K) {
                float wf[R][VEC];
                #pragma unroll
                for (int r = 0; r < R; ++r) unpack(buf[r][u], wf[r], w);
                #pragma unroll
                for (int m = 0; m < M; ++m) {
                    float xf[VEC];
                    unpack(*reinterpret_cast<const uint4*>(xs + (size_t)m * K + k), xf, w);
                    #pragma unroll
                    for (int r = 0; r < R; ++r) {
                        #pragma unroll
                        for (int i = 0; i < VEC; ++i) acc[r][m] = fmaf(xf[i], wf[r][i], acc[r][m]);
                    }
                }
            }
        }
    }
    #pragma unroll
    for (int r = 0; r < R; ++r) {
        #pragma unroll
        for (int m = 0; m < M; ++m) {
            float v = acc[r][m];
            #pragma unroll
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            acc[r][m] = v;
        }
    }
    if (KS > 1) {  // sum the slices: slice 0's warp of each group finishes
        if (lane == 0) {
            #pragma unroll
            for (int r = 0; r < R; ++r) {
                #pragma unroll
                for (int m = 0; m < M; ++m) part[(warp * R + r) * M + m] = acc[r][m];
            }
        }
        __syncthreads();
        if (slice != 0) return;
        #pragma unroll
        for (int r = 0; r < R; ++r) {
            #pragma unroll
            for (int m = 0; m < M; ++m) {
                float v = 0.f;
                #pragma unroll
                for (int s = 0; s < KS; ++s) v += part[((warp + s) * R + r) * M + m];
                acc[r][m] = v;
            }
        }
    }
    #pragma unroll
    for (int r = 0; r < R; ++r) {
        #pragma unroll
        for (int m = 0; m < M; ++m) {
            const int n = row0 + r;
            if (lane == ((r * M + m) & 31) && n < N && m < rows) {
                float v = acc[r][m];
                if (bias != nullptr) v += to_f(bias[n]);
                if (residual != nullptr) v += to_f(residual[(size_t)m * N + n]);
                store(y + (size_t)m * N + n, v);
            }
        }
    }
}
"""

_FUNCTIONS: dict = {}
_SCRATCH: dict = {}


def _function(expression: str):
    """A kernel of the module; each `linear_gemv<T, M, R, KS>` instance is its own module, compiled the
    first time a model needs it (a model uses two or three)."""
    from onnxopt.custom_ops.cuda import declare_module, raw_function

    name = _MOD + "_" + "".join(c if c.isalnum() else "_" for c in expression)
    declare_module(name, (expression,))
    return raw_function(name, _SOURCE, expression)


def gemv_shape(rows: int, n: int, k: int, itemsize: int, sm_count: int) -> tuple[int, int, int, int] | None:
    """(M, R, KS, shared bytes) of the GEMV launch for `rows` rows, or None when the GEMM path takes it:
    M the instance's row count (1, 2, 4 or 8); KS warps share a weight row (each K slice at most
    LOAD_ROUND chunks of 32 16-byte loads, so one round of loads covers it: 8 of a block's warps);
    R weight rows per warp (2 when that still gives two blocks per SM, else 1)."""
    if rows < 1 or rows > MAX_GEMV_ROWS:
        return None
    m = next(v for v in (1, 2, 4, 8) if v >= rows)
    shared = m * k * itemsize
    if shared > SHARED_MAX:
        return None
    chunks = -(-k // (32 * (16 // itemsize)))
    ks = next(v for v in (1, 2, 4, 8) if v * LOAD_ROUND >= chunks or v == 8)
    groups = (THREADS // 32) // ks
    r = 2 if -(-n // (groups * 2)) >= 2 * sm_count else 1
    return m, r, ks, shared


def _rows_scratch(shape: tuple, dtype):
    """A persistent [rows, K] buffer for the GEMM path's staged input at small row counts (a batch
    decode step may be captured: nothing is allocated inside a capture)."""
    from onnxopt.custom_ops.cuda import cupy, device_id

    key = (device_id(), tuple(shape), np.dtype(dtype).str)
    array = _SCRATCH.get(key)
    if array is None:
        array = _SCRATCH[key] = cupy().empty(shape, dtype=dtype)
    return array


def _sm_count() -> int:
    from onnxopt.custom_ops.cuda import cupy, device_id

    key = ("sm", device_id())
    if key not in _SCRATCH:
        _SCRATCH[key] = cupy().cuda.runtime.getDeviceProperties(key[1])["multiProcessorCount"]
    return _SCRATCH[key]


def _ptr(array):
    """A kernel argument for an optional input: the array, or a null pointer."""
    return np.uint64(0) if array is None else array


def _shared_fits(kernel, shared: int) -> bool:
    """Whether `kernel` may launch with `shared` bytes of dynamic shared memory (opting in past 48 KiB)."""
    if shared <= SHARED_DEFAULT:
        return True
    try:
        if kernel.max_dynamic_shared_size_bytes < shared:
            kernel.max_dynamic_shared_size_bytes = shared
        return True
    except Exception:  # a CuPy function object without the attribute: the GEMM path takes it
        return False


def cuda(x, weight, gamma=None, residual=None, bias=None, *, activation: str = "", epsilon: float = 1e-5, out=None):
    """Linear on the GPU (launches only): CuPy arrays as in the spec; `out` (optional) a C-contiguous
    [..., N] array written in place."""
    from onnxopt.custom_ops.cuda import cupy

    cp = cupy()
    n, k = weight.shape
    if x.dtype not in (cp.float16, cp.float32) or weight.dtype != x.dtype:
        raise ValueError(f"Linear: x and weight must share float16 or float32, got {x.dtype}, {weight.dtype}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"Linear: activation {activation!r} (expected one of {ACTIVATIONS})")
    act = activation == "swiglu"
    if x.shape[-1] != (2 * k if act else k) or k % (16 // x.dtype.itemsize):
        raise ValueError(f"Linear: input {x.shape} does not fit weight [N, K] = {weight.shape} (K a multiple of 16 bytes)")
    for name, value, size in (("gamma", gamma, k), ("bias", bias, n)):
        if value is not None and (value.dtype != x.dtype or value.size != size):
            raise ValueError(f"Linear: {name} must be {x.dtype} of {size} elements, got {value.dtype} {value.shape}")
    shape = (*x.shape[:-1], n)
    rows = int(np.prod(x.shape[:-1], dtype=np.int64))
    if residual is not None and (residual.dtype != x.dtype or tuple(residual.shape) != shape):
        raise ValueError(f"Linear: residual must be {x.dtype} {shape}, got {residual.dtype} {residual.shape}")
    if out is None:
        out = cp.empty(shape, dtype=x.dtype)
    elif tuple(out.shape) != shape or out.dtype != x.dtype or not out.flags.c_contiguous:
        raise ValueError(f"Linear out: expected a C-contiguous {x.dtype} array of shape {shape}, got {out.dtype} {out.shape}")
    if rows == 0:
        return out
    x = cp.ascontiguousarray(x)
    weight = cp.ascontiguousarray(weight)
    residual = None if residual is None else cp.ascontiguousarray(residual)
    suffix = "half_bits" if x.dtype == cp.float16 else "float"
    sm_count = _sm_count()
    launch = gemv_shape(rows, n, k, x.dtype.itemsize, sm_count)
    if launch is not None:
        m, r, ks, shared = launch
        kernel = _function(f"linear_gemv<{suffix}, {m}, {r}, {ks}>")
        if _shared_fits(kernel, shared):
            groups = (THREADS // 32) // ks
            kernel((-(-n // (groups * r)),), (THREADS,),
                   (x, weight, _ptr(gamma), _ptr(residual), _ptr(bias), out, np.int32(rows), np.int32(k), np.int32(n),
                    np.int32(act), np.int32(gamma is not None), np.float32(epsilon)), shared_mem=shared)
            return out
    a = x.reshape(rows, x.shape[-1])
    if act or gamma is not None:
        staged = _rows_scratch((rows, k), x.dtype) if rows <= 64 else cp.empty((rows, k), dtype=x.dtype)
        _function(f"linear_prep<{suffix}>")((rows,), (THREADS,),
                                            (a, _ptr(gamma), staged, np.int32(k), np.int32(act), np.int32(gamma is not None),
                                             np.float32(epsilon)))
        a = staged
    y = out.reshape(rows, n)
    cp.matmul(a, weight.T, out=y)
    if bias is not None:
        cp.add(y, bias, out=y)
    if residual is not None:
        cp.add(y, residual.reshape(rows, n), out=y)
    return out
