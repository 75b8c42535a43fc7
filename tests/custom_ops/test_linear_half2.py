"""The half2 packed GEMV's design (custom_ops/linear_half2.py) on the CPU: its staged x layout and its
arithmetic (codes unpacked by its bit operations, float16 products and partial sums), emulated in
NumPy, equal linear.reference on MatMulNBits' packed weight within its float16 sums' accuracy
(`SUMS_ACCURACY`; "word" sums also within the float16 Linear's elementwise tolerance). The kernel itself
runs on the GPU (tests/gpu/test_kernels.py, gemv "half2"), checked there against this emulation."""

from __future__ import annotations

import numpy as np
import pytest

from onnxopt.calibration.blockwise import quantize
from onnxopt.custom_ops import linear, linear_half2

# (N, K, activation, norm, residual, bias, bits, block_size, zero points): N not a multiple of a
# block's 32 rows (16 pairs with swiglu), blocks of 32..128, K up to llama-8b's down projection
CASES = [
    (48, 256, "", True, False, False, 4, 128, True),
    (40, 512, "swiglu", True, True, True, 4, 32, True),
    (33, 256, "", False, True, True, 8, 32, False),
    (18, 384, "swiglu", False, False, True, 8, 128, True),
    (100, 1024, "", True, True, False, 4, 64, False),
    (32, 14336, "", False, True, False, 4, 128, True),
    (1000, 2048, "swiglu", True, False, False, 4, 32, False),  # the largest "chunk" error of the GPU tests' shapes
]


@pytest.mark.parametrize("sums", linear_half2.SUMS_MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"n{c[0]}-k{c[1]}-{c[2] or 'none'}-int{c[6]}-b{c[7]}")
def test_the_kernels_arithmetic_is_the_reference(case, sums):
    n, k, act, norm, res, bias, bits, bs, with_zp = case
    rng = np.random.default_rng(n + k)
    x = (rng.standard_normal(k) * 2).astype(np.float16)
    w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float16)
    gamma = (1 + 0.3 * rng.standard_normal(k)).astype(np.float16) if norm else None
    r = rng.standard_normal(n // 2 if act else n).astype(np.float16) if res else None
    b = (0.5 * rng.standard_normal(n)).astype(np.float16) if bias else None
    qw = quantize(w.astype(np.float32).T, bits, bs)
    scales, zp = qw.scales.astype(np.float16), (qw.zero_points if with_zp else None)
    expected = linear.reference(x[None], qw.packed, gamma, None if r is None else r[None], b, scales, zp, activation=act,
                                epsilon=1e-6, bits=bits, block_size=bs).astype(np.float32).ravel()
    got = linear_half2.emulate(x, qw.packed, scales, zp, gamma, r, b, n=n, k=k, bits=bits, block_size=bs,
                               activation=act, epsilon=1e-6, sums=sums)
    assert got.dtype == np.float16 and got.shape == expected.shape
    assert linear_half2.accuracy_miss(got, expected, sums) is None, linear_half2.accuracy_miss(got, expected, sums)
    if sums == "word":
        np.testing.assert_allclose(got.astype(np.float32), expected, rtol=2e-3, atol=2e-3)  # LINEAR_TOL float16


@pytest.mark.parametrize("bits", [4, 8])
def test_staged_x_holds_every_value_once_in_pairs_and_swizzled(bits):
    k = 1024
    x = (np.arange(k) / 16).astype(np.float16)  # exact, every value distinct and within X_LIMIT (no prescale)
    words = linear_half2.staged(x, bits=bits)
    halves = words.view(np.float16)
    assert sorted(halves.tolist()) == x.tolist()
    vals, subs = 128 // bits, 16 // bits
    slices = halves.reshape(k // 8, 8)
    # chunk 5's slice 1 sits at its swizzled place, its pairs in the unpack order of the codes
    c, j = 5, 1
    at = c * subs + ((j + (c >> (1 if subs == 4 else 2))) & (subs - 1))
    first = c * vals + 8 * j
    order = [0, 4, 1, 5, 2, 6, 3, 7] if bits == 4 else [0, 2, 1, 3, 4, 6, 5, 7]
    assert slices[at].tolist() == [(first + o) / 16 for o in order]
    # 8 lanes reading 8 consecutive chunks' slice j hit 8 distinct 16-byte bank groups
    for j in range(subs):
        groups = {(cc * subs + ((j + (cc >> (1 if subs == 4 else 2))) & (subs - 1))) % 8 for cc in range(8)}
        assert len(groups) == 8


def test_launch_limits_and_grid():
    assert linear_half2.supports(1, 4, 128, 4096, 2) and linear_half2.supports(1, 8, 32, 14336, 2)
    assert not linear_half2.supports(2, 4, 128, 4096, 2)  # one row
    assert not linear_half2.supports(1, 4, 128, 4096, 4)  # float16 only
    assert not linear_half2.supports(1, 4, 16, 4096, 2)  # a 16-byte load of codes inside one block
    assert not linear_half2.supports(1, 4, 128, 4100, 2) and not linear_half2.supports(1, 4, 128, 32768, 2)
    assert linear_half2.supports(1, 8, 128, 4096, 2, n=128256)  # llama-8b's LM head: 525 MB of codes
    assert not linear_half2.supports(1, 4, 128, 4096, 2, n=2**21)  # 4 GiB of codes: past 32-bit offsets
    assert linear_half2.grid(6144, False) == 192 and linear_half2.grid(28672, True) == 896
    assert linear_half2.grid(33, False) == 2 and linear_half2.grid(100, True) == 4
    assert linear.PACKED_GEMV in linear.PACKED_GEMVS and linear.PACKED_GEMV == "half2"  # fastest on the H100


def test_high_nibbles_by_one_sixteenth_are_exact():
    """(1024 + 16 e) * 1/16 - (64 + z), one float16 fma, is e - z exactly for every 4-bit e and z."""
    e, z = np.meshgrid(np.arange(16), np.arange(16))
    code = (np.uint16(0x6400) | (e.astype(np.uint16) << np.uint16(4))).view(np.float16)  # 1024 + 16 e
    assert (code.astype(np.float64) == 1024 + 16 * e).all()
    minus = (np.uint16(0xD400) + np.uint16(16) * z.astype(np.uint16)).view(np.float16)  # -(64 + z)
    assert (minus.astype(np.float64) == -(64 + z)).all()
    got = linear_half2.fma16(code, np.array(1 / 16, np.float16), minus)
    assert (got.astype(np.float64) == e - z).all()


def test_plan_covers_k_in_one_round():
    for k, bits in [(4096, 4), (14336, 4), (4096, 8), (2048, 4), (576, 4), (linear_half2.MAX_K, 4), (16384, 8)]:
        ks, u = linear_half2.plan(k, bits)
        assert (ks, u) in linear_half2.PLANS
        assert -(-(k // (128 // bits)) // ks) <= 32 * u  # one round covers a slice
        assert linear_half2.supports(1, bits, 128, k, 2)
    # the H100 sweep's best (docs/BENCHMARKS.md): slices of at most 64 chunks, two loads per lane
    assert linear_half2.plan(14336, 4) == (8, 2)  # 448 chunks: 8 slices of 56
    assert linear_half2.plan(4096, 4) == (2, 2)
    assert linear_half2.plan(4096, 8) == (4, 2)
    assert linear_half2.grid(4096, False, 4) == 512 and linear_half2.grid(28672, True, 1) == 896
    assert not linear_half2.supports(1, 8, 32, 16400, 2)  # 8 bits: past 8 slices of 128 chunks


@pytest.mark.parametrize("sums", linear_half2.SUMS_MODES)
@pytest.mark.parametrize("bits", [4, 8])
def test_large_inputs_are_staged_scaled_by_a_power_of_two_and_match(bits, sums):
    """A massive activation (|x| ~ 3000, past what float16 sums of (e - z) * x may hold) is staged times
    2^-e and the sums times 2^e: the result still equals the reference."""
    n, k = 64, 1024
    rng = np.random.default_rng(bits)
    x = rng.standard_normal(k).astype(np.float16)
    x[7] = 3000
    w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float16)
    qw = quantize(w.astype(np.float32).T, bits, 128)
    scales = qw.scales.astype(np.float16)
    assert linear_half2.prescale_exponent(x, bits=bits, sums=sums) >= 3
    expected = linear.reference(x[None], qw.packed, None, None, None, scales, qw.zero_points, bits=bits,
                                block_size=128).astype(np.float32).ravel()
    got = linear_half2.emulate(x, qw.packed, scales, qw.zero_points, n=n, k=k, bits=bits, block_size=128, sums=sums)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got.astype(np.float32), expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())


def test_plan_overrides_parse_compiled_plans_per_weight_shape():
    from onnxopt.errors import UserError

    assert linear_half2.plan_overrides("") == {}
    assert linear_half2.plan_overrides("6144x4096=1,4; 4096X4096=1,4;") == {(6144, 4096): (1, 4), (4096, 4096): (1, 4)}
    for bad, fragment in (("6144x4096", "NxK=KS,U"), ("6144x4096=3,3", "must be one of"), ("a=1,4", "NxK=KS,U")):
        with pytest.raises(UserError, match=fragment):
            linear_half2.plan_overrides(bad)


def test_chunk_sums_cannot_overflow_at_their_limit():
    """ONNXOPT_GEMV_SUMS=chunk: 16 products of |e - z| = 15 with x at X_LIMIT_CHUNK in one float16 sum
    (every code 15 against zero point 0, or 0 against 15) stay finite and exact; past the limit x is
    staged scaled, so the worst case is this one."""
    n, k, bits = 4, 256, 4
    limit = linear_half2.X_LIMIT_CHUNK[bits]
    assert 16 * 15 * limit < float(np.finfo(np.float16).max) < 16 * 15 * 2 * limit  # the bound is tight
    x = np.full(k, limit, np.float16)
    assert linear_half2.prescale_exponent(x, bits=bits, sums="chunk") == 0
    assert linear_half2.prescale_exponent(x * np.float16(1.5), bits=bits, sums="chunk") == 1
    packed = np.full((n, k // 2), 0xFF, np.uint8)  # codes 15
    scales = np.full((n, k // 128), 2.0 ** -8, np.float16)  # the output within float16
    zero_points = np.zeros((n, 1), np.uint8)  # z = 0 for both blocks (4-bit pairs)
    got = linear_half2.emulate(x, packed, scales, zero_points, n=n, k=k, bits=bits, block_size=128, sums="chunk")
    assert (got.astype(np.float32) == 15 * limit * k * 2.0 ** -8).all()


def test_accuracy_miss_names_the_bound_a_result_passes():
    """The accuracy check the GPU tests use: a result one float16 ulp off passes either mode; one with a
    single element 3 % of the rms off, or a NaN, does not, and the account names the index."""
    rng = np.random.default_rng(0)
    expected = rng.standard_normal(4096).astype(np.float32)
    close = expected.astype(np.float16)
    assert linear_half2.accuracy_miss(close, expected, "word") is None
    assert linear_half2.accuracy_miss(close, expected, "chunk") is None
    off = close.astype(np.float32)
    off[1234] += 0.03
    assert "at index 1234" in linear_half2.accuracy_miss(off, expected, "chunk")
    off[1234] = np.nan
    assert linear_half2.accuracy_miss(off, expected, "word") is not None


def test_zero_point_halves_by_byte_permutes():
    """The kernel keeps a block's scale bits | z * 0x10010000 (z in byte 2, and for 4 bits 16 z in byte 3)
    and makes the half2 of 1024 + z and of -(64 + z) by one byte permute each with 0xd464d464: exact
    for every zero point (4 bits: both; 8 bits: 1024 + z, the only one it uses)."""
    def perm(word, other, selector):  # __byte_perm: byte i of the result is byte (selector >> 4i) & 7 of (other, word)
        pool = [(word >> 8 * i) & 0xFF for i in range(4)] + [(other >> 8 * i) & 0xFF for i in range(4)]
        return sum(pool[(selector >> 4 * i) & 7] << 8 * i for i in range(4))

    scale_bits = int(np.array(0.0123, np.float16).view(np.uint16))
    for bits in (4, 8):
        for z in range(1 << bits):
            sz = (scale_bits | z * 0x10010000) & 0xFFFFFFFF
            assert sz & 0xFFFF == scale_bits and (sz >> 16) & 0xFF == z
            halves = np.array([perm(sz, 0xD464D464, 0x4242)], np.uint32).view(np.float16).astype(np.float64)
            assert (halves == 1024 + z).all()
            if bits == 4:
                halves = np.array([perm(sz, 0xD464D464, 0x5353)], np.uint32).view(np.float16).astype(np.float64)
                assert (halves == -(64 + z)).all()


@pytest.mark.parametrize("name,value,fragment", [("ONNXOPT_GEMV_PART_BUFFERS", "3", "expected 1 or 2"),
                                                 ("ONNXOPT_GEMV_SUMS", "half", "expected one of"),
                                                 ("ONNXOPT_GEMV_MIN_BLOCKS", "4", "expected 2 or 3")])
def test_the_gemv_settings_refuse_values_they_do_not_compile(name, value, fragment):
    """The GEMV's build settings are read at import; a value with no kernel behind it stops the import
    with the variable, the value and the choices, not a compile error later."""
    import os
    import subprocess
    import sys

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("ONNXOPT_GEMV_")}, name: value}
    done = subprocess.run([sys.executable, "-c", "import onnxopt.custom_ops.linear_half2"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and f"{name}=" in done.stderr and fragment in done.stderr, done.stderr[-500:]
