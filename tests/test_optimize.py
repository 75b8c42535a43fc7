"""`onnxopt optimize` on tiny random Llama / Qwen2 / Mistral packages: the fused graph (ORT contrib
ops, shared-buffer GroupQueryAttention) against the unfused export, through each one's interface."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import make_hf_dir, needs_torch

pytestmark = needs_torch

LOGITS_ATOL = 1e-3  # the bar for fp32; the fused kernels only reorder sums (seen ~1e-7)
FAMILIES = ("llama", "qwen2", "mistral")


@pytest.fixture(scope="module", params=FAMILIES)
def packages(request, tmp_path_factory):
    """(unoptimized, optimized, report) of a 2-layer random model of one family."""
    import onnxopt

    root = tmp_path_factory.mktemp(f"opt-{request.param}")
    base = onnxopt.export(str(make_hf_dir(root / "hf", request.param)), root / "base", progress=False)
    report = onnxopt.optimize(base, root / "opt", progress=False)
    return base, root / "opt", report


def _teacher_forced(gen, prompts, decode):
    from onnxopt.optimize import ForcedTokens

    steps = gen.iter_steps(prompts, max_new_tokens=len(decode), sampler=ForcedTokens(decode), stop_at_eos=False)
    return [s.logits.copy() for s in steps]


def test_fuses_every_layer_and_reports(packages):
    _, opt, report = packages
    steps = {s.name: s for s in report.steps}
    assert steps["gqa"].matches == 2
    assert steps["gqa_interface"].matches == 2
    assert report.missed == []
    assert report.nodes_after["per_layer"] < report.nodes_before["per_layer"]
    assert report.nodes_after["ops_per_layer"]["GroupQueryAttention"] == 1
    assert report.verify["max_abs_diff_decode"] <= LOGITS_ATOL


def test_manifest_records_layout_and_passes(packages):
    import onnx_ir as ir

    _, opt, _ = packages
    manifest = json.loads((opt / "onnxopt.json").read_text())
    assert manifest["io"]["kv_cache"]["layout"] == "gqa-shared"
    assert manifest["passes"][-1]["group_query_attention"] == 2
    assert {s["name"] for s in manifest["passes"][-1]["steps"]} >= {"gqa", "gqa_interface"}
    inputs = [v.name for v in ir.load(opt / "model.onnx").graph.inputs]
    # onnxruntime-genai's interface: the graph derives seqlens_k / total_sequence_length itself.
    assert "attention_mask" in inputs and "position_ids" not in inputs
    assert not {"seqlens_k", "total_sequence_length"} & set(inputs)
    assert manifest["io"]["inputs"] == inputs
    assert manifest["io"]["logits"] == "last"  # passes/last_token_logits.py: logits [B, 1, V]
    assert ir.load(opt / "model.onnx").graph.outputs[0].shape[1] == 1


def test_prefill_and_16_decode_steps_match_unoptimized(packages):
    import onnxopt

    base, opt, _ = packages
    ref, gen = onnxopt.load(base), onnxopt.load(opt)
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, ref.vocab_size, 11).tolist()
    decode = rng.integers(0, ref.vocab_size, (17, 1))
    want, got = _teacher_forced(ref, [prompt], decode), _teacher_forced(gen, [prompt], decode)
    assert len(got) == 17
    deltas = [float(np.abs(a - b).max()) for a, b in zip(want, got)]
    assert deltas[0] <= LOGITS_ATOL, deltas
    assert max(deltas[1:]) <= LOGITS_ATOL, deltas


def test_greedy_tokens_equal_unoptimized(packages):
    import onnxopt

    base, opt, _ = packages
    prompt = [[5, 17, 42, 99, 3, 250, 8]]
    ref = [int(s.tokens[0]) for s in onnxopt.load(base).iter_steps(prompt, max_new_tokens=24, stop_at_eos=False)]
    ours = [int(s.tokens[0]) for s in onnxopt.load(opt).iter_steps(prompt, max_new_tokens=24, stop_at_eos=False)]
    assert ours == ref


def test_batch_of_different_lengths_equals_single_prompts(packages):
    import onnxopt

    _, opt, _ = packages
    gen = onnxopt.load(opt)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, gen.vocab_size, n).tolist() for n in (3, 9, 6)]
    decode = rng.integers(0, gen.vocab_size, (8, len(prompts)))
    batched = _teacher_forced(gen, prompts, decode)
    for b, prompt in enumerate(prompts):
        single = _teacher_forced(gen, [prompt], decode[:, b : b + 1])
        for step, (x, y) in enumerate(zip(batched, single)):
            np.testing.assert_allclose(x[b], y[0], atol=1e-4, err_msg=f"row {b} step {step}")


def test_batch_of_different_lengths_equals_unoptimized_batch(packages):
    import onnxopt

    base, opt, _ = packages
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 300, n).tolist() for n in (5, 2, 8)]
    decode = rng.integers(0, 300, (6, 3))
    want = _teacher_forced(onnxopt.load(base), prompts, decode)
    got = _teacher_forced(onnxopt.load(opt), prompts, decode)
    assert max(float(np.abs(a - b).max()) for a, b in zip(want, got)) <= LOGITS_ATOL


def test_onnxruntime_genai_gives_the_same_greedy_tokens(packages):
    """genai_config.json names the family's genai model type, and genai runs the graph like we do
    (tests/test_genai.py covers logits, batches and the tokenizer on the tiny Llama)."""
    og = pytest.importorskip("onnxruntime_genai")
    import onnxopt

    _, opt, _ = packages
    manifest = json.loads((opt / "onnxopt.json").read_text())
    config = json.loads((opt / "genai_config.json").read_text())
    assert config["model"]["type"] == manifest["family"] == manifest["genai"]["model_type"]
    prompt = [5, 17, 42, 99, 3, 250, 8]
    model = og.Model(str(opt))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + 12)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    theirs = []
    while not generator.is_done():
        generator.generate_next_token()
        theirs.append(int(generator.get_next_tokens()[0]))
    ours = [int(s.tokens[0]) for s in onnxopt.load(opt).iter_steps([prompt], max_new_tokens=12, stop_at_eos=False)]
    assert theirs == ours[: len(theirs)] and len(theirs) >= 1


def test_fp16_package_fuses_and_verifies(tiny_hf_dir, tmp_path):
    import onnxopt
    from onnxopt.optimize import TOLERANCE

    base = onnxopt.export(str(tiny_hf_dir), tmp_path / "base16", dtype="fp16", progress=False)
    report = onnxopt.optimize(base, tmp_path / "opt16", progress=False)
    assert report.missed == []
    assert max(report.verify.values()) <= TOLERANCE["fp16"]
    gen = onnxopt.load(tmp_path / "opt16")
    assert gen.kv_layout == "gqa-shared"
    assert len(list(gen.iter_steps([[3, 4, 5]], max_new_tokens=4))) >= 1


def test_missed_gqa_fusion_keeps_concat_interface_and_reports_it(tiny_package, tmp_path, monkeypatch):
    """Without the SDPA fusion the GQA pattern (which consumes SDPA) cannot match: the graph keeps
    the concat interface, still verifies, and the report names the misses."""
    import onnxopt
    from onnxopt.passes import pipeline

    steps = tuple(s for s in pipeline.CPU if s.name != "sdpa")
    monkeypatch.setitem(pipeline.PIPELINES, "cpu", steps)
    report = onnxopt.optimize(tiny_package, tmp_path / "opt", progress=False)
    missed = {s.name: s.note for s in report.missed}
    assert set(missed) == {"gqa", "gqa_interface"}
    assert "GroupQueryAttention fused in 0 of 2" in missed["gqa_interface"]
    manifest = json.loads((tmp_path / "opt" / "onnxopt.json").read_text())
    assert manifest["io"]["kv_cache"]["layout"] == "concat"
    assert manifest["io"]["logits"] == "last"  # the concat interface's left-padded form (a Slice at S - 1)
    assert manifest["passes"][-1]["missed"]
    assert report.verify["max_abs_diff_decode"] <= LOGITS_ATOL  # still verified, through concat


def test_full_logits_keeps_every_position(tiny_package, tmp_path):
    """`optimize --full-logits` leaves last_token_logits out: logits [B, S, V], manifest logits "all"."""
    import onnxruntime as ort
    from click.testing import CliRunner

    import onnxopt
    from onnxopt.cli import main

    result = CliRunner().invoke(main, ["optimize", str(tiny_package), "-o", str(tmp_path / "o"), "--full-logits", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert "last_token_logits" not in {s["name"] for s in report["steps"]} and report["missed"] == []
    assert report["verify"]["max_abs_diff_decode"] <= LOGITS_ATOL
    assert json.loads((tmp_path / "o" / "onnxopt.json").read_text())["io"]["logits"] == "all"
    gen = onnxopt.load(tmp_path / "o")
    assert not gen.last_logits_only
    session = ort.InferenceSession(str(tmp_path / "o" / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.array([[5, 6, 7, 8]]), "attention_mask": np.ones((1, 4), np.int64)}
    feeds.update({n: np.zeros((1, 2, 8, 16), np.float32) for n in gen._names["past"]})
    assert session.run(["logits"], feeds)[0].shape == (1, 4, 320)


def test_broken_step_is_named_and_nothing_is_written(tiny_package, tmp_path, monkeypatch):
    import onnx_ir as ir

    import onnxopt
    from onnxopt.optimize import VerificationError
    from onnxopt.passes import pipeline

    class Sabotage(ir.passes.InPlacePass):
        """Doubles the final projection's weight: a wrong but runnable graph."""

        def call(self, model):
            logits = next(v for v in model.graph.outputs if v.name == "logits")
            weight = logits.producer().inputs[1]
            weight.const_value = ir.tensor(weight.const_value.numpy() * 2)
            return ir.passes.PassResult(model, True)

    steps = list(pipeline.CPU)
    steps.insert(5, pipeline.Step("sabotage", lambda L: Sabotage()))
    monkeypatch.setitem(pipeline.PIPELINES, "cpu", tuple(steps))
    with pytest.raises(VerificationError, match="step 'sabotage' broke parity"):
        onnxopt.optimize(tiny_package, tmp_path / "opt", progress=False)
    assert not (tmp_path / "opt").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_cli_optimize_json_and_errors(tiny_package, tmp_path):
    from click.testing import CliRunner

    from onnxopt.cli import main

    runner = CliRunner()
    result = runner.invoke(main, ["optimize", str(tiny_package), "-o", str(tmp_path / "o"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["missed"] == [] and {s["name"] for s in report["steps"]} >= {"gqa", "pack_qkv", "swiglu"}
    again = runner.invoke(main, ["optimize", str(tiny_package), "-o", str(tmp_path / "o")])
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    bad = runner.invoke(main, ["optimize", str(tiny_package), "-o", str(tmp_path / "c"), "--target", "tpu"])
    assert bad.exit_code == 2 and len(bad.stderr.strip().splitlines()) == 1  # targets: tests/test_targets.py
    text = runner.invoke(main, ["optimize", str(tiny_package), "-o", str(tmp_path / "o"), "--overwrite", "--no-verify"])
    assert text.exit_code == 0 and "nodes per decoder layer" in text.stdout
    twice = runner.invoke(main, ["optimize", str(tmp_path / "o"), "-o", str(tmp_path / "oo")])
    assert twice.exit_code == 2 and "already optimized" in twice.stderr
    assert not (tmp_path / "oo").exists()


@pytest.mark.slow
def test_smollm2_optimized_greedy_64_tokens_equal_unoptimized(smollm2_package, tmp_path_factory):
    import onnx_ir as ir

    import onnxopt
    from onnxopt.passes.gqa_interface import gqa_nodes
    from test_smollm2 import PROMPTS

    out = tmp_path_factory.mktemp("smollm2-opt") / "opt"
    report = onnxopt.optimize(smollm2_package, out, progress=False)
    print(report.format_text())
    assert len(gqa_nodes(ir.load(out / "model.onnx").graph)) == 30
    assert report.missed == []
    ref, gen = onnxopt.load(smollm2_package), onnxopt.load(out)
    for prompt in PROMPTS:
        ids = ref.encode_prompt(prompt)
        want = [int(s.tokens[0]) for s in ref.iter_steps([ids], max_new_tokens=64, stop_at_eos=False)]
        got = [int(s.tokens[0]) for s in gen.iter_steps([ids], max_new_tokens=64, stop_at_eos=False)]
        assert got == want, prompt
    rng = np.random.default_rng(0)
    decode = rng.integers(0, ref.vocab_size, (17, 1))
    ids = ref.encode_prompt(PROMPTS[2])
    deltas = [float(np.abs(a - b).max()) for a, b in zip(_teacher_forced(ref, [ids], decode), _teacher_forced(gen, [ids], decode))]
    print("max |dlogits| optimized vs unoptimized: prefill", deltas[0], "decode", max(deltas[1:]))
    assert max(deltas) <= LOGITS_ATOL
