"""Bad input ends in one `error: <input>: <problem and what to do>` line, exit code 2, no traceback,
and nothing half-written.

Every case goes through the CLI (click's CliRunner against `onnxopt.cli.main`); a few also run the
installed console script in a subprocess to see the real stderr. Packages are copied into the test's
tmp_path before they are damaged: the session fixtures of conftest.py stay intact.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import needs_torch

from onnxopt.cli import main
from onnxopt.errors import GenerationError, PackageError, SourceError, UnknownArchitectureError
from onnxopt.package import (
    EXTERNAL_DATA_NAME,
    MANIFEST_NAME,
    MODEL_NAME,
    ModelPackage,
    check_external_data,
    write_manifest,
)

pytestmark = needs_torch


# -- helpers --------------------------------------------------------------------------------------


def run_cli(*args: str, input: str | None = None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


def assert_user_error(result, *fragments: str) -> str:
    """The run failed on bad input: exit 2, exactly one `error:` line on stderr naming `fragments`."""
    assert "Traceback" not in result.output, result.output
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("error: "), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


def assert_nothing_written(target: Path) -> None:
    """Neither the target nor a staging directory `.NAME.tmp-*` / `.NAME.old-*` is left beside it."""
    assert not target.exists(), sorted(target.iterdir()) if target.is_dir() else target
    leftovers = [p.name for p in target.parent.glob(f".{target.name}.*")]
    assert not leftovers, leftovers


def copy_package(package: Path, dest: Path) -> Path:
    shutil.copytree(package, dest)
    return dest


def rehash(package: Path) -> None:
    """Recompute the manifest's file hashes, as if the damage had been done before export."""
    manifest = json.loads((package / MANIFEST_NAME).read_text())
    write_manifest(package, manifest)


def set_external_location(model_path: Path, location: str) -> None:
    """Point every external-data initializer of `model_path` at `location` (protobuf, at the I/O edge)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    changed = 0
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
                    changed += 1
    assert changed, "the model has no external-data initializers"
    # Serialized directly: onnx.save would look for external data to write beside the file.
    model_path.write_bytes(model.SerializeToString())


@pytest.fixture
def no_ort(monkeypatch):
    """Fail the test if ONNX Runtime is asked to open a model."""
    import onnxruntime

    def refuse(*args, **kwargs):
        raise AssertionError("ONNX Runtime opened a model the package reader should have refused")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)


@pytest.fixture(scope="module")
def external_package(tiny_hf_dir, tmp_path_factory):
    """The tiny Llama exported with its weights in model.onnx.data."""
    import onnxopt

    return onnxopt.export(
        str(tiny_hf_dir), tmp_path_factory.mktemp("pkg-ext") / "tiny-ext", external_data=True, progress=False
    )


@pytest.fixture
def optimum_dir(external_package, tmp_path) -> Path:
    """An optimum-style ONNX directory (config.json + model.onnx + model.onnx.data, no manifest)."""
    path = tmp_path / "optimum"
    path.mkdir()
    for name in ("config.json", MODEL_NAME, EXTERNAL_DATA_NAME):
        shutil.copyfile(external_package / name, path / name)
    return path


# -- 1. missing or corrupt model file -------------------------------------------------------------


def test_missing_model_file(tiny_package, tmp_path):
    pkg = copy_package(tiny_package, tmp_path / "pkg")
    (pkg / MODEL_NAME).unlink()
    line = assert_user_error(run_cli("inspect", pkg), f"{pkg / MODEL_NAME}", "missing", "re-export")
    assert line.startswith(f"error: {pkg / MODEL_NAME}: ")


@pytest.mark.parametrize("garbage", [b"this is not a protobuf", b""], ids=["text", "empty"])
def test_corrupt_model_file_fails_the_hash_check(tiny_package, tmp_path, garbage):
    pkg = copy_package(tiny_package, tmp_path / "pkg")
    (pkg / MODEL_NAME).write_bytes(garbage)
    assert_user_error(run_cli("inspect", pkg), f"{pkg / MODEL_NAME}: size", "does not match the manifest")


@pytest.mark.parametrize(
    "garbage, problem",
    [
        (b"this is not a protobuf", "not a valid ONNX model"),
        (os.urandom(4096), "not a valid ONNX model"),
        # An empty file parses as an empty ModelProto: caught by the graph I/O check instead.
        (b"", "has no input 'input_ids'"),
    ],
    ids=["text", "random", "empty"],
)
def test_corrupt_model_file_with_matching_hashes_reaches_the_parser(tiny_package, tmp_path, no_ort, garbage, problem):
    pkg = copy_package(tiny_package, tmp_path / "pkg")
    (pkg / MODEL_NAME).write_bytes(garbage)
    rehash(pkg)
    assert_user_error(run_cli("inspect", pkg), f"{pkg / MODEL_NAME}: ", problem)
    assert_user_error(run_cli("generate", pkg, "hello"), f"{pkg / MODEL_NAME}: ", problem)


# -- 2. truncated external data -------------------------------------------------------------------


def test_truncated_external_data_fails_the_size_check(external_package, tmp_path):
    pkg = copy_package(external_package, tmp_path / "pkg")
    data = pkg / EXTERNAL_DATA_NAME
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    assert_user_error(run_cli("inspect", pkg), f"{data}: size", "truncated")


def test_truncated_external_data_with_matching_hashes(external_package, tmp_path, no_ort):
    pkg = copy_package(external_package, tmp_path / "pkg")
    data = pkg / EXTERNAL_DATA_NAME
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    rehash(pkg)
    assert_user_error(run_cli("inspect", pkg), f"{data}: external data is truncated", "re-export the model")
    assert_user_error(run_cli("generate", pkg, "hello"), f"{data}: external data is truncated")
    with pytest.raises(PackageError, match="truncated"):
        check_external_data(pkg / MODEL_NAME, pkg)


def test_external_data_file_not_in_manifest_is_refused(external_package, tmp_path, no_ort):
    """A data file the manifest does not vouch for could be swapped freely."""
    pkg = copy_package(external_package, tmp_path / "pkg")
    manifest = json.loads((pkg / MANIFEST_NAME).read_text())
    del manifest["files"][EXTERNAL_DATA_NAME]
    (pkg / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert_user_error(run_cli("inspect", pkg), f"{pkg / MODEL_NAME}: ", "not listed in the manifest")


# -- 3. external data that leaves the package -----------------------------------------------------


def _escaping_package(external_package, tmp_path, how: str) -> Path:
    pkg = copy_package(external_package, tmp_path / "pkg")
    outside = tmp_path / "outside.data"
    shutil.copyfile(pkg / EXTERNAL_DATA_NAME, outside)
    if how == "absolute":
        set_external_location(pkg / MODEL_NAME, str(outside))
    elif how == "dotdot":
        set_external_location(pkg / MODEL_NAME, "../outside.data")
    elif how == "symlink":
        (pkg / EXTERNAL_DATA_NAME).unlink()
        (pkg / EXTERNAL_DATA_NAME).symlink_to(outside)
    rehash(pkg)
    return pkg


@pytest.mark.parametrize(
    "how, problem",
    [
        ("absolute", "absolute external-data location"),
        ("dotdot", "external-data location '../outside.data' leaves the package directory"),
        ("symlink", "leaves the package directory"),
    ],
)
def test_external_data_outside_the_package_is_refused_before_ort(external_package, tmp_path, no_ort, how, problem):
    pkg = _escaping_package(external_package, tmp_path, how)
    # The manifest check and the graph check each refuse on their own.
    with pytest.raises(PackageError, match=problem):
        check_external_data(pkg / MODEL_NAME, pkg)
    with pytest.raises(PackageError, match="leaves the package|absolute"):
        ModelPackage(pkg)
    expected = problem if how == "absolute" else "leaves the package directory"
    assert_user_error(run_cli("generate", pkg, "hello"), str(pkg), expected)
    assert_user_error(run_cli("inspect", pkg), str(pkg))


def test_optimum_dir_is_imported(optimum_dir, tmp_path):
    """The control for the next test: the undamaged directory exports fine."""
    out = tmp_path / "out"
    result = run_cli("export", optimum_dir, "-o", out)
    assert result.exit_code == 0, result.output
    assert ModelPackage(out).manifest["exporter"] == "optimum (imported)"
    # Staged in a 0700 temporary directory, the package still gets a plain mkdir's mode.
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_optimum_dir_with_escaping_external_data_writes_nothing(optimum_dir, tmp_path, how):
    outside = tmp_path / "outside.data"
    shutil.copyfile(optimum_dir / EXTERNAL_DATA_NAME, outside)
    if how == "absolute":
        set_external_location(optimum_dir / MODEL_NAME, str(outside))
    elif how == "dotdot":
        set_external_location(optimum_dir / MODEL_NAME, "../outside.data")
    else:
        (optimum_dir / EXTERNAL_DATA_NAME).unlink()
        (optimum_dir / EXTERNAL_DATA_NAME).symlink_to(outside)
    out = tmp_path / "out"
    problem = {
        "absolute": "absolute external-data location",
        "dotdot": "location '../outside.data' leaves the package directory",
        "symlink": "location 'model.onnx.data' leaves the package directory through a symlink",
    }[how]
    assert_user_error(run_cli("export", optimum_dir, "-o", out), f"{optimum_dir / MODEL_NAME}: ", problem)
    assert_nothing_written(out)


def test_external_tensor_in_a_node_attribute_is_checked_too(tiny_package, tmp_path):
    """ONNX Runtime reads external data of Constant attributes as well as of initializers."""
    import onnx

    pkg = copy_package(tiny_package, tmp_path / "pkg")
    model = onnx.load(str(pkg / MODEL_NAME))
    value = onnx.TensorProto(name="c", data_type=onnx.TensorProto.FLOAT, dims=[4])
    value.data_location = onnx.TensorProto.EXTERNAL
    for key, entry in (("location", "../../secret.bin"), ("offset", "0"), ("length", "16")):
        value.external_data.add(key=key, value=entry)
    model.graph.node.append(onnx.helper.make_node("Constant", [], ["unused_c"], name="sneaky", value=value))
    (pkg / MODEL_NAME).write_bytes(model.SerializeToString())
    rehash(pkg)
    assert_user_error(run_cli("inspect", pkg), "tensor 'sneaky.value'", "leaves the package directory")


# -- 4. manifest ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
def test_file_edited_after_export_fails_the_hash_check(tiny_text_package, tmp_path, name):
    pkg = copy_package(tiny_text_package, tmp_path / "pkg")
    data = bytearray((pkg / name).read_bytes())
    data[data.index(b'"') + 1] ^= 0x20  # flip the case of the first key's first letter: same size
    (pkg / name).write_bytes(bytes(data))
    assert_user_error(run_cli("generate", pkg, "hello"), f"{pkg / name}: sha256 does not match the manifest")


def test_file_grown_after_export_fails_the_size_check(tiny_package, tmp_path):
    pkg = copy_package(tiny_package, tmp_path / "pkg")
    config = json.loads((pkg / "config.json").read_text())
    config["max_position_embeddings"] = 100_000
    (pkg / "config.json").write_text(json.dumps(config, indent=4))
    assert_user_error(run_cli("inspect", pkg), f"{pkg / 'config.json'}: size", "does not match the manifest")


def test_manifest_not_json(tiny_package, tmp_path):
    pkg = copy_package(tiny_package, tmp_path / "pkg")
    (pkg / MANIFEST_NAME).write_text("{ this is not json")
    assert_user_error(run_cli("inspect", pkg), f"{pkg / MANIFEST_NAME}: not valid JSON", "re-export")


@pytest.mark.parametrize(
    "document",
    ['["a", "list"]', '{"format_version": 1, "dims": [], "io": {}, "files": {}, "dtype": "fp32"}'],
    ids=["list", "dims-not-object"],
)
def test_manifest_of_the_wrong_shape(tiny_package, tmp_path, document):
    pkg = copy_package(tiny_package, tmp_path / "pkg")
    (pkg / MANIFEST_NAME).write_text(document)
    assert_user_error(run_cli("inspect", pkg), f"{pkg / MANIFEST_NAME}: ")


@pytest.mark.parametrize("version", [2, None, "1"])
def test_manifest_format_version_unsupported(tiny_package, tmp_path, version):
    pkg = copy_package(tiny_package, tmp_path / "pkg")
    manifest = json.loads((pkg / MANIFEST_NAME).read_text())
    manifest["format_version"] = version
    (pkg / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert_user_error(
        run_cli("inspect", pkg), f"{pkg / MANIFEST_NAME}: format_version {version!r} is not supported", "re-export"
    )


# -- packages that are not there ---------------------------------------------------------------------


@pytest.mark.parametrize("command", ["generate", "inspect"])
def test_nonexistent_package(tmp_path, command):
    missing = tmp_path / "nope"
    args = [command, missing] + (["hello"] if command == "generate" else [])
    assert_user_error(run_cli(*args), f"{missing}: no such model package directory", "onnxopt export")


@pytest.mark.parametrize("command", ["generate", "inspect"])
def test_directory_without_manifest(tmp_path, command):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "model.onnx").write_bytes(b"")
    args = [command, plain] + (["hello"] if command == "generate" else [])
    assert_user_error(run_cli(*args), f"{plain}: not a model package ({MANIFEST_NAME} missing", "onnxopt export")


def test_file_given_as_package(tmp_path):
    f = tmp_path / "model.onnx"
    f.write_bytes(b"")
    assert_user_error(run_cli("inspect", f), f"{f}: not a directory")


# -- 5. export sources -------------------------------------------------------------------------------


def test_unknown_architecture(tmp_path):
    src = tmp_path / "starcoder"
    src.mkdir()
    (src / "config.json").write_text(
        json.dumps({"model_type": "gpt_bigcode", "architectures": ["GPTBigCodeForCausalLM"], "n_layer": 2})
    )
    (src / "model.safetensors").write_bytes(b"")
    out = tmp_path / "out"
    line = assert_user_error(
        run_cli("export", src, "-o", out), f"{src / 'config.json'}: unknown architecture model_type='gpt_bigcode'"
    )
    assert "supported: " in line and "llama" in line
    assert_nothing_written(out)


def test_nonexistent_source(tmp_path):
    out = tmp_path / "out"
    missing = tmp_path / "nope"
    assert_user_error(run_cli("export", missing, "-o", out), f"{missing}: no such file or directory")
    assert_nothing_written(out)


def test_source_file_that_is_not_gguf(tmp_path):
    src = tmp_path / "weights.bin"
    src.write_bytes(b"\0" * 16)
    out = tmp_path / "out"
    assert_user_error(run_cli("export", src, "-o", out), f"{src}: unsupported file type", ".gguf")
    assert_nothing_written(out)


@pytest.mark.parametrize("garbage", [b"not a gguf at all " * 8, b"GGUF" + os.urandom(256)], ids=["text", "magic"])
def test_gguf_of_garbage_bytes(tmp_path, garbage):
    src = tmp_path / "model.gguf"
    src.write_bytes(garbage)
    out = tmp_path / "out"
    assert_user_error(run_cli("export", src, "-o", out), f"{src}: not a readable GGUF file")
    assert_nothing_written(out)


def test_directory_source_without_config(tmp_path):
    src = tmp_path / "empty"
    src.mkdir()
    out = tmp_path / "out"
    assert_user_error(run_cli("export", src, "-o", out), f"{src}: directory has no config.json")
    assert_nothing_written(out)


def test_source_config_not_json(tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text("{ nope")
    out = tmp_path / "out"
    assert_user_error(run_cli("export", src, "-o", out), f"{src / 'config.json'}: cannot read config")
    assert_nothing_written(out)


# -- 6. prompt longer than the context -----------------------------------------------------------------


def test_prompt_longer_than_context(tiny_text_package):
    max_context = ModelPackage(tiny_text_package).dims["max_context"]
    prompt = "hello " * (max_context + 10)
    for stream in ("--stream", "--no-stream"):
        assert_user_error(
            run_cli("generate", tiny_text_package, prompt, stream),
            "prompt: ",
            f"do not fit the model's context of {max_context} tokens",
            "shorten",
        )


def test_prompt_from_stdin_longer_than_context(tiny_text_package):
    max_context = ModelPackage(tiny_text_package).dims["max_context"]
    result = run_cli("generate", tiny_text_package, "-", "--json", input="hello " * (max_context + 10))
    assert_user_error(result, "prompt: ", "do not fit")
    assert result.stdout == ""


# -- 7. sampling values --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option, value, problem",
    [
        ("--temperature", "-1", "--temperature -1.0: must be a finite number >= 0"),
        ("--temperature", "nan", "--temperature nan: must be a finite number >= 0"),
        ("--top-p", "0", "--top-p 0.0: must be in (0, 1]"),
        ("--top-p", "1.5", "--top-p 1.5: must be in (0, 1]"),
        ("--top-k", "-3", "--top-k -3: must be an integer >= 0"),
        ("--repetition-penalty", "0", "--repetition-penalty 0.0: must be a finite number > 0"),
        ("--max-new-tokens", "0", "--max-new-tokens 0: must be >= 1"),
        ("--seed", "-1", "--seed -1: must be an integer >= 0"),
    ],
)
def test_invalid_sampling_values_are_refused_before_loading(tiny_package, no_ort, option, value, problem):
    line = assert_user_error(run_cli("generate", tiny_package, "hello", option, value), problem)
    assert line.startswith(f"error: {problem}")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["generate", "PKG", "hello", "--top-k", "abc"], "'abc' is not a valid integer"),
        (["generate", "PKG", "hello", "--no-such-option"], "No such option '--no-such-option'"),
        (["generate"], "Missing argument"),
        (["no-such-command"], "No such command 'no-such-command'"),
    ],
)
def test_click_usage_errors_are_one_line(tiny_package, args, fragment):
    """click's own parsing errors get our form (one `error:` line, exit 2), not click's usage block."""
    line = assert_user_error(run_cli(*[str(tiny_package) if a == "PKG" else a for a in args]), fragment)
    assert "--help" in line


def test_sampling_values_checked_in_the_python_api(tiny_package):
    import onnxopt
    from onnxopt.runtime import SamplingParams

    with pytest.raises(GenerationError, match="--top-p 0.0"):
        SamplingParams(top_p=0.0)
    gen = onnxopt.load(tiny_package)
    with pytest.raises(GenerationError, match="--max-new-tokens 0"):
        list(gen.iter_steps([[5, 6]], max_new_tokens=0))


# -- 8. output directory that exists ---------------------------------------------------------------------


def test_existing_output_is_refused_then_replaced_with_overwrite(optimum_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_user_error(run_cli("export", optimum_dir, "-o", out), f"{out}: output directory exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"

    result = run_cli("export", optimum_dir, "-o", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists()
    ModelPackage(out)
    assert not list(tmp_path.glob(".out.*"))


def test_failed_overwrite_keeps_the_old_output(optimum_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    set_external_location(optimum_dir / MODEL_NAME, "../outside.data")
    assert_user_error(run_cli("export", optimum_dir, "-o", out, "--overwrite"), "leaves the package directory")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert not list(tmp_path.glob(".out.*"))


def test_output_that_is_a_file(optimum_dir, tmp_path):
    out = tmp_path / "out"
    out.write_text("mine")
    for args in ([], ["--overwrite"]):
        result = run_cli("export", optimum_dir, "-o", out, *args)
        assert_user_error(result, f"{out}: output path exists and is not a directory", "choose another path")
    assert out.read_text() == "mine"


# -- chat ---------------------------------------------------------------------------------------------------


def test_chat_without_chat_template(tiny_text_package, tmp_path):
    pkg = copy_package(tiny_text_package, tmp_path / "pkg")
    (pkg / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((pkg / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (pkg / "tokenizer_config.json").write_text(json.dumps(config))
    rehash(pkg)
    assert_user_error(run_cli("generate", pkg, "hello", "--chat"), "--chat: ", "no chat template", "drop --chat")


def test_text_prompt_on_package_without_tokenizer(tiny_package):
    assert_user_error(run_cli("generate", tiny_package, "hello"), f"{tiny_package}: the package has no tokenizer.json")


# -- --debug and the real console ---------------------------------------------------------------------------


def test_debug_reraises_the_error(tmp_path):
    result = run_cli("--debug", "inspect", tmp_path / "nope")
    assert isinstance(result.exception, PackageError)
    assert "no such model package directory" in str(result.exception)


def _console(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "onnxopt.cli", *map(str, args)], capture_output=True, text=True, env=env, timeout=120
    )


def test_console_prints_one_line_and_exits_2(tmp_path):
    proc = _console("generate", tmp_path / "nope", "hello", "--top-p", "0")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "error: --top-p 0.0: must be in (0, 1]\n"
    assert proc.stdout == ""
    proc = _console("inspect", tmp_path / "nope")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: {tmp_path / 'nope'}: no such model package directory")
    assert proc.stderr.count("\n") == 1


def test_console_debug_shows_the_traceback(tmp_path):
    proc = _console("--debug", "inspect", tmp_path / "nope")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr
    assert "PackageError" in proc.stderr and "no such model package directory" in proc.stderr


def test_error_classes_are_user_errors():
    for cls in (PackageError, SourceError, UnknownArchitectureError, GenerationError):
        assert cls.exit_code == 2
