"""Blockwise weight quantization in the layout of ORT's com.microsoft MatMulNBits.

Spec: onnxruntime docs/ContribOperators.md, "com.microsoft.MatMulNBits". For Y = A @ W with
W [K, N] (K input channels, N output channels), the op holds W transposed, cut along K into
k_blocks = ceil(K / block_size) blocks per output channel (the last one zero-padded):

    B            uint8 [N, k_blocks, block_size * bits / 8]   for bits 4: element 2j in the low nibble
                                                              of byte j, element 2j+1 in the high one
    scales       float [N * k_blocks]
    zero_points  uint8 [N * ceil(k_blocks * bits / 8)]        bits 4: block 2j low nibble, 2j+1 high
    W[k, n] = (q[n, k] - zero_point[n, k // block_size]) * scale[n, k // block_size]

Quantization is asymmetric round-to-nearest per block, with the range widened to hold 0 so that 0
is exact (the zero-padding and all-zero rows stay zero):

    lo = min(0, min(w)), hi = max(0, max(w)), scale = (hi - lo) / (2^bits - 1)
    zp = clip(round(-lo / scale), 0, 2^bits - 1), q = clip(round(w / scale) + zp, 0, 2^bits - 1)

`dequantize` is the NumPy reference of what MatMulNBits computes with (tests compare the op to it).
"""

from __future__ import annotations

import dataclasses

import numpy as np

BITS = (4, 8)
BLOCK_SIZES = (16, 32, 64, 128, 256)


@dataclasses.dataclass
class QuantizedWeight:
    bits: int
    block_size: int
    K: int
    N: int
    packed: np.ndarray  # uint8 [N, k_blocks, block_size * bits // 8]
    scales: np.ndarray  # float32 [N * k_blocks]
    zero_points: np.ndarray  # uint8 [N * ceil(k_blocks * bits / 8)]

    @property
    def k_blocks(self) -> int:
        return -(-self.K // self.block_size)


def _blocks(weight_nk: np.ndarray, block_size: int) -> np.ndarray:
    """[N, K] -> [N, k_blocks, block_size], zero-padded along K."""
    n, k = weight_nk.shape
    k_blocks = -(-k // block_size)
    padded = np.zeros((n, k_blocks * block_size), dtype=np.float32)
    padded[:, :k] = weight_nk
    return padded.reshape(n, k_blocks, block_size)


def quantize_codes(weight_nk: np.ndarray, bits: int, block_size: int, clip=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q uint8 [N, k_blocks, block_size], scale float32 [N, k_blocks], zp uint8 [N, k_blocks]).
    `clip` [N, k_blocks] in (0, 1] shrinks each block's range (values outside saturate)."""
    qmax = (1 << bits) - 1
    blocks = _blocks(weight_nk, block_size)
    lo = np.minimum(blocks.min(axis=-1), 0.0)
    hi = np.maximum(blocks.max(axis=-1), 0.0)
    if clip is not None:
        lo, hi = lo * clip, hi * clip
    scale = ((hi - lo) / qmax).astype(np.float32)
    scale[scale == 0] = 1.0  # an all-zero block: any scale is exact
    zp = np.clip(np.rint(-lo / scale), 0, qmax)
    q = np.clip(np.rint(blocks / scale[..., None]) + zp[..., None], 0, qmax)
    return q.astype(np.uint8), scale, zp.astype(np.uint8)


def fake_quantize(weight_kn: np.ndarray, bits: int, block_size: int, clip=None) -> np.ndarray:
    """W [K, N] -> the dequantized W [K, N] that MatMulNBits would compute with (float32)."""
    k = weight_kn.shape[0]
    q, scale, zp = quantize_codes(np.ascontiguousarray(weight_kn.T), bits, block_size, clip)
    w = (q.astype(np.float32) - zp[..., None]) * scale[..., None]  # [N, k_blocks, block]
    return w.reshape(w.shape[0], -1)[:, :k].T


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    """uint8 [..., 2m] of 4-bit values -> [..., m]: element 2j low nibble, 2j+1 high nibble."""
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def quantize(weight_kn: np.ndarray, bits: int, block_size: int, clip=None) -> QuantizedWeight:
    """Quantize W [K, N] (the B input of a MatMul) for MatMulNBits; `clip` as in quantize_codes."""
    if bits not in BITS:
        raise ValueError(f"bits {bits}: MatMulNBits here supports {BITS}")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block size {block_size}: choose one of {BLOCK_SIZES}")
    k, n = weight_kn.shape
    q, scale, zp = quantize_codes(np.ascontiguousarray(weight_kn.T, dtype=np.float32), bits, block_size, clip)
    k_blocks = q.shape[1]
    if bits == 4:
        packed = _pack_nibbles(q)
        if k_blocks % 2:
            zp = np.concatenate([zp, np.zeros((n, 1), np.uint8)], axis=1)  # pad nibble, never read
        zero_points = _pack_nibbles(zp)
    else:
        packed, zero_points = q, zp
    return QuantizedWeight(bits, block_size, k, n, np.ascontiguousarray(packed), scale.reshape(-1),
                           np.ascontiguousarray(zero_points).reshape(-1))


def dequantize(qw: QuantizedWeight) -> np.ndarray:
    """The NumPy reference of MatMulNBits' weight: unpack B, scales and zero points -> W [K, N]."""
    n, k_blocks = qw.N, qw.k_blocks
    if qw.bits == 4:
        q = np.stack([qw.packed & 0x0F, qw.packed >> 4], axis=-1).reshape(n, k_blocks, qw.block_size)
        zp_bytes = qw.zero_points.reshape(n, -1)
        zp = np.stack([zp_bytes & 0x0F, zp_bytes >> 4], axis=-1).reshape(n, -1)[:, :k_blocks]
    else:
        q = qw.packed
        zp = qw.zero_points.reshape(n, k_blocks)
    scale = qw.scales.reshape(n, k_blocks)
    w = (q.astype(np.float32) - zp[..., None].astype(np.float32)) * scale[..., None]
    return w.reshape(n, -1)[:, : qw.K].T
