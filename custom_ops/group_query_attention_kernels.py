"""CUDA C of onnxopt::GroupQueryAttention (custom_ops/group_query_attention.py: spec, reference, the
launch plan and the host side), compiled by NVRTC through CuPy:

- `gqa_rope_append` (prefill): rotary for q and k, q to a scratch buffer, k and v into the caches;
  `gqa_rope_append_vec` the same in 16-byte slices (head sizes 64 and 128).
- `gqa_attend` (any head size) and `gqa_attend_vec` (head sizes 64, 128; 16-byte loads, every key of a
  decode block in one round): one block per (split, kv head, token); scores in shared memory, softmax,
  P.V; in decode they rotate and append the new key themselves.
- `gqa_decode_vec` (decode, head sizes 64, 128): the same in one pass through registers, the new key
  patched into its slot, a per-warp softmax merged flash-style, and the wait of a dependent launch
  after the loads no earlier kernel writes.
- `epilogue` (all attention kernels): one split's output, or its partials and the merge of all
  splits by the last block to finish.
- `gqa_flash_prefill` (prefill, float16, head sizes 64 and 128): flash attention on the tensor cores
  (mma.sync m16n8k16, float32 accumulators), one block per 16 x WARPS query rows of one head, key/value
  tiles of 64 rows streamed through shared memory by cp.async, the softmax online in registers; the
  causal / window / cache mask only on the tiles some row of the block needs it for (SKIP).
"""

from __future__ import annotations

from onnxopt.custom_ops.cuda import HALF_PRELUDE

SOURCE = HALF_PRELUDE + r"""
#define NEG_INF (__int_as_float(0xff800000))

__device__ __forceinline__ int past_of(const int* seqlens, int b, int S, int first) {
    return first ? 0 : seqlens[b] + 1 - S;
}

// x[d] of one head's vector after the rotary at `pos` (non-interleaved; past the table: unrotated).
template <typename T>
__device__ __forceinline__ float rope(const T* x, int d, int pos, const T* cos, const T* sin, int R, int P, int rotary) {
    float y = to_f(x[d]);
    if (rotary && d < 2 * R && pos >= 0 && pos < P) {
        const int j = d < R ? d : d - R;
        const float c = to_f(cos[(long long)pos * R + j]), s = to_f(sin[(long long)pos * R + j]);
        y = d < R ? y * c - to_f(x[d + R]) * s : y * c + to_f(x[d - R]) * s;
    }
    return y;
}

// Where prefill token i of row b goes for one head of q | k | v: qout [B,S,H,D] for q, the caches
// [B,Hk,T,D] at the token's position for k and v (nullptr past the caches)
template <typename T>
__device__ __forceinline__ T* append_dst(T* kcache, T* vcache, T* qout, int head, int i, int b, int pos, int S,
                                         int H, int Hk, int D, int Tcap) {
    if (head < H) return qout + (((long long)b * S + i) * H + head) * D;
    if (pos < 0 || pos >= Tcap) return nullptr;
    const int g = head < H + Hk ? head - H : head - H - Hk;
    return (head < H + Hk ? kcache : vcache) + (((long long)b * Hk + g) * Tcap + pos) * D;
}

// Prefill: one block per (head of q | k | v, token i, row b): rotary for q and k, q to qout
// [B,S,H,D], k and v into the caches [B,Hk,T,D] at the token's position.
template <typename T>
__global__ void gqa_rope_append(const T* qkv, const T* cos, const T* sin, const int* seqlens,
                                T* kcache, T* vcache, T* qout, int S, int H, int Hk, int D, int R, int P,
                                int Tcap, int first, int rotary) {
    const int head = blockIdx.x, i = blockIdx.y, b = blockIdx.z;
    const int pos = past_of(seqlens, b, S, first) + i;
    const T* x = qkv + ((long long)b * S + i) * (H + 2 * Hk) * D + (long long)head * D;
    T* dst = append_dst(kcache, vcache, qout, head, i, b, pos, S, H, Hk, D, Tcap);
    if (dst == nullptr) return;
    const int rot = rotary && head < H + Hk;
    for (int d = threadIdx.x; d < D; d += blockDim.x) store(dst + d, rope(x, d, pos, cos, sin, R, P, rot));
}

// --- attention: one block per (split, kv head g, token z = b*S + i) ---------------------------------
// Query heads g*G .. g*G+G-1 of token z over keys [lo, n), restricted to this split's chunk
// [split*chunk, split*chunk + chunk). Prefill (fused = 0) reads the rotated queries from qbuf, the caches
// already appended. Decode (fused = 1, S = 1) does the rotary itself from qkv, and the block whose chunk
// holds the new position appends its key and value before reading them: one launch per layer.
// Shared memory: q [G][D], p [G][chunk] (scores, then weights), red [rows][G][D] (P.V partial sums).
struct Span { int b, i, pos, start, count; };

template <typename T>
__device__ Span prologue(float* q, const T* qbuf, T* kcache, T* vcache, const int* seqlens, int S, int H, int Hk,
                         int D, int Tcap, int chunk, int first, int window, float scale, int fused, const T* qkv,
                         const T* cos, const T* sin, int R, int P, int rotary) {
    const int G = H / Hk, split = blockIdx.x, g = blockIdx.y, z = blockIdx.z, tid = threadIdx.x;
    Span sp;
    sp.b = z / S; sp.i = z - sp.b * S;
    sp.pos = past_of(seqlens, sp.b, S, first) + sp.i;
    const int n = min(sp.pos + 1, Tcap);
    const int lo = window >= 0 ? max(0, sp.pos + 1 - window) : 0;
    sp.start = max(lo, split * chunk);
    sp.count = max(0, min(n, split * chunk + chunk) - sp.start);
    if (fused) {
        const T* row = qkv + (long long)z * (H + 2 * Hk) * D;
        for (int e = tid; e < G * D; e += blockDim.x) {
            const int j = e / D, d = e - j * D;
            q[e] = round_to(rope(row + (long long)(g * G + j) * D, d, sp.pos, cos, sin, R, P, rotary), qkv) * scale;
        }
        if (split == sp.pos / chunk && sp.pos < Tcap) {
            const long long at = (((long long)sp.b * Hk + g) * Tcap + sp.pos) * D;
            for (int d = tid; d < D; d += blockDim.x) {
                store(kcache + at + d, rope(row + (long long)(H + g) * D, d, sp.pos, cos, sin, R, P, rotary));
                vcache[at + d] = row[(long long)(H + Hk + g) * D + d];
            }
        }
    } else {
        for (int e = tid; e < G * D; e += blockDim.x) {
            const int j = e / D, d = e - j * D;
            q[e] = to_f(qbuf[((long long)z * H + g * G + j) * D + d]) * scale;
        }
    }
    __syncthreads();  // also: this block's own appended key and value are visible to it
    return sp;
}

// Scores p[j][t] -> exp(p - m_j), with m_j, l_j (max, sum) per head: one warp per head.
__device__ void softmax_pieces(float* p, int count, int chunk, int G, float* m_s, float* l_s) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int j = warp; j < G; j += warps) {
        float m = NEG_INF;
        for (int t = lane; t < count; t += 32) m = fmaxf(m, p[j * chunk + t]);
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        float l = 0.0f;
        for (int t = lane; t < count; t += 32) {
            const float e = __expf(p[j * chunk + t] - m);
            p[j * chunk + t] = e;
            l += e;
        }
        for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
        if (lane == 0) { m_s[j] = m; l_s[j] = l; }
    }
    __syncthreads();
}

// red[0..G*D) = sum over `rows` of red[r][.]; then the output (one split) or this split's partial and,
// in the last block of (z, g) to finish, the merge of all splits.
template <typename T>
__device__ void epilogue(float* red, int rows, const float* m_s, const float* l_s, T* out, float* part_m,
                         float* part_l, float* part_acc, int* counters, int H, int Hk, int D, int splits) {
    __shared__ int last;
    const int G = H / Hk, split = blockIdx.x, g = blockIdx.y, z = blockIdx.z, tid = threadIdx.x;
    for (int e = tid; e < G * D; e += blockDim.x) {
        float s = 0.0f;
        for (int r = 0; r < rows; ++r) s += red[r * G * D + e];
        red[e] = s;  // row 0's slot: only this thread reads and writes index e
    }
    __syncthreads();
    if (splits == 1) {
        for (int e = tid; e < G * D; e += blockDim.x) {
            const int j = e / D, dd = e - j * D;
            const float l = l_s[j];
            store(out + ((long long)z * H + g * G + j) * D + dd, l > 0.0f ? red[e] / l : 0.0f);
        }
        return;
    }
    for (int e = tid; e < G * D; e += blockDim.x) {
        const int j = e / D, dd = e - j * D;
        const long long slot = ((long long)z * H + g * G + j) * splits + split;
        part_acc[slot * D + dd] = red[e];
        if (dd == 0) { part_m[slot] = m_s[j]; part_l[slot] = l_s[j]; }
    }
    __threadfence();
    __syncthreads();
    if (tid == 0) last = atomicAdd(counters + (long long)z * Hk + g, 1) == splits - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    // the other blocks' partials: read through L2 (__ldcg), never from this SM's L1
    for (int e = tid; e < G * D; e += blockDim.x) {
        const int j = e / D, dd = e - j * D;
        const long long base = ((long long)z * H + g * G + j) * splits;
        float m = NEG_INF;
        for (int s = 0; s < splits; ++s) m = fmaxf(m, __ldcg(part_m + base + s));
        float l = 0.0f, acc = 0.0f;
        for (int s = 0; s < splits; ++s) {
            const float ls = __ldcg(part_l + base + s);
            const float w = ls > 0.0f ? __expf(__ldcg(part_m + base + s) - m) : 0.0f;
            l += ls * w;
            acc += w > 0.0f ? __ldcg(part_acc + (base + s) * D + dd) * w : 0.0f;
        }
        store(out + ((long long)z * H + g * G + j) * D + dd, l > 0.0f ? acc / l : 0.0f);
    }
    if (tid == 0) counters[(long long)z * Hk + g] = 0;
}

#define ATTEND_PARAMS const T* qbuf, T* kcache, T* vcache, const int* seqlens, T* out, float* part_m, \
    float* part_l, float* part_acc, int* counters, int S, int H, int Hk, int D, int Tcap, int chunk, int splits, \
    int first, int window, float scale, int fused, const T* qkv, const T* cos, const T* sin, int R, int P, int rotary, \
    const unsigned char* pf, unsigned int pf_lines
#define PROLOGUE_ARGS q, qbuf, kcache, vcache, seqlens, S, H, Hk, D, Tcap, chunk, first, window, scale, fused, \
    qkv, cos, sin, R, P, rotary

// Any head size: a warp per key for the scores, a thread per (key group, d) for P.V. Red rows:
// max(1, blockDim / D).
template <typename T>
__global__ void gqa_attend(ATTEND_PARAMS) {
    extern __shared__ float smem[];
    __shared__ float m_s[8], l_s[8];
    const int G = H / Hk, g = blockIdx.y;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;
    float* q = smem;
    float* p = q + G * D;
    float* red = p + G * chunk;
    const Span sp = prologue(PROLOGUE_ARGS);
    const T* kbase = kcache + ((long long)sp.b * Hk + g) * Tcap * D + (long long)sp.start * D;
    const T* vbase = vcache + ((long long)sp.b * Hk + g) * Tcap * D + (long long)sp.start * D;
    for (int t = warp; t < sp.count; t += warps) {
        float acc[8];
        #pragma unroll
        for (int j = 0; j < 8; ++j) acc[j] = 0.0f;
        for (int d = lane; d < D; d += 32) {
            const float kv = to_f(kbase[(long long)t * D + d]);
            #pragma unroll
            for (int j = 0; j < 8; ++j) if (j < G) acc[j] += q[j * D + d] * kv;
        }
        #pragma unroll
        for (int j = 0; j < 8; ++j) {
            if (j < G) {
                float v = acc[j];
                for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
                if (lane == 0) p[j * chunk + t] = v;
            }
        }
    }
    __syncthreads();
    softmax_pieces(p, sp.count, chunk, G, m_s, l_s);
    const int rows = blockDim.x / D > 0 ? blockDim.x / D : 1;
    const int grp = tid / D, d = tid - grp * D;
    if (grp < rows) {
        for (int dd = d; dd < D; dd += blockDim.x) {
            float acc[8];
            #pragma unroll
            for (int j = 0; j < 8; ++j) acc[j] = 0.0f;
            for (int t = grp; t < sp.count; t += rows) {
                const float vv = to_f(vbase[(long long)t * D + dd]);
                #pragma unroll
                for (int j = 0; j < 8; ++j) if (j < G) acc[j] += p[j * chunk + t] * vv;
            }
            #pragma unroll
            for (int j = 0; j < 8; ++j) if (j < G) red[(grp * G + j) * D + dd] = acc[j];
        }
    }
    __syncthreads();
    epilogue(red, rows, m_s, l_s, out, part_m, part_l, part_acc, counters, H, Hk, D, splits);
}

// 16-byte loads of VEC = 16 / sizeof(T) elements, as floats.
template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float* f) { unpack(*reinterpret_cast<const uint4*>(p), f, p); }

// Head size DH (a multiple of VEC = 16 / sizeof(T), DH / VEC <= 32) and GQ query heads per kv head,
// both compile-time (registers). TPR = DH / VEC threads read one key row with one 16-byte load each,
// KPW = 32 / TPR rows per warp, U rows per thread in flight: a round covers ROUND = warps * KPW * U
// keys. The loop is latency-bound, so a launch sizes its block for one round when it can (decode):
// then the values are loaded together with the keys, and the block makes one trip to memory. The
// scores reduce over the TPR lanes of a row, P.V over the KPW rows of a warp by shuffles, then over
// the warps in shared memory (red rows: blockDim / 32).
template <typename T, int DH, int GQ, int U>
__global__ void __launch_bounds__(512) gqa_attend_vec(ATTEND_PARAMS) {
    constexpr int VEC = 16 / sizeof(T), TPR = DH / VEC, KPW = 32 / TPR;
    extern __shared__ float smem[];
    __shared__ float m_s[8], l_s[8];
    const int G = GQ, g = blockIdx.y;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;
    const int sub = lane % TPR, kw = lane / TPR, stride = warps * KPW;
    float* q = smem;
    float* p = q + G * DH;
    float* red = p + G * chunk;
    const Span sp = prologue(PROLOGUE_ARGS);
    const T* kbase = kcache + ((long long)sp.b * Hk + g) * Tcap * DH + (long long)sp.start * DH + sub * VEC;
    const T* vbase = vcache + ((long long)sp.b * Hk + g) * Tcap * DH + (long long)sp.start * DH + sub * VEC;
    const bool single = sp.count <= stride * U;  // uniform: one round holds every key of the block
    float vv[U][VEC];
    for (int base = warp * KPW; base < sp.count; base += stride * U) {  // uniform per warp
        float kv[U][VEC];
        #pragma unroll
        for (int u = 0; u < U; ++u) {
            const int t = base + u * stride + kw;
            if (t < sp.count) {
                load_vec(kbase + (long long)t * DH, kv[u]);
                if (single) load_vec(vbase + (long long)t * DH, vv[u]);
            }
        }
        #pragma unroll
        for (int u = 0; u < U; ++u) {
            const int t = base + u * stride + kw;
            float acc[GQ];
            #pragma unroll
            for (int j = 0; j < GQ; ++j) {
                acc[j] = 0.0f;
                if (t < sp.count) {
                    #pragma unroll
                    for (int e = 0; e < VEC; ++e) acc[j] += q[j * DH + sub * VEC + e] * kv[u][e];
                }
                #pragma unroll
                for (int o = TPR / 2; o > 0; o >>= 1) acc[j] += __shfl_xor_sync(0xffffffffu, acc[j], o);
                if (sub == 0 && t < sp.count) p[j * chunk + t] = acc[j];
            }
        }
    }
    __syncthreads();
    softmax_pieces(p, sp.count, chunk, G, m_s, l_s);
    float acc[GQ][VEC];
    #pragma unroll
    for (int j = 0; j < GQ; ++j)
        #pragma unroll
        for (int e = 0; e < VEC; ++e) acc[j][e] = 0.0f;
    for (int base = warp * KPW; base < sp.count; base += stride * U) {
        if (!single) {
            #pragma unroll
            for (int u = 0; u < U; ++u) {
                const int t = base + u * stride + kw;
                if (t < sp.count) load_vec(vbase + (long long)t * DH, vv[u]);
            }
        }
        #pragma unroll
        for (int u = 0; u < U; ++u) {
            const int t = base + u * stride + kw;
            if (t < sp.count) {
                #pragma unroll
                for (int j = 0; j < GQ; ++j) {
                    const float w = p[j * chunk + t];
                    #pragma unroll
                    for (int e = 0; e < VEC; ++e) acc[j][e] += w * vv[u][e];
                }
            }
        }
    }
    #pragma unroll
    for (int j = 0; j < GQ; ++j) {
        #pragma unroll
        for (int e = 0; e < VEC; ++e) {
            #pragma unroll
            for (int o = TPR; o < 32; o <<= 1) acc[j][e] += __shfl_xor_sync(0xffffffffu, acc[j][e], o);
            if (kw == 0) red[(warp * G + j) * DH + sub * VEC + e] = acc[j][e];
        }
    }
    __syncthreads();
    epilogue(red, warps, m_s, l_s, out, part_m, part_l, part_acc, counters, H, Hk, DH, splits);
}

// --- decode in one pass (S == 1): one block per (split, kv head g, row z), every key of the block's
// chunk in one round of loads (as gqa_attend_vec's decode launch), but without its shared-memory
// trips: the chain is seqlens -> (cache rows, rotary tables), then (past a dependent launch's wait)
// the query heads' qkv rows. Each thread rotates its own VEC-wide slice of the GQ queries in registers; the thread that holds
// the new position rotates the new key itself (rounded to T, as stored), appends key and value to the
// caches and uses them in place of the stale slot. Softmax runs per warp (max and sum over the warp's
// KPW x U keys by shuffles, then P.V), the warps merge in shared memory (flash-style rescale), and
// the split merge is epilogue()'s.
__device__ __forceinline__ uint4 ld16(const void* p) { return *reinterpret_cast<const uint4*>(p); }
// y = the slice y of a head rotated with its partner slice o (the other half) and the tables' c, s
template <int VEC>
__device__ __forceinline__ void rotate(float* y, const float* o, const float* c, const float* s, bool low) {
    #pragma unroll
    for (int e = 0; e < VEC; ++e) y[e] = low ? y[e] * c[e] - o[e] * s[e] : y[e] * c[e] + o[e] * s[e];
}

template <typename T, int DH, int GQ, int U>
__global__ void __launch_bounds__(512) gqa_decode_vec(ATTEND_PARAMS) {
    if (pf_lines) prefetch_l2(pf, pf_lines);  // a later kernel's weights into L2 (runtime/device_graph.py)
    constexpr int VEC = 16 / sizeof(T), TPR = DH / VEC, KPW = 32 / TPR;
    extern __shared__ float red[];  // [warps][GQ][DH]
    __shared__ float m_w[16 * GQ], l_w[16 * GQ], m_s[GQ], l_s[GQ];
    const int split = blockIdx.x, g = blockIdx.y, z = blockIdx.z;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;
    const int sub = lane % TPR, kw = lane / TPR, stride = warps * KPW, d0 = sub * VEC;
    const int b = z / S, i = z - b * S;
    const T* row = qkv + (long long)z * (H + 2 * Hk) * DH;
    const bool rot = rotary && d0 < 2 * R, low = d0 < R;
    const int partner = low ? d0 + R : d0 - R;
    const int pos = past_of(seqlens, b, S, first) + i;
    const int n = min(pos + 1, Tcap);
    const int lo = window >= 0 ? max(0, pos + 1 - window) : 0;
    const int start = max(lo, split * chunk);
    const int count = max(0, min(n, split * chunk + chunk) - start);
    const long long head = ((long long)b * Hk + g) * Tcap;
    uint4 kr[U], vr[U];
    #pragma unroll
    for (int u = 0; u < U; ++u) {
        const int r = warp * KPW + u * stride + kw;
        kr[u] = vr[u] = make_uint4(0u, 0u, 0u, 0u);
        if (r < count && start + r != pos) {
            kr[u] = ld16(kcache + (head + start + r) * DH + d0);
            vr[u] = ld16(vcache + (head + start + r) * DH + d0);
        }
    }
    const bool tabled = rot && pos >= 0 && pos < P;
    float c[VEC], sn[VEC];
    if (tabled) {
        const long long at = (long long)pos * R + (low ? d0 : d0 - R);
        unpack(ld16(cos + at), c, row);
        unpack(ld16(sin + at), sn, row);
    }
    // A dependent launch (custom_ops/cuda.py) waits here for the kernel before it (the q/k/v projection,
    // which writes qkv only): seqlens, the cache rows before pos and the tables are older than it.
    grid_wait();
    uint4 qx[GQ], qo[GQ];
    #pragma unroll
    for (int j = 0; j < GQ; ++j) {
        const T* x = row + (long long)(g * GQ + j) * DH;
        qx[j] = ld16(x + d0);
        qo[j] = rot ? ld16(x + partner) : qx[j];
    }
    #pragma unroll
    for (int u = 0; u < U; ++u) {
        const int r = warp * KPW + u * stride + kw;
        if (r < count && start + r == pos) {  // the new key and value (pos < Tcap: r < count)
            const T* kx = row + (long long)(H + g) * DH;
            float y[VEC];
            unpack(ld16(kx + d0), y, row);
            if (tabled) {
                float o[VEC];
                unpack(ld16(kx + partner), o, row);
                rotate<VEC>(y, o, c, sn, low);
            }
            kr[u] = pack(y, row);
            vr[u] = ld16(row + (long long)(H + Hk + g) * DH + d0);
            *reinterpret_cast<uint4*>(kcache + (head + pos) * DH + d0) = kr[u];
            *reinterpret_cast<uint4*>(vcache + (head + pos) * DH + d0) = vr[u];
        }
    }
    float qf[GQ][VEC];
    #pragma unroll
    for (int j = 0; j < GQ; ++j) {
        unpack(qx[j], qf[j], row);
        if (tabled) {
            float o[VEC];
            unpack(qo[j], o, row);
            rotate<VEC>(qf[j], o, c, sn, low);
        }
        #pragma unroll
        for (int e = 0; e < VEC; ++e) qf[j][e] = round_to(qf[j][e], row) * scale;
    }
    float sc[U][GQ];
    #pragma unroll
    for (int u = 0; u < U; ++u) {
        const bool valid = warp * KPW + u * stride + kw < count;  // uniform over the TPR lanes of a row
        float kf[VEC];
        unpack(kr[u], kf, row);
        #pragma unroll
        for (int j = 0; j < GQ; ++j) {
            float a = 0.0f;
            #pragma unroll
            for (int e = 0; e < VEC; ++e) a += qf[j][e] * kf[e];
            #pragma unroll
            for (int o = TPR / 2; o > 0; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
            sc[u][j] = valid ? a : NEG_INF;
        }
    }
    float acc[GQ][VEC];
    #pragma unroll
    for (int j = 0; j < GQ; ++j) {
        float m = NEG_INF;
        #pragma unroll
        for (int u = 0; u < U; ++u) m = fmaxf(m, sc[u][j]);
        #pragma unroll
        for (int o = TPR; o < 32; o <<= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        float l = 0.0f;
        #pragma unroll
        for (int e = 0; e < VEC; ++e) acc[j][e] = 0.0f;
        #pragma unroll
        for (int u = 0; u < U; ++u) {
            const float p = sc[u][j] == NEG_INF ? 0.0f : __expf(sc[u][j] - m);
            l += p;
            float vf[VEC];
            unpack(vr[u], vf, row);
            #pragma unroll
            for (int e = 0; e < VEC; ++e) acc[j][e] += p * vf[e];
        }
        #pragma unroll
        for (int o = TPR; o < 32; o <<= 1) {
            l += __shfl_xor_sync(0xffffffffu, l, o);
            #pragma unroll
            for (int e = 0; e < VEC; ++e) acc[j][e] += __shfl_xor_sync(0xffffffffu, acc[j][e], o);
        }
        if (kw == 0) {
            #pragma unroll
            for (int e = 0; e < VEC; e += 4)
                *reinterpret_cast<float4*>(red + (warp * GQ + j) * DH + d0 + e) =
                    make_float4(acc[j][e], acc[j][e + 1], acc[j][e + 2], acc[j][e + 3]);
        }
        if (lane == 0) { m_w[warp * GQ + j] = m; l_w[warp * GQ + j] = l; }
    }
    __syncthreads();
    for (int e = tid; e < GQ * DH; e += blockDim.x) {
        const int j = e / DH;
        float M = NEG_INF;
        for (int w = 0; w < warps; ++w) M = fmaxf(M, m_w[w * GQ + j]);
        float L = 0.0f, A = 0.0f;
        for (int w = 0; w < warps; ++w) {
            const float mw = m_w[w * GQ + j];
            const float f = mw == NEG_INF ? 0.0f : __expf(mw - M);
            L += f * l_w[w * GQ + j];
            A += f * red[w * GQ * DH + e];
        }
        red[e] = A;  // row 0: only this thread reads and writes index e
        if (e - j * DH == 0) { m_s[j] = M; l_s[j] = L; }
    }
    __syncthreads();
    epilogue(red, 1, m_s, l_s, out, part_m, part_l, part_acc, counters, H, Hk, DH, splits);
}

// --- prefill's rotary + append in 16-byte slices (head sizes 64 and 128) --------------------------------
// What gqa_rope_append does one element a thread, a VEC-wide slice a thread: thread t of block (x, i, b)
// takes slice x * blockDim + t of token i's H + 2 Hk heads, rotates a q or k slice with its partner slice
// (the other half of the rotary) and the tables' slices at the token's position, and stores it to qout
// or the caches with one 16-byte store. Needs the rotary half-width a multiple of VEC and every buffer
// 16-byte aligned (the host checks); the unrotated slices are copied bit for bit.
template <typename T, int DH>
__global__ void gqa_rope_append_vec(const T* __restrict__ qkv, const T* __restrict__ cos, const T* __restrict__ sin,
                                    const int* seqlens, T* kcache, T* vcache, T* qout, int S, int H, int Hk, int R,
                                    int P, int Tcap, int first, int rotary) {
    constexpr int VEC = 16 / sizeof(T), TPR = DH / VEC;
    const int i = blockIdx.y, b = blockIdx.z;
    const int item = blockIdx.x * blockDim.x + threadIdx.x;
    if (item >= (H + 2 * Hk) * TPR) return;
    const int head = item / TPR, d0 = (item - head * TPR) * VEC;
    const int pos = past_of(seqlens, b, S, first) + i;
    const T* x = qkv + ((long long)b * S + i) * (H + 2 * Hk) * DH + (long long)head * DH;
    T* dst = append_dst(kcache, vcache, qout, head, i, b, pos, S, H, Hk, DH, Tcap);
    if (dst == nullptr) return;
    uint4 raw = __ldg(reinterpret_cast<const uint4*>(x + d0));
    if (rotary && head < H + Hk && d0 < 2 * R && pos >= 0 && pos < P) {
        const bool low = d0 < R;
        const long long at = (long long)pos * R + (low ? d0 : d0 - R);
        float y[VEC], o[VEC], c[VEC], sn[VEC];
        unpack(raw, y, x);
        unpack(__ldg(reinterpret_cast<const uint4*>(x + (low ? d0 + R : d0 - R))), o, x);
        unpack(__ldg(reinterpret_cast<const uint4*>(cos + at)), c, x);
        unpack(__ldg(reinterpret_cast<const uint4*>(sin + at)), sn, x);
        rotate<VEC>(y, o, c, sn, low);
        raw = pack(y, x);
    }
    *reinterpret_cast<uint4*>(dst + d0) = raw;
}

// --- prefill on the tensor cores: float16, head sizes 64 and 128 ---------------------------------------
// One block of WARPS warps per (16 WARPS query rows, query head h, row b); warp w owns rows 16w .. 16w
// + 15. The query tile passes through the key/value buffers into registers first; then the tile's keys
// [klo, khi) stream through shared memory in tiles of 64 rows (cp.async; the next key tile is in flight
// during the softmax and P.V, the next value tile during the next Q.K^T). Q.K^T and P.V are
// mma.sync m16n8k16 with float32 accumulators; the softmax runs online in registers (exp2, the max and
// sum per row over the 4 lanes that hold it), P rounded to float16 for P.V as in flash attention.
// Shared memory rows hold D / 8 chunks of 16 bytes, chunk c of row r at c ^ (r & 7), so the 8 rows one
// ldmatrix reads fall in 8 distinct bank groups.
__device__ __forceinline__ unsigned int smem_addr(const void* p) { return (unsigned int)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void cp_async16(unsigned int dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_wait_one() { asm volatile("cp.async.wait_group 1;\n" ::); }
__device__ __forceinline__ void cp_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }
__device__ __forceinline__ void ldsm4(unsigned int (&r)[4], unsigned int addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldsm4_t(unsigned int (&r)[4], unsigned int addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// Byte offset of chunk c of row r in a swizzled tile of DH-wide rows.
template <int DH>
__device__ __forceinline__ unsigned int tile_at(int r, int c) { return r * DH * 2 + ((c ^ (r & 7)) << 4); }

// Rows [t0, t0 + 64) of one head's cache into a tile; rows at or past `end` are zero-filled.
template <int DH>
__device__ __forceinline__ void load_tile(unsigned int dst, const half_bits* head, int t0, int end) {
    constexpr int CH = DH / 8;
    for (int e = threadIdx.x; e < 64 * CH; e += blockDim.x) {
        const int r = e / CH, c = e - r * CH, t = t0 + r;
        cp_async16(dst + tile_at<DH>(r, c), t < end ? head + (long long)t * DH + c * 8 : head, t < end);
    }
}

// S = Q.K^T of one key tile for the warp's 16 rows (float32 accumulators).
template <int DH>
__device__ __forceinline__ void flash_scores(float (&s)[8][4], const unsigned int (&qf)[DH / 16][4], unsigned int kt,
                                             int lane) {
    #pragma unroll
    for (int n = 0; n < 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
    #pragma unroll
    for (int k = 0; k < DH / 16; ++k) {
        #pragma unroll
        for (int n = 0; n < 8; n += 2) {
            unsigned int kb[4];
            ldsm4(kb, kt + tile_at<DH>(n * 8 + (lane & 7) + ((lane >> 4) << 3), 2 * k + ((lane >> 3) & 1)));
            mma16816(s[n], qf[k], kb[0], kb[1]);
            mma16816(s[n + 1], qf[k], kb[2], kb[3]);
        }
    }
}

template <bool B> struct cuda_bool { static constexpr bool value = B; };

// Mask (causal, window, cache end), the online softmax of the lane's rows (s[.][0..1]: row ra, [2..3]:
// ra + 8) and O += P.V with the value tile at vt. MASK false: every key of the tile is valid for every
// row of the warp (the caller checked), so the scores are only scaled, the same values as masked.
template <int DH, bool MASK>
__device__ __forceinline__ void flash_update(float (&s)[8][4], float (&o)[DH / 8][4], float (&m)[2], float (&l)[2],
                                             unsigned int vt, int t0, int pa, int loa, int lob, int khi, float sl2,
                                             int lane) {
    const int pb = pa + 8;
    float mx[2] = {m[0], m[1]};
    #pragma unroll
    for (int n = 0; n < 8; ++n) {
        #pragma unroll
        for (int c = 0; c < 4; ++c) {
            if (MASK) {
                const int t = t0 + n * 8 + 2 * (lane & 3) + (c & 1);
                const int p = c < 2 ? pa : pb, lo = c < 2 ? loa : lob;
                s[n][c] = t <= p && t >= lo && t < khi ? s[n][c] * sl2 : NEG_INF;
            } else {
                s[n][c] *= sl2;
            }
            mx[c >> 1] = fmaxf(mx[c >> 1], s[n][c]);
        }
    }
    float alpha[2], base[2];
    #pragma unroll
    for (int r = 0; r < 2; ++r) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
        base[r] = mx[r] == NEG_INF ? 0.f : mx[r];
        alpha[r] = exp2f(m[r] - base[r]);  // 0 while the row had no key (m = -inf)
        m[r] = mx[r];
        l[r] *= alpha[r];
    }
    #pragma unroll
    for (int d = 0; d < DH / 8; ++d) {
        o[d][0] *= alpha[0]; o[d][1] *= alpha[0]; o[d][2] *= alpha[1]; o[d][3] *= alpha[1];
    }
    #pragma unroll
    for (int n = 0; n < 8; ++n) {
        #pragma unroll
        for (int c = 0; c < 4; ++c) {
            s[n][c] = exp2f(s[n][c] - base[c >> 1]);
            l[c >> 1] += s[n][c];
        }
    }
    #pragma unroll
    for (int k = 0; k < 4; ++k) {
        const unsigned int pf[4] = {half2_of(s[2 * k][0], s[2 * k][1]), half2_of(s[2 * k][2], s[2 * k][3]),
                                    half2_of(s[2 * k + 1][0], s[2 * k + 1][1]), half2_of(s[2 * k + 1][2], s[2 * k + 1][3])};
        #pragma unroll
        for (int d = 0; d < DH / 8; d += 2) {
            unsigned int vb[4];
            ldsm4_t(vb, vt + tile_at<DH>(k * 16 + (lane & 7) + (((lane >> 3) & 1) << 3), d + (lane >> 4)));
            mma16816(o[d], pf, vb[0], vb[1]);
            mma16816(o[d + 1], pf, vb[2], vb[3]);
        }
    }
}

// STAGES 1: one key and one value buffer, the next key tile loading during the softmax and P.V, the next
// value tile during the next Q.K^T. STAGES 2: two of each, the whole next tile loading during this one's
// work (4 tiles of shared memory: the launch raises the kernel's dynamic shared memory limit).
// A tile needs the mask only where some key of it is invalid for some row of the block: past the
// smallest position (the diagonal), before the largest row's window start, or past the cache's end.
// With SKIP the others run flash_update<DH, false> (the same scores, without the compares).
template <int DH, int WARPS, int STAGES, int SKIP>
__global__ void __launch_bounds__(WARPS * 32, WARPS == 4 ? 3 : 1) gqa_flash_prefill(
        const half_bits* __restrict__ qbuf, const half_bits* __restrict__ kcache, const half_bits* __restrict__ vcache,
        const int* __restrict__ seqlens, half_bits* __restrict__ out, int S, int H, int Hk, int Tcap, int first,
        int window, float scale) {
    constexpr int BM = 16 * WARPS, BN = 64, CH = DH / 8, KD = DH / 16, DT = DH / 8, TILE = BN * DH * 2;
    static_assert(BM <= 2 * BN, "the query tile passes through the key and value buffers");
    extern __shared__ uint4 flash_smem[];  // STAGES key tiles, then STAGES value tiles (the Q tile first)
    const unsigned int ks = smem_addr(flash_smem), vs = ks + STAGES * TILE, qs = ks;
    const int tile = gridDim.x - 1 - blockIdx.x;  // the longest tiles first
    const int h = blockIdx.y, b = blockIdx.z, g = h / (H / Hk);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int past = first ? 0 : seqlens[b] + 1 - S;
    const int i0 = tile * BM, rows = min(BM, S - i0);
    const int khi = min(past + i0 + rows, Tcap);
    const int klo = window >= 0 ? max(0, past + i0 + 1 - window) : 0;
    const int kt0 = klo / BN * BN;
    const int tiles = khi > klo ? (khi - kt0 + BN - 1) / BN : 0;
    const half_bits* khead = kcache + ((long long)b * Hk + g) * Tcap * DH;
    const half_bits* vhead = vcache + ((long long)b * Hk + g) * Tcap * DH;

    for (int e = threadIdx.x; e < BM * CH; e += blockDim.x) {
        const int r = e / CH, c = e - r * CH;
        cp_async16(qs + tile_at<DH>(r, c), r < rows ? qbuf + (((long long)b * S + i0 + r) * H + h) * DH + c * 8 : qbuf,
                   r < rows);
    }
    cp_commit();
    cp_wait_all();
    __syncthreads();
    unsigned int qf[KD][4];
    #pragma unroll
    for (int k = 0; k < KD; ++k) ldsm4(qf[k], qs + tile_at<DH>(warp * 16 + (lane & 15), 2 * k + (lane >> 4)));
    __syncthreads();  // the Q tile is in registers: its buffers take the keys and values
    if (tiles > 0) load_tile<DH>(ks, khead, kt0, khi);
    if (STAGES == 1) cp_commit();  // STAGES 2: the first key and value tiles are one group
    if (tiles > 0) load_tile<DH>(vs, vhead, kt0, khi);
    cp_commit();

    const int ra = warp * 16 + (lane >> 2);  // this lane's rows: ra and ra + 8
    const int pa = past + i0 + ra;  // its position
    const int loa = window >= 0 ? pa + 1 - window : 0, lob = window >= 0 ? pa + 9 - window : 0;
    const float sl2 = scale * 1.4426950408889634f;  // scores in log2 units
    float o[DT][4], m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f}, sc[8][4];
    #pragma unroll
    for (int d = 0; d < DT; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;

    // One key/value tile: its scores, the online softmax and P.V, the next tile's loads. MASK false for
    // the tiles [ja, jb), valid for every row of the block (the same scores as masked).
    auto step = [&](int j, auto mask) {
        constexpr bool MASK = decltype(mask)::value;
        const int t0 = kt0 + j * BN;
        if (STAGES == 2) {
            const int buf = j & 1;
            if (j + 1 < tiles) {  // the next tile into the other buffers (free since the last barrier)
                load_tile<DH>(ks + (buf ^ 1) * TILE, khead, t0 + BN, khi);
                load_tile<DH>(vs + (buf ^ 1) * TILE, vhead, t0 + BN, khi);
            }
            cp_commit();
            cp_wait_one();  // this tile
            __syncthreads();
            flash_scores<DH>(sc, qf, ks + buf * TILE, lane);
            flash_update<DH, MASK>(sc, o, m, l, vs + buf * TILE, t0, pa, loa, lob, khi, sl2, lane);
            __syncthreads();  // every warp is done with this tile's buffers
        } else {
            cp_wait_one();  // this key tile
            __syncthreads();
            flash_scores<DH>(sc, qf, ks, lane);
            __syncthreads();  // every warp is done with the key tile
            if (j + 1 < tiles) load_tile<DH>(ks, khead, t0 + BN, khi);
            cp_commit();
            cp_wait_one();  // this value tile
            __syncthreads();
            flash_update<DH, MASK>(sc, o, m, l, vs, t0, pa, loa, lob, khi, sl2, lane);
            __syncthreads();  // every warp is done with the value tile
            if (j + 1 < tiles) load_tile<DH>(vs, vhead, t0 + BN, khi);
            cp_commit();
        }
    };
    // Block-uniform (every warp runs the same loops, so the barriers meet): tile j needs no mask where
    // t0 >= the last real row's window start, t0 + BN - 1 <= the first row's position, t0 + BN <= khi.
    int ja = 0, jb = 0;
    if (SKIP) {
        const int pmin = past + i0, lo_max = window >= 0 ? pmin + rows - window : 0;
        ja = lo_max > kt0 ? min(tiles, (lo_max - kt0 + BN - 1) / BN) : 0;
        const int hi = min(pmin + 1, khi);  // keys below hi are valid for every row (causal, cache)
        jb = max(ja, min(tiles, hi > kt0 ? (hi - kt0) / BN : 0));
    }
    for (int j = 0; j < ja; ++j) step(j, cuda_bool<true>{});
    for (int j = ja; j < jb; ++j) step(j, cuda_bool<false>{});
    for (int j = jb; j < tiles; ++j) step(j, cuda_bool<true>{});
    cp_wait_all();

    #pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        l[r] = l[r] > 0.f ? 1.f / l[r] : 0.f;
    }
    #pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = ra + 8 * r;
        if (row >= rows) continue;
        unsigned int* dst = reinterpret_cast<unsigned int*>(out + (((long long)b * S + i0 + row) * H + h) * DH);
        #pragma unroll
        for (int d = 0; d < DT; ++d)
            dst[(d * 8 + 2 * (lane & 3)) >> 1] = half2_of(o[d][2 * r] * l[r], o[d][2 * r + 1] * l[r]);
    }
}
"""
