"""`onnxopt::GroupQueryAttention` (opset 1): rotary, KV append and attention over a shared KV buffer.

The CUDA target's attention node. It has the interface and the arithmetic of the subset of
com.microsoft::GroupQueryAttention (ORT docs/ContribOperators.md) that our optimizer emits, so that
its decomposition is that node itself; what it changes is how the CUDA runtime runs it: in decode one
CuPy kernel per layer (rotary, append and attention split over the keys) instead of ORT's four
(sequence lengths, memset, unpack/rotary/append, attention), spreading short caches over more of the
GPU; in prefill two.

Spec
----
Inputs   qkv                    [B, S, (H + 2 Hk) D]  packed query | key | value of the new tokens
         past_key, past_value   [B, Hk, T, D]  one buffer per tensor, shared with the present outputs
         seqlens_k              [B] int32      tokens of row b after this step, minus 1 (n_b - 1)
         total_sequence_length  [] int32       read on the host: == S means "first prompt"
         cos_cache, sin_cache   [P, R]         rotary tables (do_rotary = 1), rotary_dim = 2R <= D
Outputs  output                 [B, S, H D]
         present_key, present_value  [B, Hk, T, D]  = past with the new K/V written in place
Attrs    num_heads H, kv_num_heads Hk (H % Hk == 0), scale (0: 1/sqrt(D)), local_window_size
         (-1: none), do_rotary (0/1); rotary_interleaved must be 0.
Dtypes   float16, float32 (qkv, the caches and the tables alike).

Semantics (row b, new token i < S):
    past_b = 0 if total_sequence_length == S (first prompt, rows right-padded) else seqlens_k[b] + 1 - S
    p      = past_b + i                        its position
    q, k   = rotate(q, p), rotate(k, p)        x1 = x[:R], x2 = x[R:2R]: (x1 c - x2 s, x2 c + x1 s), rest kept;
                                               computed in float32, rounded to the dtype
    present[b, :, p] = k, v                    (every new token, padding included, as ORT does)
    keys   j in [lo, p]                        lo = max(0, p + 1 - local_window_size) with a window
                                               (W keys, the token's own included, as ORT does), else 0
    out    = softmax(scale q . K_j) . V_j      in float32, rounded once; query head h reads kv head h // (H/Hk)

Realisations (../shared/DESIGN.md, "Custom ops"):
- NumPy reference: `reference` (tests check it against ORT CPU's com.microsoft node).
- Decomposition: `decompose` below, the com.microsoft::GroupQueryAttention node with the same inputs
  and attributes (what the CPU target keeps; `optimize --target cuda` verifies through it).
- CuPy kernels, `cuda`: in prefill `gqa_rope_append` (grid: H + 2Hk heads x S x B) writes the rotated
  query to a scratch [B, S, H, D] and the rotated key and the value into the cache; `gqa_attend` (grid:
  splits x Hk x B S) gives each block one kv head's G = H/Hk query heads of one token over one chunk of
  keys. In decode (S = 1) `gqa_attend` alone does it all: each block rotates its queries, and the block
  whose chunk holds the new position appends the new key and value before reading them. Each block has
  scores in shared memory, softmax, P.V, in float32. With several splits each block writes its
  (max, sum, P.V) and the last block to finish (a counter per (token, kv head), reset by it) merges
  them, so one launch does the whole attention. The loop is bound by memory latency, not bandwidth:
  for head sizes 64 and 128 (`gqa_attend_vec`) a decode block loads all of its keys and values in one
  round of 16-byte loads (256 keys at head size 64 with 512 threads), so at most one split per 256
  cached positions. The number of splits is fixed by the cache size T, not the current length: a
  captured CUDA graph replays the same grid while the length, read on the device from seqlens_k, grows.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from onnxopt.custom_ops.cuda import HALF_PRELUDE

DOMAIN = "onnxopt"
OP_TYPE = "GroupQueryAttention"
VERSION = 1
DTYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16})
# com.microsoft attributes this op takes (others, e.g. softcap or smooth_softmax, keep the ORT node)
ATTRIBUTES = ("num_heads", "kv_num_heads", "scale", "local_window_size", "do_rotary", "rotary_interleaved")
MAX_GROUP = 8  # query heads per kv head the kernels take
MAX_HEAD_SIZE = 256
DECODE_CHUNK = 64  # keys per block in decode (S == 1) for the generic kernel (the vec one: one round)
PREFILL_CHUNK = 1024  # most keys per block in prefill (shared memory: G * chunk floats)
THREADS = 128


def supported(attributes: dict, head_size: int | None) -> str | None:
    """Why a com.microsoft GQA node with these attribute values cannot become this op (None: it can)."""
    extra = sorted(set(attributes) - set(ATTRIBUTES))
    if extra:
        return f"attributes {extra} are not supported"
    if attributes.get("rotary_interleaved", 0):
        return "interleaved rotary is not supported"
    h, hk = attributes.get("num_heads"), attributes.get("kv_num_heads")
    if not h or not hk or h % hk:
        return f"num_heads {h} is not a multiple of kv_num_heads {hk}"
    if h // hk > MAX_GROUP:
        return f"{h // hk} query heads per kv head (at most {MAX_GROUP})"
    if head_size is None or head_size % 2 or head_size > MAX_HEAD_SIZE:
        return f"head size {head_size} (even and at most {MAX_HEAD_SIZE} needed)"
    return None


def _split_qkv(qkv: np.ndarray, h: int, hk: int, d: int):
    b, s, _ = qkv.shape
    q = qkv[..., : h * d].reshape(b, s, h, d)
    k = qkv[..., h * d : (h + hk) * d].reshape(b, s, hk, d)
    v = qkv[..., (h + hk) * d :].reshape(b, s, hk, d)
    return q, k, v


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [S, heads, D] at the positions of cos/sin [S, R] (non-interleaved), in float32 -> x's dtype."""
    r = cos.shape[-1]
    xf = x.astype(np.float32)
    c, s = cos[:, None, :].astype(np.float32), sin[:, None, :].astype(np.float32)
    x1, x2 = xf[..., :r], xf[..., r : 2 * r]
    out = xf.copy()
    out[..., :r] = x1 * c - x2 * s
    out[..., r : 2 * r] = x2 * c + x1 * s
    return out.astype(x.dtype)


def past_lengths(seqlens_k: np.ndarray, total_sequence_length, s: int) -> np.ndarray:
    """past_b per row (module docstring)."""
    if int(np.asarray(total_sequence_length)) == s:
        return np.zeros(len(seqlens_k), dtype=np.int64)
    return np.asarray(seqlens_k, dtype=np.int64) + 1 - s


def reference(qkv, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache=None, sin_cache=None, *,
              num_heads: int, kv_num_heads: int, scale: float = 0.0, local_window_size: int = -1,
              do_rotary: int = 0, rotary_interleaved: int = 0):
    """(output, present_key, present_value) as the module docstring defines them (NumPy, new arrays).
    The inputs are the node's, in order: key and value must be None (packed qkv)."""
    if key is not None or value is not None:
        raise ValueError("GroupQueryAttention: only packed qkv is supported (key and value inputs absent)")
    if rotary_interleaved:
        raise ValueError("GroupQueryAttention: interleaved rotary is not supported")
    h, hk = num_heads, kv_num_heads
    b_size, s, _ = qkv.shape
    d = past_key.shape[3]
    scale = scale or 1.0 / math.sqrt(d)
    q, k, v = _split_qkv(qkv, h, hk, d)
    present_key, present_value = past_key.copy(), past_value.copy()
    out = np.zeros((b_size, s, h, d), dtype=np.float32)
    group = h // hk
    for b, past in enumerate(past_lengths(seqlens_k, total_sequence_length, s)):
        pos = past + np.arange(s)
        qb, kb = q[b], k[b]
        if do_rotary:
            qb, kb = _rotate(qb, cos_cache[pos], sin_cache[pos]), _rotate(kb, cos_cache[pos], sin_cache[pos])
        present_key[b][:, pos] = kb.transpose(1, 0, 2)
        present_value[b][:, pos] = v[b].transpose(1, 0, 2)
        keys = present_key[b].astype(np.float32)  # [Hk, T, D]
        values = present_value[b].astype(np.float32)
        for i, p in enumerate(pos):
            lo = max(0, p + 1 - local_window_size) if local_window_size >= 0 else 0
            for head in range(h):
                g = head // group
                scores = keys[g, lo : p + 1] @ qb[i, head].astype(np.float32) * np.float32(scale)
                weights = np.exp(scores - scores.max())
                out[b, i, head] = (weights / weights.sum()) @ values[g, lo : p + 1]
    return out.reshape(b_size, s, h * d).astype(qkv.dtype), present_key, present_value


def infer_node(node: ir.Node) -> None:
    """Output types: output [B, S, H*D] in qkv's dtype, presents as the past buffers (onnx-ir)."""
    qkv, past_key, past_value = node.inputs[0], node.inputs[3], node.inputs[4]
    h = node.attributes.get_int("num_heads")
    out, present_key, present_value = node.outputs
    if qkv is not None and qkv.dtype is not None:
        if qkv.dtype not in DTYPES:
            raise ValueError(f"GroupQueryAttention accepts {sorted(d.name for d in DTYPES)}, got {qkv.dtype.name}")
        out.dtype = qkv.dtype
    if qkv is not None and qkv.shape is not None and len(qkv.shape) == 3 and past_key is not None and past_key.shape is not None:
        d = past_key.shape[3]
        out.shape = ir.Shape([qkv.shape[0], qkv.shape[1], h * d if isinstance(d, int) else None])
    for present, past in ((present_key, past_key), (present_value, past_value)):
        if past is not None:
            present.dtype = past.dtype
            present.shape = past.shape


def decompose(node: ir.Node) -> ir.Node:
    """The com.microsoft::GroupQueryAttention node with this node's inputs and attributes (not inserted)."""
    return ir.Node("com.microsoft", "GroupQueryAttention", inputs=list(node.inputs),
                   attributes=list(node.attributes.values()), num_outputs=len(node.outputs), name=node.name)


def from_microsoft(node: ir.Node) -> ir.Node:
    """This op's node for a com.microsoft::GroupQueryAttention node (not inserted; check `supported`)."""
    return ir.Node(DOMAIN, OP_TYPE, inputs=list(node.inputs), attributes=list(node.attributes.values()),
                   num_outputs=len(node.outputs), version=VERSION, name=node.name)


# ---------------------------------------------------------------------------------------------- CUDA

_MOD = "onnxopt_gqa"
_SOURCE = HALF_PRELUDE + r"""
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

// Prefill: one block per (head of q | k | v, token i, row b): rotary for q and k, q to qout
// [B,S,H,D], k and v into the caches [B,Hk,T,D] at the token's position.
template <typename T>
__global__ void gqa_rope_append(const T* qkv, const T* cos, const T* sin, const int* seqlens,
                                T* kcache, T* vcache, T* qout, int S, int H, int Hk, int D, int R, int P,
                                int Tcap, int first, int rotary) {
    const int head = blockIdx.x, i = blockIdx.y, b = blockIdx.z;
    const int pos = past_of(seqlens, b, S, first) + i;
    const T* x = qkv + ((long long)b * S + i) * (H + 2 * Hk) * D + (long long)head * D;
    T* dst;
    if (head < H) {
        dst = qout + (((long long)b * S + i) * H + head) * D;
    } else {
        if (pos < 0 || pos >= Tcap) return;
        const int g = head < H + Hk ? head - H : head - H - Hk;
        T* cache = head < H + Hk ? kcache : vcache;
        dst = cache + (((long long)b * Hk + g) * Tcap + pos) * D;
    }
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
    int first, int window, float scale, int fused, const T* qkv, const T* cos, const T* sin, int R, int P, int rotary
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
__device__ __forceinline__ void load_vec(const half_bits* p, float* f) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const unsigned int w[4] = {raw.x, raw.y, raw.z, raw.w};
    #pragma unroll
    for (int k = 0; k < 4; ++k) {
        f[2 * k] = to_f((half_bits)(w[k] & 0xffffu));
        f[2 * k + 1] = to_f((half_bits)(w[k] >> 16));
    }
}
__device__ __forceinline__ void load_vec(const float* p, float* f) {
    const float4 raw = *reinterpret_cast<const float4*>(p);
    f[0] = raw.x; f[1] = raw.y; f[2] = raw.z; f[3] = raw.w;
}

// Head size DH (a multiple of VEC = 16 / sizeof(T), DH / VEC <= 32) and GQ query heads per kv head,
// both compile-time (registers). TPR = DH / VEC threads read one key row with one 16-byte load each,
// KPW = 32 / TPR rows per warp, U rows per thread in flight: a round covers ROUND = warps * KPW * U
// keys. The loop is latency-bound, so a launch sizes its block for one round when it can (decode):
// then the values are loaded together with the keys, and the block makes one trip to memory. The
// scores reduce over the TPR lanes of a row, P.V over the KPW rows of a warp by shuffles, then over
// the warps in shared memory (red rows: blockDim / 32).
template <typename T, int DH, int GQ>
__global__ void __launch_bounds__(512) gqa_attend_vec(ATTEND_PARAMS) {
    constexpr int VEC = 16 / sizeof(T), TPR = DH / VEC, KPW = 32 / TPR, U = 4;
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
// trips: the chain is seqlens -> (cache rows, rotary tables), the query heads' qkv rows loaded before
// it. Each thread rotates its own VEC-wide slice of the GQ queries in registers; the thread that holds
// the new position rotates the new key itself (rounded to T, as stored), appends key and value to the
// caches and uses them in place of the stale slot. Softmax runs per warp (max and sum over the warp's
// KPW x U keys by shuffles, then P.V), the warps merge in shared memory (flash-style rescale), and
// the split merge is epilogue()'s.
__device__ __forceinline__ uint4 ld16(const void* p) { return *reinterpret_cast<const uint4*>(p); }
__device__ __forceinline__ void unpack(uint4 r, float* f, const half_bits*) {
    const unsigned int w[4] = {r.x, r.y, r.z, r.w};
    #pragma unroll
    for (int k = 0; k < 4; ++k) {
        f[2 * k] = to_f((half_bits)(w[k] & 0xffffu));
        f[2 * k + 1] = to_f((half_bits)(w[k] >> 16));
    }
}
__device__ __forceinline__ void unpack(uint4 r, float* f, const float*) {
    f[0] = __uint_as_float(r.x); f[1] = __uint_as_float(r.y); f[2] = __uint_as_float(r.z); f[3] = __uint_as_float(r.w);
}
__device__ __forceinline__ unsigned int half_of(float x) {
    half_bits h; asm("{ cvt.rn.f16.f32 %0, %1; }" : "=h"(h) : "f"(x)); return h;
}
__device__ __forceinline__ uint4 pack(const float* f, const half_bits*) {
    return make_uint4(half_of(f[0]) | (half_of(f[1]) << 16), half_of(f[2]) | (half_of(f[3]) << 16),
                      half_of(f[4]) | (half_of(f[5]) << 16), half_of(f[6]) | (half_of(f[7]) << 16));
}
__device__ __forceinline__ uint4 pack(const float* f, const float*) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
}
// y = the slice y of a head rotated with its partner slice o (the other half) and the tables' c, s
template <int VEC>
__device__ __forceinline__ void rotate(float* y, const float* o, const float* c, const float* s, bool low) {
    #pragma unroll
    for (int e = 0; e < VEC; ++e) y[e] = low ? y[e] * c[e] - o[e] * s[e] : y[e] * c[e] + o[e] * s[e];
}

template <typename T, int DH, int GQ>
__global__ void __launch_bounds__(512) gqa_decode_vec(ATTEND_PARAMS) {
    constexpr int VEC = 16 / sizeof(T), TPR = DH / VEC, KPW = 32 / TPR, U = 4;
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
"""
# gqa_attend_vec's head sizes (others run gqa_attend), and its block: at most this many threads, and
# shared memory for P.V partial sums of at most RED_BYTES (one row per warp)
VEC_HEAD_SIZES = (64, 128)
VEC_THREADS = 512
RED_BYTES = 32 * 1024
ROUND_ROWS = 4  # U in the kernel
# The decode launch's kernel for those head sizes: gqa_decode_vec (one pass, registers) where the rotary
# half-width is a multiple of the 16-byte vector (else, and with "gqa_attend_vec", the two-pass kernel;
# scripts/gpu_gqa_probe.py --kernel times both: on an H200, 2026-12-04, llama-1b heads, 6.21 against
# 9.33 us a layer at 256 keys, 9.82 against 13.71 at 1280)
DECODE_KERNEL = "gqa_decode_vec"
_EXPRESSIONS = ("gqa_rope_append<float>", "gqa_rope_append<half_bits>", "gqa_attend<float>", "gqa_attend<half_bits>")



def _function(expression: str):
    """A kernel of the module; a `gqa_attend_vec<T, D, G>` instance is its own module, compiled the
    first time a model of that head size and grouping needs it."""
    from onnxopt.custom_ops.cuda import declare_module, raw_function

    if expression.startswith(("gqa_attend_vec<", "gqa_decode_vec<")):
        name = _MOD + "_" + "".join(c if c.isalnum() else "_" for c in expression)
        declare_module(name, (expression,))
        return raw_function(name, _SOURCE, expression)
    declare_module(_MOD, _EXPRESSIONS)
    return raw_function(_MOD, _SOURCE, expression)


def vec_threads(group: int, head_size: int, itemsize: int = 2) -> int:
    """Block size of gqa_attend_vec: the most warps (<= VEC_THREADS / 32) whose P.V rows fit RED_BYTES."""
    warps = min(VEC_THREADS // 32, RED_BYTES // (4 * group * head_size))
    return 32 * max(1, warps)


def round_keys(group: int, head_size: int, itemsize: int = 2) -> int:
    """Keys one round of gqa_attend_vec's block covers (module docstring of the kernel)."""
    rows_per_warp = 32 * (16 // itemsize) // head_size
    return vec_threads(group, head_size, itemsize) // 32 * rows_per_warp * ROUND_ROWS


def launch_shape(s: int, cache_len: int, first: bool, group: int, head_size: int, itemsize: int = 2):
    """(threads, chunk, splits, red rows) of the attention launch: block size, keys per block, blocks
    per (token, kv head), rows of P.V partial sums in shared memory."""
    longest = s if first else cache_len
    vec = head_size in VEC_HEAD_SIZES
    threads = vec_threads(group, head_size, itemsize) if vec else THREADS
    rows = threads // 32 if vec else max(1, THREADS // head_size)
    if s == 1:  # decode: one round per block (vec), so every key is one trip to memory
        chunk = round_keys(group, head_size, itemsize) if vec else DECODE_CHUNK
    else:  # shared memory (44 KiB): q [G][D] + p [G][chunk] + red [rows][G][D] floats
        fit = (44 * 1024 // 4 - group * head_size * (1 + rows)) // group
        chunk = min(PREFILL_CHUNK, max(32, fit // 32 * 32), -(-longest // 32) * 32)
    return threads, chunk, max(1, -(-longest // chunk)), rows


def one_pass_rotary(half_width: int, itemsize: int, table=None) -> bool:
    """Whether gqa_decode_vec can rotate in 16-byte slices: the rotary half-width (0: no rotary) a
    multiple of the vector, and the tables (a CuPy array, when given) 16-byte aligned."""
    return half_width % (16 // itemsize) == 0 and (table is None or half_width == 0 or table.data.ptr % 16 == 0)


def plan(s: int, cache_len: int, first: bool, group: int, head_size: int) -> tuple[int, int]:
    """(chunk, splits) of a float16 attention launch: keys per block and blocks per (token, kv head)."""
    _, chunk, splits, _ = launch_shape(s, cache_len, first, group, head_size)
    return chunk, splits


def cuda(qkv, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache=None, sin_cache=None, *,
         num_heads: int, kv_num_heads: int, scale: float = 0.0, local_window_size: int = -1,
         do_rotary: int = 0, rotary_interleaved: int = 0, out=None):
    """GroupQueryAttention on the GPU, launch only: the node's inputs in order, qkv, caches, seqlens_k
    (int32) and the tables CuPy arrays (key and value None), total_sequence_length a host scalar.
    Writes the new K/V into past_key/past_value in place and returns (output, past_key, past_value). `out` (optional): (output, present_key, present_value)
    preallocated; the presents must be the past buffers themselves (the shared-buffer interface)."""
    from onnxopt.custom_ops.cuda import cupy, launch, persistent

    cp = cupy()
    if key is not None or value is not None:
        raise ValueError("GroupQueryAttention: only packed qkv is supported (key and value inputs absent)")
    if rotary_interleaved:
        raise ValueError("GroupQueryAttention: interleaved rotary is not supported")
    if qkv.dtype not in (cp.float16, cp.float32) or past_key.dtype != qkv.dtype or past_value.dtype != qkv.dtype:
        raise ValueError(f"GroupQueryAttention: qkv and caches must share float16 or float32, got {qkv.dtype}, {past_key.dtype}")
    h, hk = int(num_heads), int(kv_num_heads)
    b_size, s, width = qkv.shape
    _, _, tcap, d = past_key.shape
    group = h // hk
    if h % hk or group > MAX_GROUP or width != (h + 2 * hk) * d or d > MAX_HEAD_SIZE:
        raise ValueError(f"GroupQueryAttention: unsupported heads {h}/{hk} x {d} for qkv width {width}")
    for name, cache in (("past_key", past_key), ("past_value", past_value)):
        if not cache.flags.c_contiguous or cache.shape != (b_size, hk, tcap, d):
            raise ValueError(f"GroupQueryAttention: {name} must be a C-contiguous [B, Hk, T, D] buffer, got {cache.shape}")
    output = None
    if out is not None:
        output, present_key, present_value = out
        present_key = past_key if present_key is None else present_key
        present_value = past_value if present_value is None else present_value
        if present_key.data.ptr != past_key.data.ptr or present_value.data.ptr != past_value.data.ptr:
            raise ValueError("GroupQueryAttention: present_key/present_value must be the past buffers (shared KV)")
    if output is None:
        output = cp.empty((b_size, s, h * d), dtype=qkv.dtype)
    qkv = cp.ascontiguousarray(qkv)
    seqlens = cp.ascontiguousarray(seqlens_k, dtype=cp.int32)
    first = int(np.asarray(total_sequence_length)) == s
    rotary = bool(do_rotary)
    if rotary:
        cos = cp.ascontiguousarray(cos_cache, dtype=qkv.dtype)
        sin = cp.ascontiguousarray(sin_cache, dtype=qkv.dtype)
        positions, r = cos.shape
    else:
        cos = sin = qkv  # not read
        positions, r = 0, 0
    suffix = "<half_bits>" if qkv.dtype == cp.float16 else "<float>"
    # Decode (s == 1) may be captured: its scratch stays at fixed addresses (and nothing is allocated
    # inside a capture). Prefill runs eagerly and takes fresh, stream-ordered pool memory.
    if s == 1:
        def scratch(kind, shape, dtype, zero=False):
            return persistent(kind, shape, dtype, zero=zero)
    else:
        def scratch(kind, shape, dtype, zero=False):
            return (cp.zeros if zero else cp.empty)(shape, dtype=dtype)
    fused = s == 1  # decode: one launch (rotary and append inside the attention kernel)
    if fused:
        qbuf = qkv  # not read
    else:
        qbuf = scratch("q", (b_size, s, h, d), qkv.dtype)
        _function("gqa_rope_append" + suffix)(
            (h + 2 * hk, s, b_size), (min(THREADS, d),),
            (qkv, cos, sin, seqlens, past_key, past_value, qbuf, np.int32(s), np.int32(h), np.int32(hk), np.int32(d),
             np.int32(r), np.int32(positions), np.int32(tcap), np.int32(first), np.int32(rotary)))
    threads, chunk, splits, rows = launch_shape(s, tcap, first, group, d, qkv.dtype.itemsize)
    tokens = b_size * s
    if splits > 1:
        part_m = scratch("m", (tokens * h * splits,), np.float32)
        part_l = scratch("l", (tokens * h * splits,), np.float32)
        part_acc = scratch("acc", (tokens * h * splits * d,), np.float32)
        counters = scratch("counters", (tokens * hk,), np.int32, zero=True)
    else:  # not read
        part_m = part_l = part_acc = scratch("unused", (1,), np.float32)
        counters = scratch("unused_counters", (1,), np.int32)
    shared = 4 * (group * d + group * chunk + rows * group * d)
    kernel = f"gqa_attend_vec<{suffix[1:-1]}, {d}, {group}>" if d in VEC_HEAD_SIZES else "gqa_attend" + suffix
    one_pass = (fused and d in VEC_HEAD_SIZES and DECODE_KERNEL == "gqa_decode_vec" and qkv.data.ptr % 16 == 0
                and one_pass_rotary(r, qkv.itemsize, cos) and one_pass_rotary(r, qkv.itemsize, sin))
    if one_pass:
        kernel, shared = f"gqa_decode_vec<{suffix[1:-1]}, {d}, {group}>", 4 * rows * group * d
    launch(
        _function(kernel), (splits, hk, tokens), (threads,),
        (qbuf, past_key, past_value, seqlens, output, part_m, part_l, part_acc, counters,
         np.int32(s), np.int32(h), np.int32(hk), np.int32(d), np.int32(tcap), np.int32(chunk), np.int32(splits),
         np.int32(first), np.int32(local_window_size), np.float32(scale or 1.0 / math.sqrt(d)),
         np.int32(fused), qkv, cos, sin, np.int32(r), np.int32(positions), np.int32(rotary)),
        shared_mem=shared, dependent=one_pass)
    return output, past_key, past_value
