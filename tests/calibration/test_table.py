"""`onnxopt calibrate`: statistics of every weight MatMul input, a resumable table, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import needs_torch

from onnxopt.calibration import forward
from onnxopt.calibration.table import TableError, calibrate, load_table, observed_model, random_ids_table, tensor_stats
from onnxopt.cli import main
from onnxopt.package import ModelPackage

pytestmark = needs_torch
DATA = "/work/shared/data/emma.txt"


def _tensors(table):
    return {name: {k: v for k, v in entry.items()} for name, entry in table["tensors"].items()}


def test_statistics_are_those_of_the_activations(tiny_text_package, tmp_path):
    from onnxopt.calibration.reader import token_windows
    from onnxopt.runtime.tokenizer import TextTokenizer

    package = ModelPackage(tiny_text_package)
    table = calibrate(package, [DATA], out=tmp_path / "t.json", num_samples=3, seq_len=32, progress=False)
    assert table["complete"] and table["samples_done"] == 3 and table["tokens"] == 96
    assert json.loads((tmp_path / "t.json").read_text()) == json.loads(json.dumps(table))
    model, channels = observed_model(package)
    # q/k/v share an input, and so do gate/up: 4 inputs per layer plus the LM head's.
    assert len(channels) == 4 * package.dims["num_layers"] + 1
    runner = forward.WindowRunner(package, model=model, outputs=list(channels))
    rows = {name: [] for name in channels}
    tokenizer = TextTokenizer(package.path, eos_token_ids=[])
    for window in token_windows(tokenizer, [DATA], seq_len=32, num_samples=3):
        for name, value in runner(window).items():
            rows[name].append(value.reshape(-1, channels[name]).astype(np.float64))
    for name, parts in rows.items():
        x = np.concatenate(parts)
        stats = tensor_stats(table, name)
        np.testing.assert_allclose(stats["abs_mean"], np.abs(x).mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(stats["mean_square"], np.square(x).mean(axis=0), rtol=1e-12)
        assert table["tensors"][name]["max"] == x.max() and table["tensors"][name]["min"] == x.min()


def test_random_ids_table_observes_every_matmul_input(tiny_package):
    """Benchmarks of random-weight models calibrate on random ids: the same observers, same inputs."""
    package = ModelPackage(tiny_package)
    table = random_ids_table(package, windows=2, length=16)
    _, channels = observed_model(package)
    assert set(table["tensors"]) == set(channels)
    for name, width in channels.items():
        stats = tensor_stats(table, name)
        assert len(stats["abs_mean"]) == width and np.all(stats["mean_square"] > 0)
    assert random_ids_table(package, windows=2, length=16) == table  # seeded


def test_resume_after_interruption_equals_one_run(tiny_text_package, tmp_path, monkeypatch):
    whole = calibrate(tiny_text_package, [DATA], num_samples=6, seq_len=32, progress=False)
    out = tmp_path / "t.json"
    calls = {"n": 0}
    original = forward.WindowRunner.__call__

    def flaky(self, ids):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return original(self, ids)

    monkeypatch.setattr(forward.WindowRunner, "__call__", flaky)
    with pytest.raises(KeyboardInterrupt):
        calibrate(tiny_text_package, [DATA], out=out, num_samples=6, seq_len=32, save_every=2, progress=False)
    partial = json.loads(out.read_text())
    assert partial["samples_done"] == 4 and not partial["complete"]
    with pytest.raises(TableError, match="--resume"):
        load_table(out)
    monkeypatch.setattr(forward.WindowRunner, "__call__", original)
    resumed = calibrate(tiny_text_package, [DATA], out=out, num_samples=6, seq_len=32, resume=True, progress=False)
    assert resumed["samples_done"] == 6 and resumed["complete"]
    assert _tensors(resumed) == _tensors(whole)


def test_table_checks(tiny_text_package, tiny_package, tmp_path):
    out = tmp_path / "t.json"
    calibrate(tiny_text_package, [DATA], out=out, num_samples=1, seq_len=16, progress=False)
    load_table(out, ModelPackage(tiny_text_package))
    with pytest.raises(TableError, match="another graph"):
        load_table(out, ModelPackage(tiny_package))
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(TableError, match="not an onnxopt calibration table"):
        load_table(bad)


@pytest.mark.parametrize("args,fragment", [
    (["--samples", "0"], "--samples 0"),
    (["--seq-len", "1"], "--seq-len 1"),
    (["--data", "/nonexistent.txt"], "no such data file"),
])
def test_cli_bad_input(tiny_text_package, tmp_path, args, fragment):
    out = tmp_path / "t.json"
    base = ["calibrate", str(tiny_text_package), "-o", str(out)]
    if "--data" not in args:
        base += ["--data", DATA]
    result = CliRunner().invoke(main, base + args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], result.stderr
    assert not out.exists()


def test_cli_refuses_existing_table(tiny_text_package, tmp_path):
    out = tmp_path / "t.json"
    out.write_text("{}")
    result = CliRunner().invoke(main, ["calibrate", str(tiny_text_package), "--data", DATA, "-o", str(out)])
    assert result.exit_code == 2 and "--resume" in result.stderr
    assert out.read_text() == "{}"


def test_a_cuda_target_package_calibrates_and_evaluates_on_the_cpu(tiny_text_package, tmp_path):
    """A `--target cuda` graph (onnxopt::GroupQueryAttention and SwiGLU, which ORT cannot load) runs
    decomposed: its table observes the same MatMul inputs as the cpu target's, with the same values,
    and its perplexity is the cpu target's (fp32 both, the same standard ops after decomposition)."""
    import onnx_ir as ir

    import onnxopt
    from onnxopt.custom_ops import registry
    from onnxopt.evaluate import evaluate

    packages = {}
    for target in ("cpu", "cuda"):
        onnxopt.optimize(tiny_text_package, tmp_path / target, target=target, dtype="fp32", full_logits=True,
                         progress=False)
        packages[target] = ModelPackage(tmp_path / target)
    assert registry.custom_nodes(ir.load(packages["cuda"].model_path).graph)
    tables = {t: calibrate(p, [DATA], out=tmp_path / f"{t}.json", num_samples=2, seq_len=32, progress=False)
              for t, p in packages.items()}
    assert set(tables["cuda"]["tensors"]) == set(tables["cpu"]["tensors"])
    for name in tables["cpu"]["tensors"]:
        cpu, cuda = tensor_stats(tables["cpu"], name), tensor_stats(tables["cuda"], name)
        np.testing.assert_allclose(cuda["mean_square"], cpu["mean_square"], rtol=1e-4)
    ppl = {t: evaluate(p.path, DATA, max_tokens=256, window=64, progress=False).ppl for t, p in packages.items()}
    assert ppl["cuda"] == pytest.approx(ppl["cpu"], rel=1e-4)
