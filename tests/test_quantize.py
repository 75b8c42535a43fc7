"""Weight-only quantization: MatMulNBits against the NumPy dequantized reference, the graph rewrite on a
tiny Llama, the perplexity gate, and bad input through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import needs_torch

from onnxopt.calibration import blockwise
from onnxopt.cli import main
from onnxopt.quantize import quantize_model, weight_matmuls

DATA = "/work/shared/data/prideprejudice.txt"
CALIB = "/work/shared/data/emma.txt"


def _matmul_model(w: np.ndarray):
    """Y [M, N] = X [M, K] @ W, W an initializer."""
    import onnx_ir as ir

    k, n = w.shape
    x = ir.Value(name="X", shape=ir.Shape(["M", k]), type=ir.TensorType(ir.DataType.FLOAT))
    w_value = ir.Value(name="W", shape=ir.Shape([k, n]), type=ir.TensorType(ir.DataType.FLOAT), const_value=ir.Tensor(w, name="W"))
    node = ir.Node("", "MatMul", [x, w_value], name="mm", num_outputs=1)
    node.outputs[0].name = "Y"
    node.outputs[0].shape, node.outputs[0].type = ir.Shape(["M", n]), ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[w_value], opset_imports={"": 20}, name="g")
    return ir.Model(graph, ir_version=10)


def _run(model, x: np.ndarray) -> np.ndarray:
    import onnx_ir as ir
    import onnxruntime as ort

    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"X": x})[0]


# Odd shapes: K not a multiple of the block (the last block is zero-padded), an odd number of blocks
# (a padded zero-point nibble at 4 bits), N not a multiple of anything.
SHAPES = [(576, 77), (100, 33), (64, 5)]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("block_size", [32, 128])
@pytest.mark.parametrize("k,n", SHAPES)
def test_matmulnbits_matches_numpy_reference(bits, block_size, k, n):
    rng = np.random.default_rng(k * n + bits)
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    x = rng.standard_normal((7, k)).astype(np.float32)
    qw = blockwise.quantize(w, bits, block_size)
    w_ref = blockwise.dequantize(qw)
    np.testing.assert_array_equal(w_ref, blockwise.fake_quantize(w, bits, block_size))
    # The reference really is a quantization of w: within half a step of each block.
    step = qw.scales.reshape(n, -1).repeat(block_size, axis=1)[:, :k].T
    assert np.all(np.abs(w_ref - w) <= 0.5 * step * (1 + 1e-6))
    want = x.astype(np.float64) @ w_ref.astype(np.float64)

    model = _matmul_model(w)
    quantize_model(model, bits=bits, block_size=block_size, accuracy_level=0, progress=False)
    assert [n.op_type for n in model.graph] == ["MatMulNBits"]
    # accuracy_level 0: fp32 products of the dequantized weight; only the summation order differs.
    np.testing.assert_allclose(_run(model, x), want, rtol=1e-5, atol=1e-5)

    model = _matmul_model(w)
    quantize_model(model, bits=bits, block_size=block_size, accuracy_level=4, progress=False)
    got = _run(model, x)
    # accuracy_level 4 also rounds X to int8 per block of K (symmetric, step absmax/127): the error of
    # each output is bounded by sum_k (step_k / 2) * |w_ref[k, n]|.
    blocks = -(-k // block_size)
    xp = np.zeros((x.shape[0], blocks * block_size), np.float64)
    xp[:, :k] = np.abs(x)
    x_step = (xp.reshape(x.shape[0], blocks, block_size).max(axis=-1) / 127).repeat(block_size, axis=1)[:, :k]
    bound = (x_step / 2) @ np.abs(w_ref.astype(np.float64))
    assert np.all(np.abs(got - want) <= bound * 1.01 + 1e-5)


# -- whole packages ---------------------------------------------------------------------------------

EVAL = dict(max_tokens=300, window=128, stride=64)  # small: the tiny model's gate runs in a second


def _reference_model(package, bits: int, block_size: int):
    """The package's graph with every weight replaced by its NumPy dequantized self (fp32 MatMuls);
    the LM head at 8 bits, as `quantize_model` does by default."""
    import onnx_ir as ir

    model = ir.load(package.model_path)
    for mm in weight_matmuls(model.graph):
        head = mm.shape[1] == package.dims["vocab_size"]
        w = blockwise.fake_quantize(mm.array(), 8 if head else bits, block_size)
        value = ir.Value(name=f"{mm.node.name}.ref", shape=ir.Shape(w.shape), type=ir.TensorType(ir.DataType.FLOAT),
                         const_value=ir.Tensor(w, name=f"{mm.node.name}.ref"))
        model.graph.register_initializer(value)
        mm.node.replace_input_with(1, value)  # the tied head gets its own copy; the Gather keeps E
    return model


@needs_torch
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_graph_matches_dequantized_reference(tiny_text_package, bits):
    """Whole model: MatMulNBits (accuracy_level 0) against the same graph with NumPy-dequantized weights."""
    import onnx_ir as ir

    from onnxopt.calibration.forward import WindowRunner
    from onnxopt.package import ModelPackage

    package = ModelPackage(tiny_text_package)
    reference = WindowRunner(package, model=_reference_model(package, bits, 32))
    model = ir.load(package.model_path)
    summary = quantize_model(model, bits=bits, block_size=32, vocab_size=package.dims["vocab_size"], accuracy_level=0, progress=False)
    assert summary["lm_head"]["bits"] == 8 and summary["lm_head"]["tied"]
    ops = [n.op_type for n in model.graph]
    assert "MatMulNBits" in ops and ops.count("MatMulNBits") == summary["matmuls"] + 1
    assert not weight_matmuls(model.graph)  # every weight MatMul was replaced
    quantized = WindowRunner(package, model=model)
    ids = np.random.default_rng(0).integers(0, package.dims["vocab_size"], 48)
    want, got = reference(ids)["logits"], quantized(ids)["logits"]
    # fp32 products of identical weights; only the summation order differs (seen ~1e-6).
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


@needs_torch
@pytest.mark.parametrize("recipe", [{"lm_head": "int8"}, {"lm_head": "keep"},
                                    {"method": "smoothquant", "fmt": "fp8", "alpha": 0.0, "outlier_channels": 4},
                                    {"method": "smoothquant", "fmt": "int8", "alpha": 0.5, "outlier_limit": 32.0}],
                         ids=["rtn", "rtn-head-kept", "fp8-outliers", "int8-smoothquant"])
def test_rounding_on_threads_gives_the_one_thread_graph(tiny_text_package, recipe):
    """The weights rounded by a pool of threads ahead of the rewrite (RTN per matrix, W8A8 per input
    group): the same initializers, in the same places, as one thread's."""
    import onnx_ir as ir

    from onnxopt.calibration.table import random_ids_table
    from onnxopt.package import ModelPackage

    package = ModelPackage(tiny_text_package)
    w8a8 = recipe.get("method") == "smoothquant"
    table = random_ids_table(package, windows=2, length=32) if w8a8 else None
    graphs, summaries = [], []
    for workers in (1, 3):
        model = ir.load(package.model_path)
        summaries.append(quantize_model(model, bits=8 if w8a8 else 4, block_size=32, table=table,
                                        vocab_size=package.dims["vocab_size"], progress=False, workers=workers,
                                        **recipe))
        graphs.append(model)
    assert summaries[0] == summaries[1] and summaries[0]["matmuls"] > 0
    one, many = ({name: v.const_value.numpy() for name, v in g.graph.initializers.items()} for g in graphs)
    assert one.keys() == many.keys()
    for name in one:
        np.testing.assert_array_equal(many[name], one[name], err_msg=name)
    assert [(n.op_type, [v.name if v else None for v in n.inputs]) for n in graphs[0].graph] == \
        [(n.op_type, [v.name if v else None for v in n.inputs]) for n in graphs[1].graph]


@needs_torch
@pytest.mark.parametrize("scheme,method", [("int8-wo", "rtn"), ("int4-wo", "rtn"), ("int4-wo", "awq"), ("int8", "smoothquant"),
                                           ("fp8", "smoothquant"), ("fp8", None), ("int8", "gptq")])
def test_quantize_writes_a_gated_package(tiny_text_package, tmp_path, monkeypatch, scheme, method):
    import onnxopt
    from onnxopt.package import ModelPackage
    from onnxopt.quantize import quantize

    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "q"
    calib = dict(calib_data=[CALIB], calib_samples=4, calib_seq_len=64) if method != "rtn" else {}
    record = quantize(tiny_text_package, out, scheme=scheme, method=method, eval_data=DATA, max_ppl_increase=5,
                      progress=False, **calib, **EVAL)
    manifest = ModelPackage(out).manifest
    assert manifest["quantization"] == json.loads(json.dumps(record))
    gate = record["gate"]
    assert gate["passed"] and not gate["forced"] and gate["tokens"] == 299
    assert gate["delta_pct"] == pytest.approx(100 * (gate["ppl"] / gate["ppl_parent"] - 1))
    assert record["bits"] == {"int8-wo": 8, "int4-wo": 4, "int8": 8, "fp8": 8}[scheme]
    assert record["method"] == (method or "gptq")  # fp8's default
    method = record["method"]
    if method == "gptq":
        assert record["calibration"]["hessians"] == {"samples": 4, "tokens": 4 * 64, "graph": "fp32 (the parent's MatMul inputs)"}
        ratios = record["gptq"]["error_ratio"]
        assert len(ratios) == 4 * 2 and all(0 < r <= 1.0 for r in ratios.values())
    if method != "rtn":
        assert record["calibration"]["samples"] == 4 and record["calibration"]["table_sha256"]
    if method == "awq":
        assert record["awq"]["groups"] == 4 * 2  # qkv, o, gate/up, down in each of 2 layers
    if scheme in ("int8", "fp8"):
        assert record["alpha"] == {"int8": 0.9, "fp8": 0.0}[scheme] and record["matmuls"] == 7 * 2
        assert record["activations"].startswith({"int8": "uint8", "fp8": "float8e4m3fn"}[scheme])
        # fp8's default keeps 32 channels in float, capped at an eighth of the narrowest input (64 here)
        assert record["outlier_channels"] == {"int8": 0, "fp8": 64 // 8}[scheme]
    # The package runs, and its perplexity is the one the gate recorded.
    assert onnxopt.evaluate(out, DATA, progress=False, **EVAL).ppl == gate["ppl"]
    onnxopt.load(out).generate("Hello", max_new_tokens=4)


@needs_torch
@pytest.mark.parametrize("method", ["smoothquant", "gptq"])
def test_outlier_channels_are_recorded_and_run(tiny_text_package, tmp_path, monkeypatch, method):
    """--outlier-channels 3: each W8A8 input gains one Gather, each of its MatMuls a MatMul and an Add."""
    import onnx_ir as ir

    import onnxopt
    from onnxopt.package import ModelPackage
    from onnxopt.quantize import quantize

    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path / "cache"))
    common = dict(scheme="fp8", method=method, eval_data=DATA, max_ppl_increase=5, progress=False, calib_data=[CALIB],
                  calib_samples=4, calib_seq_len=64, **EVAL)
    ops = {}
    for n in (0, 3):
        record = quantize(tiny_text_package, tmp_path / f"q{n}", outlier_channels=n, **common)
        assert record["outlier_channels"] == n and record["gate"]["passed"]
        ops[n] = [node.op_type for node in ir.load(ModelPackage(tmp_path / f"q{n}").model_path).graph]
    index = record["outlier_channel_index"]
    assert len(index) == 4 * 2 and all(len(channels) == 3 for channels in index.values())  # qkv, o, gate/up, down x 2
    for op, extra in (("Gather", 4 * 2), ("MatMul", 7 * 2), ("Add", 7 * 2)):
        assert ops[3].count(op) == ops[0].count(op) + extra, op
    assert onnxopt.evaluate(tmp_path / "q3", DATA, progress=False, **EVAL).ppl == record["gate"]["ppl"]


@needs_torch
def test_gate_refuses_and_writes_nothing(tiny_text_package, tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "q"
    args = ["quantize", str(tiny_text_package), "--scheme", "int8-wo", "--eval-data", DATA, "--max-tokens", "300",
            "--max-ppl-increase", "0", "-o", str(out)]
    result = CliRunner().invoke(main, args)
    # This seeded model's int8 perplexity is 0.005% above its parent's: past a 0% gate.
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error:") and "past the 0.0% allowed" in lines[-1] and "nothing written" in lines[-1]
    # int8-wo with rtn and blocks of 32 (the defaults): the advice is the calibrated method only
    assert "(try --method awq, raise --max-ppl-increase" in lines[-1]
    assert not out.exists() and not list(tmp_path.glob(".q.*"))
    # --force writes it, and says so in the manifest.
    result = CliRunner().invoke(main, [*args, "--force", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["gate"]["forced"] and not record["gate"]["passed"] and record["gate"]["delta_pct"] > 0


@needs_torch
@pytest.mark.parametrize("extra,fragment", [
    (["--method", "awq"], "--method awq needs"),
    (["--calib-data", CALIB], "round-to-nearest uses no calibration"),
    (["--method", "awq", "--calib-data", DATA], "is the evaluation file"),
    (["--method", "awq", "--calib", "/nonexistent.json"], "no such calibration table"),
    (["--scheme", "int3"], "int3"),
    (["--scheme", "int8", "--method", "rtn"], "--scheme int8 takes smoothquant or gptq"),
    (["--method", "gptq", "--calib-data", CALIB], "GPTQ is implemented for the W8A8 schemes only"),
    (["--scheme", "fp8", "--method", "smoothquant", "--act-order", "--calib-data", CALIB], "--act-order"),
    (["--scheme", "fp8", "--hessian-samples", "0", "--calib-data", CALIB], "--hessian-samples 0"),
    (["--scheme", "fp8"], "--method gptq needs activation statistics"),
    (["--scheme", "fp8", "--weight-only-input", "nonexistent", "--calib-data", CALIB], "--weight-only-input nonexistent"),
    (["--weight-only-input", "x"], "--scheme int8-wo is weight-only already"),
    (["--outlier-channels", "2"], "--scheme int8-wo quantizes no activations"),
    (["--scheme", "int8", "--outlier-channels", "2", "--act-range", "mse", "--calib-data", CALIB], "use --act-range minmax"),
    (["--scheme", "fp8", "--method", "smoothquant", "--outlier-channels", "100000", "--calib-data", CALIB], "has only"),
    (["--scheme", "int8"], "--method gptq needs activation statistics"),
    (["--method", "smoothquant"], "--scheme int8-wo takes rtn or awq"),
    (["--scheme", "int8", "--alpha", "1.5", "--calib-data", CALIB], "--alpha 1.5"),
    (["--scheme", "int8", "--alpha", "high", "--calib-data", CALIB], "--alpha 'high'"),
    (["--scheme", "fp8", "--alpha", "auto", "--calib-data", CALIB], "give --scheme fp8 a number"),
    (["--scheme", "fp8", "--act-range", "mse", "--calib-data", CALIB], "--scheme fp8 takes minmax"),
    (["--block-size", "48"], "48"),
    (["--max-ppl-increase", "-1"], "--max-ppl-increase"),
    (["--eval-data", "/nonexistent.txt"], "no such data file"),
])
def test_bad_input(tiny_text_package, tmp_path, extra, fragment):
    out = tmp_path / "q"
    args = ["quantize", str(tiny_text_package), "--scheme", "int8-wo", "--eval-data", DATA, "-o", str(out)]
    result = CliRunner().invoke(main, [*args, *extra])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], result.stderr
    assert not out.exists()


@needs_torch
def test_refuses_table_of_another_graph_and_a_quantized_parent(tiny_text_package, tiny_package, tmp_path, monkeypatch):
    from onnxopt.calibration.table import calibrate
    from onnxopt.quantize import quantize

    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path / "cache"))
    table = tmp_path / "t.json"
    calibrate(tiny_text_package, [CALIB], out=table, num_samples=1, seq_len=16, progress=False)
    result = CliRunner().invoke(main, ["quantize", str(tiny_package), "--scheme", "int4-wo", "--method", "awq", "--calib",
                                       str(table), "--eval-data", DATA, "-o", str(tmp_path / "q")])
    assert result.exit_code == 2 and "made for another graph" in result.stderr
    quantize(tiny_text_package, tmp_path / "q8", scheme="int8-wo", eval_data=DATA, force=True, progress=False, **EVAL)
    result = CliRunner().invoke(main, ["quantize", str(tmp_path / "q8"), "--scheme", "int4-wo", "--eval-data", DATA,
                                       "-o", str(tmp_path / "q4")])
    assert result.exit_code == 2 and "already quantized" in result.stderr


@needs_torch
def test_quantize_keeps_the_optimizers_fusions(tiny_text_package, tmp_path, monkeypatch):
    """Calibration observes the fused graph and quantization keeps its fused ops (issue: quantization
    applies after the optimizer)."""
    import onnx_ir as ir

    import onnxopt
    from onnxopt.package import ModelPackage
    from onnxopt.quantize import quantize

    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path / "cache"))
    opt = tmp_path / "opt"
    onnxopt.optimize(tiny_text_package, opt, progress=False, full_logits=True)
    fused = {n.op_type for n in ir.load(ModelPackage(opt).model_path).graph if n.domain == "com.microsoft"}
    record = quantize(opt, tmp_path / "q", scheme="int4-wo", method="awq", calib_data=[CALIB], calib_samples=2,
                      calib_seq_len=64, eval_data=DATA, max_ppl_increase=5, progress=False, **EVAL)
    ops = {n.op_type for n in ir.load(ModelPackage(tmp_path / "q").model_path).graph if n.domain == "com.microsoft"}
    assert fused and fused | {"MatMulNBits"} == ops
    assert record["gate"]["passed"] and record["awq"]["groups"] > 0


@pytest.mark.slow
def test_smollm2_gate_refuses_a_damaging_recipe(smollm2_package, tmp_path, monkeypatch):
    """4-bit everything with blocks of 128, LM head included, costs SmolLM2 far more than 1%."""
    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "q"
    result = CliRunner().invoke(main, [
        "quantize", str(smollm2_package), "--scheme", "int4-wo", "--block-size", "128", "--lm-head", "scheme",
        "--max-ppl-increase", "1", "--max-tokens", "512", "--eval-data", DATA, "-o", str(out)])
    assert result.exit_code == 2, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error:") and "past the 1.0% allowed for int4-wo" in line
    assert not out.exists() and not list(tmp_path.glob(".q.*"))


@needs_torch
def test_w8a8_mse_ranges_come_from_a_second_pass(tiny_text_package, tmp_path, monkeypatch):
    """--act-range mse: the smoothed activations' own ranges, never wider than min-max."""
    import onnx_ir as ir

    from onnxopt.calibration.table import calibrate
    from onnxopt.package import ModelPackage
    from onnxopt.quantize import quantize, smoothed_ranges

    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path / "cache"))
    table = calibrate(tiny_text_package, [CALIB], num_samples=2, seq_len=64, progress=False)
    ranges = smoothed_ranges(ModelPackage(tiny_text_package), table, alpha=0.9, samples=2, progress=False)
    assert len(ranges) == 4 * 2 and all(lo <= 0 <= hi and lo < hi for lo, hi in ranges.values())
    table_path = tmp_path / "t.json"
    table_path.write_text(json.dumps(table))
    scales = {}
    for mode in ("minmax", "mse"):
        out = tmp_path / mode
        record = quantize(tiny_text_package, out, scheme="int8", calib=table_path, act_range=mode, range_samples=2,
                          eval_data=DATA, max_ppl_increase=5, progress=False, **EVAL)
        assert record["gate"]["passed"]
        graph = ir.load(ModelPackage(out).model_path).graph
        scales[mode] = {name: float(v.const_value.numpy()) for name, v in graph.initializers.items() if name.endswith(".a_scale")}
    assert record["calibration"]["act_range"] == {"method": "mse", "samples": 2}
    assert scales["mse"].keys() == scales["minmax"].keys()
    # Same windows, same smoothing: the second pass's min-max equals the first's divided by s, and MSE clips within it.
    assert all(scales["mse"][k] <= scales["minmax"][k] * (1 + 1e-6) for k in scales["mse"])


@needs_torch
@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_gptq_w8a8_graph_matches_numpy_dequantized_weights(tiny_text_package, fmt):
    """W8A8 with GPTQ rounding on a whole tiny model: ORT's DequantizeLinear of the stored weights
    equals NumPy's (same graph, weights dequantized in NumPy as fp32 initializers), the stored codes
    are GPTQ's for the measured H, and they are not round-to-nearest's."""
    import onnx_ir as ir

    from onnxopt.calibration import gptq, smoothquant
    from onnxopt.calibration.forward import WindowRunner
    from onnxopt.calibration.table import calibrate
    from onnxopt.package import ModelPackage
    from onnxopt.quantize import input_hessians

    package = ModelPackage(tiny_text_package)
    table = calibrate(package, [CALIB], num_samples=2, seq_len=64, progress=False)
    hessians, record = input_hessians(package, table, samples=2, progress=False)
    assert record["tokens"] == 128
    originals = {mm.node.name: mm.array() for mm in weight_matmuls(ir.load(package.model_path).graph)}
    model = ir.load(package.model_path)
    summary = quantize_model(model, bits=8, block_size=32, method="gptq", table=table, hessians=hessians, alpha=0.0,
                             fmt=fmt, vocab_size=package.dims["vocab_size"], progress=False)
    assert summary["matmuls"] == 7 * 2 and len(summary["gptq"]["error_ratio"]) == 4 * 2

    reference = ir.from_proto(ir.to_proto(model))  # a copy; its external weights still resolve against the package
    moved = 0
    for node in list(reference.graph):
        if node.op_type != "DequantizeLinear" or node.inputs[0].const_value is None:
            continue  # activations' Q/DQ stay as they are
        codes = node.inputs[0].const_value.numpy().astype(np.float32)
        w = codes * node.inputs[1].const_value.numpy()  # per output column (axis 1)
        matmul = node.outputs[0].consumers()[0]
        value = ir.Value(name=f"{node.name}.ref", shape=ir.Shape(w.shape), type=ir.TensorType(ir.DataType.FLOAT),
                         const_value=ir.Tensor(w, name=f"{node.name}.ref"))
        reference.graph.register_initializer(value)
        matmul.replace_input_with(1, value)
        name = matmul.name
        x = matmul.inputs[0].producer().inputs[0].producer().inputs[0].name  # DQ <- Q <- the MatMul's input
        scale = node.inputs[1].const_value.numpy()
        grid = (lambda v: smoothquant.to_fp8(v).astype(np.float32)) if fmt == "fp8" else (
            lambda v: np.clip(np.rint(v), -127, 127).astype(np.float32))
        if name in ("node_linear_3", "node_linear_6"):  # o_proj and down_proj of layer 0 are alone in their group
            # Rounded by GPTQ from this input's H against this very scale, and not to nearest.
            np.testing.assert_array_equal(codes, gptq.gptq(originals[name], hessians[x], scale, grid))
            assert np.mean(codes != grid(originals[name] / scale)) > 0.05
            moved += 1
    assert moved == 2
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(reference)
    ids = np.random.default_rng(0).integers(0, package.dims["vocab_size"], 48)
    got = WindowRunner(package, model=model)(ids)["logits"]
    want = WindowRunner(package, model=reference)(ids)["logits"]
    # Identical weights and identical activation Q/DQ; only fp32 summation order differs (seen ~1e-6).
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_gate_advice_names_only_settings_not_tried():
    from onnxopt.quantize import gate_advice

    assert gate_advice("int4-wo", "rtn", 128) == "--method awq, --block-size 32, "
    assert gate_advice("int4-wo", "awq", 32) == ""
    assert gate_advice("fp8", "smoothquant", 32) == "--method gptq, "
    assert gate_advice("int8", "gptq", 32) == ""
