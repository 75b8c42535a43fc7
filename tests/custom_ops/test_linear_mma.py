"""The tensor-core packed GEMV's weight order (custom_ops/linear_mma.py) on the CPU: `repack` followed
by `emulate` (the kernel's arithmetic on the mma fragment layout, in NumPy) equals linear.reference on
MatMulNBits' packed weight. The kernel itself is checked on the GPU (tests/gpu/test_kernels.py)."""

from __future__ import annotations

import numpy as np
import pytest

from onnxopt.calibration.blockwise import quantize
from onnxopt.custom_ops import linear, linear_mma

# (rows, N, K, activation, norm, residual, bias, bits, block_size, zero points): K past one group and
# not a multiple of it, N not a multiple of the tile (16 rows; 8 units with swiglu), rows 1..8
CASES = [
    (1, 48, 256, "", True, False, False, 4, 64, True),
    (3, 40, 200, "swiglu", True, True, True, 4, 128, True),
    (8, 33, 96, "", False, True, True, 8, 32, False),
    (5, 18, 160, "swiglu", False, False, True, 8, 64, True),
    (2, 100, 328, "", True, True, False, 4, 64, False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"r{c[0]}-n{c[1]}-k{c[2]}-{c[3] or 'none'}-int{c[7]}-b{c[8]}")
def test_repacked_weight_through_the_fragment_layout_is_the_reference(case):
    rows, n, k, act, norm, res, bias, bits, bs, with_zp = case
    rng = np.random.default_rng(n + k)
    x = (rng.standard_normal((rows, k)) * 2).astype(np.float16)
    w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float16)
    gamma = (1 + 0.3 * rng.standard_normal(k)).astype(np.float16) if norm else None
    r = rng.standard_normal((rows, n // 2 if act else n)).astype(np.float16) if res else None
    b = (0.5 * rng.standard_normal(n)).astype(np.float16) if bias else None
    qw = quantize(w.astype(np.float32).T, bits, bs)
    scales, zp = qw.scales.astype(np.float16), (qw.zero_points if with_zp else None)
    expected = linear.reference(x, qw.packed, gamma, r, b, scales, zp, activation=act, epsilon=1e-6, bits=bits,
                                block_size=bs).astype(np.float32)
    packed, s, z = linear_mma.repack(np, qw.packed, scales, zp, n=n, k=k, bits=bits, block_size=bs,
                                     swiglu=act == "swiglu")
    assert packed.dtype == np.uint8 and packed.shape[2:] == (32, 16)
    got = linear_mma.emulate(x, packed, s, z, gamma, r, b, n=n, k=k, bits=bits, block_size=bs, activation=act,
                             epsilon=1e-6).astype(np.float32)
    # exact products and float32 sums; with the norm B is x * gamma rounded to float16
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=2e-3 if norm else 1e-3)


def test_row_order_pairs_gate_and_up_rows_in_one_tile():
    order = linear_mma.row_order(20, swiglu=True)  # 10 units: two tiles, the second half padding
    assert order[:8].tolist() == list(range(8)) and order[8:16].tolist() == list(range(10, 18))
    assert order[16:18].tolist() == [8, 9] and (order[18:24] == 20).all() and order[24:26].tolist() == [18, 19]
    assert (linear_mma.row_order(20, swiglu=False)[20:] == 20).all()


def test_supports_needs_blocks_of_whole_groups():
    assert linear_mma.supports(4, 128, 4096) and linear_mma.supports(8, 32, 576)
    assert not linear_mma.supports(4, 32, 4096) and not linear_mma.supports(4, 128, 4092)


def test_release_drops_the_repacked_weights_given(monkeypatch):
    """linear_mma.release (a runtime's finalizer, runtime/device_graph.py): the repacked weights whose
    codes are at the pointers given (key[1]) go, the others stay. Each entry also holds its sources, so no
    other weight can be allocated at a cached pointer and find a stale repack there."""
    entries = {(0, 100, 1, 2, 64, 128, 4, 128, False): "a", (0, 200, 3, 4, 64, 128, 4, 128, True): "b",
               (0, 100, 5, 6, 64, 256, 4, 128, False): "c"}
    monkeypatch.setattr(linear_mma, "_REPACKED", dict(entries))
    assert linear_mma.release(frozenset({100, 999})) == 2
    assert list(linear_mma._REPACKED.values()) == ["b"]
