"""passes/fp8_gemm.py: the fp8 scheme's Q/DQ MatMuls as GemmFloat8 + scaling compute what the Q/DQ
graph computes (the same E4M3 operands; only the float scaling rounds differently).

ORT's CPU EP has no GemmFloat8 kernel, so the rewritten graph is run here by `_emulate`, a NumPy
evaluation of its nodes with GemmFloat8 as its spec and ORT's CUDA kernel define it (cuBLASLt: float32
sum of the E4M3 products, times alpha * scaleA * scaleB, in the output dtype); the reference is ORT
CPU's run of the original Q/DQ graph. tests/gpu/test_fp8_gemm.py runs the real kernel.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest

from onnxopt.calibration.observers import TensorObserver
from onnxopt.calibration.smoothquant import to_fp8
from onnxopt.passes import fp8_gemm
from onnxopt.quantize import quantize_model

K = 96
NS = (48, 32)  # multiples of 16, as cuBLASLt's FP8 GEMM needs
_NP = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16, ir.DataType.INT64: np.int64,
       ir.DataType.FLOAT8E4M3FN: ml_dtypes.float8_e4m3fn}


def _graph(rng, *, rank=3, dtype=np.float16, ns=NS):
    """MatMuls mm{i} sharing X ([B, S, K] or [M, K]) with weights [K, n] in `dtype`: one quantization group."""
    elem = ir.DataType.from_numpy(np.dtype(dtype))
    x = ir.Value(name="X", shape=ir.Shape(["B", "S", K] if rank == 3 else ["M", K]), type=ir.TensorType(elem))
    nodes, inits = [], []
    for i, n in enumerate(ns):
        w = (rng.standard_normal((K, n)) * 0.05).astype(dtype)
        wv = ir.Value(name=f"W{i}", shape=ir.Shape([K, n]), type=ir.TensorType(elem), const_value=ir.Tensor(w, name=f"W{i}"))
        node = ir.Node("", "MatMul", [x, wv], name=f"mm{i}", num_outputs=1)
        node.outputs[0].name, node.outputs[0].type = f"Y{i}", ir.TensorType(elem)
        nodes.append(node)
        inits.append(wv)
    graph = ir.Graph([x], [nd.outputs[0] for nd in nodes], nodes=nodes, initializers=inits, opset_imports={"": 21})
    return ir.Model(graph, ir_version=10)


def _fp8(rng, fmt="fp8", x_scale=4.0, **kwargs):
    model = _graph(rng, **kwargs)
    obs = TensorObserver(K)
    x = rng.standard_normal((512, K)).astype(np.float32) * x_scale
    x[:, [3, 17]] *= 10  # outlier channels: E4M3 keeps them and the rest under one scale
    obs.update(x)
    quantize_model(model, bits=8, block_size=32, method="smoothquant", alpha=0.0,
                   table={"tensors": {"X": obs.to_json()}}, progress=False, fmt=fmt)
    return model


def _x(rng, model, rows=7, x_scale=4.0):
    x_value = model.graph.inputs[0]
    shape = (2, rows, K) if len(x_value.shape) == 3 else (rows, K)
    return (rng.standard_normal(shape) * x_scale).astype(_NP[x_value.dtype])


def _run_cpu(model, x):
    import onnxruntime as ort

    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"X": x})


def _gemm_float8(node, a, b, scale_a, scale_b):
    """GemmFloat8 with float8 A, B: Y = alpha * scaleA * scaleB * op(A) op(B), summed in float32."""
    attrs = node.attributes
    assert a.ndim == b.ndim == 2 and scale_a.size == scale_b.size == 1
    op_a = a.T if attrs.get_int("transA", 0) else a
    op_b = b.T if attrs.get_int("transB", 0) else b
    acc = op_a.astype(np.float32) @ op_b.astype(np.float32)  # E4M3 products are exact in float32
    factor = np.float32(attrs.get_float("alpha", 1.0)) * np.float32(scale_a.item()) * np.float32(scale_b.item())
    return (factor * acc).astype(_NP[attrs.get_int("dtype", ir.DataType.FLOAT)])


def _emulate(model, x):
    """The rewritten graph's outputs, every node evaluated in NumPy (the op set this pass emits)."""
    env = {v.name: v.const_value.numpy() for v in model.graph.initializers.values()}
    env["X"] = x
    for node in model.graph:
        ins = [env[v.name] if v is not None else None for v in node.inputs]
        attrs = node.attributes
        if node.op_type == "GemmFloat8":
            assert node.domain == "com.microsoft" and ins[2] is None and len(ins) == 5
            out = _gemm_float8(node, ins[0], ins[1], ins[3], ins[4])
        elif node.op_type == "QuantizeLinear":
            assert ins[2].dtype == ml_dtypes.float8_e4m3fn and float(ins[2].astype(np.float32)) == 0
            out = to_fp8(ins[0].astype(np.float32) / ins[1].astype(np.float32))  # saturating, to nearest even
        elif node.op_type == "Reshape":
            out = ins[0].reshape(ins[1])
        elif node.op_type == "Shape":
            out = np.asarray(ins[0].shape[: attrs.get_int("end", ins[0].ndim)], dtype=np.int64)
        elif node.op_type == "Concat":
            out = np.concatenate(ins, axis=attrs.get_int("axis"))
        elif node.op_type == "Mul":
            assert ins[0].dtype == ins[1].dtype
            out = ins[0] * ins[1]
        elif node.op_type == "Cast":
            out = ins[0].astype(_NP[attrs.get_int("to")])
        else:
            raise AssertionError(f"unexpected node {node.op_type} in the rewritten graph")
        env[node.outputs[0].name] = out
    return [env[v.name] for v in model.graph.outputs]


def _close(got, want, rtol):
    for w, g in zip(want, got):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_allclose(g.astype(np.float32), w.astype(np.float32), rtol=rtol,
                                   atol=rtol * float(np.abs(w.astype(np.float32)).max()))


@pytest.mark.parametrize("rank", [2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_gemm_float8_form_equals_the_qdq_graph(rank, dtype):
    rng = np.random.default_rng(0)
    model = _fp8(rng, rank=rank, dtype=dtype)
    x = _x(rng, model)
    want = _run_cpu(model, x)
    assert fp8_gemm.count(model.graph) == 2
    assert fp8_gemm.apply(model) == 2
    ops = [n.op_type for n in model.graph]
    assert ops.count("GemmFloat8") == 2 and "MatMul" not in ops and "DequantizeLinear" not in ops
    assert ops.count("QuantizeLinear") == 1  # one E4M3 quantization of the shared input
    assert ops.count("Reshape") == (3 if rank == 3 else 0) and ops.count("Shape") == (rank == 3)  # X to [M, K] once, each output back
    gemm = next(n for n in model.graph if n.op_type == "GemmFloat8")
    w = gemm.inputs[1].const_value.numpy()
    assert w.dtype == ml_dtypes.float8_e4m3fn and w.shape == (NS[0], K)  # stored [N, K] for transB=1
    assert gemm.attributes.get_int("dtype") == ir.DataType.FLOAT
    # float32: only the scaling differs (1e-6 relative). float16: the Q/DQ graph rounds its dequantized
    # operands and its MatMul to float16 (2^-11 each); the rewrite rounds once, from float32.
    _close(_emulate(model, x), want, rtol=1e-5 if dtype == np.float32 else 2e-3)


def test_float16_output_form_equals_the_qdq_graph():
    rng = np.random.default_rng(1)
    model = _fp8(rng)
    x = _x(rng, model, rows=9)
    want = _run_cpu(model, x)
    rewrite = fp8_gemm.Fp8GemmPass("float16")
    rewrite(model)
    assert rewrite.rewired == rewrite.float16_outputs == 2
    ops = [n.op_type for n in model.graph]
    assert "Cast" not in ops  # the GEMM writes float16 and the column scales multiply in float16
    assert all(n.attributes.get_int("dtype") == ir.DataType.FLOAT16 for n in model.graph if n.op_type == "GemmFloat8")
    # one more float16 rounding than the float32 form: the GEMM's output, before the column scale
    _close(_emulate(model, x), want, rtol=3e-3)


def test_float16_form_falls_back_to_float32_where_it_could_overflow():
    """With a huge activation range, a * 448 * sum_k |W_q| passes 65504: that MatMul keeps float32."""
    rng = np.random.default_rng(2)
    model = _fp8(rng, x_scale=4000.0)
    x = _x(rng, model, x_scale=4000.0)
    want = _run_cpu(model, x)
    rewrite = fp8_gemm.Fp8GemmPass("float16")
    rewrite(model)
    assert rewrite.rewired == 2 and rewrite.float16_outputs == 0
    assert [n.op_type for n in model.graph].count("Cast") == 2
    _close(_emulate(model, x), want, rtol=2e-3)


def test_int8_float_and_unaligned_matmuls_are_left_alone():
    rng = np.random.default_rng(3)
    int8 = _fp8(rng, fmt="int8")
    assert fp8_gemm.count(int8.graph) == 0 and fp8_gemm.apply(int8) == 0
    plain = _graph(rng)
    assert fp8_gemm.apply(plain) == 0
    mixed = _fp8(rng, ns=(48, 40))  # N = 40: not a multiple of 16, stays Q/DQ
    assert fp8_gemm.apply(mixed) == 1
    ops = [n.op_type for n in mixed.graph]
    assert ops.count("GemmFloat8") == 1 and ops.count("MatMul") == 1 and ops.count("DequantizeLinear") == 2
    kept = next(n for n in mixed.graph if n.op_type == "MatMul")
    assert kept.outputs[0].name == "Y1" and kept.inputs[1].producer().op_type == "DequantizeLinear"
    assert ops.count("QuantizeLinear") == 2  # the Q/DQ one stays for the MatMul left alone


def test_idempotent_and_rewritten_graph_is_valid_for_ort():
    """A second run finds nothing; ORT's schema accepts the GemmFloat8 nodes (session creation on the
    CPU EP gets past graph resolution and type checks and fails only for want of a CPU kernel)."""
    import onnxruntime as ort

    rng = np.random.default_rng(4)
    model = _fp8(rng)
    assert fp8_gemm.apply(model) == 2
    assert fp8_gemm.count(model.graph) == 0 and fp8_gemm.apply(model) == 0
    assert not any(v.name.endswith(".w_fp8") for v in model.graph.initializers.values())  # [K, N] copies gone
    with pytest.raises(Exception, match="GemmFloat8") as info:
        ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    assert "NOT_IMPLEMENTED" in str(info.value) or "Could not find an implementation" in str(info.value)


def test_out_dtype_is_checked():
    with pytest.raises(ValueError, match="out_dtype"):
        fp8_gemm.Fp8GemmPass("bfloat16")
