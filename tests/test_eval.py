"""`onnxopt eval`: strided perplexity, checked against transformers' own loss on a tiny random Llama."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import needs_torch

from onnxopt.cli import main
from onnxopt.evaluate import drift, perplexity, windows
from onnxopt.package import MANIFEST_NAME, ModelPackage, write_manifest

DATA = "/work/shared/data/prideprejudice.txt"


def _hf_strided_nll(model, ids: np.ndarray, window: int, stride: int) -> tuple[float, int]:
    """HF's recipe (docs "Perplexity of fixed-length models"): labels -100 outside the new targets,
    the model's own shifted cross-entropy, times the number of targets it averaged over."""
    import torch

    ids_t = torch.from_numpy(ids)[None]
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        trg_len = end - prev_end
        labels = ids_t[:, begin:end].clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(ids_t[:, begin:end], labels=labels).loss
        valid = int((labels[:, 1:] != -100).sum())  # HF shifts labels left by one inside the loss
        nll += float(loss) * valid
        count += valid
        prev_end = end
        if end == len(ids):
            break
    return nll, count


def test_windows_score_every_target_once():
    for n, window, stride in [(100, 16, 5), (100, 16, 16), (17, 16, 8), (5, 16, 4), (2, 2, 1)]:
        targets = [t for _, end, first in windows(n, window, stride) for t in range(first, end)]
        if stride < window:
            assert targets == list(range(1, n)), (n, window, stride)
        else:  # no overlap: a window's first token has no context in it and is skipped
            assert len(targets) == len(set(targets)) and set(targets) <= set(range(1, n))
        for begin, end, first in windows(n, window, stride):
            assert begin < first <= end <= begin + window


def test_drift_of_decode_against_prefill_logits():
    """decode_drift's measure (the GPU runs it, scripts/gpu_decode_accuracy.py): a shift of every logit of a
    step changes no probability; a changed top token counts, and its KL is the closed form."""
    rng = np.random.default_rng(0)
    prefill = rng.standard_normal((5, 50)).astype(np.float32)
    same = drift(prefill, prefill, mode="graph")
    assert (same.steps, same.max_abs, same.rms, same.mean_kl, same.top1_agree, same.mode) == (5, 0.0, 0.0, 0.0, 1.0, "graph")
    shifted = drift(prefill + 3.0, prefill)
    assert shifted.max_abs == pytest.approx(3.0) and abs(shifted.mean_kl) < 1e-12 and shifted.top1_agree == 1.0
    two = np.log(np.array([[0.75, 0.25], [0.5, 0.5]]))
    flipped = drift(two[:, ::-1], two)  # step 0's top token changes; step 1 is a tie either way
    kl0 = 0.75 * math.log(0.75 / 0.25) + 0.25 * math.log(0.25 / 0.75)
    assert flipped.mean_kl == pytest.approx(kl0 / 2) and flipped.top1_agree == 0.5
    with pytest.raises(ValueError, match="same"):
        drift(prefill[:4], prefill)


@needs_torch
@pytest.mark.parametrize("window,stride", [(200, 200), (64, 24), (48, 48)])
def test_matches_transformers(tiny_package, tiny_hf_dir, window, stride):
    import torch
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(str(tiny_hf_dir), dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(0, 320, 200).astype(np.int64)
    want_nll, want_count = _hf_strided_nll(model, ids, window, stride)
    got = perplexity(tiny_package, ids, window=window, stride=stride, progress=False)
    assert got.tokens == want_count
    # fp32 logits of ORT and torch differ by ~1e-6; summed over 200 targets the NLL agrees to ~1e-6 relative.
    assert got.nll == pytest.approx(want_nll, rel=2e-6)
    assert got.ppl == pytest.approx(math.exp(want_nll / want_count), rel=2e-6)


@needs_torch
def test_cli_json(tiny_text_package):
    result = CliRunner().invoke(main, ["eval", str(tiny_text_package), "--data", DATA, "--max-tokens", "300",
                                       "--window", "128", "--stride", "64", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert set(out) == {"ppl", "tokens"} and out["tokens"] == 299
    assert 1 < out["ppl"] < 1e6  # a random model: near the vocabulary size, but finite


@needs_torch
def test_refuses_last_token_logits(tiny_package, tmp_path):
    pkg = tmp_path / "last"
    shutil.copytree(tiny_package, pkg)
    manifest = json.loads((pkg / MANIFEST_NAME).read_text())
    manifest["io"]["logits"] = "last"
    write_manifest(pkg, manifest)
    with pytest.raises(Exception, match="last-token logits only"):
        perplexity(ModelPackage(pkg), np.arange(10), window=8, stride=4, progress=False)
    result = CliRunner().invoke(main, ["eval", str(pkg), "--data", DATA])
    assert result.exit_code == 2 and "--full-logits" in result.stderr


@needs_torch
@pytest.mark.parametrize("args,fragment", [
    (["--window", "1"], "--window 1"),
    (["--window", "64", "--stride", "65"], "--stride 65"),
    (["--window", "100000"], "context"),
    (["--max-tokens", "1"], "--max-tokens 1"),
])
def test_bad_settings(tiny_text_package, args, fragment):
    result = CliRunner().invoke(main, ["eval", str(tiny_text_package), "--data", DATA, *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], result.stderr


@needs_torch
def test_cuda_device_without_a_gpu_or_a_gpu_package_is_one_line(tiny_text_package):
    """--device cuda on this package (fp32, cpu target): no GPU, no onnxruntime-gpu, or the CUDA runtime
    refusing the package; each is one line and exit 2."""
    result = CliRunner().invoke(main, ["eval", str(tiny_text_package), "--data", DATA, "--device", "cuda"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr


@needs_torch
def test_missing_data_file(tiny_text_package, tmp_path):
    result = CliRunner().invoke(main, ["eval", str(tiny_text_package), "--data", str(tmp_path / "nope.txt")])
    assert result.exit_code == 2 and "no such data file" in result.stderr


@needs_torch
def test_optimized_package_scores_the_same(tiny_package, tmp_path):
    """The optimizer's graph (gqa-shared layout, fused ops, --full-logits) gives the exported graph's
    perplexity; without --full-logits it is refused."""
    import onnxopt

    opt = tmp_path / "opt"
    onnxopt.optimize(tiny_package, opt, progress=False, full_logits=True)
    ids = np.random.default_rng(1).integers(0, 320, 150)
    want = perplexity(tiny_package, ids, window=64, stride=32, progress=False)
    got = perplexity(opt, ids, window=64, stride=32, progress=False)
    assert got.tokens == want.tokens
    # Fused kernels reorder sums (optimize verifies logits to 1e-3); the NLL sum agrees far closer.
    assert got.nll == pytest.approx(want.nll, rel=1e-5)

    last = tmp_path / "last"
    onnxopt.optimize(tiny_package, last, progress=False)
    with pytest.raises(Exception, match="--full-logits"):
        perplexity(last, ids, window=64, stride=32, progress=False)


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2_package, smollm2_hf):
    """The real model on real text: the same strided NLL as transformers' loss (fp32 both)."""
    from onnxopt.calibration.reader import read_tokens
    from onnxopt.runtime.tokenizer import TextTokenizer

    model, _ = smollm2_hf
    ids = read_tokens(TextTokenizer(smollm2_package, eos_token_ids=[]), DATA, max_tokens=600)
    want_nll, want_count = _hf_strided_nll(model, ids, 256, 128)
    got = perplexity(smollm2_package, ids, window=256, stride=128, progress=False)
    assert got.tokens == want_count == 599
    # Export and transformers differ by ~1e-4 in logits (tests/test_smollm2.py); the NLL sum by less.
    assert got.nll == pytest.approx(want_nll, rel=1e-5)
