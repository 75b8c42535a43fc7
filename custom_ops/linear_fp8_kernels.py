"""The CUDA realisation of `onnxopt::LinearFp8` (custom_ops/linear_fp8.py has the spec and the reference):
CuPy kernels and a NumPy emulation of the decode kernel's arithmetic; the cuBLASLt GEMMs they run
between are in custom_ops/linear_fp8_gemm.py.

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
bias, SwiGLU, residual). For float16 without a bias, with `FUSED_SCALES` (and `SWIGLU` "gemm", the
default, for "swiglu"), the epilogue goes: a float16 cuBLASLt GEMM writes the outlier product plus the residual
(its C, beta 1; C and D may differ) into D, float16 [rows, N] (`HalfGemm`), and the FP8 GEMM applies
w_scale as its outer-vector scale of W and adds D as its C (without outliers, the residual); D is the output (with
"swiglu", D is a buffer and the SwiGLU kernel makes the output). The sum x_scale w_scale q.W + C is
rounded once; C itself was rounded to float16 (the outlier product plus the residual), where the spec
rounds once at the end. cuBLASLt takes the outer-vector scale of A only
with one for B too: q's is x_scale repeated M times.

The cuBLASLt plans (FP8 GEMM, outlier GEMM) are custom_ops/linear_fp8_gemm.py's.
"""

from __future__ import annotations

import logging
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
# Prefill of float16 without a bias: w_scale and the additions inside cuBLASLt's GEMM (module docstring).
# On for projections without SwiGLU, where it was faster on an H100 (llama-8b at 2048 rows, 2026-12-06,
# gpu_fp8_gemm_probe.py, per call: q/k/v 173.4 against 219.4 us, o 149.2 against 176.8, down 286.9
# against 298.4).
FUSED_SCALES = True
# Prefill with SwiGLU (gate/up), float16 without a bias or residual, with FUSED_SCALES. "gemm": the
# outlier GEMM writes D, the FP8 GEMM adds to it (C), then the SwiGLU kernel. "epilogue": float32 D, the
# float16 outlier product in a second buffer, and the epilogue kernel. ONNXOPT_FP8_SWIGLU picks one. On an
# H100 (2026-12-06 12:00 UTC, gpu_fp8_gemm_probe.py --rows 2048 --chain 10, llama-8b's four projections
# back to back, us a layer): "gemm" 1002.8, "epilogue" 1157.9 (the default until then). A third path,
# one mma.sync kernel adding the outlier product and applying SwiGLU in one pass over D, took 1019.9 and,
# rewritten, 996.5 against "gemm"'s 1004.1 (14:10 UTC; 928.4 against 901.7 with fast accumulation): its
# kernel took 155.9 us where the SwiGLU kernel takes 75.7. Gate/up and down as one part through that
# kernel (no outlier pass over gate/up's product, down's codes written by it) took 1081.2 against 964.8
# for SwiGLU on down's input. Both were removed (docs/BENCHMARKS.md, 2026-12-06 14:05 UTC).
SWIGLU_PATHS = ("gemm", "epilogue")
SWIGLU = os.environ.get("ONNXOPT_FP8_SWIGLU", "") or "gemm"
if SWIGLU not in SWIGLU_PATHS:
    logging.getLogger(__name__).warning("ONNXOPT_FP8_SWIGLU=%r is not one of %s; using 'gemm'", SWIGLU, SWIGLU_PATHS)
    SWIGLU = "gemm"

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
