"""passes/linear.py: the CUDA runtime's load-time rewrite of projections into onnxopt::Linear with the
norms, SwiGLU, bias and residual adds around them folded in. The rewritten graph (split, each op's
NumPy reference) computes what the package's graph computes; what must not fold stays."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxopt.custom_ops import registry
from onnxopt.passes.linear import Decompose, FuseLinear
from onnxopt.runtime import segments
from tests.conftest import make_family_checkpoint, onnx_model, run_onnx

LAYER = ["Linear", "GroupQueryAttention", "Linear", "Linear", "Linear"]


@pytest.fixture(scope="module")
def cuda_packages(tiny_package, tmp_path_factory):
    import onnxopt

    root = tmp_path_factory.mktemp("linear")
    for dtype in ("fp32", "fp16"):
        onnxopt.optimize(tiny_package, root / dtype, target="cuda", dtype=dtype, progress=False)
    return {dtype: root / dtype / "model.onnx" for dtype in ("fp32", "fp16")}


def _feeds(path, rng, *, batch=2, seq=5, past=None, past_len=0, tmax=16):
    model = ir.load(path)
    inputs = {v.name: v for v in model.graph.inputs}
    dtype = np.float16 if inputs["past_key_values.0.key"].dtype == ir.DataType.FLOAT16 else np.float32
    feeds = {"input_ids": rng.integers(0, 320, (batch, seq)), "attention_mask": np.ones((batch, past_len + seq), np.int64)}
    for name, value in inputs.items():
        if name.startswith("past_key_values."):
            shape = (batch, value.shape[1], tmax, value.shape[3])
            feeds[name] = past[name.replace("past_key_values", "present")] if past else np.zeros(shape, dtype)
    return {k: v for k, v in feeds.items() if k in inputs}


def _fused(path) -> tuple[ir.Model, FuseLinear]:
    model = ir.load(path)
    fuse = FuseLinear()
    fuse(model)
    return model, fuse


def test_each_layer_becomes_four_linear_ops_around_its_attention(cuda_packages):
    model, fuse = _fused(cuda_packages["fp32"])
    assert fuse.rewired == 2 * 4 + 1 and fuse.miss is None  # q/k/v, o, gate/up, down per layer; the LM head
    assert fuse.folded == {"swiglu": 2, "bias": 0, "residual": 4, "norm": 4}
    ops = [n.op_type for n in model.graph if n.domain == "onnxopt"]
    assert ops == LAYER * 2 + ["Linear"]
    kinds = [n.op_type for n in model.graph]
    assert "SkipSimplifiedLayerNormalization" not in kinds and "MatMul" not in kinds and "SwiGLU" not in kinds
    assert kinds.count("SimplifiedLayerNormalization") == 1  # the final norm, read by the last-token gather
    linears = [n for n in model.graph if n.op_type == "Linear"]
    assert linears[0].inputs[2] is not None  # the first norm folded into q/k/v
    assert linears[2].attributes["activation"].value == "swiglu" and linears[2].inputs[2] is not None  # gate/up
    assert linears[3].inputs[3] is not None and linears[3].inputs[2] is None  # down: the residual add
    # present outputs and the graph's interface are unchanged
    assert [v.name for v in model.graph.outputs] == [v.name for v in ir.load(cuda_packages["fp32"]).graph.outputs]


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_split_linear_graph_computes_the_package_graph(cuda_packages, dtype):
    path = cuda_packages[dtype]
    rng = np.random.default_rng(0)
    prefill = _feeds(path, rng)
    want = segments.run_reference(segments.split(ir.load(path)), prefill)
    model, _ = _fused(path)
    got = segments.run_reference(segments.split(model), prefill)
    scale = float(np.abs(want["logits"]).max())
    tol = 1e-5 if dtype == "fp32" else 4e-3  # fp16: the sum is rounded once where ORT rounds MatMul and add
    for name in want:
        diff = float(np.abs(got[name].astype(np.float32) - want[name].astype(np.float32)).max())
        assert diff <= tol * max(1.0, scale), (name, diff)
    decode = _feeds(path, rng, seq=1, past=want, past_len=5)
    want = segments.run_reference(segments.split(ir.load(path)), decode)
    model, _ = _fused(path)
    got = segments.run_reference(segments.split(model), decode)
    assert float(np.abs(got["logits"].astype(np.float32) - want["logits"].astype(np.float32)).max()) <= tol * max(1.0, scale)


def test_decompose_round_trip_runs_on_ort_cpu(cuda_packages):
    path = cuda_packages["fp32"]
    feeds = _feeds(path, np.random.default_rng(1))
    reference = ir.load(path)
    registry.decompose(reference)
    model, _ = _fused(path)
    back = Decompose()
    back(model)
    assert back.rewired == 9
    registry.decompose(model)  # the attention op
    assert not registry.custom_nodes(model.graph)
    for got, want in zip(run_onnx(model, feeds), run_onnx(reference, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_weight_only_projections_become_packed_linear_ops_and_compute_the_package_graph(cuda_packages, bits):
    """A cuda-target graph quantized weight-only (MatMulNBits, the LM head at 8 bits): every projection
    becomes Linear with its packed weight and the same folds, and the split graph computes the same."""
    from onnxopt.quantize import quantize_model

    quantized = ir.load(cuda_packages["fp32"])
    quantize_model(quantized, bits=bits, block_size=32, vocab_size=320, accuracy_level=0, progress=False)
    assert sum(n.op_type == "MatMulNBits" for n in quantized.graph) == 2 * 4 + 1
    rng = np.random.default_rng(3)
    prefill = _feeds(cuda_packages["fp32"], rng)
    want = segments.run_reference(segments.split(ir.from_proto(ir.to_proto(quantized))), prefill)
    kept = ir.from_proto(ir.to_proto(quantized))
    default = FuseLinear()  # the runtime's default keeps ORT's MatMulNBits (not yet faster)
    default(kept)
    assert default.rewired == 0 and sum(n.op_type == "MatMulNBits" for n in kept.graph) == 9
    fuse = FuseLinear(packed=True)
    fuse(quantized)
    assert fuse.rewired == 2 * 4 + 1 and fuse.miss is None
    assert fuse.folded == {"swiglu": 2, "bias": 0, "residual": 4, "norm": 4}
    linears = [n for n in quantized.graph if n.op_type == "Linear"]
    assert [n.attributes["bits"].value for n in linears] == [bits] * 8 + [8]
    assert "MatMulNBits" not in [n.op_type for n in quantized.graph]
    got = segments.run_reference(segments.split(quantized), prefill)
    scale = float(np.abs(want["logits"]).max())
    for name in want:  # the same dequantized float32 weights, summed in another order
        assert float(np.abs(got[name] - want[name]).max()) <= 1e-4 * max(1.0, scale), name


def test_a_matmulnbits_the_gemv_cannot_read_stays():
    """K not a multiple of 32 codes (4 bits): ORT keeps the MatMulNBits."""
    from onnxopt.calibration.blockwise import quantize

    qw = quantize(np.random.default_rng(0).standard_normal((48, 8)).astype(np.float32), 4, 16)

    x = ir.Value(name="x", shape=ir.Shape([1, 48]), type=ir.TensorType(ir.DataType.FLOAT))
    consts = [ir.Value(name=n, shape=ir.Shape(a.shape), type=ir.TensorType(ir.DataType.from_numpy(a.dtype)),
                       const_value=ir.tensor(a, name=n))
              for n, a in (("b", qw.packed), ("s", qw.scales), ("z", qw.zero_points))]
    node = ir.Node("com.microsoft", "MatMulNBits", [x, *consts], [ir.AttrInt64("K", 48), ir.AttrInt64("N", 8),
                   ir.AttrInt64("bits", 4), ir.AttrInt64("block_size", 16)], num_outputs=1)
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=consts, opset_imports={"": 20, "com.microsoft": 1})
    fuse = FuseLinear(packed=True)
    fuse(ir.Model(graph, ir_version=10))
    assert fuse.rewired == 0 and "MatMulNBits" in fuse.miss and [n.op_type for n in graph] == ["MatMulNBits"]


def test_qwen2_projection_biases_fold(tmp_path):
    """Qwen2's q/k/v bias Add becomes the Linear's bias input; the function is unchanged."""
    import onnxopt

    ckpt = make_family_checkpoint(tmp_path / "qwen2", "qwen2", sliding_window=8)
    exported = onnxopt.export(str(ckpt), tmp_path / "pkg", progress=False)
    onnxopt.optimize(exported, tmp_path / "cuda", target="cuda", dtype="fp32", progress=False)
    path = tmp_path / "cuda" / "model.onnx"
    model, fuse = _fused(path)
    assert fuse.folded["bias"] == 2
    first = next(n for n in model.graph if n.op_type == "Linear")
    assert first.inputs[4] is not None and first.inputs[2] is not None  # bias and norm on q/k/v
    feeds = _feeds(path, np.random.default_rng(2))
    want = segments.run_reference(segments.split(ir.load(path)), feeds)
    got = segments.run_reference(segments.split(model), feeds)
    assert float(np.abs(got["logits"] - want["logits"]).max()) <= 1e-5


_SKIP = """
<ir_version: 10, opset_import: ["" : 20, "com.microsoft" : 1]>
agraph (float[2, 16] x, float[2, 16] h) => (float[2, 8] y, float[2, 16] s) <float[16, 16] wo = {%s}, float[16, 8] w2 = {%s}, float[16] g = {%s}> {
    a = MatMul(x, wo)
    n, m, v, s = com.microsoft.SkipSimplifiedLayerNormalization <epsilon: float = 1e-5> (a, h, g)
    y = MatMul(n, w2)
}
"""


def _floats(count, seed):
    return ", ".join(f"{v:.4f}" for v in np.random.default_rng(seed).standard_normal(count))


def test_a_residual_sum_that_is_a_graph_output_is_not_folded():
    model = onnx_model(_SKIP % (_floats(256, 0), _floats(128, 1), _floats(16, 2)))
    feeds = {"x": np.random.default_rng(3).standard_normal((2, 16)).astype(np.float32),
             "h": np.random.default_rng(4).standard_normal((2, 16)).astype(np.float32)}
    want = run_onnx(onnx_model(_SKIP % (_floats(256, 0), _floats(128, 1), _floats(16, 2))), feeds)
    fuse = FuseLinear()
    fuse(model)
    assert fuse.rewired == 2 and fuse.folded["residual"] == 0
    assert [n.op_type for n in model.graph] == ["Linear", "SkipSimplifiedLayerNormalization", "Linear"]
    Decompose()(model)
    for got, expected in zip(run_onnx(model, feeds), want):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


_NORM = """
<ir_version: 10, opset_import: ["" : 20]>
agraph (float[3, 16] h, float[3, 16] z, float[16, 6] wi) => (float[3, 8] y, float[3, 16] r, float[3, 8] u, float[3, 6] c) <float[16, 8] w = {%s}, float[16] g = {%s}, float[8] b = {%s}> {
    n = SimplifiedLayerNormalization <axis: int = -1, epsilon: float = 1e-5, stash_type: int = 1> (h, g)
    t = MatMul(n, w)
    y = Add(t, b)
    r = Relu(n)
    m2 = MatMul(z, w)
    u = Add(m2, m2)
    c = MatMul(h, wi)
}
"""


def test_a_norm_with_other_readers_stays_for_them_and_biases_fold_only_when_constant():
    text = _NORM % (_floats(128, 5), _floats(16, 6), _floats(8, 7))
    model = onnx_model(text)
    rng = np.random.default_rng(8)
    feeds = {"h": rng.standard_normal((3, 16)).astype(np.float32), "z": rng.standard_normal((3, 16)).astype(np.float32),
             "wi": rng.standard_normal((16, 6)).astype(np.float32)}
    want = run_onnx(onnx_model(text), feeds)
    fuse = FuseLinear()
    fuse(model)
    # MatMul(h, wi): a weight that is a graph input stays a MatMul
    assert fuse.rewired == 2 and fuse.miss.startswith("1 MatMuls kept")
    assert fuse.folded == {"swiglu": 0, "bias": 1, "residual": 0, "norm": 1}
    assert sorted(n.op_type for n in model.graph) == ["Add", "Linear", "Linear", "MatMul", "Relu", "SimplifiedLayerNormalization"]
    Decompose()(model)
    for got, expected in zip(run_onnx(model, feeds), want):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_a_width_the_gemv_cannot_load_stays_a_matmul():
    """float32 rows load 4 elements at a time: K = 6 keeps ORT's MatMul."""
    model = onnx_model("""
<ir_version: 10, opset_import: ["" : 20]>
agraph (float[2, 6] x) => (float[2, 3] y) <float[6, 3] w = {%s}> {
    y = MatMul(x, w)
}
""" % _floats(18, 9))
    fuse = FuseLinear()
    fuse(model)
    assert fuse.rewired == 0 and [n.op_type for n in model.graph] == ["MatMul"]


def test_a_norm_weight_shared_by_a_segment_and_linear_ops_splits_from_external_data(cuda_packages, tmp_path):
    """Random-init norms are all ones, so one initializer serves the final norm (an ORT segment) and the
    Linear ops (constants, read as NumPy): the split must not pin the package's memory map while the
    segment serializes that initializer from it (BufferError on the H100 benchmark, llama-1b)."""
    model = ir.load(cuda_packages["fp32"])
    ir.save(model, tmp_path / "model.onnx", external_data="model.onnx.data", size_threshold_bytes=0)
    reloaded = ir.load(tmp_path / "model.onnx")
    FuseLinear()(reloaded)
    plan = segments.split(reloaded)
    gammas = {a[1] for p in plan.parts if p.kind == "op" for a in p.args[2:3] if a}
    seg_inits = {name for p in plan.segments for name in p.model.graph.initializers}
    assert gammas & seg_inits  # the case this test is about
    for part in plan.segments:
        assert segments.serialize(part.model) is not None
