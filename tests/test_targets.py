"""`optimize --target portable|cuda` and `--dtype fp16` on tiny random Llama / Qwen2 / Mistral packages.

portable: only default-domain ops at opset 23, loads in plain onnxruntime, logits within 1e-3 of the
unoptimized graph and the same greedy tokens through our runtime. cuda: the CPU fusions with
onnxopt::SwiGLU kept, fp16 by default, verified here through a decomposed copy. fp16: KV cache fp16,
logits fp32, verified against the fp32 export.
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from conftest import make_hf_dir, needs_torch

pytestmark = needs_torch

LOGITS_ATOL = 1e-3  # the fp32 bar
FAMILIES = ("llama", "qwen2", "mistral")
LAYERS = 2
# Ops with an ORT CUDA kernel for the dtypes the cuda graph uses (fp16 data, int32/int64 indices).
# Probed on an H100 (ORT 1.31.1, 2026-11-24) with this test's tiny cuda graph, SwiGLU decomposed: every node
# was placed on the CUDA EP except 4 scalar shape nodes (Gather, Cast, Cast, Sub) that ORT itself prefers on
# the CPU (GetCpuPreferredNodes); contrib ops also in ../shared/gpu/DEVICE.md. Equal (int64, the last-token
# index's S - 1): the last-token graph's decode step is captured on the H100 (tests/gpu, 2026-11-24), which
# a host-placed node would prevent.
CUDA_KERNELS = {
    ("com.microsoft", "GroupQueryAttention"),
    ("com.microsoft", "SkipSimplifiedLayerNormalization"),
    ("com.microsoft", "RotaryEmbedding"),
    ("", "SimplifiedLayerNormalization"),
    *(("", op) for op in ("Add", "Cast", "Concat", "Cos", "Equal", "Expand", "Gather", "GatherElements", "MatMul", "Min",
                          "Mul", "Range", "ReduceSum", "Reshape", "Shape", "Sin", "Slice", "Sub", "Unsqueeze")),
}


def _teacher_forced(gen, prompts, decode):
    from onnxopt.optimize import ForcedTokens

    steps = gen.iter_steps(prompts, max_new_tokens=len(decode), sampler=ForcedTokens(decode), stop_at_eos=False)
    return [s.logits.copy() for s in steps]


def _greedy(gen, prompt, n=16):
    return [int(s.tokens[0]) for s in gen.iter_steps([prompt], max_new_tokens=n, stop_at_eos=False)]


@pytest.fixture(scope="module", params=FAMILIES)
def portable(request, tmp_path_factory):
    """(unoptimized, portable package, report) of a 2-layer random model of one family."""
    import onnxopt

    root = tmp_path_factory.mktemp(f"portable-{request.param}")
    base = onnxopt.export(str(make_hf_dir(root / "hf", request.param)), root / "base", progress=False)
    report = onnxopt.optimize(base, root / "portable", target="portable", progress=False)
    return base, root / "portable", report


def test_portable_graph_is_standard_opset_23(portable):
    import collections

    _, opt, report = portable
    model = ir.load(opt / "model.onnx")
    assert dict(model.opset_imports) == {"": 23}
    ops = collections.Counter((n.domain, n.op_type) for n in model.graph.all_nodes())
    assert {domain for domain, _ in ops} == {""}
    assert ops[("", "Attention")] == LAYERS
    assert ops[("", "RMSNormalization")] == 2 * LAYERS + 1 and ops[("", "RotaryEmbedding")] == 2 * LAYERS
    assert report.missed == [] and report.verify["max_abs_diff_decode"] <= LOGITS_ATOL
    manifest = json.loads((opt / "onnxopt.json").read_text())
    assert manifest["io"]["kv_cache"]["layout"] == "concat" and manifest["dtype"] == "fp32"
    import onnx

    onnx.checker.check_model(str(opt / "model.onnx"), full_check=True)  # ONNX's own schema and type checks


def test_portable_runs_in_plain_onnxruntime(portable):
    """No onnxopt runtime: one prefill with an empty cache, fed by hand, as any ORT user would."""
    import onnxruntime as ort

    base, opt, _ = portable
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 320, (2, 5)), "attention_mask": np.ones((2, 5), np.int64)}
    feeds["attention_mask"][1, :2] = 0  # left padding
    feeds["position_ids"] = np.maximum(np.cumsum(feeds["attention_mask"], 1) - 1, 0)
    feeds.update({f"past_key_values.{i}.{kv}": np.zeros((2, 2, 0, 16), np.float32) for i in range(LAYERS) for kv in ("key", "value")})
    outputs = []
    for path in (base, opt):
        session = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        outputs.append(dict(zip(names, session.run(None, feeds))))
    want, got = outputs
    assert got["present.1.key"].shape == (2, 2, 5, 16)
    real = feeds["attention_mask"].astype(bool)  # [B, T]
    # Padding positions are don't-care: no real query attends to them. (Their values differ: a query
    # that sees no key gets the export's own fallback there and Attention-23's here.)
    # last_token_logits: each row's last position, S - 1 under left padding.
    assert got["logits"].shape == (2, 1, want["logits"].shape[2])
    assert float(np.abs(want["logits"][:, -1:] - got["logits"]).max()) <= LOGITS_ATOL
    for name in (n for n in want if n.startswith("present.")):
        assert float(np.abs(want[name] - got[name]).transpose(0, 2, 1, 3)[real].max()) <= LOGITS_ATOL, name


def test_portable_logits_and_greedy_tokens_equal_unoptimized(portable):
    import onnxopt

    base, opt, _ = portable
    ref, gen = onnxopt.load(base), onnxopt.load(opt)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 320, n).tolist() for n in (9, 4)]
    decode = rng.integers(0, 320, (12, 2))
    deltas = [float(np.abs(a - b).max()) for a, b in zip(_teacher_forced(ref, prompts, decode), _teacher_forced(gen, prompts, decode))]
    assert len(deltas) == 12 and max(deltas) <= LOGITS_ATOL, deltas
    assert _greedy(gen, prompts[0]) == _greedy(ref, prompts[0])


@pytest.fixture(scope="module")
def cuda(tiny_package, tmp_path_factory):
    import onnxopt

    out = tmp_path_factory.mktemp("cuda") / "cuda"
    return out, onnxopt.optimize(tiny_package, out, target="cuda", progress=False)


def test_cuda_keeps_swiglu_is_fp16_and_was_verified_decomposed(cuda):
    out, report = cuda
    model = ir.load(out / "model.onnx")
    swiglu = [n for n in model.graph if (n.domain, n.op_type) == ("onnxopt", "SwiGLU")]
    assert len(swiglu) == LAYERS and swiglu[0].outputs[0].dtype == ir.DataType.FLOAT16
    assert report.missed == [] and report.verify["custom_ops_decomposed"] == 2 * LAYERS  # SwiGLU, attention
    attention = [n for n in model.graph if (n.domain, n.op_type) == ("onnxopt", "GroupQueryAttention")]
    assert len(attention) == LAYERS and attention[0].outputs[0].dtype == ir.DataType.FLOAT16
    assert report.verify["max_abs_diff_decode"] <= report.verify["tolerance"]
    inputs = {v.name: v for v in model.graph.inputs}
    assert inputs["past_key_values.0.key"].dtype == ir.DataType.FLOAT16
    assert next(v for v in model.graph.outputs if v.name == "logits").dtype == ir.DataType.FLOAT
    manifest = json.loads((out / "onnxopt.json").read_text())
    assert manifest["dtype"] == "fp16" and manifest["io"]["kv_cache"]["layout"] == "gqa-shared"


def test_cuda_graph_has_only_ops_with_cuda_kernels(cuda):
    out, _ = cuda
    model = ir.load(out / "model.onnx")
    ops = {(n.domain, n.op_type) for n in model.graph.all_nodes()} - {("onnxopt", "SwiGLU"), ("onnxopt", "GroupQueryAttention")}
    assert ops <= CUDA_KERNELS, sorted(ops - CUDA_KERNELS)


def test_inspect_says_how_each_runtime_runs_a_package(cuda, tiny_package):
    from onnxopt.inspect_package import describe, format_text

    out, _ = cuda
    runs = describe(out)["runs_on"]
    assert runs["cpu"].startswith(f"no: {2 * LAYERS} onnxopt custom ops")
    assert runs["cuda"].startswith(f"{2 * LAYERS + 1} ORT CUDA segments split at {2 * LAYERS} onnxopt nodes")
    assert "runs on" in format_text(describe(out))
    plain = describe(tiny_package)["runs_on"]  # exported: fp32, concat KV cache
    assert plain["cpu"].startswith("ONNX Runtime CPU EP") and plain["cuda"].startswith("no: needs an optimized package")


def test_cuda_package_on_the_cpu_is_refused_with_advice(cuda):
    import onnxopt
    from onnxopt.errors import PackageError

    out, _ = cuda
    with pytest.raises(PackageError, match="onnxopt custom ops.*--device cuda.*--target cpu"):
        onnxopt.load(out)


def test_cli_generate_of_a_cuda_package_on_the_cpu_is_one_error_line(cuda):
    from click.testing import CliRunner

    from onnxopt.cli import main

    out, _ = cuda
    result = CliRunner().invoke(main, ["generate", str(out), "hi"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "--device cuda" in lines[0] and "Traceback" not in result.output


def test_cpu_fp16_runs_on_ort_cpu_with_fp16_cache_and_same_greedy_tokens(tiny_package, tmp_path):
    import onnxopt

    report = onnxopt.optimize(tiny_package, tmp_path / "fp16", dtype="fp16", progress=False)
    assert report.steps[-1].name == "float16" and report.missed == []
    gen, ref = onnxopt.load(tmp_path / "fp16"), onnxopt.load(tiny_package)
    assert gen.package.dtype == "fp16" and gen.kv_dtype == np.float16
    prompt = np.random.default_rng(2).integers(0, 320, 6).tolist()
    assert _greedy(gen, prompt) == _greedy(ref, prompt)


def test_portable_fp16_verifies(tiny_package, tmp_path):
    import onnxopt

    report = onnxopt.optimize(tiny_package, tmp_path / "p16", target="portable", dtype="fp16", progress=False)
    assert report.missed == [] and report.verify["max_abs_diff_decode"] <= report.verify["tolerance"]
    assert dict(ir.load(tmp_path / "p16" / "model.onnx").opset_imports) == {"": 23}


def test_bad_dtype_and_target_combinations_are_one_line_errors(tiny_package, tiny_hf_dir, tmp_path):
    from click.testing import CliRunner

    import onnxopt
    from onnxopt.cli import main

    runner = CliRunner()
    cases = [
        (["--dtype", "fp8"], "fp8"),
        (["--target", "tpu"], "tpu"),
    ]
    for args, word in cases:
        result = runner.invoke(main, ["optimize", str(tiny_package), "-o", str(tmp_path / "x"), *args])
        assert result.exit_code == 2 and word in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    half = onnxopt.export(str(tiny_hf_dir), tmp_path / "half", dtype="fp16", progress=False)
    result = runner.invoke(main, ["optimize", str(half), "-o", str(tmp_path / "y"), "--dtype", "fp32"])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "fp16 package" in result.stderr and "export" in result.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize("source", ["ours", "optimum"])
def test_portable_fuses_exports_with_biases_and_sliding_window(source, tmp_path):
    """Qwen2 with non-zero q/k/v biases, and Mistral with a sliding window (8) shorter than prompt + decode,
    from our exporter and from optimum's: every layer gets its Attention-23 (the export's mask carries the
    window), verified against the unfused graph, and batched logits agree."""
    import onnxopt
    from test_optimum_optimize import SLIDING_WINDOW, _checkpoint, _optimum_export

    for family in ("qwen2", "mistral"):
        hf = _checkpoint(tmp_path / f"hf-{family}", family)
        src = _optimum_export(hf, tmp_path / f"optimum-{family}") if source == "optimum" else hf
        base = onnxopt.export(str(src), tmp_path / f"base-{family}", progress=False)
        out = tmp_path / f"portable-{family}"
        report = onnxopt.optimize(base, out, target="portable", progress=False)
        assert report.missed == [], report.missed
        assert report.nodes_after["ops_per_layer"]["Attention"] == 1
        ref, gen = onnxopt.load(base), onnxopt.load(out)
        rng = np.random.default_rng(4)
        prompts = [rng.integers(0, 320, n).tolist() for n in (SLIDING_WINDOW + 5, 3)]
        decode = rng.integers(0, 320, (SLIDING_WINDOW + 2, 2))
        deltas = [float(np.abs(a - b).max()) for a, b in zip(_teacher_forced(ref, prompts, decode), _teacher_forced(gen, prompts, decode))]
        assert max(deltas) <= LOGITS_ATOL, (family, deltas)
