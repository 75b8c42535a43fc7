"""CuPy kernels of custom_ops against their NumPy references: dtypes x odd sizes x strided inputs.

The reference runs first (on the host, from the same input values); tolerances live in TOL.
"""

from __future__ import annotations

import numpy as np
import pytest

from onnxopt.custom_ops import sampling, swiglu
from onnxopt.runtime.sampling import SamplingParams

# SwiGLU computes in float32 and rounds once, as the reference; expf vs np.exp differ by ~1 float32
# ulp, which can move a float16 result by one float16 ulp (2^-10 relative).
TOL = {np.float32: dict(rtol=1e-5, atol=1e-6), np.float16: dict(rtol=1e-3, atol=1e-3)}
# A sampled token may legitimately differ where the draw (or the top-p cut) lies within this
# fraction of the total mass from a CDF step: the kernel sums float32 exps in another order.
MARGIN = 1e-6


@pytest.fixture(scope="module")
def cp():
    import cupy

    return cupy


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
# F odd: the ElementwiseKernel; F a multiple of 8: swiglu_vec (16-byte vectors, __expf / __fdividef)
@pytest.mark.parametrize("shape", [(1, 2 * 769), (3, 5, 2 * 5125), (7, 2 * 64), (3, 2 * 14336), (2, 3, 2 * 1032)])
@pytest.mark.parametrize("strided", [False, True])
def test_swiglu_matches_reference(cp, dtype, shape, strided):
    rng = np.random.default_rng(0)
    wide = rng.standard_normal((*shape[:-1], shape[-1] + (6 if strided else 0))).astype(dtype) * 3
    x = wide[..., : shape[-1]]  # strided rows when `strided`
    expected = swiglu.reference(np.ascontiguousarray(x))
    got = swiglu.cuda(cp.asarray(wide)[..., : shape[-1]]).get()
    assert got.dtype == dtype and got.shape == expected.shape
    np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32), **TOL[dtype])


def test_swiglu_in_vectors_matches_the_elementwise_kernel(cp):
    """The 16-byte kernel against the element kernel (an output view off the 16-byte grid takes it)."""
    x = cp.asarray(np.random.default_rng(2).standard_normal((64, 2 * 4096)).astype(np.float16) * 3)
    vec = swiglu.cuda(x)
    pad = cp.empty(64 * 4096 + 1, dtype=cp.float16)
    element = swiglu.cuda(x, out=pad[1:].reshape(64, 4096))  # 2 bytes off: the ElementwiseKernel
    np.testing.assert_allclose(vec.get().astype(np.float32), element.get().astype(np.float32), **TOL[np.float16])


def test_swiglu_writes_into_out(cp):
    x = cp.asarray(np.random.default_rng(1).standard_normal((2, 10)).astype(np.float32))
    out = cp.empty((2, 5), dtype=cp.float32)
    assert swiglu.cuda(x, out=out) is out
    np.testing.assert_allclose(out.get(), swiglu.reference(x.get()), **TOL[np.float32])
    with pytest.raises(ValueError, match="even last axis"):
        swiglu.cuda(cp.zeros((2, 5), dtype=cp.float32))


def _run(cp, logits_host, params, *, step=0, seen=None, row_stride_pad=0):
    batch, vocab = logits_host.shape
    sampler = sampling.DeviceSampler(params, batch, vocab)
    if seen is not None and sampler.seen is not None:
        sampler.seen[...] = cp.asarray(seen.astype(np.uint8))
    sampler.step.fill(step)
    if row_stride_pad:
        wide = cp.zeros((batch, vocab + row_stride_pad), dtype=logits_host.dtype)
        wide[:, :vocab] = cp.asarray(logits_host)
        logits = wide[:, :vocab]
    else:
        logits = cp.asarray(logits_host)
    return sampler(logits).get()


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("vocab", [769, 5125, 49152, 128256])
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_is_the_reference_argmax(cp, dtype, vocab, penalty):
    rng = np.random.default_rng(vocab)
    logits = (rng.standard_normal((3, vocab)) * 4).astype(dtype)
    logits[1, vocab // 2] = logits[1].max()  # a tie: the first index wins, as np.argmax
    seen = rng.random((3, vocab)) < 0.01
    params = SamplingParams(repetition_penalty=penalty)
    expected, _ = sampling.reference(logits, params, seen=seen)
    got = _run(cp, logits, params, seen=seen, row_stride_pad=7)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("vocab", [1, 33, 2049, 128256])
def test_greedy_merges_blocks_first_index_on_ties(cp, dtype, vocab):
    """argmax_partial + argmax_final: a tie between values far apart (different blocks) goes to the
    first index, NaN never wins, an all -inf row gives its first index, an all-NaN row token 0."""
    rng = np.random.default_rng(vocab)
    logits = rng.standard_normal((5, vocab)).astype(dtype)
    logits[0, vocab - 1] = logits[0, 0] = 50  # first and last: the first wins
    logits[1, : vocab // 2] = np.nan  # NaN before the best
    logits[2, :] = -np.inf
    logits[3, :] = np.nan
    assert sampling.greedy_parts(vocab) == min(128, max(1, -(-vocab // 2048)))
    got = _run(cp, logits, SamplingParams())
    assert got[0] == 0 and got[2] == 0 and got[3] == 0
    assert got[1] == vocab // 2 + int(np.argmax(logits[1, vocab // 2:]))
    assert got[4] == int(np.argmax(logits[4]))


CASES = [
    SamplingParams(temperature=0.7, seed=0),
    SamplingParams(temperature=1.0, top_k=50, seed=1),
    SamplingParams(temperature=0.8, top_p=0.9, seed=2),
    SamplingParams(temperature=1.2, top_k=40, top_p=0.8, repetition_penalty=1.3, seed=3),
    SamplingParams(temperature=1.0, top_k=1, seed=4),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("vocab", [769, 5125, 49152])
@pytest.mark.parametrize("params", CASES, ids=lambda p: f"t{p.temperature}-k{p.top_k}-p{p.top_p}-r{p.repetition_penalty}")
@pytest.mark.parametrize("step", [0, 7])
def test_sampling_matches_reference(cp, dtype, vocab, params, step):
    rows = 64
    rng = np.random.default_rng(vocab + step)
    logits = (rng.standard_normal((rows, vocab)) * 3).astype(dtype)
    seen = rng.random((rows, vocab)) < 0.02
    expected, margin = sampling.reference(logits, params, step=step, seen=seen)
    got = _run(cp, logits, params, step=step, seen=seen)
    # Rows whose draw or top-p cut lies within float32 summation error of a step are left out;
    # the guard makes sure most rows are compared.
    clear = margin > MARGIN
    assert clear.sum() >= 16, f"too few rows with a clear margin ({clear.sum()} of {rows}): the test says little"
    np.testing.assert_array_equal(got[clear], expected[clear])


def test_sampling_follows_the_distribution(cp):
    """Over many steps of one row, each token's frequency matches its softmax probability."""
    vocab, steps = 5, 4000
    logits = np.log(np.array([[0.1, 0.2, 0.3, 0.15, 0.25]], dtype=np.float32))
    sampler = sampling.DeviceSampler(SamplingParams(temperature=1.0, seed=11), 1, vocab)
    counts = np.zeros(vocab)
    d_logits = cp.asarray(logits)
    for s in range(steps):
        sampler.step.fill(s)
        counts[int(sampler(d_logits).get()[0])] += 1
    np.testing.assert_allclose(counts / steps, np.exp(logits[0]), atol=0.03)  # ~4 sigma at n=4000


def test_advance_moves_every_counter(cp):
    tokens = cp.asarray(np.array([5, 9], dtype=np.int64))
    input_ids = cp.zeros((2, 1), dtype=cp.int64)
    step = cp.asarray(np.array([3], dtype=np.int64))
    seqlens = cp.asarray(np.array([4, 6], dtype=np.int32))
    mask = cp.zeros((2, 16), dtype=cp.int64)
    seen = cp.zeros((2, 12), dtype=cp.uint8)
    history = cp.zeros((8, 2), dtype=cp.int64)
    sampling.advance(tokens, input_ids=input_ids, step=step, seqlens_k=seqlens, attention_mask=mask, seen=seen, history=history)
    assert input_ids.get().ravel().tolist() == [5, 9]
    assert int(step.get()[0]) == 4
    assert seqlens.get().tolist() == [5, 7]
    assert mask.get()[0, 5] == 1 and mask.get()[1, 7] == 1 and mask.get().sum() == 2
    assert seen.get()[0, 5] == 1 and seen.get()[1, 9] == 1 and seen.get().sum() == 2
    assert history.get()[3].tolist() == [5, 9]


def test_reference_uniform_matches_the_kernel_definition():
    u = sampling.uniform(12345, 3, 4)
    assert np.all((u >= 0) & (u < 1)) and len(set(u.tolist())) == 4


# --- GroupQueryAttention ------------------------------------------------------------------------------
# Both compute in float32 and round q/k after the rotary and the output once; sums run in other orders
# (and __expf). float16 outputs may then move by an ulp or two.
GQA_TOL = {np.float32: dict(rtol=1e-4, atol=2e-5), np.float16: dict(rtol=4e-3, atol=2e-3)}


def _gqa_inputs(rng, dtype, *, batch, s, h, hk, d, tcap, r, positions=4096):
    qkv = rng.standard_normal((batch, s, (h + 2 * hk) * d)).astype(dtype)
    past_key = rng.standard_normal((batch, hk, tcap, d)).astype(dtype)
    past_value = rng.standard_normal((batch, hk, tcap, d)).astype(dtype)
    inv = 1.0 / (10000.0 ** (np.arange(r) / r))
    angles = np.arange(positions)[:, None] * inv[None, :]
    return qkv, past_key, past_value, np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


GQA_CASES = [
    # (batch, prompt lengths or past lengths, H, Hk, D, Tmax, window); decode when the lengths are "past"
    ("prefill", [5, 3], 4, 2, 64, 64, -1),
    ("prefill", [300], 9, 3, 64, 512, -1),  # SmolLM2's heads; 300 keys: one block per query
    ("prefill", [1500, 700], 32, 8, 64, 2048, -1),  # chunks of 1024: two splits
    ("prefill", [37], 6, 1, 128, 64, 8),  # MQA, head 128, sliding window
    ("prefill", [2048, 1000], 32, 8, 128, 2048, -1),  # llama-8b heads, 32 query tiles, padding
    ("prefill", [200], 16, 2, 64, 256, 100),  # group 8, window over several key tiles
    ("prefill", [700], 8, 2, 128, 1024, 300),  # window past a tile: unmasked tiles between its start and the diagonal
    ("extend", [100, 7], 8, 2, 128, 256, -1),  # 70 new tokens after a past (chunked prefill)
    ("extend", [150], 9, 3, 64, 512, 90),  # SmolLM2's heads after a past, window
    ("decode", [0, 5], 4, 2, 64, 64, -1),  # one split
    ("decode", [200, 130], 32, 8, 64, 256, -1),  # llama-1b heads: one split of 256 keys
    ("decode", [1100], 9, 3, 64, 1280, -1),  # 5 splits, most keys
    ("decode", [77, 3], 8, 1, 256, 128, 16),  # head 256, window
    ("decode", [200], 32, 8, 128, 256, -1),  # llama-8b heads: 2 splits of 128
    ("decode", [255, 40], 16, 2, 64, 256, 100),  # group 8, the last slot, window
]
# the decode launch's kernels for head sizes 64 and 128 (custom_ops/group_query_attention.py);
# /U/N: with ROUND_ROWS U and VEC_THREADS N (the probe's sweep: a default may move to any of them)
DECODE_KERNELS = ["gqa_decode_vec", "gqa_attend_vec", "gqa_decode_vec/2/512", "gqa_decode_vec/4/512",
                  "gqa_decode_vec/4/256", "gqa_decode_vec/2/256"]
# the prefill launch's: float16 at head sizes 64 and 128 (the others always run gqa_attend)
# /W/S[/M]: gqa_flash_prefill with FLASH_WARPS W, FLASH_STAGES S (and FLASH_SKIP_MASK M)
PREFILL_KERNELS = ["gqa_flash_prefill", "gqa_flash_prefill/8/1", "gqa_flash_prefill/4/2", "gqa_flash_prefill/8/2",
                   "gqa_flash_prefill/4/1/0", "gqa_attend"]
EXTEND = 70  # new tokens of an "extend" case


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("case", GQA_CASES, ids=lambda c: f"{c[0]}-{'x'.join(map(str, c[1]))}-h{c[2]}/{c[3]}-d{c[4]}-t{c[5]}-w{c[6]}")
@pytest.mark.parametrize("kernel", DECODE_KERNELS + PREFILL_KERNELS)
def test_group_query_attention_matches_reference(cp, dtype, case, kernel, monkeypatch):
    from onnxopt.custom_ops import group_query_attention as gqa

    kind, lengths, h, hk, d, tcap, window = case
    if (kind == "decode") != (kernel in DECODE_KERNELS):
        pytest.skip("a prefill kernel in decode or a decode kernel in prefill")
    if kernel != (DECODE_KERNELS if kind == "decode" else PREFILL_KERNELS)[0] and (
            d not in gqa.VEC_HEAD_SIZES or (kind != "decode" and dtype == np.float32)):
        pytest.skip("one kernel runs this case")
    kernel, *variant = kernel.split("/")
    monkeypatch.setattr(gqa, "DECODE_KERNEL" if kind == "decode" else "PREFILL_KERNEL", kernel)
    if variant:
        flags = ("ROUND_ROWS", "VEC_THREADS") if kind == "decode" else ("FLASH_WARPS", "FLASH_STAGES", "FLASH_SKIP_MASK")
        for flag, value in zip(flags, variant):
            monkeypatch.setattr(gqa, flag, int(value))
    rng = np.random.default_rng(len(lengths) + h + d)
    batch = len(lengths)
    s = {"prefill": max(lengths), "extend": EXTEND, "decode": 1}[kind]
    qkv, past_key, past_value, cos, sin = _gqa_inputs(rng, dtype, batch=batch, s=s, h=h, hk=hk, d=d, tcap=tcap, r=d // 2)
    if kind == "prefill":
        seqlens, total = np.array(lengths, np.int32) - 1, np.array(s, np.int32)
    else:  # lengths are the past: the s new tokens follow it
        seqlens, total = np.array(lengths, np.int32) + s - 1, np.array(tcap, np.int32)
    attrs = dict(num_heads=h, kv_num_heads=hk, do_rotary=1, local_window_size=window)
    expected = gqa.reference(qkv, None, None, past_key, past_value, seqlens, total, cos, sin, **attrs)
    kd, vd = cp.asarray(past_key), cp.asarray(past_value)
    out, pk, pv = gqa.cuda(cp.asarray(qkv), None, None, kd, vd, cp.asarray(seqlens), total, cp.asarray(cos),
                           cp.asarray(sin), **attrs)
    assert pk is kd and pv is vd
    out = out.get()
    for row, n in enumerate(lengths if kind == "prefill" else [s] * batch):
        np.testing.assert_allclose(out[row, :n].astype(np.float32), expected[0][row, :n].astype(np.float32), **GQA_TOL[dtype])
    for row, n in enumerate(lengths if kind == "prefill" else [n + s for n in lengths]):
        np.testing.assert_allclose(kd[row, :, :n].get().astype(np.float32), expected[1][row, :, :n].astype(np.float32), **GQA_TOL[dtype])
        np.testing.assert_array_equal(vd[row, :, :n].get(), expected[2][row, :, :n])


@pytest.mark.parametrize("stages", [1, 2])
@pytest.mark.parametrize("case", [c for c in GQA_CASES if c[0] != "decode" and c[4] in (64, 128)],
                         ids=lambda c: f"{c[0]}-{'x'.join(map(str, c[1]))}-h{c[2]}/{c[3]}-d{c[4]}-w{c[6]}")
def test_flash_tiles_without_the_mask_give_the_masked_result(cp, case, stages, monkeypatch):
    """FLASH_SKIP_MASK: the tiles valid for every row skip the compares; the scores are the same values,
    so the output is bit for bit the masked kernel's."""
    from onnxopt.custom_ops import group_query_attention as gqa

    kind, lengths, h, hk, d, tcap, window = case
    monkeypatch.setattr(gqa, "PREFILL_KERNEL", "gqa_flash_prefill")
    monkeypatch.setattr(gqa, "FLASH_STAGES", stages)
    rng = np.random.default_rng(len(lengths) + h + d)
    s = max(lengths) if kind == "prefill" else EXTEND
    qkv, past_key, past_value, cos, sin = _gqa_inputs(rng, np.float16, batch=len(lengths), s=s, h=h, hk=hk, d=d,
                                                      tcap=tcap, r=d // 2)
    if kind == "prefill":
        seqlens, total = np.array(lengths, np.int32) - 1, np.array(s, np.int32)
    else:
        seqlens, total = np.array(lengths, np.int32) + s - 1, np.array(tcap, np.int32)
    outs = []
    for skip in (0, 1):
        monkeypatch.setattr(gqa, "FLASH_SKIP_MASK", skip)
        out, _, _ = gqa.cuda(cp.asarray(qkv), None, None, cp.asarray(past_key), cp.asarray(past_value),
                             cp.asarray(seqlens), total, cp.asarray(cos), cp.asarray(sin), num_heads=h, kv_num_heads=hk,
                             do_rotary=1, local_window_size=window)
        outs.append(out.get())
    for row, n in enumerate(lengths if kind == "prefill" else [s] * len(lengths)):  # padding rows: not written
        np.testing.assert_array_equal(outs[1][row, :n], outs[0][row, :n])


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("bits, block, zero_points", [(4, 128, True), (4, 32, False), (8, 64, True), (8, 16, False)])
def test_dequantize_kernels_write_the_reference_weight(cp, dtype, bits, block, zero_points):
    """Prefill's dequantize: linear_dequantize_out16 and linear_dequantize_vec, value for value the NumPy
    reference's (one float32 product, one rounding)."""
    from onnxopt.calibration.blockwise import quantize
    from onnxopt.custom_ops import linear

    rng = np.random.default_rng(bits + block)
    n, k = 24, 512
    qw = quantize(rng.standard_normal((k, n)).astype(np.float32), bits, block)
    packed = qw.packed.reshape(n, -1)
    scales = qw.scales.astype(dtype)
    zp = qw.zero_points if zero_points else None
    want = linear.dequantized(packed, scales.astype(np.float32), zp, bits=bits, block_size=block, k=k).astype(dtype)
    got = {kernel: linear.dequantize_cuda(cp.asarray(packed), cp.asarray(scales), None if zp is None else cp.asarray(zp),
                                          n=n, k=k, bits=bits, block_size=block, dtype=dtype, kernel=kernel).get()
           for kernel in ("out16", "vec")}
    np.testing.assert_array_equal(got["out16"], got["vec"])  # the same float32 product, rounded once
    np.testing.assert_allclose(got["out16"].astype(np.float32), want.astype(np.float32), rtol=2.0 ** -10, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("case", [c for c in GQA_CASES if c[0] != "decode"],
                         ids=lambda c: f"{c[0]}-{'x'.join(map(str, c[1]))}-h{c[2]}/{c[3]}-d{c[4]}")
def test_rope_append_in_slices_writes_what_the_element_kernel_writes(cp, dtype, case, monkeypatch):
    """gqa_rope_append_vec against gqa_rope_append: V copied bit for bit, q and k rotated to the same
    values (the same float32 expressions; at most one rounding step apart should contraction differ)."""
    from onnxopt.custom_ops import group_query_attention as gqa

    kind, lengths, h, hk, d, tcap, window = case
    rng = np.random.default_rng(len(lengths) + h + d)
    s = max(lengths) if kind == "prefill" else EXTEND
    qkv, past_key, past_value, cos, sin = _gqa_inputs(rng, dtype, batch=len(lengths), s=s, h=h, hk=hk, d=d,
                                                      tcap=tcap, r=d // 2)
    if kind == "prefill":
        seqlens, total = np.array(lengths, np.int32) - 1, np.array(s, np.int32)
    else:
        seqlens, total = np.array(lengths, np.int32) + s - 1, np.array(tcap, np.int32)
    attrs = dict(num_heads=h, kv_num_heads=hk, do_rotary=1, local_window_size=window)
    results = []
    for vec in (False, True):
        monkeypatch.setattr(gqa, "ROPE_APPEND_VEC", vec)
        kd, vd = cp.asarray(past_key), cp.asarray(past_value)
        qb = cp.asarray(qkv)
        assert gqa.rope_append_vec(qb, cp.asarray(cos), cp.asarray(sin), kd, vd, kd, d // 2) == vec
        out, _, _ = gqa.cuda(qb, None, None, kd, vd, cp.asarray(seqlens), total, cp.asarray(cos), cp.asarray(sin), **attrs)
        results.append((out.get(), kd.get(), vd.get()))
    (out0, k0, v0), (out1, k1, v1) = results
    np.testing.assert_array_equal(v1, v0)
    ulp = dict(rtol=2.0 ** -10, atol=1e-3) if dtype == np.float16 else dict(rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(k1.astype(np.float32), k0.astype(np.float32), **ulp)
    for row, n in enumerate(lengths if kind == "prefill" else [s] * len(lengths)):  # padding rows: not written
        np.testing.assert_allclose(out1[row, :n].astype(np.float32), out0[row, :n].astype(np.float32), **GQA_TOL[dtype])


@pytest.mark.parametrize("kernel", DECODE_KERNELS)
def test_group_query_attention_decode_replays_as_the_length_grows(cp, kernel, monkeypatch):
    """A captured decode launch (fixed grid, 2 splits) replayed over growing lengths equals the reference."""
    from onnxopt.custom_ops import group_query_attention as gqa

    kernel, *variant = kernel.split("/")
    monkeypatch.setattr(gqa, "DECODE_KERNEL", kernel)
    for flag, value in zip(("ROUND_ROWS", "VEC_THREADS"), variant):
        monkeypatch.setattr(gqa, flag, int(value))
    rng = np.random.default_rng(5)
    h, hk, d, tcap = 8, 2, 64, 512
    _, past_key, past_value, cos, sin = _gqa_inputs(rng, np.float16, batch=2, s=1, h=h, hk=hk, d=d, tcap=tcap, r=32)
    kd, vd = cp.asarray(past_key), cp.asarray(past_value)
    qkv_d = cp.zeros((2, 1, (h + 2 * hk) * d), dtype=cp.float16)
    seqlens_d = cp.asarray(np.array([10, 60], np.int32))
    cos_d, sin_d = cp.asarray(cos), cp.asarray(sin)
    out_d = cp.empty((2, 1, h * d), dtype=cp.float16)
    attrs = dict(num_heads=h, kv_num_heads=hk, do_rotary=1)
    total = np.array(tcap, np.int32)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        gqa.cuda(qkv_d, None, None, kd, vd, seqlens_d, total, cos_d, sin_d, out=(out_d, kd, vd), **attrs)  # warm-up
        stream.synchronize()
        stream.begin_capture()
        gqa.cuda(qkv_d, None, None, kd, vd, seqlens_d, total, cos_d, sin_d, out=(out_d, kd, vd), **attrs)
        graph = stream.end_capture()
        host_k, host_v = kd.get(), vd.get()
        for lengths in ([11, 61], [70, 300], [400, 511]):
            qkv = rng.standard_normal((2, 1, (h + 2 * hk) * d)).astype(np.float16)
            seqlens = np.array(lengths, np.int32)
            expected = gqa.reference(qkv, None, None, host_k, host_v, seqlens, total, cos, sin, **attrs)
            qkv_d[...] = cp.asarray(qkv)
            seqlens_d[...] = cp.asarray(seqlens)
            graph.launch(stream)
            stream.synchronize()
            np.testing.assert_allclose(out_d.get().astype(np.float32), expected[0].astype(np.float32), **GQA_TOL[np.float16])
            np.testing.assert_allclose(kd.get().astype(np.float32), expected[1].astype(np.float32), **GQA_TOL[np.float16])
            host_k, host_v = kd.get(), vd.get()


# onnxopt::Linear: float32 sums in another order than NumPy's matmul, and the float16 output is
# rounded once (as the reference), so a result may sit one float16 ulp away.
LINEAR_TOL = {np.float32: dict(rtol=1e-4, atol=1e-4), np.float16: dict(rtol=2e-3, atol=2e-3)}
# (rows (leading shape), N, K, activation, norm, residual, bias): decode rows 1..8 (the GEMV, every
# instance M = 1, 2, 4, 8 and its padding), prefill rows (the GEMM path), odd N, K of 16-byte multiples
# that are not multiples of the 256-wide load step, K past the 4-step unroll, and the LM-head width.
LINEAR_CASES = [
    ((1,), 3072, 2048, "", True, False, False),
    ((1, 1), 2048, 2048, "", False, True, False),
    ((1,), 2048, 8192, "", False, True, False),
    ((1,), 16384, 2048, "swiglu", True, False, False),
    ((1,), 49152, 576, "", True, False, False),
    ((3,), 77, 200, "", True, True, True),
    ((5,), 1000, 1032, "swiglu", False, True, True),
    ((1,), 4096, 14336, "", False, True, False),
    ((8,), 129, 4096, "", True, True, False),
    ((2, 3), 640, 64, "swiglu", True, False, True),
    ((2, 20), 640, 64, "swiglu", True, True, True),
    ((37,), 300, 520, "", True, True, True),
    ((2, 100), 514, 256, "swiglu", False, True, False),
    ((2, 100), 513, 256, "", True, True, False),
]


def _linear_inputs(rng, dtype, lead, n, k, activation, norm, residual, bias):
    x = (rng.standard_normal((*lead, k)) * 2).astype(dtype)
    w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(dtype)
    gamma = (1 + 0.3 * rng.standard_normal(k)).astype(dtype) if norm else None
    res = rng.standard_normal((*lead, n // 2 if activation else n)).astype(dtype) if residual else None
    b = (0.5 * rng.standard_normal(n)).astype(dtype) if bias else None
    return x, w, gamma, res, b


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-n{c[1]}-k{c[2]}-{c[3] or 'none'}"
                         f"{'-norm' if c[4] else ''}{'-res' if c[5] else ''}{'-bias' if c[6] else ''}")
def test_linear_matches_reference(cp, dtype, case):
    from onnxopt.custom_ops import linear

    lead, n, k, activation, norm, residual, bias = case
    x, w, gamma, res, b = _linear_inputs(np.random.default_rng(n + k), dtype, lead, n, k, activation, norm, residual, bias)
    expected = linear.reference(x, w, gamma, res, b, activation=activation, epsilon=1e-6)
    dev = [None if a is None else cp.asarray(a) for a in (x, w, gamma, res, b)]
    got = linear.cuda(*dev, activation=activation, epsilon=1e-6).get()
    assert got.dtype == dtype and got.shape == expected.shape
    np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32), **LINEAR_TOL[dtype])


# Packed weights (MatMulNBits' B): (rows, N, K, activation, norm, residual, bias, bits, block_size, zero
# points): decode rows 1..8 (float16 with blocks of 64+ at 4 bits, 32+ at 8: the tensor-core GEMV of
# linear_mma.py; float32 and 4-bit blocks of 32: the NBits GEMV), K past one round of 4 loads per lane
# (K > 4096 for 4 bits), odd N, no zero points (the default 2^(bits-1)), and prefill rows (dequantize +
# GEMM).
NBITS_CASES = [
    ((1,), 3072, 2048, "", True, False, False, 4, 128, True),
    ((1,), 2048, 2048, "", False, True, False, 4, 32, True),
    ((1,), 16384, 2048, "swiglu", True, False, False, 4, 128, True),
    ((1,), 4096, 14336, "", False, True, False, 4, 128, True),
    ((1,), 49152, 576, "", True, False, False, 8, 32, True),
    ((3,), 77, 256, "", True, True, True, 4, 32, False),
    ((5,), 1000, 1024, "swiglu", False, True, True, 8, 128, True),
    ((8,), 129, 4096, "", True, True, False, 4, 32, True),
    ((2, 20), 640, 256, "swiglu", True, True, True, 4, 128, True),
    ((2,), 200, 328, "", True, True, True, 4, 64, False),  # tensor cores: K not a multiple of a group
    ((7,), 4096, 4096, "swiglu", True, False, False, 8, 64, True),
    ((1,), 6144, 4096, "", True, False, False, 4, 128, True),  # llama-8b q/k/v and down: the half2 GEMV's
    ((1,), 4096, 14336, "", False, True, False, 4, 128, True),  # staging of K 4096 and 14336
    ((1,), 100, 160, "swiglu", False, True, True, 8, 32, False),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("case", NBITS_CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-n{c[1]}-k{c[2]}-{c[3] or 'none'}"
                         f"{'-norm' if c[4] else ''}{'-res' if c[5] else ''}{'-bias' if c[6] else ''}-int{c[7]}-b{c[8]}"
                         f"{'' if c[9] else '-nozp'}")
@pytest.mark.parametrize("gemv", ["mma", "half2", "simt"])
def test_linear_packed_weight_matches_reference(cp, dtype, case, gemv, monkeypatch):
    from onnxopt.calibration.blockwise import quantize
    from onnxopt.custom_ops import linear, linear_half2

    lead, n, k, activation, norm, residual, bias, bits, block, with_zp = case
    rows = int(np.prod(lead))
    if gemv == "half2" and not linear_half2.supports(rows, bits, block, k, np.dtype(dtype).itemsize):
        pytest.skip("the half2 GEMV takes one float16 row")
    if gemv == "simt" and (dtype != np.float16 or rows > linear.MAX_GEMV_ROWS):
        pytest.skip("the mma case already runs linear_nbits_gemv here")
    monkeypatch.setattr(linear, "PACKED_GEMV", gemv)
    rng = np.random.default_rng(n + k + bits)
    x, w, gamma, res, b = _linear_inputs(rng, dtype, lead, n, k, activation, norm, residual, bias)
    qw = quantize(w.astype(np.float32).T, bits, block)
    scales, zp = qw.scales.astype(dtype), (qw.zero_points if with_zp else None)
    if int(np.prod(lead)) <= linear.MAX_GEMV_ROWS:  # the GEMV: the weight dequantized in float32
        expected = linear.reference(x, qw.packed, gamma, res, b, scales, zp, activation=activation, epsilon=1e-6,
                                    bits=bits, block_size=block)
    else:  # prefill: the GEMM reads W dequantized into the dtype (spec), so the float weights' reference
        w_dtype = linear.dequantized(qw.packed, scales, zp, bits=bits, block_size=block, k=k).astype(dtype)
        expected = linear.reference(x, w_dtype, gamma, res, b, activation=activation, epsilon=1e-6)
    dev = [None if a is None else cp.asarray(a) for a in (x, qw.packed, gamma, res, b, scales, zp)]
    got = linear.cuda(*dev, activation=activation, epsilon=1e-6, bits=bits, block_size=block).get()
    assert got.dtype == dtype and got.shape == expected.shape
    # the float weights' tolerance: both sides compute with the same weights (float32 dequantized in the
    # GEMV; in the dtype past MAX_GEMV_ROWS). The float16 GEMM also rounds the normalized input and the
    # product to float16 before SwiGLU and the residual (the reference keeps float32): an H200 run
    # (2026-12-04) put the 2x20 swiglu case at 3.4e-3 from it, so prefill rows get twice the bound.
    tol = LINEAR_TOL[dtype]
    if dtype == np.float16 and int(np.prod(lead)) > linear.MAX_GEMV_ROWS:
        tol = dict(rtol=4e-3, atol=4e-3)
    if gemv == "half2":  # its float16 sums: checked against their emulation, and for their accuracy
        emulated = linear_half2.emulate(x, qw.packed, scales, zp, gamma, res, b, n=n, k=k, bits=bits, block_size=block,
                                        activation=activation, epsilon=1e-6)
        _assert_half2(got, expected, emulated)
        if linear_half2.SUMS != "word":
            return
    np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32), **tol)


def _assert_half2(got, expected, emulated):
    """The half2 GEMV's output is its NumPy emulation (custom_ops/linear_half2.py emulate: the same float16
    products and sums) up to the order of its float32 sums, so a float16 ulp; and, like the emulation, within
    the float16 sums' accuracy against the float32 reference (SUMS_ACCURACY, per ONNXOPT_GEMV_SUMS)."""
    from onnxopt.custom_ops import linear_half2

    got, emulated = got.astype(np.float32).ravel(), emulated.astype(np.float32).ravel()
    rms = float(np.sqrt(np.mean(emulated.astype(np.float64) ** 2)))
    np.testing.assert_allclose(got, emulated, rtol=1e-3, atol=1e-4 * rms, err_msg="against the emulation")
    miss = linear_half2.accuracy_miss(got, expected)
    assert miss is None, miss


# Every compiled (KS, U) plan of the half2 GEMV on shapes it covers: N not a multiple of a block's rows,
# slices that end inside a round (K = 14336 in 4 or 8 slices), swiglu pairs, 8-bit codes, no zero points
HALF2_PLAN_CASES = [(200, 4096, "", True, True, 4, 128, True), (4100, 14336, "", False, True, 4, 128, True),
                    (1000, 2048, "swiglu", True, False, 4, 32, False), (132, 4096, "", True, False, 8, 32, True)]


@pytest.mark.parametrize("case", HALF2_PLAN_CASES, ids=lambda c: f"n{c[0]}-k{c[1]}-{c[2] or 'none'}-int{c[5]}-b{c[6]}")
def test_half2_gemv_matches_reference_with_every_plan(cp, case):
    from onnxopt.calibration.blockwise import quantize
    from onnxopt.custom_ops import linear, linear_half2

    n, k, activation, norm, residual, bits, block, with_zp = case
    rng = np.random.default_rng(n + k + bits)
    x, w, gamma, res, _ = _linear_inputs(rng, np.float16, (1,), n, k, activation, norm, residual, False)
    qw = quantize(w.astype(np.float32).T, bits, block)
    scales, zp = qw.scales.astype(np.float16), (qw.zero_points if with_zp else None)
    expected = linear.reference(x, qw.packed, gamma, res, None, scales, zp, activation=activation, epsilon=1e-6,
                                bits=bits, block_size=block)
    dev = [None if a is None else cp.asarray(a) for a in (x, qw.packed, gamma, res, scales, zp)]
    emulated = linear_half2.emulate(x, qw.packed, scales, zp, gamma, res, None, n=n, k=k, bits=bits, block_size=block,
                                    activation=activation, epsilon=1e-6)
    chunks = k // (128 // bits)
    plans = [(ks, u, persistent) for ks, u in linear_half2.PLANS if -(-chunks // ks) <= 32 * u for persistent in (0, 1, 2)]
    assert plans
    for plan in plans:
        out = cp.full(expected.shape, np.nan, dtype=cp.float16)
        linear_half2.gemv(dev[0], dev[1], dev[4], dev[5], dev[2], dev[3], None, out, n=n, k=k, bits=bits,
                          block_size=block, activation=activation, epsilon=1e-6, plan_override=plan)
        try:
            _assert_half2(out.get(), expected, emulated)
            if linear_half2.SUMS == "word":  # word sums also keep the float16 Linear's elementwise tolerance
                np.testing.assert_allclose(out.get().astype(np.float32), expected.astype(np.float32),
                                           **LINEAR_TOL[np.float16])
        except AssertionError as e:
            raise AssertionError(f"plan {plan}: {e}") from None


_GEMV_SETTINGS_SCRIPT = """
import sys
import cupy as cp, numpy as np
from onnxopt.calibration.blockwise import quantize
from onnxopt.custom_ops import linear_half2
outs = []
# (N, K, bits, block, activation, zero points, plans): down's shape (4 and 8 slices), a gate/up pair
# without zero points (blocks of 32), the 8-bit LM head's plan
for n, k, bits, block, act, with_zp, plans in ((4100, 14336, 4, 128, "", True, ((8, 2), (4, 4), (8, 4))),
                                              (1000, 4096, 4, 32, "swiglu", False, ((2, 2), (1, 4))),
                                              (1000, 4096, 8, 128, "", True, ((4, 2),))):
    rng = np.random.default_rng(n + bits)
    x = rng.standard_normal((1, k)).astype(np.float16)
    qw = quantize((0.05 * rng.standard_normal((n, k))).astype(np.float32).T, bits, block)
    gamma = (1 + 0.1 * rng.standard_normal(k)).astype(np.float16)
    dev = [cp.asarray(a) for a in (x, qw.packed, qw.scales.astype(np.float16), qw.zero_points, gamma)]
    for plan in plans:
        out = cp.zeros((1, n // 2 if act else n), dtype=cp.float16)
        linear_half2.gemv(dev[0], dev[1], dev[2], dev[3] if with_zp else None, dev[4], None, None, out, n=n, k=k,
                          bits=bits, block_size=block, activation=act, epsilon=1e-6, plan_override=plan)
        outs.append(out.get().ravel())
np.save(sys.argv[1], np.concatenate(outs))
"""


@pytest.mark.parametrize("setting", [{"ONNXOPT_GEMV_MIN_BLOCKS": "3", "ONNXOPT_GEMV_BLOCKS_PER_SM": "2"},
                                     {"ONNXOPT_GEMV_MIN_BLOCKS": "3", "ONNXOPT_GEMV_BLOCKS_PER_SM": "3"},
                                     {"ONNXOPT_GEMV_PART_BUFFERS": "1"}],
                         ids=lambda s: ",".join(f"{k[13:].lower()}={v}" for k, v in s.items()))
def test_the_gemv_launch_settings_change_no_value(cp, tmp_path, setting):
    """ONNXOPT_GEMV_MIN_BLOCKS=3 (80 registers, a few bytes spilled; custom_ops/linear_half2.py) and its
    persistent grids, and one buffer for the slices' sums where the default alternates two
    (ONNXOPT_GEMV_PART_BUFFERS=1: two barriers a group, on plans of 2, 4 and 8 slices), write bit for bit
    what the default build writes: the same arithmetic."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("ONNXOPT_GEMV_")}
    results = {}
    for name, extra in (("default", {}), ("setting", setting)):
        path = tmp_path / f"{name}.npy"
        subprocess.run([sys.executable, "-c", _GEMV_SETTINGS_SCRIPT, str(path)], env={**env, **extra}, check=True,
                       timeout=600)
        results[name] = np.load(path)
    assert np.isfinite(results["default"]).all()
    np.testing.assert_array_equal(results["setting"], results["default"])


def test_l2_prefetch_changes_no_value(cp):
    """`prefetch` (runtime/device_graph.py L2_PREFETCH_MB): the packed GEMV and the one-pass decode
    attention prefetch another buffer into L2; captured and replayed, both write bit for bit what they
    write without it (a range of whole lines, and one past a grid's thread count)."""
    from onnxopt.calibration.blockwise import quantize
    from onnxopt.custom_ops import group_query_attention as gqa
    from onnxopt.custom_ops import linear

    rng = np.random.default_rng(12)
    x, w, gamma, res, _ = _linear_inputs(rng, np.float16, (1, 1), 4096, 4096, "", True, True, False)
    qw = quantize(w.astype(np.float32).T, 4, 128)
    xd, qd, gd, rd, sd, zd = (cp.asarray(a) for a in (x, qw.packed, gamma, res, qw.scales.astype(np.float16),
                                                    qw.zero_points))
    other = cp.zeros(40 * 2 ** 20, dtype=cp.uint8)  # 327,680 lines: several a thread
    h, hk, d, tcap = 32, 8, 128, 256
    qkv0, past_key, past_value, cos, sin = _gqa_inputs(rng, np.float16, batch=1, s=1, h=h, hk=hk, d=d, tcap=tcap, r=64)
    seqlens, total = cp.asarray(np.array([150], np.int32)), np.array(tcap, np.int32)
    cos_d, sin_d = cp.asarray(cos), cp.asarray(sin)
    results = []
    for prefetch in (None, (other.data.ptr, other.nbytes), (other.data.ptr, 128)):
        out = cp.full((1, 1, 4096), np.nan, dtype=cp.float16)
        att = cp.full((1, 1, h * d), np.nan, dtype=cp.float16)
        kd, vd = cp.asarray(past_key), cp.asarray(past_value)
        qkv = cp.asarray(qkv0)
        stream = cp.cuda.Stream(non_blocking=True)
        with stream:
            def step():
                linear.cuda(xd, qd, gd, rd, None, sd, zd, bits=4, block_size=128, out=out, prefetch=prefetch)
                gqa.cuda(qkv, None, None, kd, vd, seqlens, total, cos_d, sin_d, num_heads=h, kv_num_heads=hk,
                         do_rotary=1, out=(att, kd, vd), prefetch=prefetch)
            step()  # warm-up: compiles
            stream.synchronize()
            stream.begin_capture()
            step()
            graph = stream.end_capture()
            graph.launch(stream)
            stream.synchronize()
        results.append((out.get(), att.get(), kd.get()))
    assert np.isfinite(results[0][0]).all() and np.isfinite(results[0][1]).all()
    for got in results[1:]:
        for a, b in zip(results[0], got):
            np.testing.assert_array_equal(a, b)


def test_packed_linear_launch_is_captured_after_its_repack_and_replays_on_new_inputs(cp):
    """A packed GEMV launch captured after its first (eager) call (where the tensor-core GEMV repacks the
    weight) allocates nothing and replays on new inputs, within the half2 sums' accuracy (one float16
    row: the half2 GEMV)."""
    from onnxopt.calibration.blockwise import quantize
    from onnxopt.custom_ops import linear, linear_half2

    rng = np.random.default_rng(10)
    x, w, gamma, _, _ = _linear_inputs(rng, np.float16, (1, 1), 2048, 1024, "swiglu", True, False, False)
    qw = quantize(w.astype(np.float32).T, 4, 128)
    scales = qw.scales.astype(np.float16)
    xd, qd, gd, sd, zd = (cp.asarray(a) for a in (x, qw.packed, gamma, scales, qw.zero_points))
    out = cp.empty((1, 1, 1024), dtype=cp.float16)
    stream = cp.cuda.Stream(non_blocking=True)
    kw = dict(activation="swiglu", bits=4, block_size=128, out=out)
    with stream:
        linear.cuda(xd, qd, gd, None, None, sd, zd, **kw)  # warm-up: compiles and repacks
        stream.synchronize()
        stream.begin_capture()
        linear.cuda(xd, qd, gd, None, None, sd, zd, **kw)
        graph = stream.end_capture()
        for seed in (1, 2):
            x2 = (np.random.default_rng(seed).standard_normal(x.shape) * 2).astype(np.float16)
            xd[...] = cp.asarray(x2)
            graph.launch(stream)
            stream.synchronize()
            expected = linear.reference(x2, qw.packed, gamma, None, None, scales, qw.zero_points, activation="swiglu",
                                        bits=4, block_size=128)
            assert linear.PACKED_GEMV == "half2"  # one float16 row: the half2 GEMV, chunk sums by default
            miss = linear_half2.accuracy_miss(out.get(), expected)
            assert miss is None, miss


def test_linear_decode_launch_is_captured_and_replays_on_new_inputs(cp):
    """The GEMV launch with `out` allocates nothing: captured once, it replays on new inputs."""
    from onnxopt.custom_ops import linear

    rng = np.random.default_rng(9)
    x, w, gamma, res, _ = _linear_inputs(rng, np.float16, (1, 1), 1024, 512, "", True, True, False)
    xd, wd, gd, rd = (cp.asarray(a) for a in (x, w, gamma, res))
    out = cp.empty((1, 1, 1024), dtype=cp.float16)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        linear.cuda(xd, wd, gd, rd, out=out)  # warm-up: compiles
        stream.synchronize()
        stream.begin_capture()
        linear.cuda(xd, wd, gd, rd, out=out)
        graph = stream.end_capture()
        for seed in (1, 2):
            x2 = np.random.default_rng(seed).standard_normal(x.shape).astype(np.float16)
            xd[...] = cp.asarray(x2)
            graph.launch(stream)
            stream.synchronize()
            expected = linear.reference(x2, w, gamma, res)
            np.testing.assert_allclose(out.get().astype(np.float32), expected.astype(np.float32), **LINEAR_TOL[np.float16])


def test_dependent_launches_replay_a_captured_layer_exactly_as_ordinary_launches(cp, monkeypatch):
    """A decode layer (q/k/v Linear -> attention -> o Linear + residual -> gate/up Linear + SwiGLU ->
    down Linear + residual), captured with programmatic dependent launches, gives bit for bit the
    outputs and caches of the ordinary launches, step after step (each step reads the key the one
    before appended)."""
    from onnxopt.custom_ops import cuda as cuda_ops
    from onnxopt.custom_ops import group_query_attention as gqa
    from onnxopt.custom_ops import linear

    rng = np.random.default_rng(11)
    h, hk, d, hidden, inter, tcap = 8, 2, 64, 512, 1024, 256
    f16 = np.float16
    weights = {"qkv": rng.standard_normal(((h + 2 * hk) * d, hidden)) / np.sqrt(hidden),
               "o": rng.standard_normal((hidden, h * d)) / np.sqrt(h * d),
               "gu": rng.standard_normal((2 * inter, hidden)) / np.sqrt(hidden),
               "down": rng.standard_normal((hidden, inter)) / np.sqrt(inter)}
    weights = {k: cp.asarray(v.astype(f16)) for k, v in weights.items()}
    g1, g2 = (cp.asarray((1 + 0.2 * rng.standard_normal(hidden)).astype(f16)) for _ in range(2))
    _, past_key, past_value, cos, sin = _gqa_inputs(rng, f16, batch=1, s=1, h=h, hk=hk, d=d, tcap=tcap, r=32)
    cos_d, sin_d = cp.asarray(cos), cp.asarray(sin)
    inputs = [cp.asarray(rng.standard_normal((1, 1, hidden)).astype(f16)) for _ in range(3)]

    def run(pdl: bool):
        monkeypatch.setattr(cuda_ops, "pdl", pdl)
        kd, vd = cp.asarray(past_key), cp.asarray(past_value)
        x = cp.empty((1, 1, hidden), dtype=cp.float16)
        seqlens = cp.asarray(np.array([100], np.int32))
        qkv = cp.empty((1, 1, (h + 2 * hk) * d), dtype=cp.float16)
        att = cp.empty((1, 1, h * d), dtype=cp.float16)
        o = cp.empty((1, 1, hidden), dtype=cp.float16)
        act = cp.empty((1, 1, inter), dtype=cp.float16)
        y = cp.empty((1, 1, hidden), dtype=cp.float16)
        total = np.array(tcap, np.int32)

        def layer():
            linear.cuda(x, weights["qkv"], g1, out=qkv)
            gqa.cuda(qkv, None, None, kd, vd, seqlens, total, cos_d, sin_d, num_heads=h, kv_num_heads=hk, do_rotary=1,
                     out=(att, kd, vd))
            linear.cuda(att, weights["o"], None, x, out=o)
            linear.cuda(o, weights["gu"], g2, activation="swiglu", out=act)
            linear.cuda(act, weights["down"], None, o, out=y)

        stream = cp.cuda.Stream(non_blocking=True)
        outs = []
        with stream:
            x[...] = inputs[0]
            layer()  # warm-up: compiles (appends at 100, as the first replay does again)
            stream.synchronize()
            stream.begin_capture()
            layer()
            graph = stream.end_capture()
            for step, value in enumerate(inputs):
                x[...] = value
                seqlens[...] = 100 + step
                graph.launch(stream)
                stream.synchronize()
                outs.append(y.get())
        return outs, kd.get(), vd.get()

    plain, pdl = run(False), run(True)
    assert np.isfinite(plain[0][0]).all() and np.abs(plain[0][0]).max() > 0
    for a, b in zip(plain[0], pdl[0]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(plain[1], pdl[1])
    np.testing.assert_array_equal(plain[2], pdl[2])


def test_the_other_sums_mode_passes_the_half2_tests(cp):
    """ONNXOPT_GEMV_SUMS (custom_ops/linear_half2.py, read at import) set to the mode the default build
    does not run: the half2 GEMV's tests above again in a fresh interpreter, every plan and grid and the
    packed-weight cases, against that mode's emulation and accuracy."""
    import os
    import subprocess
    import sys

    from onnxopt.custom_ops import linear_half2

    other = next(m for m in linear_half2.SUMS_MODES if m != linear_half2.SUMS)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("ONNXOPT_GEMV_")}, "ONNXOPT_GEMV_SUMS": other}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                           "-k", "half2 and not other_sums_mode"], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-4000:]
    assert " failed" not in done.stdout
