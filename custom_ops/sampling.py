"""Choosing the next token on the GPU from [B, V] logits: greedy, temperature, top-k, top-p,
repetition penalty, seeded; no host synchronization (so it can sit inside a captured CUDA graph).
Greedy runs as two kernels: `argmax_partial` spreads each row over up to GREEDY_PARTS blocks (one
block per row read a 128k vocabulary in 30 us on an H100, 2 % of a Llama-1B decode step), then
`argmax_final` merges their partial maxima. Sampling runs one block per row (`sample_rows`).

Math (the CPU definition is `onnxopt.runtime.sampling.Sampler`; this op follows it, in float32):
    z = logits;  z[v] = z[v] / r if z[v] > 0 else z[v] * r   for tokens v already seen (r = penalty)
    greedy:      token = argmax_v z (first index on ties)
    sampled:     z /= temperature
                 top-k:  keep z >= z_(k)         (z_(k) the k-th largest value; ties at it stay)
                 top-p:  keep z >= z_(m)         m = min{j : sum of the j largest probabilities >= p}
                 p_v = softmax(z over kept);  token = #{v : cumsum(p)_v < u}  (inverse CDF, vocab order)
The thresholds are found by bisection over the float's ordered bit pattern (32 block-wide counts),
which equals the sorted form above except when values tie at z_(m) (the sort would keep part of a
tie). Sums run in float32 in another order than NumPy's cumsum: a draw within ~1e-6 of a CDF step
may pick the neighbour. `warp` and `reference` are this definition in NumPy, used by the tests.

Random numbers: counter-based, so the draw of (seed, step, row) is reproducible on any device and in
NumPy and no generator state lives on the host:
    x = seed * 0x9E3779B97F4A7C15 + (step * 2^20 + row + 1) * 0xBF58476D1CE4E5B9   (mod 2^64)
    x = splitmix64_finalize(x);  u = (x >> 11) * 2^-53
The step counter is an int64 in device memory that `advance` increments, so a replayed CUDA graph
draws fresh numbers. (The CPU Sampler draws from numpy's default_rng: the same seed gives a
different, equally valid, sample stream on the two devices; greedy decoding is the same.)

Dtypes: logits float16 or float32 (read as float32). Rows may be strided (row_stride elements apart).
"""

from __future__ import annotations

import numpy as np

from onnxopt.runtime.sampling import SamplingParams

THREADS = 1024  # one block of THREADS per row (sampling)
GREEDY_THREADS = 256  # argmax_partial: blocks of 256 threads ...
GREEDY_PARTS = 128  # ... up to 128 of them per row, each thread reading at least 8 values
GREEDY_MIN_PER_THREAD = 8
_MOD = "onnxopt_sampling"

_SOURCE = r"""
typedef unsigned short half_bits;
#define NEG_INF (__int_as_float(0xff800000))  // NVRTC has no <math.h> INFINITY

__device__ __forceinline__ float load(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float load(const half_bits* p, long long i) {
    float f;
    asm("{ cvt.f32.f16 %0, %1; }" : "=f"(f) : "h"(p[i]));
    return f;
}

// Order-preserving map float -> uint32 (larger float, larger key); -inf maps low, NaN high.
__device__ __forceinline__ unsigned int key_of(float f) {
    unsigned int u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float float_of(unsigned int k) {
    unsigned int u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
    return __uint_as_float(u);
}

__device__ __forceinline__ double uniform(unsigned long long seed, long long step, int row) {
    unsigned long long x = seed * 0x9E3779B97F4A7C15ull
                         + ((unsigned long long)step * 1048576ull + (unsigned long long)row + 1ull) * 0xBF58476D1CE4E5B9ull;
    x ^= x >> 30; x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 27; x *= 0x94D049BB133111EBull;
    x ^= x >> 31;
    return (double)(x >> 11) * (1.0 / 9007199254740992.0);
}

// Block-wide sum (all threads get the result). `scratch` holds 32 values.
template <typename A>
__device__ A block_sum(A v, A* scratch) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    A total = 0;
    const int warps = blockDim.x >> 5;
    for (int w = 0; w < warps; ++w) total += scratch[w];
    return total;
}

__device__ float block_max(float v, float* scratch) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_down_sync(0xffffffffu, v, o));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float m = NEG_INF;
    const int warps = blockDim.x >> 5;
    for (int w = 0; w < warps; ++w) m = fmaxf(m, scratch[w]);
    return m;
}

template <typename T>
__device__ __forceinline__ float penalized(const T* row, const unsigned char* seen, int v, float penalty) {
    float z = load(row, v);
    if (seen != nullptr && seen[v]) z = z > 0.0f ? z / penalty : z * penalty;
    return z;
}

// (best, arg) of one thread's values seen in increasing index: the first best wins, NaN never does.
__device__ __forceinline__ void argmax_take(float z, int v, float& best, int& arg) {
    if (z > best || (arg == 0x7fffffff && !(z != z))) { best = z; arg = v; }
}

// Block-wide merge of (best, arg), ties to the smaller index; the result is valid in thread 0.
__device__ void block_argmax(float& best, int& arg, float* fscratch, int* iscratch) {
    for (int o = 16; o > 0; o >>= 1) {
        const float ob = __shfl_down_sync(0xffffffffu, best, o);
        const int oa = __shfl_down_sync(0xffffffffu, arg, o);
        if (ob > best || (ob == best && oa < arg)) { best = ob; arg = oa; }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { fscratch[warp] = best; iscratch[warp] = arg; }
    __syncthreads();
    if (threadIdx.x == 0)
        for (int w = 1; w < (int)(blockDim.x >> 5); ++w)
            if (fscratch[w] > best || (fscratch[w] == best && iscratch[w] < arg)) { best = fscratch[w]; arg = iscratch[w]; }
}

// Greedy, first pass: block (p, b) takes the strided values v = p*blockDim + t (+ parts*blockDim ...)
// of row b and writes its (best, arg) to part_best/part_arg [B, parts].
template <typename T>
__global__ void argmax_partial(const T* logits, long long row_stride, int V, const unsigned char* seen_all,
                               float penalty, int parts, float* part_best, int* part_arg) {
    __shared__ float fscratch[32];
    __shared__ int iscratch[32];
    const int b = blockIdx.y, p = blockIdx.x;
    const T* row = logits + (long long)b * row_stride;
    const unsigned char* seen = seen_all == nullptr ? nullptr : seen_all + (long long)b * V;
    float best = NEG_INF; int arg = 0x7fffffff;
    for (int v = p * blockDim.x + threadIdx.x; v < V; v += parts * blockDim.x)
        argmax_take(penalized(row, seen, v, penalty), v, best, arg);
    block_argmax(best, arg, fscratch, iscratch);
    if (threadIdx.x == 0) { part_best[b * parts + p] = best; part_arg[b * parts + p] = arg; }
}

// Greedy, second pass: one block (of >= parts threads) per row merges the partials into tokens [B].
extern "C" __global__ void argmax_final(const float* part_best, const int* part_arg, int parts, long long* tokens) {
    __shared__ float fscratch[32];
    __shared__ int iscratch[32];
    const int b = blockIdx.x;
    float best = NEG_INF; int arg = 0x7fffffff;
    if ((int)threadIdx.x < parts) { best = part_best[b * parts + threadIdx.x]; arg = part_arg[b * parts + threadIdx.x]; }
    block_argmax(best, arg, fscratch, iscratch);
    if (threadIdx.x == 0) tokens[b] = arg == 0x7fffffff ? 0 : arg;
}

// logits: [B, V] (rows row_stride apart); seen: [B, V] uint8 or null; tokens: [B] int64.
// temperature <= 0 means greedy; top_k <= 0 or >= V is off; top_p >= 1 is off.
template <typename T>
__global__ void sample_rows(const T* logits, long long row_stride, int V, const unsigned char* seen_all,
                            float penalty, float temperature, int top_k, float top_p,
                            unsigned long long seed, const long long* step, long long* tokens) {
    __shared__ float fscratch[32];
    __shared__ int iscratch[32];
    __shared__ double dscratch[32];
    const int b = blockIdx.x;
    const T* row = logits + (long long)b * row_stride;
    const unsigned char* seen = seen_all == nullptr ? nullptr : seen_all + (long long)b * V;

    if (temperature <= 0.0f) {
        // argmax in one block (DeviceSampler uses argmax_partial + argmax_final instead).
        float best = NEG_INF; int arg = 0x7fffffff;
        for (int v = threadIdx.x; v < V; v += blockDim.x) argmax_take(penalized(row, seen, v, penalty), v, best, arg);
        block_argmax(best, arg, fscratch, iscratch);
        if (threadIdx.x == 0) tokens[b] = arg == 0x7fffffff ? 0 : arg;
        return;
    }

    // Keys of warped values z = penalized / temperature; kept tokens have key >= lo.
    unsigned int lo = 0u;
    if (top_k > 0 && top_k < V) {
        // The largest t with #{key >= t} >= top_k is key(z_(k)).
        unsigned long long a = 0ull, c = 0x100000000ull;
        while (c - a > 1ull) {
            const unsigned long long mid = (a + c) >> 1;
            int count = 0;
            for (int v = threadIdx.x; v < V; v += blockDim.x)
                count += key_of(penalized(row, seen, v, penalty) / temperature) >= (unsigned int)mid;
            if (block_sum<int>(count, iscratch) >= top_k) a = mid; else c = mid;
        }
        lo = (unsigned int)a;
    }
    float zmax = NEG_INF;
    for (int v = threadIdx.x; v < V; v += blockDim.x)
        zmax = fmaxf(zmax, penalized(row, seen, v, penalty) / temperature);
    zmax = block_max(zmax, fscratch);
    if (top_p < 1.0f) {
        double mass = 0.0;
        for (int v = threadIdx.x; v < V; v += blockDim.x) {
            const float z = penalized(row, seen, v, penalty) / temperature;
            if (key_of(z) >= lo) mass += (double)expf(z - zmax);
        }
        const double need = (double)top_p * block_sum<double>(mass, dscratch);
        // The largest t >= lo with mass{key >= t} >= top_p * total is key(z_(m)).
        unsigned long long a = lo, c = 0x100000000ull;
        while (c - a > 1ull) {
            const unsigned long long mid = (a + c) >> 1;
            double part = 0.0;
            for (int v = threadIdx.x; v < V; v += blockDim.x) {
                const float z = penalized(row, seen, v, penalty) / temperature;
                if (key_of(z) >= (unsigned int)mid) part += (double)expf(z - zmax);
            }
            if (block_sum<double>(part, dscratch) >= need) a = mid; else c = mid;
        }
        lo = (unsigned int)a;
    }
    // Inverse CDF in vocabulary order: thread t owns the contiguous chunk [t*chunk, (t+1)*chunk).
    const int chunk = (V + blockDim.x - 1) / blockDim.x;
    const int begin = min(V, (int)threadIdx.x * chunk), end = min(V, begin + chunk);
    double own = 0.0;
    for (int v = begin; v < end; ++v) {
        const float z = penalized(row, seen, v, penalty) / temperature;
        if (key_of(z) >= lo) own += (double)expf(z - zmax);
    }
    // Exclusive prefix of the chunk sums (warp scan, then a scan of the warp totals).
    double incl = own;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = 1; o < 32; o <<= 1) {
        const double n = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += n;
    }
    __syncthreads();
    if (lane == 31) dscratch[warp] = incl;
    __syncthreads();
    double before = incl - own, total = 0.0;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) {
        if (w < warp) before += dscratch[w];
        total += dscratch[w];
    }
    const double target = uniform(seed, *step, b) * total;
    int count = 0;
    double cdf = before;
    for (int v = begin; v < end; ++v) {
        const float z = penalized(row, seen, v, penalty) / temperature;
        if (key_of(z) >= lo) cdf += (double)expf(z - zmax);
        count += cdf < target;
    }
    count = block_sum<int>(count, iscratch);
    if (threadIdx.x == 0) tokens[b] = min(count, V - 1);
}

// After a decode step's sampling: feed the tokens back and move every counter one token on.
// tokens [B] -> input_ids [B] (the next step's [B, 1]), history[step, B]; seqlens_k[b] += 1 (if given);
// attention_mask[b, seqlens_k[b] + 1] = 1 for a static [B, mask_len] mask (if given); seen[b, token] = 1.
extern "C" __global__ void advance(const long long* tokens, int batch, long long* input_ids, int* seqlens_k,
                                   long long* attention_mask, int mask_len, unsigned char* seen, int V,
                                   long long* history, long long history_len, long long* step) {
    const long long s = *step;
    const int b = threadIdx.x;
    __syncthreads();  // every thread has read the step before it moves
    if (b < batch) {
        const long long t = tokens[b];
        input_ids[b] = t;
        if (history != nullptr && s < history_len) history[s * batch + b] = t;
        if (seen != nullptr) seen[(long long)b * V + t] = 1;
        if (seqlens_k != nullptr) {
            const int next = seqlens_k[b] + 1;
            seqlens_k[b] = next;
            if (attention_mask != nullptr && next < mask_len) attention_mask[(long long)b * mask_len + next] = 1;
        }
    }
    if (b == 0) *step = s + 1;
}
"""

_EXPRESSIONS = ("sample_rows<float>", "sample_rows<half_bits>", "argmax_partial<float>", "argmax_partial<half_bits>",
                "argmax_final", "advance")


def _function(expression: str):
    from onnxopt.custom_ops.cuda import declare_module, raw_function

    declare_module(_MOD, _EXPRESSIONS)
    return raw_function(_MOD, _SOURCE, expression)


class DeviceSampler:
    """Samples [B, V] CuPy logits into a preallocated int64 [B] device buffer, launch only (no sync).

    The seed and the step counter (device int64, moved on by `advance`) decide the draws; `seen`
    ([B, V] uint8 on the device, or None) marks the tokens the repetition penalty applies to.
    """

    def __init__(self, params: SamplingParams, batch: int, vocab: int):
        cp = _cupy()
        self.params = params
        self.tokens = cp.zeros(batch, dtype=cp.int64)  # [B]
        self.step = cp.zeros(1, dtype=cp.int64)  # draws of step s use counter s
        self.seen = cp.zeros((batch, vocab), dtype=cp.uint8) if params.repetition_penalty != 1.0 else None
        self.batch, self.vocab = batch, vocab
        self.parts = greedy_parts(vocab)
        if params.greedy:
            self.part_best = cp.empty((batch, self.parts), dtype=cp.float32)
            self.part_arg = cp.empty((batch, self.parts), dtype=cp.int32)

    def mark_seen(self, prompts) -> None:
        """Mark the prompt tokens of each row as seen (host ids -> device mask)."""
        if self.seen is None:
            return
        cp = _cupy()
        for b, ids in enumerate(prompts):
            self.seen[b, cp.asarray(np.unique(np.asarray(ids, dtype=np.int64)))] = 1

    def __call__(self, logits) -> object:
        """logits: CuPy [B, V] (float16/float32; rows may be strided). Returns self.tokens."""
        cp = _cupy()
        batch, vocab = logits.shape
        if (batch, vocab) != (self.batch, self.vocab):
            raise ValueError(f"logits shape {logits.shape} != sampler shape ({self.batch}, {self.vocab})")
        if logits.strides[1] != logits.itemsize:
            raise ValueError("logits rows must be contiguous along the vocabulary")
        kind = "float" if logits.dtype == cp.float32 else "half_bits"
        p = self.params
        row_stride = np.int64(logits.strides[0] // logits.itemsize)
        seen = self.seen if self.seen is not None else np.uint64(0)
        if p.greedy:
            _function(f"argmax_partial<{kind}>")(
                (self.parts, batch), (GREEDY_THREADS,),
                (logits, row_stride, np.int32(vocab), seen, np.float32(p.repetition_penalty), np.int32(self.parts),
                 self.part_best, self.part_arg),
            )
            _function("argmax_final")((batch,), (GREEDY_PARTS,), (self.part_best, self.part_arg, np.int32(self.parts), self.tokens))
            return self.tokens
        fn = _function(f"sample_rows<{kind}>")
        temperature = 0.0 if p.greedy else float(p.temperature)
        seed = np.uint64(p.seed if p.seed is not None else 0)
        fn(
            (batch,), (THREADS,),
            (logits, row_stride, np.int32(vocab), seen, np.float32(p.repetition_penalty),
             np.float32(temperature), np.int32(p.top_k), np.float32(p.top_p), seed, self.step, self.tokens),
        )
        return self.tokens


def greedy_parts(vocab: int) -> int:
    """Blocks per row of argmax_partial: each thread reads at least GREEDY_MIN_PER_THREAD values."""
    return max(1, min(GREEDY_PARTS, -(-vocab // (GREEDY_THREADS * GREEDY_MIN_PER_THREAD))))


def advance(tokens, *, input_ids, step, seqlens_k=None, attention_mask=None, seen=None, history=None) -> None:
    """Launch the `advance` kernel (see the CUDA source): every argument a CuPy array or None."""
    batch = int(tokens.shape[0])
    null = np.uint64(0)
    mask_len = int(attention_mask.shape[1]) if attention_mask is not None else 0
    vocab = int(seen.shape[1]) if seen is not None else 0
    history_len = int(history.shape[0]) if history is not None else 0
    _function("advance")(
        (1,), (max(32, batch),),
        (tokens, np.int32(batch), input_ids, null if seqlens_k is None else seqlens_k,
         null if attention_mask is None else attention_mask, np.int32(mask_len),
         null if seen is None else seen, np.int32(vocab), null if history is None else history,
         np.int64(history_len), step),
    )


def _cupy():
    from onnxopt.custom_ops.cuda import cupy

    return cupy()


# -- NumPy reference ---------------------------------------------------------------------------------

_M64 = (1 << 64) - 1


def uniform(seed: int, step: int, rows: int) -> np.ndarray:
    """The draws u[row] of (seed, step) that the kernel uses, in float64 (exact integer arithmetic)."""
    out = np.empty(rows, dtype=np.float64)
    for row in range(rows):
        x = (seed * 0x9E3779B97F4A7C15 + (step * 1048576 + row + 1) * 0xBF58476D1CE4E5B9) & _M64
        x ^= x >> 30
        x = (x * 0xBF58476D1CE4E5B9) & _M64
        x ^= x >> 27
        x = (x * 0x94D049BB133111EB) & _M64
        x ^= x >> 31
        out[row] = (x >> 11) * (1.0 / 9007199254740992.0)
    return out


def warp(logits: np.ndarray, params: SamplingParams, *, seen: np.ndarray | None = None) -> np.ndarray:
    """The float32 [B, V] values the kernel draws from (dropped tokens -inf): the CPU Sampler's warp
    (runtime/sampling.py), except that a tie at the top-p cut is kept whole (module docstring).

    logits [B, V]; seen [B, V] bool (repetition penalty) or None.
    """
    from onnxopt.runtime.sampling import Sampler

    z = logits.astype(np.float32, copy=True)
    if seen is not None and params.repetition_penalty != 1.0:
        r = np.float32(params.repetition_penalty)
        z = np.where(seen, np.where(z > 0, z / r, z * r), z).astype(np.float32)
    if params.greedy:
        return z
    # Temperature and top-k exactly as the CPU Sampler (its top-k keeps ties too).
    z = Sampler(SamplingParams(temperature=params.temperature, top_k=params.top_k)).warp(z)
    if params.top_p < 1.0:
        p = np.exp((z - z.max(axis=-1, keepdims=True)).astype(np.float64))
        ordered = -np.sort(-p, axis=-1)
        cum = np.cumsum(ordered, axis=-1) / p.sum(axis=-1, keepdims=True)
        m = np.minimum((cum < params.top_p).sum(axis=-1), p.shape[-1] - 1)  # sorted index of z_(m)
        cut = ordered[np.arange(p.shape[0]), m]
        z[p < cut[:, None]] = -np.inf  # keep z >= z_(m)
    return z


def reference(logits: np.ndarray, params: SamplingParams, *, step: int = 0, seen: np.ndarray | None = None):
    """The tokens [B] the kernel picks, and per row how far (as a fraction of the total mass) the
    draw and the top-p cut lie from a step of their cumulative sums: rows whose margin is below
    float32 summation error may legitimately differ (inf for greedy rows).
    """
    z = warp(logits, params, seen=seen)
    rows = np.arange(z.shape[0])
    if params.greedy:
        return z.argmax(axis=-1), np.full(z.shape[0], np.inf)
    e = np.exp((z - z.max(axis=-1, keepdims=True)).astype(np.float64))
    cdf = np.cumsum(e, axis=-1)
    total = cdf[:, -1]
    target = uniform(params.seed or 0, step, z.shape[0]) * total
    tokens = np.minimum((cdf < target[:, None]).sum(axis=-1), z.shape[1] - 1)
    margin = np.min(np.abs(cdf - target[:, None]), axis=-1) / total
    if params.top_p < 1.0:
        kept_k = warp(logits, SamplingParams(temperature=params.temperature, top_k=params.top_k,
                                             repetition_penalty=params.repetition_penalty), seen=seen)
        p = np.exp((kept_k - kept_k.max(axis=-1, keepdims=True)).astype(np.float64))
        cum = np.cumsum(-np.sort(-p, axis=-1), axis=-1) / p.sum(axis=-1, keepdims=True)
        m = np.minimum((cum < params.top_p).sum(axis=-1), p.shape[-1] - 1)
        below = np.where(m > 0, cum[rows, np.maximum(m - 1, 0)], -np.inf)  # mass before the cut token
        margin = np.minimum(margin, np.minimum(cum[rows, m] - params.top_p, params.top_p - below))
    return tokens, margin
