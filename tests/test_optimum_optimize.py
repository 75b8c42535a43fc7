"""`onnxopt optimize` on optimum-onnx exports (TorchScript exporter) of tiny Llama, Qwen2 and Mistral.

Each family's seeded checkpoint is exported twice, by optimum-cli and by us (dynamo), and both
packages are optimized. The optimum graph must fuse into the same graph as ours (the same op
histogram: SkipSimplifiedLayerNormalization, GroupQueryAttention with rotary, packed QKV (+ bias
for Qwen2), packed gate/up + SwiGLU) and compute what its unfused graph computes: logits over
prefill + decode within 1e-3, the same greedy tokens, batches equal to single prompts. Qwen2 gets
non-zero q/k/v biases; Mistral a sliding window of 8 tokens, shorter than the prompts and the decode,
which GroupQueryAttention must keep (local_window_size).
"""

from __future__ import annotations

import collections
import os
import shutil
import subprocess

import numpy as np
import pytest

from conftest import make_family_checkpoint, needs_torch

pytestmark = needs_torch

LOGITS_ATOL = 1e-3  # the fp32 bar; fused kernels only reorder sums (seen <= 3e-7 here)
BATCH_ATOL = 1e-4  # a row of a batch vs the same prompt alone (seen ~1e-7)
SLIDING_WINDOW = 8
FAMILIES = ("llama", "qwen2", "mistral")


def _checkpoint(path, family: str):
    return make_family_checkpoint(path, family, sliding_window=SLIDING_WINDOW)


def _optimum_export(hf_dir, out):
    pytest.importorskip("optimum.exporters.onnx")
    cli = shutil.which("optimum-cli")
    if cli is None:
        pytest.skip("optimum-cli is not installed")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    cmd = [cli, "export", "onnx", "--model", str(hf_dir), "--task", "text-generation-with-past", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"optimum-cli failed:\n{proc.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def packages(family, tmp_path_factory):
    """{"optimum": (base, opt, report), "ours": (base, opt, report)} of one family."""
    import onnxopt

    root = tmp_path_factory.mktemp(f"optimum-{family}")
    hf = _checkpoint(root / "hf", family)
    result = {}
    for source, path in (("optimum", _optimum_export(hf, root / "optimum-onnx")), ("ours", hf)):
        base = onnxopt.export(str(path), root / f"{source}-base", progress=False)
        report = onnxopt.optimize(base, root / f"{source}-opt", progress=False)
        result[source] = (base, root / f"{source}-opt", report)
    return result


def _load(path):
    import onnx_ir as ir

    return ir.load(path / "model.onnx")


def _graph(path):
    return _load(path).graph


def _teacher_forced(gen, prompts, decode):
    from onnxopt.optimize import ForcedTokens

    steps = gen.iter_steps(prompts, max_new_tokens=len(decode), sampler=ForcedTokens(decode), stop_at_eos=False)
    return [s.logits.copy() for s in steps]


def test_fuses_into_the_same_graph_as_our_export(packages, family):
    _, opt, report = packages["optimum"]
    assert report.missed == [], report.format_text()
    assert packages["ours"][2].missed == [], packages["ours"][2].format_text()
    assert {s.name: s.matches for s in report.steps}["torchscript_forms"] > 0
    optimum_ops = collections.Counter(n.op_type for n in _graph(opt))
    ours_ops = collections.Counter(n.op_type for n in _graph(packages["ours"][1]))
    assert optimum_ops == ours_ops
    assert optimum_ops["GroupQueryAttention"] == 2 and optimum_ops["RotaryEmbedding"] == 0  # rotary inside GQA
    assert optimum_ops["SkipSimplifiedLayerNormalization"] == 4 and optimum_ops["QuickGelu"] == 2
    assert optimum_ops["Add"] == (2 if family == "qwen2" else 0)  # the packed q/k/v bias
    from onnxopt.passes.report import node_layers

    for layer, nodes in node_layers(_load(opt)).items():  # the report attributes fused nodes to their layer
        per_layer = collections.Counter(n.op_type for n in nodes)
        assert per_layer["GroupQueryAttention"] == 1 and per_layer["Split"] == 1, (layer, per_layer)
    windows = {n.attributes.get_int("local_window_size", -1) for n in _graph(opt) if n.op_type == "GroupQueryAttention"}
    assert windows == ({SLIDING_WINDOW} if family == "mistral" else {-1})


def test_portable_target_fuses_optimum_exports_like_ours(packages, family, tmp_path):
    """--target portable (opset-23 Attention/RotaryEmbedding/RMSNormalization, standard ops only) on
    the optimum graph: every expected fusion fires, the fused ops per layer are ours, verify passes
    (optimize writes nothing past 1e-3), and plain ORT decodes the same greedy tokens."""
    import onnxopt

    base, _, _ = packages["optimum"]
    reports, graphs = {}, {}
    for source, src in (("optimum", base), ("ours", packages["ours"][0])):
        reports[source] = onnxopt.optimize(src, tmp_path / source, target="portable", progress=False)
        graphs[source] = collections.Counter(n.op_type for n in _graph(tmp_path / source))
    assert reports["optimum"].missed == [], reports["optimum"].format_text()
    assert reports["optimum"].verify["max_abs_diff_decode"] <= LOGITS_ATOL
    fused = ("Attention", "RotaryEmbedding", "RMSNormalization", "MatMul", "Sigmoid", "Split")
    assert {op: graphs["optimum"][op] for op in fused} == {op: graphs["ours"][op] for op in fused}
    assert graphs["optimum"]["Attention"] == 2 and graphs["optimum"]["RotaryEmbedding"] == 4
    assert all(n.domain in ("", "ai.onnx") for n in _graph(tmp_path / "optimum"))
    # 10 + 16 positions: past Mistral's window of 8, which the opset-23 Attention's mask must keep.
    prompt = [[5, 17, 42, 99, 3, 250, 8, 61, 7, 300]]
    ref = [int(s.tokens[0]) for s in onnxopt.load(base).iter_steps(prompt, max_new_tokens=16, stop_at_eos=False)]
    got = [int(s.tokens[0]) for s in onnxopt.load(tmp_path / "optimum").iter_steps(prompt, max_new_tokens=16, stop_at_eos=False)]
    assert got == ref


def test_prefill_and_decode_past_the_window_match_unoptimized(packages):
    import onnxopt

    base, opt, report = packages["optimum"]
    assert report.verify["max_abs_diff_decode"] <= LOGITS_ATOL
    ref, gen = onnxopt.load(base), onnxopt.load(opt)
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, ref.vocab_size, 11).tolist()  # longer than the window
    decode = rng.integers(0, ref.vocab_size, (17, 1))  # 11 + 17 positions: far past it
    want, got = _teacher_forced(ref, [prompt], decode), _teacher_forced(gen, [prompt], decode)
    deltas = [float(np.abs(a - b).max()) for a, b in zip(want, got)]
    assert len(deltas) == 17
    assert max(deltas) <= LOGITS_ATOL, deltas


def test_greedy_tokens_equal_unoptimized(packages):
    import onnxopt

    base, opt, _ = packages["optimum"]
    prompt = [[5, 17, 42, 99, 3, 250, 8, 61, 7, 300]]
    ref = [int(s.tokens[0]) for s in onnxopt.load(base).iter_steps(prompt, max_new_tokens=24, stop_at_eos=False)]
    ours = [int(s.tokens[0]) for s in onnxopt.load(opt).iter_steps(prompt, max_new_tokens=24, stop_at_eos=False)]
    assert ours == ref


def test_batch_of_different_lengths_equals_single_prompts(packages):
    import onnxopt

    _, opt, _ = packages["optimum"]
    gen = onnxopt.load(opt)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, gen.vocab_size, n).tolist() for n in (3, 12, 6)]
    decode = rng.integers(0, gen.vocab_size, (10, len(prompts)))
    batched = _teacher_forced(gen, prompts, decode)
    for b, prompt in enumerate(prompts):
        single = _teacher_forced(gen, [prompt], decode[:, b : b + 1])
        for step, (x, y) in enumerate(zip(batched, single)):
            np.testing.assert_allclose(x[b], y[0], atol=BATCH_ATOL, err_msg=f"row {b} step {step}")


def test_attention_with_an_unrecognized_mask_stays_unfused_and_exact(packages, family, tmp_path, monkeypatch):
    """A mask the GQA check cannot prove causal (here: forced) keeps attention as standard ops: the
    intermediate SDPA node is decomposed, the report says why GQA missed, and the graph verifies."""
    if family != "llama":
        pytest.skip("one family is enough: the path does not depend on the architecture")
    import onnxopt
    from onnxopt.passes import gqa_mask_window

    def unrecognized(*_):
        raise gqa_mask_window._Unsupported("forced by the test")

    monkeypatch.setattr(gqa_mask_window, "probe_window", unrecognized)
    base = packages["optimum"][0]
    report = onnxopt.optimize(base, tmp_path / "opt", progress=False)
    missed = {s.name: s.note for s in report.missed}
    assert "attention mask: forced by the test" in missed["gqa"]
    ops = collections.Counter(n.op_type for n in _graph(tmp_path / "opt"))
    assert ops["GroupQueryAttention"] == 0 and ops["SDPA"] == 0 and ops["Softmax"] == 2
    assert ops["SkipSimplifiedLayerNormalization"] == 4  # the other fusions still apply
    assert report.verify["max_abs_diff_decode"] <= LOGITS_ATOL


def test_dropping_the_sliding_window_is_caught_and_named(packages, family, tmp_path, monkeypatch):
    """What the pipeline did before the mask check (onnxscript's GQA ignores the mask): plain causal
    GroupQueryAttention on a sliding-window model. Verify refuses it and names the step."""
    if family != "mistral":
        pytest.skip("only Mistral has a window to drop")
    import onnxopt
    from onnxopt.optimize import VerificationError
    from onnxopt.passes import gqa_mask_window

    monkeypatch.setattr(gqa_mask_window, "probe_window", lambda *_: None)  # "causal": no local_window_size
    with pytest.raises(VerificationError, match="step 'gqa' broke parity"):
        onnxopt.optimize(packages["ours"][0], tmp_path / "opt", progress=False)
    assert not (tmp_path / "opt").exists()
