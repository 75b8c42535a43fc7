"""CUDA C of onnxopt::Linear (custom_ops/linear.py: spec, reference, decomposition and the host side),
compiled by NVRTC through CuPy:

- `linear_gemv` (float weights, up to MAX_GEMV_ROWS rows) and `write_rows`, its epilogue;
- `linear_nbits_gemv` (packed MatMulNBits weights, the GEMV that neither linear_half2 nor linear_mma takes);
- prefill's pieces around the cuBLAS GEMM: `linear_prep` / `linear_prep_vec` (the norm), `linear_add_vec`
  (the residual), `linear_dequantize` / `_out16` / `_vec` (a packed weight to the dtype).
"""

from __future__ import annotations

from onnxopt.custom_ops.cuda import HALF_PRELUDE

SOURCE = HALF_PRELUDE + r"""

// The epilogue of both GEMVs: lane m of the warp writes row m's outputs (every lane holds the sums):
// the norm's scale, bias, SwiGLU of the gate/up pair (ACT) and the residual, rounded once.
template <typename T, int M, int R, int ACT>
__device__ __forceinline__ void write_rows(const float (&acc)[R][M], const float (&ss)[M], const int (&rowid)[R], int unit,
                                           int lane, int rows, int K, int N, int norm, float eps,
                                           const T* __restrict__ residual, const T* __restrict__ bias, T* __restrict__ y) {
    const int half = N / 2;
    #pragma unroll
    for (int m = 0; m < M; ++m) {
        if (m >= rows || lane != (m & 31)) continue;
        const float inv = norm ? rsqrtf(ss[m] / (float)K + eps) : 1.f;
        if (ACT) {
            if (unit >= half) continue;
            float g = acc[0][m] * inv, u = acc[R - 1][m] * inv;
            if (bias != nullptr) { g += to_f(bias[unit]); u += to_f(bias[unit + half]); }
            float v = g / (1.f + expf(-g)) * u;
            if (residual != nullptr) v += to_f(residual[(size_t)m * half + unit]);
            store(y + (size_t)m * half + unit, v);
        } else {
            #pragma unroll
            for (int r = 0; r < R; ++r) {
                const int n = rowid[r];
                if (n >= N) continue;
                float v = acc[r][m] * inv;
                if (bias != nullptr) v += to_f(bias[n]);
                if (residual != nullptr) v += to_f(residual[(size_t)m * N + n]);
                store(y + (size_t)m * N + n, v);
            }
        }
    }
}

// 1 / rms of a row of K values from each thread's partial sum of squares ss, over the whole block (red:
// 32 floats of shared memory)
__device__ __forceinline__ float block_inv_rms(float ss, int K, float eps, float* red) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = ss;
    __syncthreads();
    float total = 0.f;
    for (int i = 0; i < (int)(blockDim.x >> 5); ++i) total += red[i];
    return rsqrtf(total / (float)K + eps);
}

// Prefill: rows of x normalized and scaled by gamma into out [rows, K], rounded (the GEMM reads the
// dtype); grid: rows.
template <typename T>
__global__ void linear_prep(const T* __restrict__ x, const T* __restrict__ gamma, T* __restrict__ out, int K, float eps) {
    __shared__ float red[32];
    const T* xr = x + (size_t)blockIdx.x * K;
    float ss = 0.f;
    for (int k = threadIdx.x; k < K; k += blockDim.x) { const float v = to_f(xr[k]); ss += v * v; }
    const float inv = block_inv_rms(ss, K, eps, red);
    for (int k = threadIdx.x; k < K; k += blockDim.x)
        store(out + (size_t)blockIdx.x * K + k, to_f(xr[k]) * inv * to_f(gamma[k]));
}

// linear_prep in 16-byte slices (K a multiple of 16 bytes, x, gamma and out 16-byte aligned: the host
// checks): the same float32 arithmetic and one rounding per value, as many loads a sixteenth as many.
template <typename T>
__global__ void linear_prep_vec(const T* __restrict__ x, const T* __restrict__ gamma, T* __restrict__ out, int K,
                                float eps) {
    constexpr int VEC = 16 / sizeof(T);
    __shared__ float red[32];
    const T* xr = x + (size_t)blockIdx.x * K;
    const int slices = K / VEC;
    float ss = 0.f;
    for (int sl = threadIdx.x; sl < slices; sl += blockDim.x) {
        float v[VEC];
        unpack(__ldg(reinterpret_cast<const uint4*>(xr) + sl), v, xr);
        #pragma unroll
        for (int e = 0; e < VEC; ++e) ss += v[e] * v[e];
    }
    const float inv = block_inv_rms(ss, K, eps, red);
    for (int sl = threadIdx.x; sl < slices; sl += blockDim.x) {
        float v[VEC], g[VEC];
        unpack(__ldg(reinterpret_cast<const uint4*>(xr) + sl), v, xr);
        unpack(__ldg(reinterpret_cast<const uint4*>(gamma) + sl), g, xr);
        #pragma unroll
        for (int e = 0; e < VEC; ++e) v[e] = v[e] * inv * g[e];
        reinterpret_cast<uint4*>(out + (size_t)blockIdx.x * K)[sl] = pack(v, xr);
    }
}

// Prefill's residual add, y += r over n16 16-byte vectors (y and r 16-byte aligned): each sum in float32,
// rounded once, as cupy.add on float16 (which took 41 us a call for [2048, 4096] on an H100, 1.2 TB/s)
template <typename T>
__global__ void linear_add_vec(T* __restrict__ y, const T* __restrict__ r, long long n16) {
    constexpr int VEC = 16 / sizeof(T);
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n16) return;
    float a[VEC], b[VEC];
    unpack(reinterpret_cast<const uint4*>(y)[i], a, r);
    unpack(__ldg(reinterpret_cast<const uint4*>(r) + i), b, r);
    #pragma unroll
    for (int e = 0; e < VEC; ++e) a[e] += b[e];
    reinterpret_cast<uint4*>(y)[i] = pack(a, r);
}

// Y for rows m < `rows` (module docstring). The block's 8 warps: KS slices of K times 8 / KS groups of
// R weight rows (ACT: R = 2, rows j and j + N/2 of pair j). A chunk is 32 lanes x one 16-byte load
// (STEP elements); the warp of slice s takes chunks s, s + KS, ... and loads U of them per row in one
// round (one round covers its share: the host picks KS so); x is read beside them (L1/L2), gamma from
// shared memory, where the block stages the round's span while the weights are on their way.
// Partial dot products and sums of squares: shuffles in the warp, then shared memory across slices.
template <typename T, int M, int R, int KS, int ACT>
__global__ void __launch_bounds__(256) linear_gemv(
        const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ gamma, const T* __restrict__ residual,
        const T* __restrict__ bias, T* __restrict__ y, int rows, int K, int N, int norm, float eps) {
    constexpr int VEC = 16 / sizeof(T), U = 8, STEP = 32 * VEC, GROUPS = 8 / KS, SPAN = U * KS * STEP;
    __shared__ float part[KS > 1 ? 8 * (R + 1) * M : 1];
    extern __shared__ uint4 staged[];  // with the norm: gamma[SPAN] of the round (dynamic shared memory)
    const T* gs = reinterpret_cast<const T*>(staged);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int slice = warp % KS, group = warp / KS;
    const int unit = blockIdx.x * GROUPS + group;  // ACT: pair j; else the first of R rows
    const int half = N / 2;
    int rowid[R];
    #pragma unroll
    for (int r = 0; r < R; ++r) rowid[r] = ACT ? (unit < half ? unit + r * half : N) : unit * R + r;
    const int chunks = (K + STEP - 1) / STEP;

    uint4 buf[R][U];
    auto load = [&](int round) {
        #pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = (round * U + u) * KS + slice;
            const int k = c * STEP + lane * VEC;
            #pragma unroll
            for (int r = 0; r < R; ++r) {
                buf[r][u] = (c < chunks && k < K && rowid[r] < N)
                    ? __ldcs(reinterpret_cast<const uint4*>(w + (size_t)rowid[r] * K + k)) : make_uint4(0u, 0u, 0u, 0u);
            }
        }
    };
    float acc[R][M], ss[M];
    #pragma unroll
    for (int m = 0; m < M; ++m) {
        ss[m] = 0.f;
        #pragma unroll
        for (int r = 0; r < R; ++r) acc[r][m] = 0.f;
    }
    const int rounds = (chunks + U * KS - 1) / (U * KS);
    for (int round = 0; round < rounds; ++round) {
        load(round);
        if (norm) {  // gamma of the round into shared memory, while the weights are on their way
            // (read from L1/L2 inside the chunk loop, each chunk waited on its own load: ~3 us a launch)
            if (round > 0) __syncthreads();
            for (int e = threadIdx.x * VEC; e < SPAN; e += blockDim.x * VEC) {
                const int k = round * SPAN + e;
                staged[e / VEC] = k < K ? __ldg(reinterpret_cast<const uint4*>(gamma + k)) : make_uint4(0u, 0u, 0u, 0u);
            }
            __syncthreads();
        }
        if (round == 0) grid_wait();  // a dependent launch: weights and gamma above, x and the rest below
        #pragma unroll
        for (int m = 0; m < M; ++m) {
            if (m >= rows) break;
            uint4 xb[U];
            #pragma unroll
            for (int u = 0; u < U; ++u) {
                const int c = (round * U + u) * KS + slice;
                const int k = c * STEP + lane * VEC;
                xb[u] = (c < chunks && k < K) ? __ldg(reinterpret_cast<const uint4*>(x + (size_t)m * K + k)) : make_uint4(0u, 0u, 0u, 0u);
            }
            #pragma unroll
            for (int u = 0; u < U; ++u) {
                const int c = (round * U + u) * KS + slice;
                const int k = c * STEP + lane * VEC;
                if (c < chunks && k < K) {
                    float xf[VEC];
                    unpack(xb[u], xf, w);
                    if (norm) {
                        float gf[VEC];
                        unpack(*reinterpret_cast<const uint4*>(gs + (u * KS + slice) * STEP + lane * VEC), gf, w);
                        #pragma unroll
                        for (int i = 0; i < VEC; ++i) { ss[m] = fmaf(xf[i], xf[i], ss[m]); xf[i] *= gf[i]; }
                    }
                    #pragma unroll
                    for (int r = 0; r < R; ++r) {
                        float wf[VEC];
                        unpack(buf[r][u], wf, w);
                        #pragma unroll
                        for (int i = 0; i < VEC; ++i) acc[r][m] = fmaf(xf[i], wf[i], acc[r][m]);
                    }
                }
            }
        }
    }
    #pragma unroll
    for (int m = 0; m < M; ++m) {
        #pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            ss[m] += __shfl_xor_sync(0xffffffffu, ss[m], o);
            #pragma unroll
            for (int r = 0; r < R; ++r) acc[r][m] += __shfl_xor_sync(0xffffffffu, acc[r][m], o);
        }
    }
    if (KS > 1) {  // sum the slices: slice 0's warp of each group finishes
        if (lane == 0) {
            #pragma unroll
            for (int m = 0; m < M; ++m) {
                part[(warp * (R + 1) + R) * M + m] = ss[m];
                #pragma unroll
                for (int r = 0; r < R; ++r) part[(warp * (R + 1) + r) * M + m] = acc[r][m];
            }
        }
        __syncthreads();
        if (slice != 0) return;
        #pragma unroll
        for (int m = 0; m < M; ++m) {
            #pragma unroll
            for (int r = 0; r <= R; ++r) {
                float v = 0.f;
                #pragma unroll
                for (int s = 0; s < KS; ++s) v += part[((warp + s) * (R + 1) + r) * M + m];
                if (r == R) ss[m] = v; else acc[r][m] = v;
            }
        }
    }
    write_rows<T, M, R, ACT>(acc, ss, rowid, unit, lane, rows, K, N, norm, eps, residual, bias, y);
}

// 16 bytes of packed weights as VALS = 128 / BITS floats q (the unsigned codes): 4 bits, element 2j in the
// low nibble of byte j; 8 bits, one byte each (com.microsoft MatMulNBits' B)
template <int BITS>
__device__ __forceinline__ void unpack_codes(const uint4& raw, float* q) {
    const unsigned int w[4] = {raw.x, raw.y, raw.z, raw.w};
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        #pragma unroll
        for (int j = 0; j < 32 / BITS; ++j) q[i * (32 / BITS) + j] = (float)((w[i] >> (BITS * j)) & ((1u << BITS) - 1u));
    }
}

// The zero point of block `blk` of row n (MatMulNBits' packing; 2^(BITS-1) without zero points).
template <int BITS>
__device__ __forceinline__ float zero_point(const unsigned char* zp, int n, int blk, int k_blocks) {
    if (zp == nullptr) return (float)(1 << (BITS - 1));
    if (BITS == 8) return (float)zp[(size_t)n * k_blocks + blk];
    const unsigned char b = zp[(size_t)n * ((k_blocks + 1) / 2) + blk / 2];
    return (float)((blk & 1) ? (b >> 4) : (b & 15));
}

// Linear with a packed weight, rows m < `rows`: linear_gemv's scheme with one warp per R rows over K (no
// K slices). A chunk is one lane's 16-byte load: VALS codes of one block (block_size is a multiple of
// VALS), whose dot product with x is scaled once: scale * (sum q x - zero_point * sum x).
template <typename T, int M, int R, int BITS, int ACT>
__global__ void __launch_bounds__(256) linear_nbits_gemv(
        const T* __restrict__ x, const unsigned char* __restrict__ w, const T* __restrict__ scales,
        const unsigned char* __restrict__ zp, const T* __restrict__ gamma, const T* __restrict__ residual,
        const T* __restrict__ bias, T* __restrict__ y, int rows, int K, int N, int block_size, int norm, float eps) {
    constexpr int VEC = 16 / sizeof(T), VALS = 128 / BITS, XL = VALS / VEC, U = 4;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int unit = blockIdx.x * 8 + warp;
    const int half = N / 2;
    int rowid[R];
    #pragma unroll
    for (int r = 0; r < R; ++r) rowid[r] = ACT ? (unit < half ? unit + r * half : N) : unit * R + r;
    const int k_blocks = (K + block_size - 1) / block_size;
    const size_t row_bytes = (size_t)k_blocks * block_size * BITS / 8;
    const int chunks = K / VALS;  // the host checks K % VALS == 0

    float acc[R][M], ss[M];
    #pragma unroll
    for (int m = 0; m < M; ++m) {
        ss[m] = 0.f;
        #pragma unroll
        for (int r = 0; r < R; ++r) acc[r][m] = 0.f;
    }
    for (int base = 0; base < chunks; base += 32 * U) {
        uint4 buf[R][U];
        float scale[R][U], zero[R][U];
        #pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = base + u * 32 + lane;
            #pragma unroll
            for (int r = 0; r < R; ++r) {
                const bool ok = c < chunks && rowid[r] < N;
                buf[r][u] = ok ? __ldcs(reinterpret_cast<const uint4*>(w + rowid[r] * row_bytes + (size_t)c * 16))
                               : make_uint4(0u, 0u, 0u, 0u);
            }
        }
        #pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = base + u * 32 + lane;
            const int blk = c * VALS / block_size;
            #pragma unroll
            for (int r = 0; r < R; ++r) {
                const bool ok = c < chunks && rowid[r] < N;
                scale[r][u] = ok ? to_f(scales[(size_t)rowid[r] * k_blocks + blk]) : 0.f;
                zero[r][u] = ok ? zero_point<BITS>(zp, rowid[r], blk, k_blocks) : 0.f;
            }
        }
        #pragma unroll
        for (int m = 0; m < M; ++m) {
            if (m >= rows) break;
            #pragma unroll
            for (int u = 0; u < U; ++u) {
                const int c = base + u * 32 + lane;
                if (c >= chunks) continue;
                const int k0 = c * VALS;
                float xf[VALS];
                #pragma unroll
                for (int l = 0; l < XL; ++l)
                    unpack(__ldg(reinterpret_cast<const uint4*>(x + (size_t)m * K + k0 + l * VEC)), xf + l * VEC, x);
                if (norm) {
                    #pragma unroll
                    for (int l = 0; l < XL; ++l) {
                        float gf[VEC];
                        unpack(__ldg(reinterpret_cast<const uint4*>(gamma + k0 + l * VEC)), gf, x);
                        #pragma unroll
                        for (int i = 0; i < VEC; ++i) { ss[m] = fmaf(xf[l * VEC + i], xf[l * VEC + i], ss[m]); xf[l * VEC + i] *= gf[i]; }
                    }
                }
                float sx = 0.f;
                #pragma unroll
                for (int i = 0; i < VALS; ++i) sx += xf[i];
                #pragma unroll
                for (int r = 0; r < R; ++r) {
                    float q[VALS], dot = 0.f;
                    unpack_codes<BITS>(buf[r][u], q);
                    #pragma unroll
                    for (int i = 0; i < VALS; ++i) dot = fmaf(q[i], xf[i], dot);
                    acc[r][m] = fmaf(scale[r][u], dot - zero[r][u] * sx, acc[r][m]);
                }
            }
        }
    }
    #pragma unroll
    for (int m = 0; m < M; ++m) {
        #pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            ss[m] += __shfl_xor_sync(0xffffffffu, ss[m], o);
            #pragma unroll
            for (int r = 0; r < R; ++r) acc[r][m] += __shfl_xor_sync(0xffffffffu, acc[r][m], o);
        }
    }
    write_rows<T, M, R, ACT>(acc, ss, rowid, unit, lane, rows, K, N, norm, eps, residual, bias, y);
}

// W [N, K] in the dtype from a packed weight (prefill's GEMM input); grid: (ceil(K / 256), N).
template <typename T, int BITS>
__global__ void linear_dequantize(const unsigned char* __restrict__ w, const T* __restrict__ scales,
                                  const unsigned char* __restrict__ zp, T* __restrict__ out, int K, int block_size) {
    const int n = blockIdx.y, k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= K) return;
    const int k_blocks = (K + block_size - 1) / block_size, blk = k / block_size;
    const size_t row_bytes = (size_t)k_blocks * block_size * BITS / 8;
    const unsigned char b = w[n * row_bytes + (size_t)k * BITS / 8];
    const float q = BITS == 8 ? (float)b : (float)((k & 1) ? (b >> 4) : (b & 15));
    store(out + (size_t)n * K + k, (q - zero_point<BITS>(zp, n, blk, k_blocks)) * to_f(scales[(size_t)n * k_blocks + blk]));
}

// The same, one 16-byte vector of output per thread (16 / sizeof(T) values, 2 to 8 bytes of codes of one
// quantization block: K and block_size multiples of the vector, w 8-byte aligned): a warp's loads and
// stores are each one contiguous span. grid: (N, ceil(K / VEC / blockDim)). The arithmetic is
// linear_dequantize's, value for value.
template <typename T, int BITS>
__global__ void linear_dequantize_out16(const unsigned char* __restrict__ w, const T* __restrict__ scales,
                                        const unsigned char* __restrict__ zp, T* __restrict__ out, int K,
                                        int block_size) {
    constexpr int VEC = 16 / sizeof(T), BYTES = VEC * BITS / 8;
    const int n = blockIdx.x, k0 = (blockIdx.y * blockDim.x + threadIdx.x) * VEC;
    if (k0 >= K) return;
    const int k_blocks = (K + block_size - 1) / block_size, blk = k0 / block_size;
    const size_t row_bytes = (size_t)k_blocks * block_size * BITS / 8;
    const unsigned char* src = w + n * row_bytes + (size_t)k0 * BITS / 8;
    unsigned long long codes;
    if (BYTES == 8) codes = __ldcs(reinterpret_cast<const unsigned long long*>(src));
    else if (BYTES == 4) codes = __ldcs(reinterpret_cast<const unsigned int*>(src));
    else codes = __ldcs(reinterpret_cast<const unsigned short*>(src));
    const float sc = to_f(scales[(size_t)n * k_blocks + blk]), z = zero_point<BITS>(zp, n, blk, k_blocks);
    float f[VEC];
    #pragma unroll
    for (int j = 0; j < VEC; ++j) f[j] = ((float)(unsigned int)((codes >> (j * BITS)) & ((1ull << BITS) - 1ull)) - z) * sc;
    *reinterpret_cast<uint4*>(out + (size_t)n * K + k0) = pack(f, out);
}

// The same a 16-byte chunk of codes per thread (128 / BITS values of one quantization block: K and
// block_size multiples of 128 / BITS), grid-stride over N * K / (128 / BITS) chunks.
template <typename T, int BITS>
__global__ void linear_dequantize_vec(const unsigned char* __restrict__ w, const T* __restrict__ scales,
                                      const unsigned char* __restrict__ zp, T* __restrict__ out, int K, int N,
                                      int block_size) {
    constexpr int VALS = 128 / BITS, VEC = 16 / sizeof(T);
    const int chunks = K / VALS, k_blocks = (K + block_size - 1) / block_size;
    const size_t row_bytes = (size_t)k_blocks * block_size * BITS / 8;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (long long)N * chunks;
         i += (long long)gridDim.x * blockDim.x) {
        const int n = (int)(i / chunks), c = (int)(i - (long long)n * chunks), blk = c * VALS / block_size;
        const uint4 v = __ldcs(reinterpret_cast<const uint4*>(w + n * row_bytes + (size_t)c * 16));
        const float sc = to_f(scales[(size_t)n * k_blocks + blk]), z = zero_point<BITS>(zp, n, blk, k_blocks);
        const unsigned int words[4] = {v.x, v.y, v.z, v.w};
        T* dst = out + (size_t)n * K + (size_t)c * VALS;
        #pragma unroll
        for (int j0 = 0; j0 < VALS; j0 += VEC) {  // 16 bytes of output at a time
            float f[VEC];
            #pragma unroll
            for (int j = 0; j < VEC; ++j) {
                const int bit = (j0 + j) * BITS;
                f[j] = ((float)((words[bit >> 5] >> (bit & 31)) & ((1u << BITS) - 1u)) - z) * sc;
            }
            *reinterpret_cast<uint4*>(dst + j0) = pack(f, dst);
        }
    }
}
"""
