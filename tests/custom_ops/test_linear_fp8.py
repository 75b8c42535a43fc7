"""custom_ops/linear_fp8.py: onnxopt::LinearFp8's NumPy reference against its definition and against ORT's
QuantizeLinear; its decomposition on ORT CPU; node typing; and the decode GEMV's arithmetic
(custom_ops/linear_fp8_kernels.py `emulate_gemv`: float16 products and partial sums) against the
reference. The kernels themselves run on the GPU (tests/gpu/test_linear_fp8.py)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnxopt.calibration.smoothquant import fp8_weight_qparams, to_fp8
from onnxopt.custom_ops import linear_fp8, linear_fp8_gemm, linear_fp8_kernels

E4M3 = ml_dtypes.float8_e4m3fn
# activation, norm, residual, bias, outlier channels
COMBOS = [("", False, False, False, 0), ("", True, False, False, 5), ("", False, True, True, 0),
          ("swiglu", False, True, False, 3), ("swiglu", True, True, True, 7), ("", True, True, True, 16),
          ("swiglu", True, False, False, 4), ("", False, True, False, 6)]  # the last two: as llama's gate/up, o/down


def _ids(combo):
    act, *flags, n_out = combo
    return "-".join([act or "none"] + [n for n, on in zip(("norm", "res", "bias"), flags) if on] + [f"out{n_out}"])


def _inputs(rng, dtype, rows=(2, 3), n=40, k=48, activation="", norm=False, residual=False, bias=False, n_out=0,
            input_swiglu=False):
    """Random op inputs as the quantizer makes them: W [K, N] per-column E4M3 with its outlier rows
    zeroed and kept in float, the outlier channels of x the largest, x_scale from the other channels'
    range (a float16 value, as a float16 package holds it; see decompose). `input_swiglu`: X is a packed
    gate | up [..., 2K] (the op's input_activation "swiglu"), not with `norm`."""
    x = (2 * rng.standard_normal((*rows, 2 * k if input_swiglu else k))).astype(dtype)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    index = np.sort(rng.choice(k, n_out, replace=False)).astype(np.int64) if n_out else None
    if n_out:  # past the E4M3 range of the others: their codes saturate, meeting zero weights
        x[..., index] *= 8
        if input_swiglu:
            x[..., k + index] *= 4
    gamma = (1 + 0.3 * rng.standard_normal(k)).astype(dtype) if norm else None
    a = linear_fp8.normalized(x, gamma, 1e-6, "swiglu" if input_swiglu else "")
    kept = np.setdiff1d(np.arange(k), index if n_out else [])
    x_scale = np.float32(np.float16(np.abs(a[..., kept]).max() / 448))
    masked = w.copy()
    if n_out:
        masked[index] = 0
    w_q, w_scale = fp8_weight_qparams(masked)
    w_scale = w_scale.astype(np.float16).astype(np.float32)
    w_q = to_fp8(masked / w_scale)  # on the float16-valued scale, as a float16 package stores it
    outlier_w = np.ascontiguousarray(w[index].T).astype(dtype) if n_out else None
    res = rng.standard_normal((*rows, n // 2 if activation else n)).astype(dtype) if residual else None
    b = (0.5 * rng.standard_normal(n)).astype(dtype) if bias else None
    return x, np.ascontiguousarray(w_q.T), gamma, res, b, w_scale, x_scale, index, outlier_w


def test_reference_is_the_dequantized_product():
    """The definition, computed another way: E4M3 values dequantized in float64, outliers added."""
    rng = np.random.default_rng(0)
    x, w, gamma, res, b, w_scale, x_scale, index, outlier_w = _inputs(rng, np.float32, norm=True, residual=True,
                                                                      bias=True, n_out=5)
    xf = x.astype(np.float64)
    a = (xf / np.sqrt(np.mean(xf * xf, -1, keepdims=True) + 1e-6) * gamma).astype(np.float32).astype(np.float64)
    q = to_fp8(a / x_scale).astype(np.float64) * x_scale
    z = q @ (w.astype(np.float64) * w_scale[:, None]).T + a[..., index] @ outlier_w.T.astype(np.float64) + b
    want = z + res
    got = linear_fp8.reference(x, w, gamma, res, b, w_scale, x_scale, index, outlier_w, epsilon=1e-6)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # the weight's bytes (as the GPU holds it) mean the same
    np.testing.assert_array_equal(linear_fp8.reference(x, w.view(np.uint8), gamma, res, b, w_scale, x_scale, index,
                                                       outlier_w, epsilon=1e-6), got)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_quantized_equals_ort_quantizelinear_bit_for_bit(dtype):
    """float32 division, nearest even (the E4M3 midpoints themselves included), saturation at +-448."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    scale = np.asarray(0.0137, dtype)
    grid = np.sort(np.arange(256, dtype=np.uint8).view(E4M3).astype(np.float32))
    grid = grid[np.isfinite(grid)]
    ties = ((grid[1:] + grid[:-1]) / 2) * np.float32(scale)
    a = np.concatenate([(3 * rng.standard_normal(20000)).astype(dtype), ties.astype(dtype),
                        np.asarray([1e4, -1e4, 460 * float(scale)], dtype)])
    elem = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    graph = helper.make_graph([helper.make_node("QuantizeLinear", ["a", "s", "z"], ["q"])], "g",
                              [helper.make_tensor_value_info("a", elem, [None])],
                              [helper.make_tensor_value_info("q", TensorProto.FLOAT8E4M3FN, [None])],
                              [numpy_helper.from_array(scale, "s"), helper.make_tensor("z", TensorProto.FLOAT8E4M3FN, [], [0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    (want,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"a": a})
    got = linear_fp8.quantized(a.astype(np.float32), np.float32(scale))
    assert got.dtype == E4M3
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


def _model(inputs, dtype, activation, input_activation=""):
    """One LinearFp8 node (X and the residual graph inputs, the rest initializers), decomposed."""
    from onnxopt.passes.linear import Decompose

    elem = ir.DataType.FLOAT16 if dtype == np.float16 else ir.DataType.FLOAT
    names = linear_fp8.INPUTS
    values = {}
    for name, array in zip(names, inputs):
        if array is None:
            values[name] = None
        elif name in ("x", "residual"):
            values[name] = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(elem))
        else:
            array = np.asarray(array)
            values[name] = ir.Value(name=name, shape=ir.Shape(array.shape), const_value=ir.tensor(array, name=name),
                                    type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
    node = linear_fp8.make_node(values["x"], values["weight"], values["w_scale"], values["x_scale"],
                                gamma=values["gamma"], residual=values["residual"], bias=values["bias"],
                                outlier_index=values["outlier_index"], outlier_weight=values["outlier_weight"],
                                activation=activation, epsilon=1e-6, input_activation=input_activation,
                                name="linear_fp8")
    node.outputs[0].name = "y"
    graph = ir.Graph([v for k, v in values.items() if k in ("x", "residual") and v is not None], node.outputs,
                     nodes=[node], initializers=[v for k, v in values.items() if k not in ("x", "residual") and v is not None],
                     opset_imports={"": 21, "onnxopt": 1})
    model = ir.Model(graph, ir_version=10)
    decompose = Decompose()
    decompose(model)
    assert decompose.rewired == 1
    ops = [n.op_type for n in model.graph]
    assert "QuantizeLinear" in ops and ops.count("DequantizeLinear") == 2 and ("Gather" in ops) == (inputs[7] is not None)
    return model


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("combo", COMBOS, ids=_ids)
def test_decomposition_runs_on_ort_cpu_and_matches_the_reference(dtype, combo):
    activation, norm, residual, bias, n_out = combo
    rng = np.random.default_rng(2)
    inputs = _inputs(rng, dtype, activation=activation, norm=norm, residual=residual, bias=bias, n_out=n_out)
    x, res = inputs[0], inputs[3]
    session = ort.InferenceSession(ir.to_proto(_model(inputs, dtype, activation)).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x, **({"residual": res} if res is not None else {})})
    want = linear_fp8.reference(*inputs, activation=activation, epsilon=1e-6)
    assert got.dtype == want.dtype and got.shape == want.shape
    # float32: the same E4M3 codes, the dequantized operands rounded to float32 before the sum. float16:
    # the Q/DQ graph also rounds the dequantized operands, the product and each sum to float16 (the
    # float16 Linear's tolerance)
    tol = 1e-5 if dtype == np.float32 else 4e-3
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=tol,
                               atol=tol * max(1.0, float(np.abs(want).max())))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("combo", [("", False, False, 0), ("", True, False, 6), ("swiglu", False, True, 3)],
                         ids=["plain", "res-out6", "swiglu-bias-out3"])
def test_the_swiglu_input_is_onnxopt_swiglu_then_the_op(dtype, combo):
    """input_activation "swiglu": the reference is the op on onnxopt::SwiGLU's output (exactly), and its
    decomposition runs on ORT CPU and matches it."""
    from onnxopt.custom_ops import swiglu

    activation, residual, bias, n_out = combo
    inputs = _inputs(np.random.default_rng(4), dtype, activation=activation, residual=residual, bias=bias,
                     n_out=n_out, input_swiglu=True)
    x, res = inputs[0], inputs[3]
    want = linear_fp8.reference(*inputs, activation=activation, epsilon=1e-6, input_activation="swiglu")
    np.testing.assert_array_equal(want, linear_fp8.reference(swiglu.reference(x), *inputs[1:], activation=activation,
                                                             epsilon=1e-6))
    session = ort.InferenceSession(ir.to_proto(_model(inputs, dtype, activation, "swiglu")).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x, **({"residual": res} if res is not None else {})})
    assert got.dtype == want.dtype and got.shape == want.shape
    # as the decomposition test above (float16: the graph's sigmoid and products also round to float16)
    tol = 1e-5 if dtype == np.float32 else 4e-3
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=tol,
                               atol=tol * max(1.0, float(np.abs(want).max())))
    with pytest.raises(ValueError, match="does not fit"):
        linear_fp8.reference(x[..., :48], *inputs[1:], input_activation="swiglu")


def test_make_node_trims_absent_inputs_and_types_the_output():
    def value(name, shape, dtype):
        return ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype))

    x = value("x", ["B", "S", 32], ir.DataType.FLOAT16)
    w = value("w", [96, 32], ir.DataType.FLOAT8E4M3FN)
    ws, xs = value("ws", [96], ir.DataType.FLOAT), value("xs", [], ir.DataType.FLOAT)
    node = linear_fp8.make_node(x, w, ws, xs, activation="swiglu")
    assert [v.name if v else None for v in node.inputs] == ["x", "w", None, None, None, "ws", "xs"]
    y = node.outputs[0]
    assert y.dtype == ir.DataType.FLOAT16 and list(y.shape)[2] == 48 and str(y.shape[0]) == "B"  # swiglu halves N
    idx, ow = value("idx", [4], ir.DataType.INT64), value("ow", [96, 4], ir.DataType.FLOAT16)
    node = linear_fp8.make_node(x, w, ws, xs, outlier_index=idx, outlier_weight=ow)
    assert len(node.inputs) == 9 and list(node.outputs[0].shape)[2] == 96
    assert linear_fp8.attributes_of(node) == {"activation": "", "epsilon": 1e-5, "input_activation": ""}
    node = linear_fp8.make_node(value("gu", ["B", "S", 64], ir.DataType.FLOAT16), w, ws, xs, input_activation="swiglu")
    assert linear_fp8.attributes_of(node)["input_activation"] == "swiglu" and list(node.outputs[0].shape)[2] == 96
    with pytest.raises(ValueError, match="do not go together"):
        linear_fp8.make_node(x, w, ws, xs, gamma=value("g", [32], ir.DataType.FLOAT16), input_activation="swiglu")
    with pytest.raises(ValueError, match="go together"):
        linear_fp8.make_node(x, w, ws, xs, outlier_index=idx)
    with pytest.raises(ValueError, match="activation"):
        linear_fp8.make_node(x, w, ws, xs, activation="gelu")


def test_reference_refuses_a_mismatched_input():
    inputs = list(_inputs(np.random.default_rng(3), np.float32, n_out=3))
    with pytest.raises(ValueError, match="does not fit"):
        linear_fp8.reference(inputs[0][..., :16], *inputs[1:])
    with pytest.raises(ValueError, match="float8e4m3fn"):
        linear_fp8.reference(inputs[0], inputs[1].astype(np.float32), *inputs[2:])
    with pytest.raises(ValueError, match="w_scale"):
        linear_fp8.reference(*inputs[:5], inputs[5][:-1], *inputs[6:])
    with pytest.raises(ValueError, match="outlier_weight"):
        linear_fp8.reference(*inputs[:8], inputs[8][:, :2])


# -- the decode GEMV's arithmetic ---------------------------------------------------------------------

# (rows, N, K, activation, norm, residual, bias, outlier channels): N not a multiple of a block's 32
# rows (16 pairs with swiglu), chunk counts odd and not a multiple of a round's 128, K up to llama-8b's
# down projection, every row-count instance
GEMV_CASES = [
    (1, 48, 256, "", True, False, False, 0),
    (1, 40, 512, "swiglu", True, True, True, 8),
    (1, 66, 272, "", False, True, True, 4),
    (1, 100, 4112, "", True, True, False, 32),
    (1, 32, 14336, "", False, True, False, 32),
    (2, 64, 4096, "swiglu", True, False, False, 32),
    (3, 50, 1040, "", True, True, True, 7),
    (8, 24, 2944, "swiglu", False, True, True, 5),  # 46 KiB staged: the largest 8-row x that fits
]


def test_the_gemv_leaves_room_for_its_static_shared_memory():
    """8 rows of K 3072 are 48 KiB staged: with the kernel's static shared memory past the launch
    default, the H100 refused the launch (CUDA_ERROR_INVALID_VALUE, 2026-12-06); the GEMM takes them."""
    assert linear_fp8_kernels.gemv_rows(8, 3072) is None and linear_fp8_kernels.gemv_rows(8, 2944) == 8


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("case", GEMV_CASES, ids=lambda c: f"r{c[0]}-n{c[1]}-k{c[2]}-{c[3] or 'none'}-out{c[7]}")
def test_the_gemv_arithmetic_is_the_reference(dtype, case):
    rows, n, k, act, norm, res, bias, n_out = case
    assert linear_fp8_kernels.gemv_rows(rows, k) is not None  # a case the GEMV takes
    inputs = _inputs(np.random.default_rng(n + k), dtype, rows=(rows,), n=n, k=k, activation=act, norm=norm,
                     residual=res, bias=bias, n_out=n_out)
    want = linear_fp8.reference(*inputs, activation=act, epsilon=1e-6).astype(np.float32)
    got = linear_fp8_kernels.emulate_gemv(*inputs, activation=act, epsilon=1e-6)
    assert got.dtype == dtype and got.shape == want.shape
    # The float16 Linear's tolerance (2e-3), for float32 x too: both stage float16 codes and sum 4
    # products in float16. SwiGLU multiplies the gate's error by up (and up's by silu(gate)), so there
    # the absolute part scales with the product's magnitude.
    product = linear_fp8.reference(*inputs[:3], None, *inputs[4:], epsilon=1e-6).astype(np.float32)
    scale = max(1.0, float(np.abs(product).max())) if act else 1.0
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=2e-3 * scale)
    # and it is not the reference itself: its float16 partial sums round
    assert not np.array_equal(got.astype(np.float32), want)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("case", [(1, 64, 1024, "", True, 8), (2, 40, 4096, "", False, 32), (8, 24, 2944, "swiglu", True, 5)],
                         ids=["r1-k1024-res-out8", "r2-k4096-out32", "r8-k2944-swiglu-res-out5"])
def test_the_gemv_arithmetic_with_the_swiglu_input_is_the_reference(dtype, case):
    rows, n, k, act, res, n_out = case
    inputs = _inputs(np.random.default_rng(n + k), dtype, rows=(rows,), n=n, k=k, activation=act, residual=res,
                     n_out=n_out, input_swiglu=True)
    want = linear_fp8.reference(*inputs, activation=act, epsilon=1e-6, input_activation="swiglu").astype(np.float32)
    got = linear_fp8_kernels.emulate_gemv(*inputs, activation=act, epsilon=1e-6, input_activation="swiglu")
    assert got.dtype == dtype and got.shape == want.shape
    product = linear_fp8.reference(*inputs[:3], None, *inputs[4:], epsilon=1e-6,
                                   input_activation="swiglu").astype(np.float32)
    scale = max(1.0, float(np.abs(product).max())) if act else 1.0
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=2e-3 * scale)


def test_staged_products_are_exact_and_a_run_stays_finite():
    """Every product of two finite E4M3 values times 2^-4 is a float16 value, and a run of 4 of the
    largest sums below float16's 65504 (the GEMV's staging scale, custom_ops/linear_fp8_kernels.py)."""
    values = np.arange(256, dtype=np.uint8).view(E4M3).astype(np.float64)
    values = values[np.isfinite(values)]
    products = np.multiply.outer(values, values).ravel() * 2.0**-linear_fp8_kernels.STAGE_SHIFT
    assert np.array_equal(products.astype(np.float16).astype(np.float64), products)
    run = linear_fp8_kernels.RUN * products.max()
    assert run < 65504 < 2 * run  # the largest power of two that keeps a run finite
    staged = values * 2.0**-linear_fp8_kernels.STAGE_SHIFT  # the staged codes themselves
    assert np.array_equal(staged.astype(np.float16).astype(np.float64), staged)


def test_gemv_limits_and_grid():
    assert linear_fp8_kernels.gemv_rows(1, 14336) == 1  # 28 KiB staged
    assert linear_fp8_kernels.gemv_rows(2, 14336) is None  # 56 KiB: the prefill path
    assert linear_fp8_kernels.gemv_rows(3, 4096) == 4 and linear_fp8_kernels.gemv_rows(5, 4096) == 8
    assert linear_fp8_kernels.gemv_rows(6, 4096) is None and linear_fp8_kernels.gemv_rows(9, 64) is None
    assert linear_fp8_kernels.gemv_rows(0, 64) is None
    assert linear_fp8_kernels.gemv_grid(6144, False) == 192 and linear_fp8_kernels.gemv_grid(28672, True) == 896
    assert linear_fp8_kernels.gemv_grid(33, False) == 2 and linear_fp8_kernels.gemv_grid(100, True) == 4


def test_kernel_instances_are_declared_as_the_host_names_them():
    expressions = set(linear_fp8_kernels._EXPRESSIONS)
    for dtype in ("half_bits", "float"):
        for act in (0, 1):
            assert f"linear_fp8_epilogue<{dtype}, {act}>" in expressions
            for m in (1, 2, 4, 8):
                assert f"linear_fp8_gemv<{dtype}, {m}, {act}>" in expressions
        assert f"linear_fp8_quantize<{dtype}>" in expressions


def test_gemm_plans_are_made_per_row_bucket():
    """A prompt length not seen before reuses its bucket's cuBLASLt plan (linear_fp8_gemm: plan_rows)."""
    buckets = [linear_fp8_gemm.plan_rows(m) for m in (9, 33, 64, 65, 100, 128, 129, 2000, 2048, 2049)]
    assert buckets == [64, 64, 64, 128, 128, 128, 256, 2048, 2048, 4096]
    assert all(linear_fp8_gemm.plan_rows(m) >= m for m in range(1, 5000, 7))
