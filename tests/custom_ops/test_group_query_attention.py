"""onnxopt::GroupQueryAttention: the NumPy reference (the definition) against its decomposition, ORT CPU's
com.microsoft::GroupQueryAttention, on prefill (right-padded rows), decode and sliding windows.

The CuPy kernels are checked against the same reference in tests/gpu/test_kernels.py.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnxopt.custom_ops import group_query_attention as gqa
from onnxopt.passes.gqa_custom import ToMicrosoft

# (dtype) -> (atol, rtol) of ORT CPU against the reference; float16: both compute in float32 and round
# q/k after the rotary and the output once, but sum in other orders.
TOLERANCES = {"float32": (2e-5, 1e-4), "float16": (2e-3, 4e-3)}


def _model(dtype: np.dtype, *, h: int, hk: int, d: int, tcap: int, positions: int, r: int, attrs: dict) -> ir.Model:
    """One onnxopt GroupQueryAttention node over graph inputs, decomposed to the com.microsoft node."""
    t = ir.DataType.from_numpy(dtype)

    def value(name, elem, shape):
        return ir.Value(name=name, type=ir.TensorType(elem), shape=ir.Shape(shape))

    inputs = [
        value("qkv", t, ["B", "S", (h + 2 * hk) * d]),
        value("past_key", t, ["B", hk, tcap, d]),
        value("past_value", t, ["B", hk, tcap, d]),
        value("seqlens_k", ir.DataType.INT32, ["B"]),
        value("total_sequence_length", ir.DataType.INT32, []),
        value("cos_cache", t, [positions, r]),
        value("sin_cache", t, [positions, r]),
    ]
    node_inputs = [inputs[0], None, None, *inputs[1:]]
    node = ir.node("GroupQueryAttention", node_inputs, attributes=attrs, domain=gqa.DOMAIN, version=gqa.VERSION,
                   num_outputs=3)
    gqa.infer_node(node)
    for out, name in zip(node.outputs, ("output", "present_key", "present_value")):
        out.name = name
    graph = ir.Graph(inputs, node.outputs, nodes=[node],
                     opset_imports={"": 20, "com.microsoft": 1, gqa.DOMAIN: gqa.VERSION})
    model = ir.Model(graph, ir_version=10)
    decompose = ToMicrosoft()
    decompose(model)
    assert decompose.rewired == 1 and [n.domain for n in model.graph] == ["com.microsoft"]
    return model


def _rotary_tables(positions: int, r: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    inv = 1.0 / (10000.0 ** (np.arange(r) / r))
    angles = np.arange(positions)[:, None] * inv[None, :]
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


CASES = [
    # name, (B, S), prompt lengths (prefill) or past lengths (decode), heads, kv heads, head size, window
    ("prefill-padded", "prefill", [5, 3], 4, 2, 16, -1),
    ("prefill-mqa", "prefill", [7], 3, 1, 16, -1),
    ("decode", "decode", [6, 2], 4, 2, 16, -1),
    ("decode-window", "decode", [9, 4], 4, 2, 16, 3),
    ("prefill-window", "prefill", [8, 6], 6, 2, 32, 2),
]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_reference_matches_ort_group_query_attention(case, dtype):
    _, kind, lengths, h, hk, d, window = case
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(len(lengths) * 31 + h)
    b, tcap, r = len(lengths), 16, d // 2
    s = max(lengths) if kind == "prefill" else 1
    attrs = {"num_heads": h, "kv_num_heads": hk, "do_rotary": 1, "local_window_size": window}
    past_key = (rng.standard_normal((b, hk, tcap, d))).astype(dtype)
    past_value = (rng.standard_normal((b, hk, tcap, d))).astype(dtype)
    qkv = rng.standard_normal((b, s, (h + 2 * hk) * d)).astype(dtype)
    if kind == "prefill":
        seqlens = np.array(lengths, np.int32) - 1
        total = np.array(s, np.int32)
    else:
        seqlens = np.array(lengths, np.int32)  # past length = seqlens_k: the new token's position
        total = np.array(max(lengths) + 1, np.int32)
    cos, sin = _rotary_tables(32, r, dtype)
    feeds = {"qkv": qkv, "key": None, "value": None, "past_key": past_key, "past_value": past_value, "seqlens_k": seqlens,
             "total_sequence_length": total, "cos_cache": cos, "sin_cache": sin}
    expected = gqa.reference(*feeds.values(), **attrs)
    model = _model(dtype, h=h, hk=hk, d=d, tcap=tcap, positions=32, r=r, attrs=attrs)
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v for k, v in feeds.items() if v is not None})
    atol, rtol = TOLERANCES[dtype.name]
    valid = [n if kind == "prefill" else 1 for n in lengths]
    for row, n in enumerate(valid):  # a padded row's queries past its length are not defined
        np.testing.assert_allclose(got[0][row, :n].astype(np.float32), expected[0][row, :n].astype(np.float32), atol=atol, rtol=rtol)
    for row, n in enumerate(lengths):  # the cache up to each row's length (past and written)
        upto = n if kind == "prefill" else n + 1
        for k in (1, 2):
            np.testing.assert_allclose(got[k][row, :, :upto].astype(np.float32), expected[k][row, :, :upto].astype(np.float32),
                                       atol=atol, rtol=rtol)


def test_reference_is_plain_attention_without_rotary():
    """One kv head, no rotary, decode at position 2: softmax(q.K/sqrt(D)).V by hand."""
    rng = np.random.default_rng(0)
    d = 4
    past_key = rng.standard_normal((1, 1, 4, d)).astype(np.float32)
    past_value = rng.standard_normal((1, 1, 4, d)).astype(np.float32)
    qkv = rng.standard_normal((1, 1, 3 * d)).astype(np.float32)
    out, pk, pv = gqa.reference(qkv, None, None, past_key, past_value, np.array([2], np.int32), np.array(4, np.int32),
                                num_heads=1, kv_num_heads=1)
    q, k, v = qkv[0, 0, :d], qkv[0, 0, d : 2 * d], qkv[0, 0, 2 * d :]
    keys = np.concatenate([past_key[0, 0, :2], k[None]])
    values = np.concatenate([past_value[0, 0, :2], v[None]])
    w = np.exp(keys @ q / 2.0)
    np.testing.assert_allclose(out[0, 0], (w / w.sum()) @ values, rtol=1e-5)
    np.testing.assert_array_equal(pk[0, 0, 2], k)
    np.testing.assert_array_equal(pk[0, 0, 3], past_key[0, 0, 3])  # beyond the position: untouched


def test_supported_names_what_it_cannot_take():
    assert gqa.supported({"num_heads": 8, "kv_num_heads": 2, "do_rotary": 1}, 64) is None
    assert "softcap" in gqa.supported({"num_heads": 8, "kv_num_heads": 2, "softcap": 30.0}, 64)
    assert "interleaved" in gqa.supported({"num_heads": 8, "kv_num_heads": 2, "rotary_interleaved": 1}, 64)
    assert "query heads per kv head" in gqa.supported({"num_heads": 32, "kv_num_heads": 2}, 64)
    assert "head size" in gqa.supported({"num_heads": 8, "kv_num_heads": 2}, 512)


@pytest.mark.parametrize("s,tcap,first,expected", [(1, 256, False, (256, 1)), (1, 64, False, (256, 1)),
                                                   (1, 1280, False, (256, 5)), (128, 256, True, (128, 1)),
                                                   (3000, 4096, True, (1024, 3))])
def test_plan_chunks_and_splits(s, tcap, first, expected):
    assert gqa.plan(s, tcap, first, group=4, head_size=64) == expected


@pytest.mark.parametrize("group,head_size", [(1, 64), (3, 64), (4, 128), (8, 128), (8, 256), (7, 96)])
def test_launch_fits_shared_memory(group, head_size):
    for s, tcap, first in ((1, 4096, False), (2048, 4096, True), (5, 64, True)):
        threads, chunk, splits, rows = gqa.launch_shape(s, tcap, first, group, head_size)
        assert 4 * (group * head_size + group * chunk + rows * group * head_size) <= 48 * 1024
        assert threads % 32 == 0 and threads <= 512 and chunk * splits >= (s if first else tcap)


def test_one_pass_decode_takes_16_byte_rotary_slices_only():
    """gqa_decode_vec rotates 16-byte slices: the rotary half-width must be a multiple of the vector
    (8 float16 / 4 float32 values; 0 = no rotary) and the tables 16-byte aligned."""

    class Table:
        def __init__(self, ptr):
            self.data = type("Data", (), {"ptr": ptr})()

    assert gqa.one_pass_rotary(32, 2) and gqa.one_pass_rotary(64, 2) and gqa.one_pass_rotary(0, 2)
    assert not gqa.one_pass_rotary(12, 2) and gqa.one_pass_rotary(12, 4) and not gqa.one_pass_rotary(6, 4)
    assert gqa.one_pass_rotary(32, 2, Table(0x1000)) and not gqa.one_pass_rotary(32, 2, Table(0x1008))
    assert gqa.one_pass_rotary(0, 2, Table(0x1008))  # no rotary: the tables are not read
    # its launch: every key of a block's chunk is one slot of one thread (warps x KPW rows x U rounds)
    for group, d in ((4, 64), (3, 64), (4, 128), (8, 128), (8, 64)):
        threads, chunk, _, rows = gqa.launch_shape(1, 4096, False, group, d)
        assert chunk == threads // 32 * (32 * 8 // d) * gqa.decode_round_rows(d) and rows == threads // 32 <= 16
        if threads == 512:  # 16 warps: a block covers 256 keys at both head sizes
            assert chunk == 256
        assert 4 * rows * group * d <= gqa.RED_BYTES
