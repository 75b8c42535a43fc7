"""`onnxopt::Linear`'s decode GEMV on packed 4/8-bit weights with tensor cores (float16 activations).

Batch-1 decode on a 4-bit weight reads a quarter of float16's bytes, so the kernel has a quarter of
the time per weight: converting each code to float and multiplying it in float32 (linear.py's
`linear_nbits_gemv`) is bound by that arithmetic (0.7-1.3 TB/s of packed bytes on an H200), not by
memory. Here a warp turns eight codes into four half2 registers with a few bit operations and one
half2 op per pair, and the tensor cores do the products:

- codes -> half, exactly: ``(q & 0x000f000f) | 0x64006400`` is the half2 (1024 + q0, 1024 + q4), minus
  (1024 + z) gives q - z; the high nibbles (``0x00f000f0``: 1024 + 16 q) are scaled by 1/16 and
  offset by -(64 + z) in one fma. Eight bits: a byte permute builds (1024 + b0, 1024 + b1). Each
  result is a small integer, exact in float16.
- ``mma.sync.m16n8k16`` (f16 inputs, f32 accumulation: products exact, sums in float32): A is 16
  weight rows x 16 k of (q - z), B is 16 k x 8 columns of X (the batch rows; MAX_GEMV_ROWS = 8), D is
  16 rows x 8 batch rows. D is scaled by each row's block scale when the block ends.

The weight is read in the tensor cores' fragment order, so `repack` (run once per weight, on the
device, when a weight is first used; the original stays for prefill) reorders MatMulNBits' B into:
tiles of 16 output rows x groups of KG = 16 * SPL k (SPL k16 steps per 16-byte load: 4 at 4 bits, 2
at 8), one 16-byte load per lane per group. Inside a group the k order is permuted (the same for A
and B, so the dot product is unchanged) such that each lane's B elements are contiguous in X: lane
(g, c) = (lane / 4, lane % 4) reads X[k0 + c * KG / 4 ...] with one or two 16-byte loads. With
"swiglu", a tile's rows 0-7 are gate rows j..j+7 and rows 8-15 the matching up rows, so a lane holds
gate and up of the same output and applies SwiGLU in registers.

A block (8 warps) owns one tile; its warps split K by rounds of U groups; partial sums and the norm's
sums of squares meet in shared memory. The block size must be a multiple of KG (64 at 4 bits, 32 at
8); linear.py keeps the float32 GEMV for other block sizes and for float32.

Measured (H200, 2026-12-04, `scripts/gpu_linear_probe.py --hidden 4096 --intermediate 14336 --layers 8
--replays 20 --bits 4`): correct (tests/gpu), but **not faster**: 1222.1 us of projections per token
against 1127.1 for `linear_nbits_gemv` and 1166.4 for float16 Linear; q/k/v reads its packed bytes at
0.8 TB/s, gate/up at 0.9, down at 1.2. Likely bound by bytes in flight (U = 4 loads per lane, one tile
a block, scattered 2-byte scale and zero-point loads), not by the conversion. So passes/linear.py keeps
MatMulNBits by default (`packed=True` opts in); ideas: more loads in flight, several tiles a block,
scales and zero points repacked per tile.
"""

from __future__ import annotations

import numpy as np

from onnxopt.custom_ops.cuda import HALF_PRELUDE

THREADS = 256  # 8 warps, one tile of 16 rows
ROUND = 4  # U: 16-byte weight loads per lane in one round


def steps_per_load(bits: int) -> int:
    """k16 mma steps in one lane's 16-byte load (4 bits: 4 B of codes per lane per step, 8 bits: 8 B)."""
    return 4 if bits == 4 else 2


def group_k(bits: int) -> int:
    """KG: the k one 16-byte load per lane covers (64 at 4 bits, 32 at 8)."""
    return 16 * steps_per_load(bits)


def supports(bits: int, block_size: int, k: int) -> bool:
    return bits in (4, 8) and block_size % group_k(bits) == 0 and k % 8 == 0


def row_order(n: int, swiglu: bool) -> np.ndarray:
    """Source row of each tile row (int64 [tiles * 16]; n: a padding row). With swiglu, tile T holds gate
    rows 8T..8T+7 and up rows N/2 + 8T.. in its rows 0-7 and 8-15."""
    if not swiglu:
        tiles = -(-n // 16)
        order = np.arange(tiles * 16)
        return np.where(order < n, order, n)
    half = n // 2
    tiles = -(-half // 8)
    t, r = np.divmod(np.arange(tiles * 16), 16)
    j = 8 * t + r % 8
    return np.where(j < half, j + (r >= 8) * half, n)


def unpack_codes(xp, weight, n: int, k_blocks: int, block_size: int, bits: int):
    """MatMulNBits' B [N, k_blocks, block_size * bits / 8] -> codes uint8 [N, k_blocks * block_size]."""
    b = weight.reshape(n, k_blocks * block_size * bits // 8)
    if bits == 8:
        return b
    return xp.stack([b & 15, b >> 4], axis=-1).reshape(n, k_blocks * block_size)


def unpack_zero_points(xp, zero_points, n: int, k_blocks: int, bits: int):
    """uint8 [N, k_blocks]: the zero point of each block (2^(bits-1) without zero points)."""
    if zero_points is None:
        return xp.full((n, k_blocks), 1 << (bits - 1), dtype=xp.uint8)
    if bits == 8:
        return zero_points.reshape(n, k_blocks)
    z = zero_points.reshape(n, -1)
    return xp.stack([z & 15, z >> 4], axis=-1).reshape(n, -1)[:, :k_blocks]


def repack(xp, weight, scales, zero_points, *, n: int, k: int, bits: int, block_size: int, swiglu: bool):
    """(codes uint8 [tiles, groups, 32, 16], scales [tiles * 16, k_blocks], zeros uint8 [tiles * 16,
    k_blocks]) in the kernel's order (module docstring); `xp` numpy or cupy."""
    k_blocks = -(-k // block_size)
    spl, kg = steps_per_load(bits), group_k(bits)
    groups = -(-k // kg)
    order = xp.asarray(row_order(n, swiglu))
    tiles = order.size // 16
    codes = unpack_codes(xp, weight, n, k_blocks, block_size, bits)[:, : groups * kg]
    a = xp.zeros((n + 1, groups * kg), dtype=xp.uint8)  # row n: padding
    a[:n, : codes.shape[1]] = codes
    a = a[order]
    # k = l*KG + c*(KG/4) + 4*s + p; row = tile*16 + hi*8 + g;  fragment a_i, i = 4*(p // 2) + 2*hi + p % 2
    a = a.reshape(tiles, 2, 8, groups, 4, spl, 2, 2)  # tile, hi, g, l, c, s, p // 2, p % 2
    a = a.transpose(0, 3, 2, 4, 5, 6, 1, 7)  # tile, l, g, c, s, p // 2, hi, p % 2
    a = xp.ascontiguousarray(a).reshape(tiles, groups, 32, spl, 8)
    if bits == 4:  # word nibbles [a0 a2 a4 a6 a1 a3 a5 a7], two per byte, low first
        a = a[..., [0, 2, 4, 6, 1, 3, 5, 7]].reshape(tiles, groups, 32, spl * 4, 2)
        a = a[..., 0] | (a[..., 1] << 4)
    packed = xp.ascontiguousarray(a.reshape(tiles, groups, 32, 16))
    s = xp.concatenate([scales.reshape(n, k_blocks), xp.zeros((1, k_blocks), dtype=scales.dtype)])[order]
    z = unpack_zero_points(xp, zero_points, n, k_blocks, bits)
    z = xp.concatenate([z, xp.full((1, k_blocks), 1 << (bits - 1), dtype=xp.uint8)])[order]
    return packed, xp.ascontiguousarray(s), xp.ascontiguousarray(z)


def emulate(x, packed, scales, zeros, gamma=None, residual=None, bias=None, *, n: int, k: int, bits: int,
            block_size: int, activation: str = "", epsilon: float = 1e-5):
    """What the kernel computes, in NumPy, from the repacked arrays and the mma fragment layout (PTX ISA,
    m16n8k16): checks `repack` against linear.reference without a GPU. x [rows, K] float16."""
    rows = x.shape[0]
    spl, kg = steps_per_load(bits), group_k(bits)
    tiles, groups = packed.shape[:2]
    xf = x.astype(np.float32)
    ss = (xf * xf).sum(axis=1)
    b_in = (xf * gamma.astype(np.float32)).astype(np.float16) if gamma is not None else x
    bpad = np.zeros((8, groups * kg), np.float16)
    bpad[:rows, :k] = b_in
    if bits == 4:
        nib = np.stack([packed & 15, packed >> 4], axis=-1).reshape(tiles, groups, 32, spl, 8)
        frag = np.empty_like(nib)
        frag[..., [0, 2, 4, 6, 1, 3, 5, 7]] = nib  # a_i from the word's nibble order
    else:
        frag = packed.reshape(tiles, groups, 32, spl, 8)
    acc = np.zeros((tiles, 16, 8), np.float32)
    lane = np.arange(32)
    g, c = lane // 4, lane % 4
    for l in range(groups):
        blk = l * kg // block_size
        for s in range(spl):
            # A [tile, 16 rows, 16 cols] from fragment positions; col -> k of this step
            a_mat = np.zeros((tiles, 16, 16), np.float32)
            for i in range(8):
                row = g + 8 * ((i // 2) % 2)
                col = 2 * c + (i % 2) + 8 * (i // 4)
                z = zeros.reshape(tiles, 16, -1)[:, :, blk][:, row]
                a_mat[:, row, col] = frag[:, l, :, s, i].astype(np.float32) - z
            # fragment col j <-> k = l*KG + c*(KG/4) + 4*s + p, p = (j % 8 // 2... ) : cols 2c, 2c+1, 2c+8, 2c+9
            kmap = np.empty(16, np.int64)
            for cc in range(4):
                for p in range(4):
                    kmap[2 * cc + (p % 2) + 8 * (p // 2)] = l * kg + cc * (kg // 4) + 4 * s + p
            b_mat = bpad[:, kmap].astype(np.float32).T  # [16 k, 8 batch]
            d = a_mat @ b_mat
            acc += d * scales.reshape(tiles, 16, -1)[:, :, blk][:, :, None].astype(np.float32)
    acc = acc.transpose(2, 0, 1).reshape(8, tiles * 16)[:rows]  # [rows, tile rows]
    if gamma is not None:
        acc = acc / np.sqrt(ss[:, None] / k + epsilon)
    order = row_order(n, activation == "swiglu")
    z = np.zeros((rows, n + 1), np.float32)
    z[:, order] = acc
    z = z[:, :n]
    if bias is not None:
        z = z + bias.astype(np.float32)
    if activation == "swiglu":
        gate, up = z[:, : n // 2], z[:, n // 2:]
        z = gate / (1 + np.exp(-gate)) * up
    if residual is not None:
        z = z + residual.reshape(rows, -1).astype(np.float32)
    return z.astype(np.float16)


_MOD = "onnxopt_linear_mma"
_SOURCE = HALF_PRELUDE + r"""
__device__ __forceinline__ unsigned int prmt(unsigned int a, unsigned int b, unsigned int sel) {
    unsigned int d; asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel)); return d;
}
// The A fragment of k16 step s of a lane's 16-byte load: registers (a0 a1) (a2 a3) (a4 a5) (a6 a7) of
// rows g, g+8, g, g+8, as half2 of q - z. zlo: (1024 + z_g) twice; zhi: 4 bits -(64 + z_{g+8}) twice
// (the high nibbles come as 1024 + 16 q), 8 bits (1024 + z_{g+8}) twice.
template <int BITS>
__device__ __forceinline__ void fragment(const uint4& w, int s, unsigned int zlo, unsigned int zhi, unsigned int (&a)[4]) {
    const unsigned int words[4] = {w.x, w.y, w.z, w.w};
    if (BITS == 4) {  // one word per step: nibbles [a0 a2 a4 a6 a1 a3 a5 a7]
        const unsigned int q = words[s], q8 = q >> 8;
        a[0] = hsub2((q & 0x000f000fu) | 0x64006400u, zlo);
        a[1] = hfma2((q & 0x00f000f0u) | 0x64006400u, 0x2c002c00u, zhi);  // x 1/16
        a[2] = hsub2((q8 & 0x000f000fu) | 0x64006400u, zlo);
        a[3] = hfma2((q8 & 0x00f000f0u) | 0x64006400u, 0x2c002c00u, zhi);
    } else {  // two words per step: bytes [a0 a1 a2 a3] [a4 a5 a6 a7]
        const unsigned int lo = words[2 * s], hi = words[2 * s + 1];
        a[0] = hsub2(prmt(lo, 0x64u, 0x4140u), zlo);
        a[1] = hsub2(prmt(lo, 0x64u, 0x4342u), zhi);
        a[2] = hsub2(prmt(hi, 0x64u, 0x4140u), zlo);
        a[3] = hsub2(prmt(hi, 0x64u, 0x4342u), zhi);
    }
}

template <int BITS>
__device__ __forceinline__ void zero_consts(int zg, int zg8, unsigned int& zlo, unsigned int& zhi) {
    zlo = (0x6400u | (unsigned int)zg) * 0x10001u;
    zhi = BITS == 4 ? (0xd400u | ((unsigned int)zg8 << 4)) * 0x10001u : (0x6400u | (unsigned int)zg8) * 0x10001u;
}

// One block per tile of 16 rows (linear_mma.py docstring); rows m < `rows` <= 8 of x (float16).
template <int BITS, int ACT>
__global__ void __launch_bounds__(256, 2) linear_nbits_mma(
        const half_bits* __restrict__ x, const uint4* __restrict__ w, const half_bits* __restrict__ scales,
        const unsigned char* __restrict__ zeros, const half_bits* __restrict__ gamma,
        const half_bits* __restrict__ residual, const half_bits* __restrict__ bias, half_bits* __restrict__ y,
        int rows, int K, int N, int groups, int k_blocks, int block_size, int norm, float eps) {
    constexpr int SPL = BITS == 4 ? 4 : 2, KG = 16 * SPL, SPAN = KG / 4, XL = SPAN / 8, U = 4;
    __shared__ float red[8][32][4];
    __shared__ float ssr[8][8];
    const int tile = blockIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int rg = tile * 16 + g, rg8 = rg + 8;  // the lane's rows (repacked order)
    const bool active = g < rows;  // the lane holds batch row m = g of B
    float acc[4] = {0.f, 0.f, 0.f, 0.f}, part[4] = {0.f, 0.f, 0.f, 0.f}, ss = 0.f;
    for (int base = warp * U; base < groups; base += 8 * U) {  // uniform per warp
        uint4 wv[U], xv[U][XL], gv[U][XL];
        float sg[U], sg8[U];
        int zg[U], zg8[U];
        #pragma unroll
        for (int u = 0; u < U; ++u) {
            const int l = base + u;
            const bool ok = l < groups;
            wv[u] = ok ? __ldcs(w + ((size_t)tile * groups + l) * 32 + lane) : make_uint4(0u, 0u, 0u, 0u);
            const int blk = ok ? l * KG / block_size : 0;
            sg[u] = ok ? to_f(scales[(size_t)rg * k_blocks + blk]) : 0.f;
            sg8[u] = ok ? to_f(scales[(size_t)rg8 * k_blocks + blk]) : 0.f;
            zg[u] = zeros[(size_t)rg * k_blocks + blk];
            zg8[u] = zeros[(size_t)rg8 * k_blocks + blk];
            #pragma unroll
            for (int h = 0; h < XL; ++h) {
                const int k = l * KG + c * SPAN + h * 8;
                const bool in = ok && active && k < K;
                xv[u][h] = in ? __ldg(reinterpret_cast<const uint4*>(x + (size_t)g * K + k)) : make_uint4(0u, 0u, 0u, 0u);
                gv[u][h] = in && norm ? __ldg(reinterpret_cast<const uint4*>(gamma + k)) : make_uint4(0u, 0u, 0u, 0u);
            }
        }
        if (norm && active) {  // B = x * gamma (float16), the sums of squares of x beside it
            #pragma unroll
            for (int u = 0; u < U; ++u) {
                #pragma unroll
                for (int h = 0; h < XL; ++h) {
                    {  // out of range: x and gamma are zeros, so B stays zero
                        unsigned int xw[4] = {xv[u][h].x, xv[u][h].y, xv[u][h].z, xv[u][h].w};
                        const unsigned int gw[4] = {gv[u][h].x, gv[u][h].y, gv[u][h].z, gv[u][h].w};
                        #pragma unroll
                        for (int i = 0; i < 4; ++i) {
                            const float x0 = to_f((half_bits)(xw[i] & 0xffffu)), x1 = to_f((half_bits)(xw[i] >> 16));
                            ss = fmaf(x0, x0, fmaf(x1, x1, ss));
                            xw[i] = half2_of(x0 * to_f((half_bits)(gw[i] & 0xffffu)), x1 * to_f((half_bits)(gw[i] >> 16)));
                        }
                        xv[u][h] = make_uint4(xw[0], xw[1], xw[2], xw[3]);
                    }
                }
            }
        }
        #pragma unroll
        for (int u = 0; u < U; ++u) {
            const int l = base + u;
            if (l >= groups) break;
            unsigned int zlo, zhi;
            zero_consts<BITS>(zg[u], zg8[u], zlo, zhi);
            #pragma unroll
            for (int s = 0; s < SPL; ++s) {
                unsigned int a[4];
                fragment<BITS>(wv[u], s, zlo, zhi, a);
                // B: the lane's k 4s .. 4s+3 of its span: words 2s, 2s+1 (16-byte load h = s / 2 at 4 bits)
                const uint4& xs = xv[u][(2 * s) / 4];
                const unsigned int xw[4] = {xs.x, xs.y, xs.z, xs.w};
                mma16816(part, a, xw[(2 * s) % 4], xw[(2 * s + 1) % 4]);
            }
            if (((l + 1) * KG) % block_size == 0 || u == U - 1 || l == groups - 1) {  // the block's scale
                acc[0] = fmaf(sg[u], part[0], acc[0]); acc[1] = fmaf(sg[u], part[1], acc[1]);
                acc[2] = fmaf(sg8[u], part[2], acc[2]); acc[3] = fmaf(sg8[u], part[3], acc[3]);
                part[0] = part[1] = part[2] = part[3] = 0.f;
            }
        }
    }
    ss += __shfl_xor_sync(0xffffffffu, ss, 1);
    ss += __shfl_xor_sync(0xffffffffu, ss, 2);
    #pragma unroll
    for (int i = 0; i < 4; ++i) red[warp][lane][i] = acc[i];
    if (c == 0) ssr[warp][g] = ss;
    __syncthreads();
    if (warp != 0) return;
    float inv[2] = {1.f, 1.f};
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        float v = 0.f;
        #pragma unroll
        for (int q = 0; q < 8; ++q) v += red[q][lane][i];
        acc[i] = v;
    }
    if (norm) {
        #pragma unroll
        for (int j = 0; j < 2; ++j) {
            float v = 0.f;
            #pragma unroll
            for (int q = 0; q < 8; ++q) v += ssr[q][(2 * c + j) & 7];
            inv[j] = rsqrtf(v / (float)K + eps);
        }
    }
    // D: acc[0], acc[1]: row g, batch rows 2c, 2c+1; acc[2], acc[3]: row g+8
    #pragma unroll
    for (int j = 0; j < 2; ++j) {
        const int m = 2 * c + j;
        if (m >= rows) continue;
        if (ACT) {
            const int half = N / 2, unit = tile * 8 + g;
            if (unit >= half) continue;
            float gt = acc[j] * inv[j], up = acc[2 + j] * inv[j];
            if (bias != nullptr) { gt += to_f(bias[unit]); up += to_f(bias[unit + half]); }
            float v = gt / (1.f + expf(-gt)) * up;
            if (residual != nullptr) v += to_f(residual[(size_t)m * half + unit]);
            store(y + (size_t)m * half + unit, v);
        } else {
            #pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int n = tile * 16 + g + 8 * r;
                if (n >= N) continue;
                float v = acc[2 * r + j] * inv[j];
                if (bias != nullptr) v += to_f(bias[n]);
                if (residual != nullptr) v += to_f(residual[(size_t)m * N + n]);
                store(y + (size_t)m * N + n, v);
            }
        }
    }
}
"""
_EXPRESSIONS = tuple(f"linear_nbits_mma<{b}, {a}>" for b in (4, 8) for a in (0, 1))

_REPACKED: dict[tuple, tuple] = {}


def repacked(weight, scales, zero_points, *, n: int, k: int, bits: int, block_size: int, swiglu: bool):
    """`repack` on the device, once per weight (keyed by the arrays' device pointers; the first call must
    not be inside a stream capture: it allocates)."""
    from onnxopt.custom_ops.cuda import cupy, device_id

    cp = cupy()
    key = (device_id(), weight.data.ptr, scales.data.ptr, 0 if zero_points is None else zero_points.data.ptr,
           n, k, bits, block_size, swiglu)
    got = _REPACKED.get(key)
    if got is None:
        # the sources held with it: while the repacked weight stands for them, no other weight gets their memory
        got = _REPACKED[key] = (*repack(cp, weight, scales, zero_points, n=n, k=k, bits=bits, block_size=block_size,
                                        swiglu=swiglu), (weight, scales, zero_points))
    return got[:3]


def release(pointers) -> int:
    """Drop the repacked weights whose codes are at these device pointers (a runtime's constants, as the
    runtime goes away: runtime/device_graph.py). Returns how many went."""
    from onnxopt.custom_ops.cuda import drop_weights

    return drop_weights(_REPACKED, pointers)


def gemv(x, weight, scales, zero_points, gamma, residual, bias, out, *, rows: int, n: int, k: int, bits: int,
         block_size: int, activation: str, epsilon: float) -> None:
    """Launch the kernel for `rows` <= 8 rows of float16 x [..., K] into `out` (linear.py checked the inputs)."""
    from onnxopt.custom_ops.cuda import cupy, declare_module, raw_function

    cp = cupy()
    act = activation == "swiglu"
    packed, s, z = repacked(weight, scales, zero_points, n=n, k=k, bits=bits, block_size=block_size, swiglu=act)
    tiles, groups = packed.shape[:2]
    declare_module(_MOD, _EXPRESSIONS)
    fn = raw_function(_MOD, _SOURCE, f"linear_nbits_mma<{bits}, {int(act)}>")
    null = np.uint64(0)
    fn((tiles,), (THREADS,),
       (x, packed, s, z, null if gamma is None else gamma, null if residual is None else residual,
        null if bias is None else bias, out, np.int32(rows), np.int32(k), np.int32(n), np.int32(groups),
        np.int32(s.shape[1]), np.int32(block_size), np.int32(gamma is not None), np.float32(epsilon)))
    del cp
