"""passes/linear_fp8.py: a cuda-target package quantized with the `fp8` scheme (outlier channels on, as by
default) has its Q/DQ MatMuls rewritten into onnxopt::LinearFp8 with the norms, SwiGLU and residual adds
folded in; the rewritten graph (split, each op's NumPy reference) computes what the Q/DQ graph computes
on ORT CPU; what the op cannot take stays Q/DQ, with a reason."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxopt.custom_ops import registry
from onnxopt.passes.linear import Decompose
from onnxopt.passes.linear_fp8 import FuseLinearFp8, count
from onnxopt.runtime import segments
from tests.conftest import run_onnx
from tests.passes.test_linear import _feeds

LAYER = ["LinearFp8", "GroupQueryAttention", "LinearFp8", "LinearFp8", "LinearFp8"]
OUTLIERS = 8  # the fp8 default (32) capped at an eighth of the narrowest input (hidden 64), as quantize does


@pytest.fixture(scope="module")
def cuda_packages(tiny_package, tmp_path_factory):
    import onnxopt

    root = tmp_path_factory.mktemp("linear_fp8")
    for dtype in ("fp32", "fp16"):
        onnxopt.optimize(tiny_package, root / dtype, target="cuda", dtype=dtype, progress=False)
    return {dtype: root / dtype for dtype in ("fp32", "fp16")}


def _table(package) -> dict:
    """A calibration table of the package's MatMul inputs from one random prefill through its split graph
    (ORT CPU cannot load onnxopt ops, so `calibrate` itself does not run a cuda-target package)."""
    from onnxopt.calibration.observers import TensorObserver
    from onnxopt.calibration.table import observed_model
    from onnxopt.package import ModelPackage

    pkg = ModelPackage(package)
    model, channels = observed_model(pkg)
    values = segments.run_reference(segments.split(model), _feeds(pkg.model_path, np.random.default_rng(0), seq=16))
    tensors = {}
    for name, width in channels.items():
        observer = TensorObserver(width)
        observer.update(values[name].reshape(-1, width).astype(np.float32))
        tensors[name] = observer.to_json()
    return {"tensors": tensors}


@pytest.fixture(scope="module")
def tables(cuda_packages):
    return {dtype: _table(path) for dtype, path in cuda_packages.items()}


def _quantized(cuda_packages, tables, dtype, *, fmt="fp8", alpha=0.0, outliers=OUTLIERS) -> ir.Model:
    from onnxopt.quantize import quantize_model

    model = ir.load(cuda_packages[dtype] / "model.onnx")
    quantize_model(model, bits=8, block_size=32, method="smoothquant", alpha=alpha, fmt=fmt, table=tables[dtype],
                   vocab_size=320, outlier_channels=outliers, progress=False)
    return model


def _copy(model: ir.Model) -> ir.Model:
    return ir.from_proto(ir.to_proto(model))


def _relative(got, want) -> float:
    got, want = got.astype(np.float32), want.astype(np.float32)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def test_each_layer_becomes_four_linear_fp8_ops(cuda_packages, tables):
    model = _quantized(cuda_packages, tables, "fp32")
    assert count(model.graph) == (2 * 4, {})
    fuse = FuseLinearFp8()
    fuse(model)
    assert fuse.rewired == 2 * 4 and fuse.refused == {}  # q/k/v, o, gate/up, down per layer
    assert fuse.folded == {"swiglu": 2, "bias": 0, "residual": 4, "norm": 4}
    assert [n.op_type for n in model.graph if n.domain == "onnxopt"] == LAYER * 2
    kinds = [n.op_type for n in model.graph]
    for gone in ("QuantizeLinear", "DequantizeLinear", "MatMul", "SwiGLU", "SkipSimplifiedLayerNormalization"):
        assert gone not in kinds, gone
    assert kinds.count("MatMulNBits") == 1  # the 8-bit weight-only LM head stays ORT's
    ops = [n for n in model.graph if n.op_type == "LinearFp8"]
    assert all(len(n.inputs) == 9 and n.inputs[7].const_value.numpy().shape == (OUTLIERS,) for n in ops)
    assert ops[0].inputs[2] is not None and ops[2].attributes["activation"].value == "swiglu"  # norm; SwiGLU
    assert ops[3].inputs[3] is not None  # down: the residual add
    assert [v.name for v in model.graph.outputs] == [v.name for v in ir.load(cuda_packages["fp32"] / "model.onnx").graph.outputs]


def test_swiglu_input_moves_the_swiglu_into_down(cuda_packages, tables):
    """swiglu_input: gate/up stays a plain projection, down reads the packed product and applies SwiGLU."""
    model = _quantized(cuda_packages, tables, "fp32")
    fuse = FuseLinearFp8(swiglu_input=True)
    fuse(model)
    assert fuse.rewired == 2 * 4
    assert fuse.folded == {"swiglu": 0, "bias": 0, "residual": 4, "norm": 4, "swiglu_input": 2}
    assert [n.op_type for n in model.graph if n.domain == "onnxopt"] == LAYER * 2
    ops = [n for n in model.graph if n.op_type == "LinearFp8"]
    gate_up, down = ops[2], ops[3]
    assert gate_up.attributes["activation"].value == "" and down.inputs[0] is gate_up.outputs[0]
    assert down.attributes["input_activation"].value == "swiglu" and down.inputs[2] is None
    assert list(gate_up.outputs[0].shape)[-1] == 2 * down.inputs[1].shape[1]  # the packed gate | up [.., 2I]


@pytest.mark.parametrize("swiglu_input", [False, True], ids=["swiglu-in-gate-up", "swiglu-in-down"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_split_graph_computes_the_qdq_graph(cuda_packages, tables, dtype, swiglu_input):
    qdq = _quantized(cuda_packages, tables, dtype)
    fused = _copy(qdq)
    FuseLinearFp8(swiglu_input=swiglu_input)(fused)
    path = cuda_packages[dtype] / "model.onnx"
    prefill = _feeds(path, np.random.default_rng(1))
    want = segments.run_reference(segments.split(_copy(qdq)), prefill)
    got = segments.run_reference(segments.split(_copy(fused)), prefill)
    decode = _feeds(path, np.random.default_rng(2), seq=1, past=want, past_len=5)
    want_step = segments.run_reference(segments.split(_copy(qdq)), decode)
    got_step = segments.run_reference(segments.split(_copy(fused)), decode)
    for a, b in ((got, want), (got_step, want_step)):
        if dtype == "fp32":  # the same E4M3 codes; float32 sums in another order
            for name in b:
                assert float(np.abs(a[name] - b[name]).max()) <= 1e-5 * max(1.0, float(np.abs(b[name]).max())), name
            continue
        # float16, layer 0 (both graphs quantize the same normalized embedding): a few float16 ulps (the
        # Q/DQ graph rounds its dequantized operands, products and sums to float16; the op once)
        for name in ("present.0.key", "present.0.value"):
            assert float(np.abs(a[name].astype(np.float32) - b[name].astype(np.float32)).max()) \
                <= 2e-3 * float(np.abs(b[name].astype(np.float32)).max()), name
        # Later, those float16 differences move some values across an E4M3 rounding boundary at the next
        # QuantizeLinear, a 1/16 step each: 0.9-1.6 % (relative L2) on the logits over 6 seeds
        for name in b:
            assert _relative(a[name], b[name]) < 0.03, name


@pytest.mark.parametrize("swiglu_input", [False, True], ids=["swiglu-in-gate-up", "swiglu-in-down"])
def test_decomposed_fused_graph_runs_on_ort_cpu_as_the_qdq_graph(cuda_packages, tables, swiglu_input):
    qdq = _quantized(cuda_packages, tables, "fp32")
    fused = _copy(qdq)
    FuseLinearFp8(swiglu_input=swiglu_input)(fused)
    back = Decompose()
    back(fused)
    assert back.rewired == 2 * 4
    registry.decompose(fused)  # the attention and SwiGLU ops, on both sides
    registry.decompose(qdq)
    assert not registry.custom_nodes(fused.graph)
    feeds = _feeds(cuda_packages["fp32"] / "model.onnx", np.random.default_rng(3))
    for got, want in zip(run_onnx(fused, feeds), run_onnx(qdq, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(want).max())))


def test_smoothquant_outliers_are_refused_and_smoothing_alone_is_taken(cuda_packages, tables):
    """alpha > 0: QuantizeLinear reads x * (1/s). With outlier channels the Gather reads x itself, which one
    input cannot give both: every MatMul stays Q/DQ. Without them the op reads x * (1/s) and computes the
    same as the Q/DQ graph."""
    smoothed = _quantized(cuda_packages, tables, "fp32", alpha=0.5)
    fuse = FuseLinearFp8()
    fuse(smoothed)
    assert fuse.rewired == 0 and list(fuse.refused.values()) == [2 * 4]
    assert "SmoothQuant" in next(iter(fuse.refused))
    assert [n.op_type for n in smoothed.graph].count("QuantizeLinear") == 2 * 4

    qdq = _quantized(cuda_packages, tables, "fp32", alpha=0.5, outliers=0)
    fused = _copy(qdq)
    fuse = FuseLinearFp8()
    fuse(fused)
    assert fuse.rewired == 2 * 4 and fuse.refused == {}
    assert fuse.folded["norm"] == 0 and fuse.folded["swiglu"] == 2  # the Mul sits between norm and op
    feeds = _feeds(cuda_packages["fp32"] / "model.onnx", np.random.default_rng(4))
    want = segments.run_reference(segments.split(qdq), feeds)
    got = segments.run_reference(segments.split(fused), feeds)
    for name in want:
        assert float(np.abs(got[name] - want[name]).max()) <= 1e-5 * max(1.0, float(np.abs(want[name]).max())), name


def test_int8_packages_are_not_this_pass_s(cuda_packages, tables):
    model = _quantized(cuda_packages, tables, "fp32", fmt="int8", outliers=0)
    fuse = FuseLinearFp8()
    fuse(model)
    assert fuse.rewired == 0 and fuse.refused == {} and "LinearFp8" not in [n.op_type for n in model.graph]


def _single(k: int, n: int = 32) -> ir.Model:
    """One float32 MatMul X [B, k] x W [k, n], quantized fp8 (with 2 outlier channels)."""
    from onnxopt.calibration.observers import TensorObserver
    from onnxopt.quantize import quantize_model

    rng = np.random.default_rng(k)
    x = ir.Value(name="X", shape=ir.Shape(["B", k]), type=ir.TensorType(ir.DataType.FLOAT))
    w = rng.standard_normal((k, n)).astype(np.float32)
    wv = ir.Value(name="W", shape=ir.Shape([k, n]), type=ir.TensorType(ir.DataType.FLOAT), const_value=ir.tensor(w, name="W"))
    node = ir.Node("", "MatMul", [x, wv], name="mm", num_outputs=1)
    node.outputs[0].name = "Y"
    model = ir.Model(ir.Graph([x], node.outputs, nodes=[node], initializers=[wv], opset_imports={"": 21}), ir_version=10)
    observer = TensorObserver(k)
    observer.update(rng.standard_normal((64, k)).astype(np.float32))
    quantize_model(model, bits=8, block_size=32, method="smoothquant", alpha=0.0, fmt="fp8",
                   table={"tensors": {"X": observer.to_json()}}, outlier_channels=2, progress=False)
    return model


def test_what_the_op_cannot_take_stays_qdq_with_a_reason():
    unaligned = _single(24)  # K = 24: not a multiple of 16
    fuse = FuseLinearFp8()
    fuse(unaligned)
    assert fuse.rewired == 0 and list(fuse.refused) == ["K, N = 24, 32: not multiples of 16"]
    plain = _single(32)
    assert count(plain.graph) == (1, {})
    quant = next(n for n in plain.graph if n.op_type == "QuantizeLinear")
    quant.attributes["saturate"] = ir.AttrInt64("saturate", 0)
    fuse(plain)
    assert fuse.rewired == 0 and "saturating" in next(iter(fuse.refused))
    taken = _single(32)
    feeds = {"X": np.random.default_rng(5).standard_normal((3, 32)).astype(np.float32)}
    (want,) = run_onnx(taken, feeds)
    fuse(taken)
    assert fuse.rewired == 1 and [n.op_type for n in taken.graph] == ["LinearFp8"]
    Decompose()(taken)
    (got,) = run_onnx(taken, feeds)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
