"""The model package: a directory with model.onnx, its manifest `onnxopt.json`, tokenizer and config.

The manifest is the contract between stages (../shared/DESIGN.md, "The model package"). Readers
refuse a package whose format version or file hashes do not match, and whose external-data
locations leave the package directory. Writers build in a temporary directory beside the target and
rename it into place at the end, so a failed stage leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from onnxopt.errors import PackageError, UserError

logger = logging.getLogger(__name__)

MANIFEST_NAME = "onnxopt.json"
MODEL_NAME = "model.onnx"
EXTERNAL_DATA_NAME = "model.onnx.data"
FORMAT_VERSION = 1

# Files copied from a source into the package when present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
_HASH_CHUNK = 1 << 22


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def kv_names(num_layers: int) -> dict[str, list[str]]:
    """Graph I/O names of the KV cache, in the form optimum and onnxruntime-genai use."""
    past = [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    return {"past": past, "present": present}


@contextlib.contextmanager
def staging_dir(target: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield an empty directory beside `target`; on success it replaces `target` atomically.

    On any exception the staging directory is removed and `target` is left as it was.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise UserError(f"{target}: output directory exists (pass --overwrite to replace it)")
    if target.exists() and not target.is_dir():
        raise UserError(f"{target}: output path exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            # Rename the old package aside first so there is never a moment with neither.
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "pkg")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(directory: Path, manifest: dict) -> dict:
    """Hash every file of `directory` into the manifest and write it; returns the manifest."""
    directory = Path(directory)
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST_NAME:
            files[path.relative_to(directory).as_posix()] = {
                "sha256": sha256_file(path),
                "bytes": path.stat().st_size,
            }
    manifest = {**manifest, "format_version": FORMAT_VERSION, "files": files}
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


class ModelPackage:
    """A validated model package on disk.

    Construction checks the manifest, the hashes of every file it lists and the external-data
    locations of the graph; any failure raises `PackageError` naming the file and the problem.
    """

    def __init__(self, path: str | os.PathLike, *, verify_hashes: bool = True):
        self.path = Path(path)
        if not self.path.exists():
            raise PackageError(f"{self.path}: no such model package directory")
        if not self.path.is_dir():
            raise PackageError(f"{self.path}: not a directory (a model package is a directory)")
        self.manifest = self._read_manifest()
        if verify_hashes:
            self._verify_files()
        check_external_data(self.model_path, self.path)

    # -- manifest ---------------------------------------------------------------------------
    def _read_manifest(self) -> dict:
        mpath = self.path / MANIFEST_NAME
        if not mpath.is_file():
            raise PackageError(
                f"{self.path}: not a model package ({MANIFEST_NAME} missing; "
                "create one with `onnxopt export`)"
            )
        try:
            manifest = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PackageError(f"{mpath}: not valid JSON ({e})") from e
        if not isinstance(manifest, dict):
            raise PackageError(f"{mpath}: expected a JSON object")
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise PackageError(
                f"{mpath}: format_version {version!r} is not supported "
                f"(this onnxopt reads version {FORMAT_VERSION}; re-export the package)"
            )
        for key in ("dims", "io", "files", "dtype"):
            if key not in manifest:
                raise PackageError(f"{mpath}: required field {key!r} is missing")
        return manifest

    def _verify_files(self) -> None:
        root = self.path.resolve()
        for name, entry in self.manifest["files"].items():
            path = (self.path / name).resolve()
            if not path.is_relative_to(root):
                raise PackageError(f"{self.path / MANIFEST_NAME}: file entry {name!r} leaves the package")
            if not path.is_file():
                raise PackageError(f"{self.path / name}: file listed in the manifest is missing")
            size = path.stat().st_size
            if size != entry.get("bytes"):
                raise PackageError(
                    f"{self.path / name}: size {size} bytes does not match the manifest "
                    f"({entry.get('bytes')} bytes); the file is truncated or was modified"
                )
            if sha256_file(path) != entry.get("sha256"):
                raise PackageError(
                    f"{self.path / name}: sha256 does not match the manifest; the file was modified"
                )
        if MODEL_NAME not in self.manifest["files"]:
            raise PackageError(f"{self.path / MANIFEST_NAME}: lists no {MODEL_NAME}")

    # -- accessors ------------------------------------------------------------------------------
    @property
    def model_path(self) -> Path:
        return self.path / MODEL_NAME

    @property
    def dims(self) -> dict:
        return self.manifest["dims"]

    @property
    def io(self) -> dict:
        return self.manifest["io"]

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    def read_json(self, name: str) -> dict | None:
        path = self.path / name
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise PackageError(f"{path}: not valid JSON ({e})") from e

    def __repr__(self) -> str:
        return f"ModelPackage({str(self.path)!r})"


def check_external_data(model_path: Path, package_dir: Path) -> None:
    """Refuse a graph whose external data leaves `package_dir` or runs past the end of its file.

    Model files are untrusted: an external-data location may be absolute, climb out with `..`, or
    point through a symlink to any file on the machine; a truncated data file would otherwise be
    read past its end by the runtime.
    """
    import onnx_ir as ir

    if not model_path.is_file():
        raise PackageError(f"{model_path}: model file is missing")
    try:
        model = ir.load(model_path)
    except Exception as e:  # onnx-ir raises protobuf DecodeError and others for corrupt files
        raise PackageError(f"{model_path}: not a valid ONNX model ({type(e).__name__}: {e})") from e
    root = Path(package_dir).resolve()
    sizes: dict[Path, int] = {}
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        location = tensor.location
        if os.path.isabs(location) or Path(location).is_absolute():
            raise PackageError(
                f"{model_path}: initializer {name!r} has an absolute external-data location "
                f"{location!r}; locations must be relative to the package"
            )
        data_path = (Path(package_dir) / location).resolve()
        if not data_path.is_relative_to(root):
            raise PackageError(
                f"{model_path}: initializer {name!r} external-data location {location!r} "
                "leaves the package directory"
            )
        if not data_path.is_file():
            raise PackageError(f"{model_path}: external-data file {location!r} is missing")
        size = sizes.setdefault(data_path, data_path.stat().st_size)
        end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
        if end > size:
            raise PackageError(
                f"{data_path}: external data is truncated ({size} bytes; initializer {name!r} "
                f"needs bytes up to {end})"
            )
