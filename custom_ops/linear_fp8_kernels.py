"""The CUDA realisation of `onnxopt::LinearFp8` (custom_ops/linear_fp8.py has the spec and the reference):
CuPy kernels, the cuBLASLt FP8 GEMM through nvmath-python's bindings, and a NumPy emulation of the
decode kernel's arithmetic.

Decode (`linear_fp8_gemv`, rows <= MAX_GEMV_ROWS whose x fits in shared memory): one launch.
- x staged once per block: each row normalized (with gamma; its sum of squares reduced over the block
  first), rounded to the dtype, quantized to E4M3 exactly as QuantizeLinear does (IEEE division by
  x_scale, then `cvt.rn.satfinite.e4m3x2.f32`: nearest even, saturating at +-448), converted back to
  float16 (exact) and scaled by 2^-4 (exact), in shared memory; each chunk's two 16-byte halves
  swapped on a pattern so that 8 lanes reading 8 consecutive chunks hit 8 distinct bank groups.
- weights: 16-byte loads of 16 E4M3 values, 4 rows a warp (with "swiglu" 2 gate/up pairs), U = 4
  loads per row in flight, round 0 issued before grid_wait() (a dependent launch, custom_ops/cuda.py);
  E4M3 pairs to half2 with `cvt.rn.f16x2.e4m3x2` (sm_89+, exact).
- arithmetic: half2 fma of weights and staged x in two independent runs per 16-value chunk (its low
  and high 8 values); each half of a run's half2 sums 4 products (even or odd k), then to float32. Why
  2^-4: a product of two E4M3 values is exact in float16 (4 x 4 significant bits) but can reach
  448^2 = 200704, past float16's 65504; scaled by 2^-4 four of them stay below 50176, and the smallest
  nonzero product (2^-9 * 2^-9 * 2^-4 = 2^-22) is still a float16 value. So products are exact and only
  the 4-term sums round (float16 roundoff of the partial sum; runs of 8 had about 1.6x the error in
  the NumPy emulation, and one dependent chain of 8 fmas). At the end y = acc * 16 * x_scale * w_scale[n],
  plus the outlier product (lane j takes channel j: a[idx_j] times the row's outlier weights, summed
  with the warp's shuffles), bias, SwiGLU, residual, rounded once.

Both kernels take the op's input in one of three modes (`norm`): x as it is, its RMSNorm times gamma,
or, with input_activation "swiglu", SwiGLU of the packed gate | up row [2K] (silu(gate) * up in float32,
rounded to the dtype, as onnxopt::SwiGLU): the activation is computed where x is staged or quantized.

Prefill (more rows): `linear_fp8_quantize` (one block per row: the same normalization and E4M3 codes,
as bytes [rows, K], and the outlier channels a[:, idx] [rows, n] in the dtype), the FP8 GEMM in
cuBLASLt (float32 D = x_scale * q @ W^T: FP8 products summed in float32), the outlier GEMM (float16
cuBLASLt, `HalfGemm`) where there are outlier channels, and `linear_fp8_epilogue` (times w_scale, plus the outlier product,
bias, SwiGLU, residual). For float16 without a bias, with `FUSED_SCALES` (and `FUSED_SWIGLU` for
"swiglu"), the epilogue goes: a float16 cuBLASLt GEMM writes the outlier product plus the residual
(its C, beta 1; C and D may differ) into D, float16 [rows, N] (`HalfGemm`), and the FP8 GEMM applies
w_scale as its outer-vector scale of W and adds D as its C (without outliers, the residual); D is the output (with
"swiglu", D is a buffer and the SwiGLU kernel makes the output). The sum x_scale w_scale q.W + C is
rounded once; C itself was rounded to float16 (the outlier product plus the residual), where the spec
rounds once at the end. cuBLASLt takes the outer-vector scale of A only
with one for B too: q's is x_scale repeated M times.

Why nvmath's low-level bindings (nvmath.bindings.cublasLt) and not `nvmath.linalg.advanced.Matmul`:
the stateful Matmul takes NumPy, CuPy or torch operands and reads their dtype names, and CuPy has no
float8 dtype (ml_dtypes types are not CuPy dtypes), so FP8 operands would need torch, which onnxopt
must not need at run time. The bindings take device pointers: the plan (descriptor, layouts, algorithm
from the heuristic, workspace) is made once per (weight, x_scale, rows) and cached; a call is one
cublasLtMatmul on the current CuPy stream, with no synchronization and no allocation (capturable).
cuBLASLt's FP8 GEMM on sm_89/sm_90 takes the "TN" layout only: in its column-major terms
D[N, M] = op(A) op(B) with A = W stored [N, K] row-major (= [K, N] column-major, transposed) and
B = q [M, K] row-major (= [K, M] column-major, not transposed); D [N, M] column-major is our row-major
[M, N]. A's scale is 1, B's is x_scale (a device pointer: the op's x_scale input).
"""

from __future__ import annotations

import os

import numpy as np

from onnxopt.custom_ops.cuda import HALF_PRELUDE

THREADS = 256  # 8 warps
ROWS_PER_WARP = 4  # RW in the GEMV (swiglu: 2 gate/up pairs)
MAX_GEMV_ROWS = 8  # M instances 1, 2, 4, 8
# bytes of dynamic shared memory for the staged rows (rows * K * 2): 48 KiB, the default limit of a
# launch, less 1 KiB for the kernel's static shared memory (an H100 refused 8 rows of K 3072 with
# CUDA_ERROR_INVALID_VALUE: 48 KiB dynamic + 256 bytes static)
MAX_STAGED = 47 * 1024
STAGE_SHIFT = 4  # the staged codes are q * 2^-4 (module docstring)
RUN = 4  # products per float16 partial sum
WORKSPACE = 32 * 1024 * 1024  # cuBLASLt workspace (the size NVIDIA recommends for Hopper)
GEMM_FAST_ACCUM = False  # CUBLASLT_MATMUL_DESC_FAST_ACCUM: off keeps Hopper's FP8 sums promoted to float32
# Plans are made per row bucket (`plan_rows`: the next power of two, at least PLAN_MIN_ROWS): one
# heuristic query per (weight, bucket), its algorithm run for every row count in the bucket (a layout
# pair per row count, made once). A prompt length not seen before then builds no plan in its bucket:
# a plan is ~0.1-0.2 ms of host time (H100, 2026-12-06: 222 us a projection when the probe rebuilt one
# per call), and a prefill builds two per projection, 256 for llama-8b. The algorithm is checked for each
# new row count (cublasLtMatmulAlgoCheck); where cuBLASLt refuses it, that row count gets its own plan.
PLAN_MIN_ROWS = 64
# A plan's algorithm: cuBLASLt's first heuristic, or with AUTOTUNE (env ONNXOPT_FP8_AUTOTUNE=1) the fastest
# of its first ALGO_CANDIDATES, timed on the plan's own shapes once per (kind, M bucket, N, K, types) and
# reused by every plan of that problem (TensorRT-LLM profiles its GEMMs the same way, ahead of time). The
# timing runs at the first prefill of a new bucket (about 8 x 4 GEMMs a shape), never inside a stream
# capture. Off until an H100 shows it faster end to end.
AUTOTUNE = os.environ.get("ONNXOPT_FP8_AUTOTUNE", "0") == "1"
ALGO_CANDIDATES = 8
_TUNED: dict[tuple, int] = {}  # problem -> index of the fastest candidate
_PLAN_CACHE_SIZE = 4096
_LAYOUTS_PER_PLAN = 64
# Prefill of float16 without a bias: w_scale and the additions inside cuBLASLt's GEMM (module docstring).
# On for projections without SwiGLU, where it was faster on an H100 (llama-8b at 2048 rows, 2026-12-06,
# gpu_fp8_gemm_probe.py, per call: q/k/v 173.4 against 219.4 us, o 149.2 against 176.8, down 286.9
# against 298.4). With SwiGLU (FUSED_SWIGLU) the float16-out GEMM cuBLASLt's heuristic picks was the
# slower one (400.1 against 367.3 us on gate/up), and the path lost (681.6 against 645.5 us).
FUSED_SCALES = True
FUSED_SWIGLU = False

# Prefill's quantize kernel for float16 rows without the SwiGLU input, K up to 32 * 8 * 16 = 4096:
# "warp" (linear_fp8_quantize_warp, a warp a row, the row in registers, no barrier) or "block"
# (linear_fp8_quantize, a block a row). On an H100 (2026-12-06, llama-8b at 2048 rows) the block kernel
# took 20-23 us for q/k/v, o and gate/up by the probe (per call, synchronized). In the 09:55 UTC profile
# of the same prefill "warp" took 15 us a launch, and the quantize kernels' total was unchanged (3.2 ms):
# the block kernel's launches there were no slower (docs/BENCHMARKS.md).
QUANTIZE = "warp"
QUANTIZE_WARP_SLICES = (4, 8, 16)  # QS: 16-byte slices a lane holds (K <= 32 * 8 * QS)
_MOD = "onnxopt_linear_fp8"
_TYPES = ("half_bits", "float")
_EXPRESSIONS = (tuple(f"linear_fp8_gemv<{t}, {m}, {a}>" for t in _TYPES for m in (1, 2, 4, 8) for a in (0, 1))
                + tuple(f"linear_fp8_quantize<{t}>" for t in _TYPES)
                + tuple(f"linear_fp8_quantize_warp<{qs}>" for qs in QUANTIZE_WARP_SLICES)
                + tuple(f"linear_fp8_epilogue<{t}, {a}>" for t in _TYPES for a in (0, 1)))
_SOURCE = HALF_PRELUDE + r"""
// E4M3 pair (low byte: the lower element) -> half2 (low half: the lower element), exact (sm_89+)
__device__ __forceinline__ unsigned int half2_of_e4m3x2(unsigned short v) {
    unsigned int d; asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(d) : "h"(v)); return d;
}
// E4M3 codes of (lo, hi) in the low and high byte: nearest even, saturating at +-448 (QuantizeLinear,
// saturate=1); cvt puts its first operand in the high byte
__device__ __forceinline__ unsigned short e4m3x2_of(float lo, float hi) {
    unsigned short d; asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(d) : "f"(hi), "f"(lo)); return d;
}
__device__ __forceinline__ unsigned int hmul2(unsigned int a, unsigned int b) {
    unsigned int d; asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b)); return d;
}
__device__ __forceinline__ float hsum2(unsigned int a) {
    return to_f((half_bits)(a & 0xffffu)) + to_f((half_bits)(a >> 16));
}
// 8 consecutive elements as floats (16 bytes of float16, 32 of float)
__device__ __forceinline__ void load8(const half_bits* p, float* f) { unpack(__ldg(reinterpret_cast<const uint4*>(p)), f, p); }
__device__ __forceinline__ void load8(const float* p, float* f) {
    unpack(__ldg(reinterpret_cast<const uint4*>(p)), f, p);
    unpack(__ldg(reinterpret_cast<const uint4*>(p) + 1), f + 4, p);
}
// mode 2's silu is silu_fast (HALF_PRELUDE): every block of the decode GEMV computes it for the whole
// row (14336 values on llama-8b's down); with expf and an IEEE division that cost about 4.7 us a layer
// there (H100, 2026-12-06: decode 4.004 against 3.850 ms a step).
// The product's input a, 8 values at x (a row of the op's X, offset): mode 1, x * inv * gamma rounded to T
// (the normalized input, as the unfused graph's norm output); mode 2, silu(x) * x[K] rounded to T (the
// SwiGLU of a packed gate | up row, as onnxopt::SwiGLU computes it); 0, x
template <typename T>
__device__ __forceinline__ void normed8(const T* x, const T* gamma, float inv, int mode, int K, float* a) {
    load8(x, a);
    if (mode == 1) {
        float g[8];
        load8(gamma, g);
        #pragma unroll
        for (int i = 0; i < 8; ++i) a[i] = round_to(a[i] * inv * g[i], x);
    } else if (mode == 2) {
        float u[8];
        load8(x + K, u);
        #pragma unroll
        for (int i = 0; i < 8; ++i) a[i] = round_to(silu_fast(a[i]) * u[i], x);
    }
}
// One value of a (channel k of the row xr), as normed8
template <typename T>
__device__ __forceinline__ float input_at(const T* xr, const T* gamma, float inv, int mode, int K, long long k) {
    const float v = to_f(xr[k]);
    if (mode == 1) return round_to(v * inv * to_f(gamma[k]), xr);
    if (mode == 2) return round_to(silu_fast(v) * to_f(xr[K + k]), xr);
    return v;
}
// 1 / rms of `rows` rows of x [rows, K] over the whole block (blockDim.x == 256); inv[m] = 1 without the norm
template <int M, typename T>
__device__ __forceinline__ void row_norms(const T* x, int rows, int K, int norm, float eps, float (&inv)[M],
                                          float (&red)[8][M]) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    #pragma unroll
    for (int m = 0; m < M; ++m) inv[m] = 1.f;
    if (norm != 1) return;
    float ss[M];
    #pragma unroll
    for (int m = 0; m < M; ++m) {
        ss[m] = 0.f;
        if (m >= rows) continue;
        for (int s = tid; s < K / 8; s += 256) {
            float f[8];
            load8(x + (size_t)m * K + s * 8, f);
            #pragma unroll
            for (int i = 0; i < 8; ++i) ss[m] = fmaf(f[i], f[i], ss[m]);
        }
        #pragma unroll
        for (int o = 16; o > 0; o >>= 1) ss[m] += __shfl_xor_sync(0xffffffffu, ss[m], o);
        if (lane == 0) red[warp][m] = ss[m];
    }
    __syncthreads();
    #pragma unroll
    for (int m = 0; m < M; ++m) {
        float total = 0.f;
        #pragma unroll
        for (int i = 0; i < 8; ++i) total += red[i][m];
        inv[m] = rsqrtf(total / (float)K + eps);
    }
}
// Position of 16-byte half j of chunk c (16 values) among the staged slices (module docstring)
__device__ __forceinline__ int swizzled(int c, int j) { return 2 * c + (j ^ ((c ^ (c >> 2)) & 1)); }

// Decode (module docstring): rows m < `rows` <= M of x [rows, K] ([rows, 2K] with norm 2); W [N, K] E4M3
// bytes; norm: the input mode of normed8 (0 x, 1 RMSNorm times gamma, 2 SwiGLU of gate | up); grid
// ceil(N / 32) (ACT: ceil(N / 2 / 16)); dynamic shared memory rows * K * 2 bytes.
template <typename T, int M, int ACT>
__global__ void __launch_bounds__(256) linear_fp8_gemv(
        const T* __restrict__ x, const unsigned char* __restrict__ w, const float* __restrict__ w_scale,
        const float* __restrict__ x_scale, const T* __restrict__ gamma, const T* __restrict__ residual,
        const T* __restrict__ bias, const long long* __restrict__ oidx, const T* __restrict__ ow,
        T* __restrict__ y, int rows, int K, int N, int n_out, int norm, float eps) {
    constexpr int RW = 4, U = 4;
    extern __shared__ uint4 xs[];  // rows x K / 8 slices of 8 float16: q * 2^-4
    __shared__ float red[8][M];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int half = N / 2, chunks = K / 16, slices = K / 8;
    int rowid[RW];
    if (ACT) {
        const int j0 = (blockIdx.x * 8 + warp) * 2;
        rowid[0] = j0 < half ? j0 : N;
        rowid[1] = j0 + 1 < half ? j0 + 1 : N;
        rowid[2] = j0 < half ? half + j0 : N;
        rowid[3] = j0 + 1 < half ? half + j0 + 1 : N;
    } else {
        #pragma unroll
        for (int r = 0; r < RW; ++r) {
            const int n = (blockIdx.x * 8 + warp) * RW + r;
            rowid[r] = n < N ? n : N;
        }
    }
    uint4 buf[RW][U];
    auto load = [&](int round) {
        #pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = (round * U + u) * 32 + lane;
            #pragma unroll
            for (int r = 0; r < RW; ++r)
                buf[r][u] = (c < chunks && rowid[r] < N)
                    ? __ldcs(reinterpret_cast<const uint4*>(w + (size_t)rowid[r] * K + (size_t)c * 16))
                    : make_uint4(0u, 0u, 0u, 0u);
        }
    };
    load(0);
    float wsc[RW], own[RW];  // each row's w_scale, and its outlier weight of channel j = lane
    #pragma unroll
    for (int r = 0; r < RW; ++r) {
        const bool ok = rowid[r] < N;
        wsc[r] = ok ? w_scale[rowid[r]] : 0.f;
        own[r] = ok && lane < n_out ? to_f(ow[(size_t)rowid[r] * n_out + lane]) : 0.f;
    }
    const float s = *x_scale;
    grid_wait();  // a dependent launch: the weights, scales and outlier weights above, x below

    float inv[M];
    row_norms<M>(x, rows, K, norm, eps, inv, red);
    const int xrow = norm == 2 ? 2 * K : K;  // X's row: [gate | up] with the SwiGLU input
    const unsigned int step = 0x2c002c00u;  // half2 (2^-4, 2^-4)
    #pragma unroll
    for (int m = 0; m < M; ++m) {
        if (m >= rows) break;
        for (int sl = tid; sl < slices; sl += 256) {
            float a[8];
            normed8(x + (size_t)m * xrow + sl * 8, gamma + sl * 8, inv[m], norm, K, a);
            unsigned int h[4];
            #pragma unroll
            for (int i = 0; i < 4; ++i) h[i] = hmul2(half2_of_e4m3x2(e4m3x2_of(a[2 * i] / s, a[2 * i + 1] / s)), step);
            xs[m * slices + swizzled(sl >> 1, sl & 1)] = make_uint4(h[0], h[1], h[2], h[3]);
        }
    }
    __syncthreads();

    float acc[RW][M];
    #pragma unroll
    for (int r = 0; r < RW; ++r) {
        #pragma unroll
        for (int m = 0; m < M; ++m) acc[r][m] = 0.f;
    }
    const int rounds = (chunks + 32 * U - 1) / (32 * U);
    for (int round = 0; round < rounds; ++round) {
        if (round > 0) load(round);
        #pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = (round * U + u) * 32 + lane;
            if (c >= chunks) continue;
            unsigned int wh[RW][8];  // 16 weights of each row as 8 half2, in k order
            #pragma unroll
            for (int r = 0; r < RW; ++r) {
                const unsigned int word[4] = {buf[r][u].x, buf[r][u].y, buf[r][u].z, buf[r][u].w};
                #pragma unroll
                for (int i = 0; i < 4; ++i) {
                    wh[r][2 * i] = half2_of_e4m3x2((unsigned short)(word[i] & 0xffffu));
                    wh[r][2 * i + 1] = half2_of_e4m3x2((unsigned short)(word[i] >> 16));
                }
            }
            #pragma unroll
            for (int m = 0; m < M; ++m) {
                if (m >= rows) break;
                const uint4 lo = xs[m * slices + swizzled(c, 0)], hi = xs[m * slices + swizzled(c, 1)];
                const unsigned int xv[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
                #pragma unroll
                for (int r = 0; r < RW; ++r) {
                    unsigned int lo_run = 0u, hi_run = 0u;  // 4 products per half each (module docstring)
                    #pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        lo_run = hfma2(wh[r][i], xv[i], lo_run);
                        hi_run = hfma2(wh[r][i + 4], xv[i + 4], hi_run);
                    }
                    acc[r][m] += hsum2(lo_run) + hsum2(hi_run);
                }
            }
        }
    }
    // outlier channels: lane j takes channel idx[j] (and j + 32, ...): a[m, idx] times each row's weight
    float o[RW][M];
    #pragma unroll
    for (int r = 0; r < RW; ++r) {
        #pragma unroll
        for (int m = 0; m < M; ++m) o[r][m] = 0.f;
    }
    for (int j = lane; j < n_out; j += 32) {
        const long long k = oidx[j];
        float wj[RW];
        #pragma unroll
        for (int r = 0; r < RW; ++r) wj[r] = j == lane ? own[r] : (rowid[r] < N ? to_f(ow[(size_t)rowid[r] * n_out + j]) : 0.f);
        #pragma unroll
        for (int m = 0; m < M; ++m) {
            if (m >= rows) break;
            const float a = input_at(x + (size_t)m * xrow, gamma, inv[m], norm, K, k);
            #pragma unroll
            for (int r = 0; r < RW; ++r) o[r][m] = fmaf(a, wj[r], o[r][m]);
        }
    }
    #pragma unroll
    for (int r = 0; r < RW; ++r) {
        #pragma unroll
        for (int m = 0; m < M; ++m) {
            #pragma unroll
            for (int d = 16; d > 0; d >>= 1) {
                acc[r][m] += __shfl_xor_sync(0xffffffffu, acc[r][m], d);
                o[r][m] += __shfl_xor_sync(0xffffffffu, o[r][m], d);
            }
        }
    }
    const float scale = 16.f * s;  // undo the staging's 2^-4
    #pragma unroll
    for (int m = 0; m < M; ++m) {
        if (m >= rows) break;
        if (ACT) {
            #pragma unroll
            for (int p = 0; p < 2; ++p) {
                const int j = rowid[p];
                if (lane != ((p * M + m) & 31) || j >= N) continue;
                float g = acc[p][m] * scale * wsc[p] + o[p][m], v = acc[p + 2][m] * scale * wsc[p + 2] + o[p + 2][m];
                if (bias != nullptr) { g += to_f(bias[j]); v += to_f(bias[j + half]); }
                float out = g / (1.f + expf(-g)) * v;
                if (residual != nullptr) out += to_f(residual[(size_t)m * half + j]);
                store(y + (size_t)m * half + j, out);
            }
        } else {
            #pragma unroll
            for (int r = 0; r < RW; ++r) {
                const int n = rowid[r];
                if (lane != ((r * M + m) & 31) || n >= N) continue;
                float v = acc[r][m] * scale * wsc[r] + o[r][m];
                if (bias != nullptr) v += to_f(bias[n]);
                if (residual != nullptr) v += to_f(residual[(size_t)m * N + n]);
                store(y + (size_t)m * N + n, v);
            }
        }
    }
}

// Prefill, before the GEMM: row blockIdx.x of x [rows, K] normalized (gamma; norm 1) or of x [rows, 2K]
// through SwiGLU (norm 2), quantized to E4M3 codes q [rows, K]; its outlier channels a[m, idx] into
// a_out [rows, n_out] (T). 256 threads.
template <typename T>
__global__ void __launch_bounds__(256) linear_fp8_quantize(
        const T* __restrict__ x, const T* __restrict__ gamma, const float* __restrict__ x_scale,
        const long long* __restrict__ oidx, unsigned char* __restrict__ q, T* __restrict__ a_out, int K, int n_out,
        int norm, float eps) {
    __shared__ float red[8][1];
    const size_t m = blockIdx.x;
    const T* xr = x + m * (norm == 2 ? 2 * K : K);  // X's row: [gate | up] with the SwiGLU input
    float inv[1];
    row_norms<1>(xr, 1, K, norm, eps, inv, red);
    const float s = *x_scale;
    for (int sl = threadIdx.x; sl < K / 8; sl += blockDim.x) {
        float a[8];
        normed8(xr + sl * 8, gamma + sl * 8, inv[0], norm, K, a);
        const unsigned int lo = e4m3x2_of(a[0] / s, a[1] / s) | ((unsigned int)e4m3x2_of(a[2] / s, a[3] / s) << 16);
        const unsigned int hi = e4m3x2_of(a[4] / s, a[5] / s) | ((unsigned int)e4m3x2_of(a[6] / s, a[7] / s) << 16);
        *reinterpret_cast<uint2*>(q + m * K + sl * 8) = make_uint2(lo, hi);
    }
    for (int j = threadIdx.x; j < n_out; j += blockDim.x) {
        store(a_out + m * n_out + j, input_at(xr, gamma, inv[0], norm, K, oidx[j]));
    }
}

// linear_fp8_quantize for float16 rows of K <= 256 * QS (norm 0 or 1): a warp per row, 8 rows a block. A
// lane loads its QS 16-byte slices of the row at once (slice i * 32 + lane), the sum of squares meets
// by shuffles, and each slice is normalized, quantized and stored as the block kernel does; the outlier
// channels likewise. Grid ceil(rows / 8).
template <int QS>
__global__ void __launch_bounds__(256) linear_fp8_quantize_warp(
        const half_bits* __restrict__ x, const half_bits* __restrict__ gamma, const float* __restrict__ x_scale,
        const long long* __restrict__ oidx, unsigned char* __restrict__ q, half_bits* __restrict__ a_out, int rows,
        int K, int n_out, int norm, float eps) {
    const int lane = threadIdx.x & 31;
    const size_t m = (size_t)blockIdx.x * 8 + (threadIdx.x >> 5);
    if (m >= (size_t)rows) return;
    const half_bits* xr = x + m * K;
    const int slices = K / 8;
    uint4 xv[QS];
    #pragma unroll
    for (int i = 0; i < QS; ++i) {
        const int sl = i * 32 + lane;
        xv[i] = sl < slices ? __ldg(reinterpret_cast<const uint4*>(xr) + sl) : make_uint4(0u, 0u, 0u, 0u);
    }
    float inv = 1.f;
    if (norm == 1) {
        float ss = 0.f;
        #pragma unroll
        for (int i = 0; i < QS; ++i) {
            float f[8];
            unpack(xv[i], f, xr);
            #pragma unroll
            for (int e = 0; e < 8; ++e) ss = fmaf(f[e], f[e], ss);
        }
        #pragma unroll
        for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
        inv = rsqrtf(ss / (float)K + eps);
    }
    const float s = *x_scale;
    #pragma unroll
    for (int i = 0; i < QS; ++i) {
        const int sl = i * 32 + lane;
        if (sl < slices) {
            float a[8];
            unpack(xv[i], a, xr);
            if (norm == 1) {
                float g[8];
                load8(gamma + sl * 8, g);
                #pragma unroll
                for (int e = 0; e < 8; ++e) a[e] = round_to(a[e] * inv * g[e], xr);
            }
            const unsigned int lo = e4m3x2_of(a[0] / s, a[1] / s) | ((unsigned int)e4m3x2_of(a[2] / s, a[3] / s) << 16);
            const unsigned int hi = e4m3x2_of(a[4] / s, a[5] / s) | ((unsigned int)e4m3x2_of(a[6] / s, a[7] / s) << 16);
            *reinterpret_cast<uint2*>(q + m * K + sl * 8) = make_uint2(lo, hi);
        }
    }
    for (int j = lane; j < n_out; j += 32) store(a_out + m * n_out + j, input_at(xr, gamma, inv, norm, K, oidx[j]));
}

// Prefill, after the GEMM: acc [rows, N] (float32, x_scale * the E4M3 sums) times w_scale, plus the
// outlier product outl [rows, N] (T), bias, SwiGLU (gate | up columns), residual -> y [rows, Ny].
// Grid (rows, ceil(Ny / 256)).
template <typename T, int ACT>
__global__ void __launch_bounds__(256) linear_fp8_epilogue(
        const float* __restrict__ acc, const float* __restrict__ w_scale, const T* __restrict__ outl,
        const T* __restrict__ bias, const T* __restrict__ residual, T* __restrict__ y, int N) {
    const int ny = ACT ? N / 2 : N, j = blockIdx.y * blockDim.x + threadIdx.x;
    if (j >= ny) return;
    const size_t row = (size_t)blockIdx.x * N, out = (size_t)blockIdx.x * ny + j;
    float v = acc[row + j] * w_scale[j];
    if (outl != nullptr) v += to_f(outl[row + j]);
    if (bias != nullptr) v += to_f(bias[j]);
    if (ACT) {
        float u = acc[row + j + ny] * w_scale[j + ny];
        if (outl != nullptr) u += to_f(outl[row + j + ny]);
        if (bias != nullptr) u += to_f(bias[j + ny]);
        v = v / (1.f + expf(-v)) * u;
    }
    if (residual != nullptr) v += to_f(residual[out]);
    store(y + out, v);
}
"""


def function(expression: str):
    """A kernel of the module (every instance compiled together, once per device)."""
    from onnxopt.custom_ops.cuda import declare_module, raw_function

    declare_module(_MOD, _EXPRESSIONS)
    return raw_function(_MOD, _SOURCE, expression)


def gemv_rows(rows: int, k: int) -> int | None:
    """The M instance (1, 2, 4 or 8) of the decode GEMV for `rows` rows of K, or None when the prefill
    path takes them (more rows than MAX_GEMV_ROWS, or their staged x past MAX_STAGED bytes)."""
    if not 1 <= rows <= MAX_GEMV_ROWS or rows * k * 2 > MAX_STAGED:
        return None
    return next(m for m in (1, 2, 4, 8) if m >= rows)


def gemv_grid(n: int, swiglu: bool) -> int:
    """Blocks of the GEMV: 8 warps of 4 rows (swiglu: 2 gate/up pairs)."""
    units = n // 2 if swiglu else n
    per_block = 8 * (2 if swiglu else ROWS_PER_WARP)
    return -(-units // per_block)


# -- cuBLASLt FP8 GEMM (nvmath-python bindings) -------------------------------------------------------

def _nvmath():
    """(cublasLt bindings, cublas bindings, nvmath) or GpuUnavailable naming the extra to install."""
    from onnxopt.custom_ops.cuda import GpuUnavailable

    try:
        import nvmath
        from nvmath.bindings import cublas, cublasLt
    except ImportError as e:
        raise GpuUnavailable("LinearFp8's prefill GEMM needs nvmath-python (cuBLASLt bindings): "
                             "pip install 'onnxopt[gpu]' (nvmath-python>=1.0)") from e
    return cublasLt, cublas, nvmath


class _LtPlan:
    """One cuBLASLt matmul plan in our row-major terms, D [M, N] = alpha op(q [M, K] @ W [N, K]^T) + beta C
    (cuBLASLt's TN, module docstring): descriptor, layouts, the heuristic's first algorithm, and the
    workspace. Subclasses set the types and the scale attributes; `__call__(q, d, c)` is one
    cublasLtMatmul on the current CuPy stream (no synchronization, no allocation: capturable)."""

    def _build(self, weight, m: int, *, ab_type, d_type, scales, refused) -> None:
        from onnxopt.custom_ops.cuda import cupy, persistent

        lt, cublas, nvmath = _nvmath()
        cp = cupy()
        self._lt = lt
        n, k = weight.shape
        self.shape = (m, n, k)  # m: the most rows (the bucket's); fewer take layouts of their own
        self._types = (ab_type, d_type)
        self._layouts: dict[int, tuple[int, int]] = {}  # rows below m -> (b, d) layouts
        self._exact: dict[int, _LtPlan] = {}  # rows whose layouts cuBLASLt refused the bucket's algorithm for
        self.remake = None  # rows -> a plan of this kind for exactly those rows (set by gemm / half_gemm)
        self.weight = weight  # kept alive: the plan holds its pointer (and the cache's key)
        self.handle = _handle(lt)
        self.workspace = persistent("linear_fp8_workspace", (WORKSPACE,), np.uint8)
        f32 = nvmath.CudaDataType.CUDA_R_32F
        self.desc = lt.matmul_desc_create(cublas.ComputeType.COMPUTE_32F, f32)
        attr = lt.MatmulDescAttribute
        self._set(attr.TRANSA, int(cublas.Operation.T))
        self._set(attr.TRANSB, int(cublas.Operation.N))
        scales(lt, attr)
        self.a_layout = lt.matrix_layout_create(ab_type, k, n, k)  # W: [K, N] column-major, op T
        self.b_layout = lt.matrix_layout_create(ab_type, k, m, k)  # q: [K, M] column-major, op N
        self.d_layout = lt.matrix_layout_create(d_type, n, m, n)  # D: [N, M] column-major = [M, N] row-major
        pref = lt.matmul_preference_create()
        size = np.array([WORKSPACE], dtype=lt.get_matmul_preference_attribute_dtype(
            lt.MatmulPreferenceAttribute.MAX_WORKSPACE_BYTES))
        lt.matmul_preference_set_attribute(pref, lt.MatmulPreferenceAttribute.MAX_WORKSPACE_BYTES, size.ctypes.data,
                                           size.nbytes)
        wanted = ALGO_CANDIDATES if AUTOTUNE else 1
        self._candidates = lt.MatmulHeuristicResult(wanted)  # kept alive: self.algo points into it
        found = np.zeros(1, dtype=np.int32)
        try:
            with cp.cuda.Device(weight.device.id):
                lt.matmul_algo_get_heuristic(self.handle, self.desc, self.a_layout, self.b_layout, self.d_layout,
                                             self.d_layout, pref, wanted, self._candidates.ptr, found.ctypes.data)
        except lt.cuBLASLtError as e:
            refused(f"cuBLASLt refused the plan for M, N, K = {self.shape}: {e}", e)
        finally:
            lt.matmul_preference_destroy(pref)
        if found[0] < 1:
            refused(f"cuBLASLt has no plan for M, N, K = {self.shape}", None)
        self.alpha = np.ones(1, dtype=np.float32)  # host scalars (pointer mode host)
        self.beta = np.zeros(1, dtype=np.float32)
        self.beta_one = np.ones(1, dtype=np.float32)
        # the call's constant arguments, read once (ndarray.ctypes.data costs microseconds a call)
        self._alpha_ptr, self._beta_ptrs = self.alpha.ctypes.data, (self.beta.ctypes.data, self.beta_one.ctypes.data)
        self._w_ptr, self._ws_ptr = weight.data.ptr, self.workspace.data.ptr
        self.algo_index = self._tuned(int(found[0])) if AUTOTUNE and found[0] > 1 else 0
        self.algo = self._candidate(self.algo_index) if self.algo_index else self._candidates

    def _candidate(self, index: int):
        """The heuristic result `index` (its first member is the algorithm cublasLtMatmul takes)."""
        size = self._lt.matmul_heuristic_result_dtype.itemsize
        return self._lt.MatmulHeuristicResult.from_ptr(self._candidates.ptr + index * size, 1)

    def _tuned(self, count: int) -> int:
        """Index of the fastest of `count` candidates on this plan's problem (AUTOTUNE): each run on
        zeroed operands of the bucket's shape, 1 + 3 times between CUDA events, the median of the 3 kept;
        cached per problem. Inside a stream capture (a captured batch decode past the GEMV's rows): 0."""
        from onnxopt.custom_ops.cuda import cupy

        cp = cupy()
        key = (type(self).__name__, self.shape, tuple(int(t) for t in self._types), self.w_scale_mode())
        if key in _TUNED:
            return _TUNED[key]
        stream = cp.cuda.get_current_stream()
        if stream.is_capturing():
            return 0
        m, n, k = self.shape
        dtypes = {int(t): d for t, d in self._dtype_map().items()}
        q = cp.zeros((m, k), dtype=dtypes[int(self._types[0])])
        d = cp.zeros((m, n), dtype=dtypes[int(self._types[1])])
        times = []
        for index in range(count):
            algo = self._candidate(index)
            try:
                samples = []
                for run in range(4):
                    start, stop = cp.cuda.Event(), cp.cuda.Event()
                    start.record(stream)
                    self._enqueue(algo.ptr, q, d, None, self.b_layout, self.d_layout)
                    stop.record(stream)
                    stop.synchronize()
                    if run:
                        samples.append(cp.cuda.get_elapsed_time(start, stop))
                times.append(sorted(samples)[1])
            except self._lt.cuBLASLtError:  # a candidate that does not run here
                times.append(float("inf"))
        _TUNED[key] = best = int(np.argmin(times))
        return best

    def w_scale_mode(self) -> bool:
        return getattr(self, "w_scale", None) is not None

    def _dtype_map(self) -> dict:
        _, _, nvmath = _nvmath()
        types = nvmath.CudaDataType
        return {types.CUDA_R_8F_E4M3: np.uint8, types.CUDA_R_16F: np.float16, types.CUDA_R_32F: np.float32}

    def _enqueue(self, algo_ptr: int, q, d, c, b_layout, d_layout) -> None:
        """One cublasLtMatmul on the current CuPy stream (D = alpha op(W) q + beta C, C = D where None)."""
        from onnxopt.custom_ops.cuda import cupy

        self._lt.matmul(self.handle, self.desc, self._alpha_ptr, self._w_ptr, self.a_layout,
                        q.data.ptr, b_layout, self._beta_ptrs[c is not None], (d if c is None else c).data.ptr,
                        d_layout, d.data.ptr, d_layout, algo_ptr, self._ws_ptr, WORKSPACE,
                        cupy().cuda.get_current_stream().ptr)

    def _set(self, attribute, value: int) -> None:
        buf = np.array([value], dtype=self._lt.get_matmul_desc_attribute_dtype(attribute))
        self._lt.matmul_desc_set_attribute(self.desc, attribute, buf.ctypes.data, buf.nbytes)

    def _layouts_for(self, rows: int) -> tuple[int, int]:
        """(b, d) layouts of `rows` rows (the plan's own for its bucket's count; made once for fewer)."""
        if rows == self.shape[0]:
            return self.b_layout, self.d_layout
        got = self._layouts.get(rows)
        if got is None:
            _, n, k = self.shape
            ab_type, d_type = self._types
            if len(self._layouts) >= _LAYOUTS_PER_PLAN:  # host descriptors, read when a call is enqueued
                for layout in self._layouts.pop(next(iter(self._layouts))):
                    self._lt.matrix_layout_destroy(layout)
            got = self._layouts[rows] = (self._lt.matrix_layout_create(ab_type, k, rows, k),
                                         self._lt.matrix_layout_create(d_type, n, rows, n))
        return got

    def __call__(self, q, d, c=None) -> None:

        m, n, k = self.shape
        rows = q.shape[0]
        assert 0 < rows <= m and q.shape == (rows, k) and d.shape == (rows, n)
        assert q.flags.c_contiguous and d.flags.c_contiguous
        assert c is None or (c.shape == d.shape and c.dtype == d.dtype and c.flags.c_contiguous)
        exact = self._exact.get(rows)
        if exact is not None:
            return exact(q, d, c)
        fresh = rows != m and rows not in self._layouts
        b_layout, d_layout = self._layouts_for(rows)
        if fresh and not self._algo_takes(b_layout, d_layout):
            # the bucket's algorithm does not take this row count (cublasLtMatmulAlgoCheck): a plan of its own
            if self.remake is None:
                raise RuntimeError(f"cuBLASLt: the plan for {m} rows does not take {rows}")
            exact = self._exact[rows] = self.remake(rows)
            return exact(q, d, c)
        # the algorithm is the heuristic result's first member (cublasLtMatmulHeuristicResult_t.algo)
        self._enqueue(self.algo.ptr, q, d, c, b_layout, d_layout)

    def _algo_takes(self, b_layout, d_layout) -> bool:
        """Whether the plan's algorithm runs on these layouts (cublasLtMatmulAlgoCheck, once per row count)."""
        result = self._lt.MatmulHeuristicResult(1)
        try:
            self._lt.matmul_algo_check(self.handle, self.desc, self.a_layout, b_layout, d_layout, d_layout,
                                       self.algo.ptr, result.ptr)
        except self._lt.cuBLASLtError:
            return False
        return True


class Fp8Gemm(_LtPlan):
    """D [M, N] float32 = x_scale * q [M, K] @ W [N, K]^T for E4M3 q and W (bytes on the device), one
    cuBLASLt plan (module docstring); `__call__(q, d)` launches on the current CuPy stream.

    With `w_scale` (float32 [N] on the device), D is float16 = x_scale * w_scale[n] * (q @ W^T)[:, n]
    + C: W's scale is cuBLASLt's outer-vector scale (CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F, one
    per row of its A), the sum is rounded once to float16, and `__call__(q, d, c)` adds a float16
    C [M, N] (beta 1; C may be D). No epilogue kernel then reads a float32 D back. Raises
    NotImplementedError where cuBLASLt or the bindings have no such plan."""

    def __init__(self, weight, x_scale, m: int, w_scale=None):
        from onnxopt.custom_ops.cuda import cupy, persistent

        _, _, nvmath = _nvmath()
        cp = cupy()
        # kept alive: the plan holds their pointers (and the cache's key: no other array can take them)
        self.x_scale, self.w_scale = x_scale, w_scale
        self.one = persistent("linear_fp8_one", (1,), np.float32)
        self.one.fill(1.0)

        def scales(lt, attr):
            if w_scale is not None:  # cuBLAS's A is W: one scale per output channel
                mode, vector = getattr(attr, "A_SCALE_MODE", None), getattr(lt, "MatmulMatrixScale", None)
                if mode is None or vector is None or not hasattr(vector, "OUTER_VEC_32F"):
                    raise NotImplementedError("nvmath-python's cuBLASLt bindings have no outer-vector scale mode")
                self._set(mode, int(vector.OUTER_VEC_32F))
                self._set(attr.A_SCALE_POINTER, w_scale.data.ptr)
                # B (q) as an outer vector too, x_scale in each of its M entries: cuBLASLt refused an outer
                # vector for A with a scalar for B (CUBLAS_STATUS_INVALID_VALUE, H100, 2026-12-06)
                self.x_scales = cp.empty(m, dtype=cp.float32)
                self.x_scales[...] = x_scale.reshape(())
                self._set(attr.B_SCALE_MODE, int(vector.OUTER_VEC_32F))
                self._set(attr.B_SCALE_POINTER, self.x_scales.data.ptr)
            else:  # scale 1
                self._set(attr.A_SCALE_POINTER, self.one.data.ptr)
                self._set(attr.B_SCALE_POINTER, x_scale.data.ptr)  # B is q: the activation scale
            self._set(attr.FAST_ACCUM, int(GEMM_FAST_ACCUM))

        def refused(message, error):
            if w_scale is not None:
                raise NotImplementedError(f"outer-vector FP8 GEMM: {message}") from error
            raise RuntimeError(f"FP8 GEMM (E4M3 TN, float32 D): {message}") from error

        f16, f32 = nvmath.CudaDataType.CUDA_R_16F, nvmath.CudaDataType.CUDA_R_32F
        self._build(weight, m, ab_type=nvmath.CudaDataType.CUDA_R_8F_E4M3, d_type=f16 if w_scale is not None else f32,
                    scales=scales, refused=refused)


class HalfGemm(_LtPlan):
    """D [M, N] float16 = a [M, n] @ W [N, n]^T (+ C), float32 sums: the outlier product of the fused
    path written straight into the output, or plus the residual (`__call__(a, d, residual)`),
    where the FP8 GEMM then adds its part (module docstring). One cached cuBLASLt plan, like Fp8Gemm."""

    def __init__(self, weight, m: int):
        _, _, nvmath = _nvmath()

        def refused(message, error):
            raise RuntimeError(f"outlier GEMM (float16 TN): {message}") from error

        f16 = nvmath.CudaDataType.CUDA_R_16F
        self._build(weight, m, ab_type=f16, d_type=f16, scales=lambda lt, attr: None, refused=refused)


_HANDLES: dict[int, int] = {}
_PLANS: dict[tuple, Fp8Gemm] = {}


def _handle(lt) -> int:
    from onnxopt.custom_ops.cuda import device_id

    device = device_id()
    if device not in _HANDLES:
        _HANDLES[device] = lt.create()
    return _HANDLES[device]


def _plan(key, make, refusals: tuple):
    """The plan cached under `key` (None: not cached), made by `make()` when missing; None, remembered,
    where `make` raises one of `refusals` (the caller's fallback then costs nothing the next time). The
    oldest plan goes past _PLAN_CACHE_SIZE."""
    if key is not None and key in _PLANS:
        return _PLANS[key]
    try:
        plan = make()
    except refusals:
        plan = None
    if key is not None:
        if len(_PLANS) >= _PLAN_CACHE_SIZE:
            _PLANS.pop(next(iter(_PLANS)))
        _PLANS[key] = plan
    return plan


def plan_rows(m: int) -> int:
    """The row bucket of M rows: the plan made for it serves every row count up to it."""
    return max(PLAN_MIN_ROWS, 1 << (max(1, m) - 1).bit_length())


def _with_remake(plan, remake):
    if plan is not None:
        plan.remake = remake
    return plan


def half_gemm(weight, m: int) -> HalfGemm | None:
    """The cached outlier-GEMM plan for (device, weight, M's bucket) (HalfGemm), or None where cuBLASLt
    has none (the caller multiplies through CuPy then). Call it with M rows (at most its bucket)."""
    from onnxopt.custom_ops.cuda import device_id

    cap = plan_rows(m)
    return _plan((device_id(), weight.data.ptr, tuple(weight.shape), cap, "half"),
                 lambda: _with_remake(HalfGemm(weight, cap), lambda rows: HalfGemm(weight, rows)), (RuntimeError,))


def gemm(weight, x_scale, m: int, w_scale=None, *, cache: bool = True) -> Fp8Gemm | None:
    """The cached plan for (device, weight, x_scale, M's bucket[, w_scale]), for calls of M rows (at
    most the bucket). With w_scale (Fp8Gemm's float16 form): None where cuBLASLt has no such plan.
    `cache=False`: a plan for exactly this call's M only (operands that are one call's copies)."""
    from onnxopt.custom_ops.cuda import device_id

    if not cache:
        return _plan(None, lambda: Fp8Gemm(weight, x_scale, m, w_scale), () if w_scale is None else (NotImplementedError,))
    cap = plan_rows(m)
    key = (device_id(), weight.data.ptr, tuple(weight.shape), x_scale.data.ptr, cap,
           None if w_scale is None else w_scale.data.ptr)
    return _plan(key, lambda: _with_remake(Fp8Gemm(weight, x_scale, cap, w_scale),
                                           lambda rows: Fp8Gemm(weight, x_scale, rows, w_scale)),
                 () if w_scale is None else (NotImplementedError,))


# -- NumPy emulation of the decode GEMV --------------------------------------------------------------

def emulate_gemv(x, weight, gamma=None, residual=None, bias=None, w_scale=None, x_scale=None, outlier_index=None,
                 outlier_weight=None, *, activation: str = "", epsilon: float = 1e-5,
                 input_activation: str = "") -> np.ndarray:
    """What `linear_fp8_gemv` computes for rows x [rows, K] ([rows, 2K] with the SwiGLU input), in
    NumPy: the staged codes (q * 2^-4 in
    float16), E4M3 weights as float16, 4-product float16 fma chains per half of each half2 (even and odd
    k of each 8 values of a chunk), their sums in float32, then the float32 epilogue. Checks the kernel's
    design against linear_fp8.reference (the same arguments)."""
    from onnxopt.custom_ops.linear import reference_epilogue
    from onnxopt.custom_ops.linear_fp8 import e4m3, normalized, quantized
    from onnxopt.custom_ops.linear_half2 import fma16

    rows = x.shape[0]
    w = e4m3(weight).astype(np.float16)  # exact
    n, k = w.shape
    a = normalized(x, gamma, epsilon, input_activation)  # float32 values of the dtype
    staged = (quantized(a, x_scale).astype(np.float32) * np.float32(2.0**-STAGE_SHIFT)).astype(np.float16)
    runs = k // (2 * RUN)
    wc = w.reshape(n, runs, RUN, 2)  # [N, run, step i, parity]: k = 8 run + 2 i + parity
    y = np.empty((rows, n), np.float32)
    for m in range(rows):
        xc = staged[m].reshape(runs, RUN, 2)
        p = np.zeros((n, runs, 2), np.float16)
        for i in range(RUN):
            p = fma16(wc[:, :, i, :], xc[None, :, i, :], p)
        acc = p.astype(np.float32).sum(axis=2).sum(axis=1, dtype=np.float32)  # hsum2, then over runs
        y[m] = acc * np.float32(2.0**STAGE_SHIFT) * np.float32(x_scale) * np.asarray(w_scale, np.float32)
    if outlier_index is not None:
        y = y + a[:, outlier_index] @ np.asarray(outlier_weight, np.float32).T
    return reference_epilogue(y, bias, residual, activation=activation, dtype=x.dtype)
