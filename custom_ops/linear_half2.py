"""`onnxopt::Linear`'s batch-1 decode GEMV on packed 4/8-bit weights in half2 arithmetic (float16 x).

Why another packed GEMV: on an H200 (2026-12-04, llama-8b shapes) `linear_nbits_gemv` read its packed
bytes at 0.7-1.3 TB/s. Counted per 16-byte load of 4-bit codes (32 weights) and per weight row, it
spends ~300 instructions: 32 integer-to-float conversions (a quarter-rate unit), and, for every row
again, 32 conversions of x, the norm's 32 multiplies and 32 squares, 32 adds for sum(x); the float16
Linear spends ~50 per 16 bytes. This kernel moves the per-x work out of the loop and does the
per-weight work two at a time:

- **x staged once per block** in shared memory as float16, normalized by the RMSNorm where there is
  one (the norm's sum of squares reduced over the block first; x * inv * gamma rounded to float16, as
  the unfused graph's SimplifiedLayerNormalization output is), each 16-byte slice in the order the
  codes unpack (below) and swizzled within its chunk so that 8 lanes reading 8 chunks hit 8 distinct
  16-byte bank groups. Where the block's bound on the staged values (max|x| * inv * max|gamma|) passes
  X_LIMIT (256 for 4 bits with chunk sums, 512 with word sums, 64 for 8), x is staged times 2^-e
  (exact) and the sums are scaled by 2^e, so the float16 sums below cannot overflow on a massive
  activation.
- **codes to half2 by bit operations**: ``w & 0x000f000f | 0x64006400`` is the half2 (1024 + e_0,
  1024 + e_4) of a 32-bit word's nibbles 0 and 4, minus (1024 + z, 1024 + z) it is (e - z), exact;
  ``w & 0x00f000f0 | 0x64006400`` is (1024 + 16 e_1, 1024 + 16 e_5), and one fma, times 1/16 minus
  (64 + z), gives (e - z) as exactly; the same on ``w >> 8`` gives nibbles 2, 6 and 3, 7 (one shift per
  word; 8 bits: a byte permute gives (1024 + e_0, 1024 + e_2), (1024 + e_1, 1024 + e_3)). Half2 fmas
  with the paired x values sum (e - z) * x over a 16-byte chunk (16 fmas; `SUMS`: "word" sums each
  32-bit word apart, as 8-bit codes do); that sum, converted to float32, is multiplied by the block
  scale there.
- **4 weight rows a warp** (with "swiglu": 2 gate/up pairs), so one staged x slice serves 4 rows. The
  block's 8 warps are KS slices of K times 8 / KS row groups; each warp covers its slice in one round of
  U 16-byte loads per row and lane, issued before the wait on the previous kernel (a dependent launch,
  custom_ops/cuda.py) together with the block scales and zero points; the slices' sums meet in shared
  memory. `plan` picks (KS, U): slices of at most 64 chunks, two loads per lane (llama-8b: q/k/v, o and
  gate/up (2, 2), down (8, 2), the 8-bit LM head (4, 2)). With `PERSISTENT` (the default) the grid is
  two blocks per SM: each block stages x once and loops over row groups, reloading each chunk's
  registers with the next group's weights as soon as they have been used. Both choices come from a
  sweep of every plan and grid on an H100 (2026-12-06, docs/BENCHMARKS.md).

Per 16 bytes of 4-bit codes and row, the arithmetic is 4 shifts, 8 LOP3s, 8 half2 subtractions, 8 fmas
for the codes, 16 fmas with x, 2 conversions, 1 add and 1 fma with the scale ("word" sums: 8, 4 and
4). x is read once per 4 rows from shared memory.

In SASS (nvcc 13.0, sm_90, gate/up's instance) the loop over one row group began at 1403 instructions,
about 175 per chunk and row: the arithmetic, the next group's loads, and the reduction. Four changes
cut it:
- the masks and the magic number go through one LOP3 (`and_or`), where the compiler made two;
- the load offsets are 32-bit, and what depends only on the lane is computed once (`Slot`);
- lanes 0-3 share one store path, where each row had its own diverged branch;
- a row past N loads row 0 instead of a predicated zero fill.

After the first three the loop was 1025 instructions, and the projections ran 13 % faster on an H100
(docs/BENCHMARKS.md, 2026-12-06). With the fourth it was 959 (2.18 ms the llama-8b int4 step); the chunk
sums (`SUMS`) make it 834 (2.12 ms). Of those, about half is the arithmetic above; the next group's loads
take about 140 (addresses, scale and zero-point bytes) and the reduction and epilogue about 100. Then:
- the zero point's half2 forms, 1024 + z and -(64 + z), come from one byte permute each of the slot's
  scale | z * 0x10010000 word (z and 16 z in its high bytes), where a shift and two multiplies made them;
- SwiGLU's silu is `silu_fast` (the SFU's exp and reciprocal, as onnxopt::SwiGLU's kernel), where
  IEEE division took a slow-path check and call;
- x and gamma of a thread's first chunk stay in registers from their load to the staged write after the
  norm's barrier (U <= 2), where gamma was loaded again from L2 on the way to the first group;
- the slices' sums alternate between two shared buffers (`PART_BUFFERS`), one barrier a group fewer.
The loop is 764 instructions for gate/up (747 q/k/v and o, 758 down, 587 the 8-bit head), and the
llama-8b int4 step 2.080 ms on an H100 (2.089 before the last change; docs/BENCHMARKS.md, 2026-12-06).
One more was tried and dropped: a 32-bit scale | zero-point word a block, merged once per weight on the
device, cut gate/up's loop from 758 to 693 instructions (one part buffer), but it reads 4 bytes a block
where the package has 2.5 (2.3 % more for block 128), and the step took 2.096-2.098 ms against
2.079-2.080 without it.

Nsight Compute on the H100 found this kernel issuing on 60 % of cycles. Its stalls are spread over
memory, fixed-latency dependencies, the math pipes and the barrier (docs/BENCHMARKS.md, 2026-12-06).

Rounding against the reference (float32 weights and sums): x rounded to float16 after the norm,
(e - z) * x products and their 16-term (4 bits; 4-term with "word" sums) or 2-term (8 bits) sums in
float16, everything after in float32: `SUMS_ACCURACY` states the result's error per mode ("word" stays
within the float16 Linear's elementwise tolerance; "chunk" does not on every element).

Limits (the host falls back to linear.py's GEMVs otherwise): float16, one row (batch-1 decode), K a
multiple of 128 / bits, at most 24,064 (x in 47 KiB of shared memory) and at most 8 slices of 128
chunks, block_size a multiple of 128 / bits, and the packed weight under 4 GiB (32-bit offsets).
`linear.PACKED_GEMV = "half2"` (the default) selects it; `scripts/gpu_linear_probe.py --bits 4
--packed-gemv half2 --plans` times every plan.
"""

from __future__ import annotations

import os

import numpy as np

from onnxopt.custom_ops.cuda import HALF_PRELUDE
from onnxopt.errors import UserError

THREADS = 256  # 8 warps
ROWS_PER_WARP = 4  # RW in the kernel (swiglu: 2 gate/up pairs)
MAX_K = 47 * 1024 // 2  # x staged as float16 within the 48 KiB default, 1 KiB left for static shared memory

_MOD = "onnxopt_linear_half2"
# (KS, U) pairs the launch plan can pick (`plan`); every instance is compiled with the module
# (U = 1: half the bytes in flight per warp, but smaller row groups; for q/k/v on llama-8b (384 groups
# of 16 rows over 264 resident blocks: two rounds, the second 45 % full) (4, 1) makes 768 groups of 8,
# three rounds of half the size. H100 sweep 2026-12-06 09:47 UTC: (4, 1) 8.12 us for q/k/v against the
# chosen (2, 2)'s 8.69, but one-projection probes misjudge the captured step: see plan().)
PLANS = ((1, 4), (1, 2), (2, 4), (2, 2), (2, 1), (4, 4), (4, 2), (4, 1), (8, 4), (8, 2), (8, 1))
# A grid of at most PERSISTENT blocks per SM, each looping over row groups with the next group's weights
# loaded as the current ones are used (2, the H100 sweep's choice), or one block per row group (0).
# 1 leaves half of each SM's registers free for the next kernel's blocks: started early by the dependent
# launch, they can issue their weight loads while this kernel finishes (by the H100 probe of 2026-12-06,
# each launch costs ~2.9 us beyond its bytes at 2.8 TB/s: 4 launches a layer). Timed 09:48 UTC: 8 layers
# + head 745.7 us at 1 against 610.6 at 2, so 2 stays.
# ONNXOPT_GEMV_BLOCKS_PER_SM sets it for a process (the benchmark's end-to-end comparison).
# ONNXOPT_GEMV_MIN_BLOCKS: the kernel's __launch_bounds__ minimum of resident blocks per SM, 2 (114
# registers, none spilled) or 3 (80 registers, 4-24 bytes spilled by nvcc 13.0 for sm_90). With 3 and
# 2 blocks per SM, a third block of the next kernel fits beside this one's two and, started early by
# the dependent launch, issues its weight loads while they finish, without the 1-block grid's loss of
# parallelism. Timed in the captured int4 step (H100, 2026-12-06 15:48 UTC, `gpu_quant_session.sh
# bench-residency`): 2.641 ms with 2 blocks per SM and 2.262 with 3, against 2.202 for 2 / 2, so 2 stays.
MIN_BLOCKS = int(os.environ.get("ONNXOPT_GEMV_MIN_BLOCKS", "2"))
if MIN_BLOCKS not in (2, 3):
    raise ValueError(f"ONNXOPT_GEMV_MIN_BLOCKS={MIN_BLOCKS}: expected 2 or 3")
PERSISTENT = int(os.environ.get("ONNXOPT_GEMV_BLOCKS_PER_SM", "2"))
if not 0 <= PERSISTENT <= MIN_BLOCKS:
    raise ValueError(f"ONNXOPT_GEMV_BLOCKS_PER_SM={PERSISTENT}: expected 0 (one block per row group) to "
                     f"ONNXOPT_GEMV_MIN_BLOCKS ({MIN_BLOCKS})")


def plan_overrides(text: str) -> dict[tuple[int, int], tuple[int, int]]:
    """ONNXOPT_GEMV_PLANS, "NxK=KS,U;...": the (KS, U) of `plan` replaced for weights of N rows and K
    columns (the packed weight's logical shape), for sweeping plans inside the captured decode step,
    where one-projection probes misjudge them (plan()). An entry that is not a compiled plan raises."""
    overrides = {}
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        try:
            shape, values = entry.split("=")
            n, k = (int(v) for v in shape.lower().split("x"))
            ks, u = (int(v) for v in values.split(","))
        except ValueError:
            raise UserError(f"ONNXOPT_GEMV_PLANS entry {entry!r}: expected NxK=KS,U (e.g. 6144x4096=1,4)") from None
        if (ks, u) not in PLANS:
            raise UserError(f"ONNXOPT_GEMV_PLANS entry {entry!r}: (KS, U) must be one of {PLANS}")
        overrides[(n, k)] = (ks, u)
    return overrides


PLAN_OVERRIDES = plan_overrides(os.environ.get("ONNXOPT_GEMV_PLANS", ""))
# ONNXOPT_GEMV_SUMS: "chunk" (the default) keeps a float16 sum over a 4-bit chunk's 4 words (16
# products a lane of half2) and converts it to float32 once, where "word" converts each 32-bit word's sum
# (4 products): per chunk and row 4 instructions there instead of 16, with x staged at most X_LIMIT 256
# instead of 512 (16 * 15 * 256 = 61440 cannot overflow float16). "chunk" also reduces a warp's 4 row
# sums transposed (6 shuffles instead of 20), multiplies by 2^e once per row, and keeps each slot's
# zero-point byte and shift. In SASS (nvcc 13.0, sm_90) the loop over one row group takes 935 -> 811
# instructions for q/k/v's instance (KS 2, U 2), 959 -> 834 for gate/up's, 965 -> 823 for down's (KS 8),
# at 126-128 registers (no spill). H100, llama-8b int4-wo 128 -> 128, the captured step
# (`gpu_quant_session.sh bench-sums`, 2026-12-06 17:47 UTC, alternating processes): 2.182 / 2.121 /
# 2.182 / 2.121 ms (word / chunk / word / chunk); the GEMV chain of 8 layers + head 614 -> 594 us.
# 8-bit codes keep per-word sums either way. The price is rounding (SUMS_ACCURACY).
SUMS_MODES = ("word", "chunk")
# The float16 sums' accuracy against linear.reference (float32 sums of the same dequantized weights),
# per mode: (relative L2 error, the largest error beyond 2e-3 |reference| as a fraction of the
# reference's rms). Measured on the emulation (`emulate`, which the GPU kernel matches to a float16 ulp,
# tests/gpu/test_kernels.py) over the test shapes: "word" 3.9e-4 - 6.4e-4 and at most 2.8e-3; "chunk"
# 5.3e-4 - 1.1e-3 and at most 5.0e-3 (a 16-term float16 sum's rounding grows with its partial sums:
# sqrt(sum j) over the chain, 1.8x the 4-term sum's). The float16 output's own rounding is ~2e-4, and
# int4 weights' rounding (which both modes share) moves a projection by about 1e-1 of its rms.
SUMS_ACCURACY = {"word": (1e-3, 5e-3), "chunk": (2e-3, 1e-2)}
SUMS = os.environ.get("ONNXOPT_GEMV_SUMS", "") or "chunk"
if SUMS not in SUMS_MODES:
    raise ValueError(f"ONNXOPT_GEMV_SUMS={SUMS!r}: expected one of {SUMS_MODES}")
_EXPRESSIONS = tuple(f"linear_half2_gemv<{b}, {a}, {ks}, {u}>" for b in (4, 8) for a in (0, 1) for ks, u in PLANS)
# ONNXOPT_GEMV_PART_BUFFERS: with K in slices (KS > 1), each row group's slice sums meet in shared memory
# behind a barrier, and with one buffer (1) a second barrier keeps the next group from writing it while
# slice 0 still reads. 2 (the default) alternates two buffers, so one barrier a group suffices (a group's
# writers pass the next group's barrier, which slice 0 reaches only after reading): the same arithmetic in
# the same order, bit for bit (GPU test), one barrier fewer per group for q/k/v, o, gate/up (KS 2) and
# down (KS 8). H100, llama-8b int4-wo 128 -> 128, the captured step (`gpu_quant_session.sh bench-gemv`,
# 2026-12-06 19:54 UTC, alternating processes 2 / 1 / 2 / 1): 2.080, 2.089, 2.079, 2.089 ms.
PART_BUFFERS = int(os.environ.get("ONNXOPT_GEMV_PART_BUFFERS", "2"))
if PART_BUFFERS not in (1, 2):
    raise ValueError(f"ONNXOPT_GEMV_PART_BUFFERS={PART_BUFFERS}: expected 1 or 2")
_SOURCE = HALF_PRELUDE + (f"#define MIN_BLOCKS {MIN_BLOCKS}\n#define SUMS_CHUNK {int(SUMS == 'chunk')}\n"
                          f"#define PART_BUFFERS {PART_BUFFERS}\n") + r"""
// The largest staged |x|: 4 bits, |e - z| <= 15 and 4 products a word sum to at most 60 * 512 (with
// SUMS_CHUNK 16 products a chunk, 240 * 256 = 61440, the roundings' growth still below 65504); 8 bits,
// |e - z| <= 255, 2 products, 510 * 64 (float16's largest finite value is 65504)
#define X_LIMIT (BITS == 4 ? (SUMS_CHUNK ? 256.f : 512.f) : 64.f)
#define SUMS_CHUNK4 (SUMS_CHUNK && BITS == 4)  // chunk sums apply to 4-bit codes only
__device__ __forceinline__ float hsum2(unsigned int a) {
    return to_f((half_bits)(a & 0xffffu)) + to_f((half_bits)(a >> 16));
}

// One 32-bit word of codes against its x pairs (x: 4 half2 for 4 bits, 2 for 8): sum of (e - z) * x in
// float16, returned as float (the block scale multiplies it in float32). z2: half2 of 1024 + z; z16:
// half2 of -(64 + z). 4 bits: (w & 0x000f000f) | 0x64006400 is the half2 (1024 + e0, 1024 + e4), minus
// z2 gives (e - z); (w & 0x00f000f0) | 0x64006400 is (1024 + 16 e1, 1024 + 16 e5), times 1/16 minus
// (64 + z) in one fma gives (e - z) too (every step exact in float16), so one shift serves four pairs.
// |e - z| <= 2^bits - 1 and x is staged at most X_LIMIT, so the float16 sum cannot overflow.
// (a & MASK) | c in one LOP3: written as C, the compiler splits it into two (MASK and the magic number
// cannot both be immediates of one instruction), so c comes in a register
template <unsigned int MASK>
__device__ __forceinline__ unsigned int and_or(unsigned int a, unsigned int c) {
    unsigned int d; asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(d) : "r"(a), "n"(MASK), "r"(c)); return d;
}

template <int BITS>
__device__ __forceinline__ unsigned int word_acc(unsigned int w, const unsigned int* x, unsigned int z2,
                                                 unsigned int z16, unsigned int magic, unsigned int p) {
    if (BITS == 4) {
        const unsigned int v = w >> 8, sixteenth = 0x2c002c00u;
        p = hfma2(hsub2(and_or<0x000f000fu>(w, magic), z2), x[0], p);
        p = hfma2(hfma2(and_or<0x00f000f0u>(w, magic), sixteenth, z16), x[1], p);
        p = hfma2(hsub2(and_or<0x000f000fu>(v, magic), z2), x[2], p);
        p = hfma2(hfma2(and_or<0x00f000f0u>(v, magic), sixteenth, z16), x[3], p);
    } else {
        p = hfma2(hsub2(__byte_perm(w, 0x64646464u, 0x4240), z2), x[0], p);
        p = hfma2(hsub2(__byte_perm(w, 0x64646464u, 0x4341), z2), x[1], p);
    }
    return p;
}

// Position of 16-byte slice j of chunk c in shared memory (module docstring: bank groups).
template <int SUBS>
__device__ __forceinline__ int swizzled(int c, int j) {
    return c * SUBS + ((j + (c >> (SUBS == 4 ? 1 : 2))) & (SUBS - 1));
}

// The 4 weight rows of row group `unit` (swiglu: gate rows 2u, 2u + 1 and their up rows); N past the end.
template <int ACT>
__device__ __forceinline__ void group_rows(int unit, int N, int (&rowid)[4]) {
    const int half = N / 2;
    if (ACT) {
        const int j0 = unit * 2;
        rowid[0] = j0 < half ? j0 : N;
        rowid[1] = j0 + 1 < half ? j0 + 1 : N;
        rowid[2] = j0 < half ? half + j0 : N;
        rowid[3] = j0 + 1 < half ? half + j0 + 1 : N;
    } else {
        #pragma unroll
        for (int r = 0; r < 4; ++r) rowid[r] = unit * 4 + r < N ? unit * 4 + r : N;
    }
}

// One of a lane's U chunk positions, the same for every row group: the chunk c, its block, whether the
// lane has it (within the warp's slice and K), and (4 bits) its zero point's byte in the row and shift
struct Slot { int c; unsigned int blk; bool valid; unsigned int zcol, zshift; };

// Load a slot of a warp's slice for its 4 rows: the 16-byte codes, and the block scale's bits | zero point
// << 16. Offsets in 32 bits (the host keeps N * row_bytes below 2^32).
template <int BITS>
__device__ __forceinline__ void load_chunk(const unsigned char* __restrict__ w, const half_bits* __restrict__ scales,
                                           const unsigned char* __restrict__ zp, const int (&rowid)[4], int N,
                                           const Slot& slot, unsigned int k_blocks, unsigned int row_bytes,
                                           unsigned int zp_row, uint4 (&buf)[4], unsigned int (&sz)[4]) {
    if (!slot.valid)
        return;  // past the warp's slice or K: the arithmetic skips this slot
    #pragma unroll
    for (int r = 0; r < 4; ++r) {
        // a row past N reads row 0 instead: in bounds, with no zero fill, and its sums are never stored
        const unsigned int row = rowid[r] < N ? (unsigned int)rowid[r] : 0u;
        buf[r] = __ldcs(reinterpret_cast<const uint4*>(w + (row * row_bytes + 16u * (unsigned int)slot.c)));
        const unsigned int s = scales[row * k_blocks + slot.blk];
        unsigned int z = 1u << (BITS - 1);
        if (zp != nullptr)
            // SUMS_CHUNK: the zero point's byte and shift come with the slot, not recomputed for each row
            z = BITS == 8 ? zp[row * zp_row + slot.blk]
                : SUMS_CHUNK ? (zp[row * zp_row + slot.zcol] >> slot.zshift) & 15u
                : (zp[row * zp_row + (slot.blk >> 1)] >> (4u * (slot.blk & 1u))) & 15u;
        sz[r] = s | (z * 0x10010000u);  // z in byte 2 and (4 bits) 16 z in byte 3, for the byte permutes
    }
}

// y = x . W^T (+ bias, SwiGLU, residual) for one row x [K] (module docstring). The block's 8 warps are
// KS slices of K times 8 / KS groups of 4 weight rows (swiglu: 2 gate/up pairs); the warp of slice s
// takes a contiguous range of `per` chunks, U loads of 32 lanes per row in one round (the host's plan
// makes U * 32 >= per). The block stages x once and takes row groups blockIdx.x, + gridDim.x, ...: with
// a grid of fewer blocks than groups (persistent), each load of the next group's rows is issued as soon
// as the chunk it replaces has been used, so the weights stay in flight across groups.
template <int BITS, int ACT, int KS, int U>
__global__ void __launch_bounds__(256, MIN_BLOCKS) linear_half2_gemv(
        const half_bits* __restrict__ x, const unsigned char* __restrict__ w, const half_bits* __restrict__ scales,
        const unsigned char* __restrict__ zp, const half_bits* __restrict__ gamma, const half_bits* __restrict__ residual,
        const half_bits* __restrict__ bias, half_bits* __restrict__ y, int K, int N, int block_size, int norm, float eps,
        const unsigned char* __restrict__ pf, unsigned int pf_lines) {
    constexpr int VALS = 128 / BITS, SUBS = VALS / 8, RW = 4, G = 8 / KS;
    extern __shared__ uint4 xs[];  // K / 8 slices of x in float16, paired and swizzled
    __shared__ float red[24];
    __shared__ float part[PART_BUFFERS][8][RW];  // KS > 1: each warp's row sums (PART_BUFFERS: alternating)
    int pb = 0;  // the buffer of this group
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int slice = warp % KS, half = N / 2;
    const int units = ACT ? (half + 1) / 2 : (N + RW - 1) / RW, groups = (units + G - 1) / G;
    const int k_blocks = (K + block_size - 1) / block_size;
    const unsigned int row_bytes = (unsigned int)(k_blocks * block_size * BITS / 8);
    const int chunks = K / VALS, zp_row = BITS == 8 ? k_blocks : (k_blocks + 1) / 2;
    const int per = (chunks + KS - 1) / KS, first = slice * per;
    Slot slot[U];
    #pragma unroll
    for (int u = 0; u < U; ++u) {
        const int i = u * 32 + lane, c = first + i;
        const unsigned int blk = (unsigned int)(c * VALS / block_size);
        slot[u] = {c, blk, i < per && c < chunks, blk >> 1, 4u * (blk & 1u)};
    }

    int g = blockIdx.x, rowid[RW];
    group_rows<ACT>(g * G + warp / KS, N, rowid);
    // the first group's weights, block scales and zero points, before the wait on the previous kernel
    uint4 buf[U][RW];
    unsigned int sz[U][RW];
    #pragma unroll
    for (int u = 0; u < U; ++u)
        load_chunk<BITS>(w, scales, zp, rowid, N, slot[u], k_blocks, row_bytes, zp_row, buf[u], sz[u]);
    if (pf_lines) prefetch_l2(pf, pf_lines);  // a later kernel's weights into L2 (no dependence on anything)
    grid_wait();  // a dependent launch: the weights, scales and zero points above, x below

    // Stage x. A thread's first chunk (c = tid) stays in registers, x and gamma, from the load to the
    // staged write after the norm's barrier (the gamma reload from L2 was one more round trip on the
    // path from the previous kernel's end to the first group's sums); chunks past the first (K above
    // 256 chunks: 8192 for 4 bits) go to their swizzled place at once, the thread that wrote one reading
    // it back there, and reload gamma. With four loads a lane (U 4) the registers are the weights': all
    // chunks take the shared-memory path (holding them spilled 140-170 bytes, nvcc 13.0 sm_90).
    constexpr bool KEEP = U <= 2;
    float ss = 0.f, mx = 0.f, mg = 0.f;  // sum of squares, max |x|, max |gamma|
    uint4 xr[SUBS], gr[SUBS];
    for (int c = tid; c < chunks; c += blockDim.x) {
        #pragma unroll
        for (int j = 0; j < SUBS; ++j) {
            const uint4 v = __ldg(reinterpret_cast<const uint4*>(x) + c * SUBS + j);
            if (KEEP && c == tid) xr[j] = v; else xs[swizzled<SUBS>(c, j)] = v;
            const unsigned int q[4] = {v.x, v.y, v.z, v.w};
            #pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float a = to_f((half_bits)(q[i] & 0xffffu)), b = to_f((half_bits)(q[i] >> 16));
                ss = fmaf(a, a, fmaf(b, b, ss));
                mx = fmaxf(mx, fmaxf(fabsf(a), fabsf(b)));
            }
            if (norm) {
                const uint4 gm = __ldg(reinterpret_cast<const uint4*>(gamma) + c * SUBS + j);
                if (KEEP && c == tid) gr[j] = gm;
                const unsigned int gq[4] = {gm.x, gm.y, gm.z, gm.w};
                #pragma unroll
                for (int i = 0; i < 4; ++i)
                    mg = fmaxf(mg, fmaxf(fabsf(to_f((half_bits)(gq[i] & 0xffffu))), fabsf(to_f((half_bits)(gq[i] >> 16)))));
            }
        }
    }
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        ss += __shfl_xor_sync(0xffffffffu, ss, o);
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        mg = fmaxf(mg, __shfl_xor_sync(0xffffffffu, mg, o));
    }
    if (lane == 0) { red[warp] = ss; red[8 + warp] = mx; red[16 + warp] = mg; }
    __syncthreads();
    float total = 0.f, xmax = 0.f, gmax = 0.f;
    #pragma unroll
    for (int i = 0; i < 8; ++i) { total += red[i]; xmax = fmaxf(xmax, red[8 + i]); gmax = fmaxf(gmax, red[16 + i]); }
    const float inv = norm ? rsqrtf(total / (float)K + eps) : 1.f;
    // x is staged times 2^-e (exact) with e >= 0 the least that keeps every staged value <= X_LIMIT; the
    // sums are multiplied by 2^e with the block scale
    const float bound = norm ? xmax * inv * gmax : xmax;
    int e = 0;
    if (bound > X_LIMIT) frexpf(bound / X_LIMIT, &e);
    const float down = ldexpf(1.f, -e), up = ldexpf(1.f, e);
    for (int c = tid; c < chunks; c += blockDim.x) {
        #pragma unroll
        for (int j = 0; j < SUBS; ++j) {
            const uint4 slice_x = KEEP && c == tid ? xr[j] : xs[swizzled<SUBS>(c, j)];
            float f[8];
            const unsigned int q[4] = {slice_x.x, slice_x.y, slice_x.z, slice_x.w};
            #pragma unroll
            for (int i = 0; i < 4; ++i) { f[2 * i] = to_f((half_bits)(q[i] & 0xffffu)); f[2 * i + 1] = to_f((half_bits)(q[i] >> 16)); }
            if (norm) {
                const uint4 gm = KEEP && c == tid ? gr[j] : __ldg(reinterpret_cast<const uint4*>(gamma) + c * SUBS + j);
                const unsigned int gq[4] = {gm.x, gm.y, gm.z, gm.w};
                #pragma unroll
                for (int i = 0; i < 4; ++i) {
                    f[2 * i] *= inv * to_f((half_bits)(gq[i] & 0xffffu));
                    f[2 * i + 1] *= inv * to_f((half_bits)(gq[i] >> 16));
                }
            }
            #pragma unroll
            for (int i = 0; i < 8; ++i) f[i] = round_to(f[i], x) * down;  // the unfused graph's float16 value, scaled exactly
            // pairs in unpack order: 4 bits (x0,x4) (x1,x5) (x2,x6) (x3,x7); 8 bits (x0,x2) (x1,x3) (x4,x6) (x5,x7)
            unsigned int pr[4];
            #pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int a = BITS == 4 ? i : (i & 1) + 4 * (i >> 1), b = BITS == 4 ? i + 4 : a + 2;
                pr[i] = half_of(f[a]) | (half_of(f[b]) << 16);
            }
            xs[swizzled<SUBS>(c, j)] = make_uint4(pr[0], pr[1], pr[2], pr[3]);
        }
    }
    __syncthreads();

    for (; g < groups; g += gridDim.x) {
        const int next = g + gridDim.x;
        int nrow[RW];
        group_rows<ACT>(next * G + warp / KS, next < groups ? N : 0, nrow);  // all "past the end" without a next group
        float acc[RW];
        #pragma unroll
        for (int r = 0; r < RW; ++r) acc[r] = 0.f;
        const unsigned int magic = 0x64006400u;  // in a register: and_or's third operand
        const unsigned int kz = 0xd464d464u;  // the high bytes of 1024 + z and -(64 + z), for the permutes
        #pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = slot[u].c;
            if (slot[u].valid) {
                unsigned int z2[RW], z16[RW];  // as half2 of one value: 1024 + z, -(64 + z)
                float sc[RW];  // the block scale times 2^e
                #pragma unroll
                for (int r = 0; r < RW; ++r) {
                    // SUMS_CHUNK4: 2^e multiplies the row's sum once, after the loop (exact either way)
                    sc[r] = to_f((half_bits)(sz[u][r] & 0xffffu)) * (SUMS_CHUNK4 ? 1.f : up);
                    // one byte permute each: (0x64 | z) twice is 1024 + z, (0xd4 | 16 z) -(64 + z)
                    z2[r] = __byte_perm(sz[u][r], kz, 0x4242);
                    z16[r] = __byte_perm(sz[u][r], kz, 0x5353);
                }
                unsigned int p[RW];  // SUMS_CHUNK4: the chunk's float16 sums, as half2
                #pragma unroll
                for (int r = 0; r < RW; ++r) p[r] = 0u;
                #pragma unroll
                for (int j = 0; j < 4; ++j) {  // the chunk's 4 words of codes
                    const uint4 xv = xs[swizzled<SUBS>(c, BITS == 4 ? j : j >> 1)];
                    unsigned int xp[4] = {xv.x, xv.y, xv.z, xv.w};
                    const unsigned int* px = BITS == 4 ? xp : xp + 2 * (j & 1);
                    #pragma unroll
                    for (int r = 0; r < RW; ++r) {
                        const unsigned int word = j == 0 ? buf[u][r].x : j == 1 ? buf[u][r].y : j == 2 ? buf[u][r].z : buf[u][r].w;
                        if (SUMS_CHUNK4)
                            p[r] = word_acc<BITS>(word, px, z2[r], z16[r], magic, p[r]);
                        else
                            acc[r] = fmaf(sc[r], hsum2(word_acc<BITS>(word, px, z2[r], z16[r], magic, 0u)), acc[r]);
                    }
                }
                if (SUMS_CHUNK4) {
                    #pragma unroll
                    for (int r = 0; r < RW; ++r) acc[r] = fmaf(sc[r], hsum2(p[r]), acc[r]);
                }
            }
            if (next < groups)  // this chunk's registers now serve the next group
                load_chunk<BITS>(w, scales, zp, nrow, N, slot[u], k_blocks, row_bytes, zp_row, buf[u], sz[u]);
        }
        if (SUMS_CHUNK4) {
            #pragma unroll
            for (int r = 0; r < RW; ++r) acc[r] *= up;
        }
        if (SUMS_CHUNK) {
            // transposed: lanes with bit 4 clear keep rows 0 and 1 and send 2 and 3 to their partner, then
            // bit 3 halves again; lane l ends with row (l >> 3) & 3 summed over the warp, in acc[0]
            const bool b4 = lane & 16, b3 = lane & 8;
            float a0 = b4 ? acc[2] : acc[0], a1 = b4 ? acc[3] : acc[1];
            const float s0 = b4 ? acc[0] : acc[2], s1 = b4 ? acc[1] : acc[3];
            a0 += __shfl_xor_sync(0xffffffffu, s0, 16);
            a1 += __shfl_xor_sync(0xffffffffu, s1, 16);
            float t = b3 ? a1 : a0;
            t += __shfl_xor_sync(0xffffffffu, b3 ? a0 : a1, 8);
            #pragma unroll
            for (int o = 4; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
            acc[0] = t;
            if (KS > 1) {  // the slices' sums meet in shared memory; slice 0 writes
                const int rw = (lane >> 3) & 3;
                if ((lane & 7) == 0) part[pb][warp][rw] = t;
                __syncthreads();
                if (slice == 0) {
                    #pragma unroll
                    for (int s = 1; s < KS; ++s) acc[0] += part[pb][warp + s][rw];
                }
                if (PART_BUFFERS == 1) __syncthreads();  // part is written again by the next group
                else pb ^= 1;  // the next group writes the other buffer; the one after, past its barrier
            }
        } else {
            #pragma unroll
            for (int r = 0; r < RW; ++r) {
                #pragma unroll
                for (int o = 16; o > 0; o >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
            }
            if (KS > 1) {  // the slices' sums meet in shared memory; slice 0 writes
                if (lane == 0) {
                    #pragma unroll
                    for (int r = 0; r < RW; ++r) part[pb][warp][r] = acc[r];
                }
                __syncthreads();
                if (slice == 0) {
                    #pragma unroll
                    for (int r = 0; r < RW; ++r) {
                        #pragma unroll
                        for (int s = 1; s < KS; ++s) acc[r] += part[pb][warp + s][r];
                    }
                }
                if (PART_BUFFERS == 1) __syncthreads();  // part is written again by the next group
                else pb ^= 1;
            }
        }
        // Lane q of slice 0 writes the group's row q (with "swiglu", lanes 0 and 1 write a gate/up pair
        // each): one code path for those lanes, not one diverged branch per row. SUMS_CHUNK: lane 8 q
        // holds row q (acc[0]), and a gate's up row is 16 lanes on
        const int q = SUMS_CHUNK ? (lane >> 3) & 3 : lane & 3;
        const int n = q == 0 ? rowid[0] : q == 1 ? rowid[1] : q == 2 ? rowid[2] : rowid[3];
        const float v = SUMS_CHUNK ? acc[0] : q == 0 ? acc[0] : q == 1 ? acc[1] : q == 2 ? acc[2] : acc[3];
        const float up_sum = SUMS_CHUNK && ACT ? __shfl_down_sync(0xffffffffu, acc[0], 16) : 0.f;
        const bool writer = SUMS_CHUNK ? (lane & 7) == 0 && q < (ACT ? 2 : RW) : lane < (ACT ? 2 : RW);
        if (slice == 0 && writer && n < N) {
            float out = v;
            if (ACT) {
                float up = SUMS_CHUNK ? up_sum : q == 0 ? acc[2] : acc[3];
                if (bias != nullptr) { out += to_f(bias[n]); up += to_f(bias[n + half]); }
                out = silu_fast(out) * up;  // as onnxopt::SwiGLU's kernel: the SFU's exp and reciprocal
            } else if (bias != nullptr) {
                out += to_f(bias[n]);
            }
            if (residual != nullptr) out += to_f(residual[n]);
            store(y + n, out);
        }
        #pragma unroll
        for (int r = 0; r < RW; ++r) rowid[r] = nrow[r];
    }
}
"""


def supports(rows: int, bits: int, block_size: int, k: int, itemsize: int, n: int = 1) -> bool:
    """Whether this GEMV takes the launch of an [N, K] weight (module docstring, "Limits")."""
    vals = 128 // bits if bits in (4, 8) else 0
    return (rows == 1 and itemsize == 2 and vals > 0 and k % vals == 0 and block_size % vals == 0
            and 0 < k <= MAX_K and k // vals <= 8 * 128
            and n * -(-k // block_size) * block_size * bits // 8 < 2**32)  # the kernel's 32-bit offsets


def plan(k: int, bits: int) -> tuple[int, int]:
    """(KS, U) of the launch: the fewest K slices of at most 64 chunks (two loads per lane), else 8
    slices of four loads. Chosen by the sweep of every plan and both grids on an H100 (2026-12-06,
    llama-8b shapes, docs/BENCHMARKS.md): with the persistent grid this plan was the fastest or within
    4 % of it for q/k/v, o, gate/up, down and the 8-bit LM head; four loads per lane, one slice or
    one block per row group were slower (down: 38.5 us for (4, 4) one block per group, 18.6 us here).
    Alone, q/k/v and o ran faster as (1, 4) (8.20 against 8.69 us, 5.31 against 6.07; 2026-12-06 09:47 UTC),
    but in the captured int4 step (dependent launches) (1, 4) for them made the token slower: 2.222 against
    2.180 ms. The step, not the probe, decides."""
    chunks = k // (128 // bits)
    ks = next(v for v in (1, 2, 4, 8) if -(-chunks // v) <= 64 or v == 8)
    return ks, (2 if -(-chunks // ks) <= 64 else 4)


def grid(n: int, swiglu: bool, ks: int = 1) -> int:
    """Blocks of the launch: 8 / KS groups of 4 rows (swiglu: 2 gate/up pairs)."""
    units = -(-n // 2 // 2) if swiglu else -(-n // ROWS_PER_WARP)
    return -(-units // (8 // ks))


def gemv(x, weight, scales, zero_points, gamma, residual, bias, out, *, n: int, k: int, bits: int, block_size: int,
         activation: str, epsilon: float, plan_override: tuple | None = None, prefetch: tuple | None = None) -> None:
    """Launch for one row of float16 x [..., K] into `out` (linear.py checked the inputs).
    `plan_override` (KS, U) or (KS, U, blocks per SM, 0 for none) replaces `plan` and PERSISTENT
    (scripts/gpu_linear_probe.py sweeps them). `prefetch` (device pointer, bytes): a range the grid
    prefetches into L2 before its wait (runtime/device_graph.py: a later kernel's weights)."""
    from onnxopt.custom_ops.cuda import declare_module, launch, prefetch_args, raw_function, sm_count

    act = activation == "swiglu"
    if plan_override is None:
        plan_override = PLAN_OVERRIDES.get((n, k))
    ks, u, persistent = (*plan(k, bits), PERSISTENT) if plan_override is None else (
        (*plan_override, PERSISTENT) if len(plan_override) == 2 else plan_override)
    if -(-(k // (128 // bits)) // ks) > 32 * u:
        raise ValueError(f"Linear half2 GEMV: {ks} slices of {u} loads per lane do not cover K = {k}")
    blocks = grid(n, act, ks)
    if persistent:  # at most `persistent` resident blocks per SM (__launch_bounds__(256, 2)) loop over the row groups
        blocks = min(blocks, int(persistent) * sm_count())
    declare_module(_MOD, _EXPRESSIONS)
    null = np.uint64(0)
    launch(raw_function(_MOD, _SOURCE, f"linear_half2_gemv<{bits}, {int(act)}, {ks}, {u}>"), (blocks,), (THREADS,),
           (x, weight, scales, null if zero_points is None else zero_points, null if gamma is None else gamma,
            null if residual is None else residual, null if bias is None else bias, out, np.int32(k), np.int32(n),
            np.int32(block_size), np.int32(gamma is not None), np.float32(epsilon), *prefetch_args(prefetch)),
           shared_mem=2 * k, dependent=True)


def fma16(a, b, c):
    """fma.rn.f16x2 on float16 arrays: a * b + c rounded once (exact in float64 for float16 operands)."""
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float16)


X_LIMIT = {4: 512.0, 8: 64.0}  # the kernel's X_LIMIT: the largest staged |x| ("word" sums)
X_LIMIT_CHUNK = {4: 256.0, 8: 64.0}  # with ONNXOPT_GEMV_SUMS=chunk (16 products a float16 sum)


def prescale_exponent(x, gamma=None, *, bits: int, epsilon: float = 1e-5, sums: str | None = None) -> int:
    """e >= 0 of the kernel's staging: x (normalized) is staged times 2^-e, the least e that keeps the
    kernel's bound on every staged |x| (max|x| * inv * max|gamma|) at most X_LIMIT (`sums`: SUMS's
    modes, default the module's)."""
    limit = (X_LIMIT_CHUNK if (sums or SUMS) == "chunk" else X_LIMIT)[bits]
    f = x.astype(np.float32)
    bound = float(np.abs(f).max(initial=0.0))
    if gamma is not None:
        inv = np.float32(1.0) / np.sqrt(np.float32((f * f).sum(dtype=np.float32) / f.shape[-1] + epsilon), dtype=np.float32)
        bound *= float(inv) * float(np.abs(gamma.astype(np.float32)).max(initial=0.0))
    return int(np.frexp(bound / limit)[1]) if bound > limit else 0


def staged(x, gamma=None, *, bits: int, epsilon: float = 1e-5, sums: str | None = None) -> np.ndarray:
    """The kernel's shared-memory x for one row x [K] float16: uint32 [K / 2] words (half2 pairs), each
    chunk's 16-byte slices paired in unpack order and swizzled (module docstring); values normalized,
    rounded to float16 and times 2^-prescale_exponent."""
    k = x.shape[-1]
    vals, subs = 128 // bits, 16 // bits
    f = x.astype(np.float32)
    if gamma is not None:
        inv = np.float32(1.0) / np.sqrt(np.float32((f * f).sum(dtype=np.float32) / k + epsilon), dtype=np.float32)
        f = f * (inv * gamma.astype(np.float32))
    down = np.float32(2.0 ** -prescale_exponent(x, gamma, bits=bits, epsilon=epsilon, sums=sums))
    a = (f.astype(np.float16).astype(np.float32) * down).astype(np.float16).reshape(k // 8, 8)
    order = [0, 4, 1, 5, 2, 6, 3, 7] if bits == 4 else [0, 2, 1, 3, 4, 6, 5, 7]
    slices = np.ascontiguousarray(a[:, order]).view(np.uint32)  # [K / 8, 4] half2 words
    out = np.empty_like(slices)
    chunk = np.arange(k // 8) // subs
    j = np.arange(k // 8) % subs
    shift = 1 if subs == 4 else 2
    out[chunk * subs + ((j + (chunk >> shift)) & (subs - 1))] = slices
    assert k % vals == 0
    return out.reshape(-1)


def accuracy_miss(got, expected, sums: str | None = None) -> str | None:
    """Where a half2 GEMV output (or its emulation) misses SUMS_ACCURACY for `sums` (default the
    module's mode) against linear.reference's `expected`: a one-line account, else None."""
    rel_l2, excess = SUMS_ACCURACY[sums or SUMS]
    g, e = np.asarray(got, np.float64).ravel(), np.asarray(expected, np.float64).ravel()
    rms = float(np.sqrt(np.mean(e * e))) or 1.0
    err = np.abs(g - e)
    l2, worst = float(np.sqrt(np.mean(err * err))) / rms, float(np.max(err - 2e-3 * np.abs(e), initial=0.0)) / rms
    if np.isfinite(g).all() and l2 <= rel_l2 and worst <= excess:
        return None
    return (f"{sums or SUMS} sums: relative L2 error {l2:.2e} (bound {rel_l2:.0e}), largest excess {worst:.2e} "
            f"of the rms (bound {excess:.0e}), at index {int(np.argmax(err - 2e-3 * np.abs(e)))}")


def emulate(x, weight, scales, zero_points=None, gamma=None, residual=None, bias=None, *, n: int, k: int, bits: int,
            block_size: int, activation: str = "", epsilon: float = 1e-5, sums: str | None = None) -> np.ndarray:
    """What the kernel computes for one row x [K] float16, in NumPy, from MatMulNBits' packed weight:
    the staged layout read back as the kernel does (swizzled slice of each word), the codes unpacked with
    its bit operations, and its float16 roundings (`sums`: ONNXOPT_GEMV_SUMS's modes, default the
    module's: "chunk" sums a 4-bit chunk's 4 words in float16 before float32); checks the design against
    linear.reference."""
    sums = sums or SUMS
    chunk_sums = sums == "chunk" and bits == 4
    vals, subs = 128 // bits, 16 // bits
    k_blocks = -(-k // block_size)
    chunks = k // vals
    xs = staged(x.reshape(-1), gamma, bits=bits, epsilon=epsilon, sums=sums).reshape(-1, 4)  # [K / 8 slices, 4 words]
    words = np.ascontiguousarray(weight).reshape(n, -1).view(np.uint32)  # [N, row_bytes / 4]
    shift = 1 if subs == 4 else 2
    up = np.float32(2.0 ** prescale_exponent(x.reshape(-1), gamma, bits=bits, epsilon=epsilon, sums=sums))
    acc = np.zeros(n, np.float32)
    for c in range(chunks):
        blk = c * vals // block_size
        s = scales.reshape(n, k_blocks)[:, blk].astype(np.float16).astype(np.float32) * up
        if zero_points is None:
            z = np.full(n, 1 << (bits - 1), np.uint32)
        elif bits == 8:
            z = zero_points.reshape(n, -1)[:, blk].astype(np.uint32)
        else:
            z = ((zero_points.reshape(n, -1)[:, blk // 2] >> (4 * (blk & 1))) & 15).astype(np.uint32)
        zh = (np.uint32(0x6400) + z).astype(np.uint16).view(np.float16)
        p = np.zeros((n, 2), np.float16)
        for j in range(4):
            sl = (j if bits == 4 else j >> 1)
            xv = xs[c * subs + ((sl + (c >> shift)) & (subs - 1))]
            px = xv if bits == 4 else xv[2 * (j & 1):2 * (j & 1) + 2]
            w = words[:, c * 4 + j]
            if bits == 4:
                codes = [((w >> np.uint32(4 * i)) & np.uint32(0x000F000F)) | np.uint32(0x64006400) for i in range(4)]
            else:  # __byte_perm(w, 0x64646464, 0x4240 / 0x4341)
                b = [(w >> np.uint32(8 * i)) & np.uint32(0xFF) for i in range(4)]
                codes = [b[0] | np.uint32(0x6400) | ((b[2] | np.uint32(0x6400)) << np.uint32(16)),
                         b[1] | np.uint32(0x6400) | ((b[3] | np.uint32(0x6400)) << np.uint32(16))]
            if not chunk_sums:
                p = np.zeros((n, 2), np.float16)
            for code, xw in zip(codes, px):
                h = code.astype(np.uint32).view(np.uint16).reshape(n, 2).view(np.float16)  # (low, high) halves
                q = (h.astype(np.float32) - zh[:, None].astype(np.float32)).astype(np.float16)  # e - z, exact
                xpair = np.array([xw], np.uint32).view(np.float16)  # (low, high)
                p = fma16(q, xpair[None, :], p)
            if not chunk_sums:
                acc += s * (p[:, 0].astype(np.float32) + p[:, 1].astype(np.float32))
        if chunk_sums:  # the kernel multiplies by 2^e after the loop: exact, the same value
            acc += s * (p[:, 0].astype(np.float32) + p[:, 1].astype(np.float32))
    from onnxopt.custom_ops.linear import reference_epilogue

    return reference_epilogue(acc, bias, None if residual is None else residual.reshape(-1), activation=activation,
                              dtype=np.float16)
