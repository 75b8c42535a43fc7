"""custom_ops/linear.py: onnxopt::Linear's NumPy reference against its definition and its decomposition
on ORT CPU; node typing; the GEMV launch choices (the kernel itself: tests/gpu/test_kernels.py)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnxopt.custom_ops import linear, swiglu

COMBOS = [("", False, False, False), ("", True, False, False), ("", False, True, True), ("swiglu", False, True, False),
          ("swiglu", True, True, True), ("", True, True, True)]


def _inputs(rng, dtype, rows=(2, 3), n=40, k=24, activation="", norm=False, residual=False, bias=False):
    x = (2 * rng.standard_normal((*rows, k))).astype(dtype)
    w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(dtype)
    gamma = (1 + 0.3 * rng.standard_normal(k)).astype(dtype) if norm else None
    res = rng.standard_normal((*rows, n // 2 if activation else n)).astype(dtype) if residual else None
    b = rng.standard_normal(n).astype(dtype) if bias else None
    return x, w, gamma, res, b


def test_reference_is_the_unfused_computation():
    rng = np.random.default_rng(0)
    x, w, gamma, res, b = _inputs(rng, np.float32, activation="swiglu", norm=True, residual=True, bias=True)
    a = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6) * gamma
    z = a @ w.T + b
    want = swiglu.reference(z) + res
    np.testing.assert_allclose(linear.reference(x, w, gamma, res, b, activation="swiglu", epsilon=1e-6), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(linear.reference(x, w), x @ w.T, rtol=1e-6, atol=1e-6)


def test_reference_rounds_once():
    """float16: float32 throughout, one rounding at the end (the unfused graph rounds more often)."""
    rng = np.random.default_rng(1)
    x, w, gamma, res, _ = _inputs(rng, np.float16, norm=True, residual=True)
    xf = x.astype(np.float32)
    a = xf / np.sqrt(np.mean(xf * xf, -1, keepdims=True) + 1e-5) * gamma.astype(np.float32)
    want = (a @ w.astype(np.float32).T + res.astype(np.float32)).astype(np.float16)
    got = linear.reference(x, w, gamma, res)
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, want)


def _linear_model(dtype, shapes: dict, activation: str, epsilon: float) -> ir.Model:
    elem = ir.DataType.FLOAT16 if dtype == np.float16 else ir.DataType.FLOAT
    inputs = {name: ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(elem)) if shape is not None else None
              for name, shape in shapes.items()}
    node = linear.make_node(*inputs.values(), activation=activation, epsilon=epsilon, name="linear")
    node.outputs[0].name = "y"
    graph = ir.Graph([v for v in inputs.values() if v is not None], node.outputs, nodes=[node],
                     opset_imports={"": 20, "onnxopt": 1})
    model = ir.Model(graph, ir_version=10)
    from onnxopt.passes.linear import Decompose

    decompose = Decompose()
    decompose(model)
    assert decompose.rewired == 1
    return model


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join([c[0] or "none"] + [n for n, on in zip(("norm", "res", "bias"), c[1:]) if on]))
def test_decomposition_runs_on_ort_cpu_and_matches_the_reference(dtype, combo):
    activation, norm, residual, bias = combo
    rng = np.random.default_rng(2)
    x, w, gamma, res, b = _inputs(rng, dtype, activation=activation, norm=norm, residual=residual, bias=bias)
    shapes = {"x": x.shape, "w": w.shape, "gamma": None if gamma is None else gamma.shape,
              "residual": None if res is None else res.shape, "bias": None if b is None else b.shape}
    while shapes[list(shapes)[-1]] is None:
        shapes.pop(list(shapes)[-1])
    model = _linear_model(dtype, shapes, activation, 1e-6)
    feeds = {name: value for name, value in zip(("x", "w", "gamma", "residual", "bias"), (x, w, gamma, res, b))
             if value is not None and name in shapes}
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, feeds)
    want = linear.reference(x, w, gamma, res, b, activation=activation, epsilon=1e-6)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=4e-3, atol=4e-3)
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), **tol)


def test_make_node_trims_absent_inputs_and_types_the_output():
    x = ir.Value(name="x", shape=ir.Shape(["B", "S", 32]), type=ir.TensorType(ir.DataType.FLOAT16))
    w = ir.Value(name="w", shape=ir.Shape([96, 32]), type=ir.TensorType(ir.DataType.FLOAT16))
    node = linear.make_node(x, w, activation="swiglu")
    assert len(node.inputs) == 2 and node.attributes["activation"].value == "swiglu"
    y = node.outputs[0]
    assert y.dtype == ir.DataType.FLOAT16 and list(y.shape)[2] == 48 and str(y.shape[0]) == "B"  # swiglu halves N
    assert list(linear.make_node(x, w).outputs[0].shape)[2] == 96
    r = ir.Value(name="r", shape=ir.Shape(["B", "S", 96]), type=ir.TensorType(ir.DataType.FLOAT16))
    assert [v.name if v else None for v in linear.make_node(x, w, None, r).inputs] == ["x", "w", None, "r"]


def test_reference_refuses_a_mismatched_input():
    rng = np.random.default_rng(3)
    x, w, *_ = _inputs(rng, np.float32)
    with pytest.raises(ValueError, match="does not fit"):
        linear.reference(x[..., :10], w)
    with pytest.raises(ValueError, match="activation"):
        linear.reference(x, w, activation="gelu")


def test_gemv_launch_shapes():
    # (M, R, KS): decode at batch 1 is the one-row instance; KS warps split K so that one round of 8
    # 16-byte loads per lane covers a warp's share; R = 2 rows per warp while that still gives two
    # blocks per SM, and always with swiglu (gate and up rows)
    assert linear.gemv_shape(1, 3072, 2048, 2, 132) == (1, 1, 1)
    assert linear.gemv_shape(1, 2048, 8192, 2, 132) == (1, 2, 4)
    assert linear.gemv_shape(1, 128256, 2048, 2, 132) == (1, 2, 1)
    assert linear.gemv_shape(1, 2048, 2048, 2, 132, swiglu=True) == (1, 2, 1)
    assert linear.gemv_shape(1, 4096, 14336, 2, 132)[2] == 8
    assert linear.gemv_shape(1, 3072, 2048, 4, 132)[2] == 2  # float32: 128 elements per chunk
    assert linear.gemv_shape(3, 2048, 8192, 2, 132)[0] == 4  # padded to the 4-row instance
    assert linear.gemv_shape(8, 4096, 14336, 2, 132)[0] == 8  # nothing staged: any K
    assert linear.gemv_shape(9, 2048, 2048, 2, 132) is None  # prefill: the GEMM path
    assert linear.gemv_shape(0, 10, 8, 2, 132) is None


# -- packed weights (bits 4 and 8: com.microsoft MatMulNBits' B, scales, zero points) ---------------


def _packed(rng, n, k, bits, block_size, dtype, zero_points=True):
    """A random [N, K] weight quantized as MatMulNBits stores it: (B [N, k_blocks, blob], scales in
    `dtype`, zero points or None, the float32 [N, K] weight they mean)."""
    from onnxopt.calibration.blockwise import quantize

    qw = quantize((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), bits, block_size)
    scales = qw.scales.astype(dtype)
    zp = qw.zero_points if zero_points else None
    dense = linear.dequantized(qw.packed, scales, zp, bits=bits, block_size=block_size, k=k)
    return qw.packed, scales, zp, dense


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("zero_points", [True, False])
def test_packed_reference_is_the_float_reference_on_the_dequantized_weight(bits, zero_points):
    rng = np.random.default_rng(4)
    packed, scales, zp, dense = _packed(rng, 40, 96, bits, 32, np.float32, zero_points)
    x, _, gamma, res, b = _inputs(rng, np.float32, n=40, k=96, activation="swiglu", norm=True, residual=True, bias=True)
    got = linear.reference(x, packed, gamma, res, b, scales, zp, activation="swiglu", bits=bits, block_size=32)
    np.testing.assert_array_equal(got, linear.reference(x, dense, gamma, res, b, activation="swiglu"))
    if not zero_points:  # MatMulNBits' default zero point is 2^(bits-1)
        from onnxopt.calibration.blockwise import QuantizedWeight, dequantize

        mid = np.full((40, 3 if bits == 8 else 2), 1 << (bits - 1) | ((1 << (bits - 1)) << 4 if bits == 4 else 0), np.uint8)
        want = dequantize(QuantizedWeight(bits, 32, 96, 40, packed, scales, mid.reshape(-1))).T
        np.testing.assert_array_equal(dense, want)


def _packed_model(dtype, x_shape, packed, scales, zp, gamma, res, b, *, bits, block_size, activation, epsilon):
    """One Linear node with a packed weight (constants as initializers, X and the residual as inputs), decomposed."""
    elem = ir.DataType.FLOAT16 if dtype == np.float16 else ir.DataType.FLOAT

    def const(name, array):
        return None if array is None else ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                                                   const_value=ir.tensor(array, name=name))

    x = ir.Value(name="x", shape=ir.Shape(x_shape), type=ir.TensorType(elem))
    residual = None if res is None else ir.Value(name="residual", shape=ir.Shape(res.shape), type=ir.TensorType(elem))
    consts = [const("w", packed), const("gamma", gamma), const("bias", b), const("scales", scales), const("zero_points", zp)]
    w, g, bias, s, z = consts
    node = linear.make_node(x, w, g, residual, bias, s, z, activation=activation, epsilon=epsilon, bits=bits,
                            block_size=block_size, name="linear")
    node.outputs[0].name = "y"
    graph = ir.Graph([v for v in (x, residual) if v is not None], node.outputs, nodes=[node],
                     initializers=[v for v in consts if v is not None], opset_imports={"": 20, "onnxopt": 1})
    model = ir.Model(graph, ir_version=10)
    from onnxopt.passes.linear import Decompose

    Decompose()(model)
    assert [n.op_type for n in model.graph if n.op_type == "MatMulNBits"] == ["MatMulNBits"]
    return model


@pytest.mark.parametrize("bits,block_size", [(4, 32), (4, 128), (8, 32)])
@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join([c[0] or "none"] + [n for n, on in zip(("norm", "res", "bias"), c[1:]) if on]))
def test_packed_decomposition_is_matmulnbits_on_ort_cpu(bits, block_size, combo):
    activation, norm, residual, bias = combo
    rng = np.random.default_rng(5)
    n, k = 48, 256
    packed, scales, zp, _ = _packed(rng, n, k, bits, block_size, np.float32)
    x, _, gamma, res, b = _inputs(rng, np.float32, n=n, k=k, activation=activation, norm=norm, residual=residual, bias=bias)
    model = _packed_model(np.float32, x.shape, packed, scales, zp, gamma, res, b, bits=bits, block_size=block_size,
                          activation=activation, epsilon=1e-6)
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x, **({"residual": res} if res is not None else {})})
    want = linear.reference(x, packed, gamma, res, b, scales, zp, activation=activation, epsilon=1e-6, bits=bits,
                            block_size=block_size)
    # float32 products of the same dequantized weights, summed in another order
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_packed_node_is_typed_from_its_scales_and_refuses_a_bad_bits():
    x = ir.Value(name="x", shape=ir.Shape([1, 1, 64]), type=ir.TensorType(ir.DataType.FLOAT16))
    w = ir.Value(name="w", shape=ir.Shape([96, 2, 16]), type=ir.TensorType(ir.DataType.UINT8))
    s = ir.Value(name="s", shape=ir.Shape([192]), type=ir.TensorType(ir.DataType.FLOAT16))
    node = linear.make_node(x, w, scales=s, activation="swiglu", bits=4, block_size=32)
    assert [v.name if v else None for v in node.inputs] == ["x", "w", None, None, None, "s"]
    assert node.outputs[0].dtype == ir.DataType.FLOAT16 and list(node.outputs[0].shape)[2] == 48
    assert linear.attributes_of(node)["bits"] == 4 and linear.attributes_of(node)["block_size"] == 32
    with pytest.raises(ValueError, match="bits"):
        linear.make_node(x, w, bits=3, block_size=32)
    with pytest.raises(ValueError, match="bits"):
        linear.make_node(x, w, bits=4, block_size=32)  # no scales
