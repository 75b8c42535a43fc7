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
# Every stage's graph has these, before and after `optimize` (../shared/DESIGN.md, "Graph contract").
_REQUIRED_INPUT = "input_ids"
_REQUIRED_OUTPUT = "logits"
_REEXPORT = "re-export the package with `onnxopt export`"


def _current_umask() -> int:
    # There is no getter: set and restore. Done once, at import, before any threads of ours exist.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# tempfile.mkdtemp creates 0700 directories; a package gets the mode a plain mkdir would give it.
_DIR_MODE = 0o777 & ~_current_umask()


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


def check_target(target: Path, *, overwrite: bool) -> None:
    """Refuse an output path that exists (unless `overwrite`) or that is not a directory."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise UserError(f"{target}: output path exists and is not a directory; choose another path")
    if target.exists() and not overwrite:
        raise UserError(f"{target}: output directory exists (pass --overwrite to replace it)")


@contextlib.contextmanager
def staging_dir(target: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield an empty directory beside `target`; on success it replaces `target` atomically.

    On any exception the staging directory is removed and `target` is left as it was.
    """
    target = Path(target)
    check_target(target, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, _DIR_MODE)
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
            raise PackageError(f"{self.path}: no such model package directory (create one with `onnxopt export`)")
        if not self.path.is_dir():
            raise PackageError(f"{self.path}: not a directory (a model package is a directory)")
        self.manifest = self._read_manifest()
        if verify_hashes:
            self._verify_files()
        model = _load_graph(self.model_path)
        _check_graph_io(model, self.model_path)
        data_files = check_external_data(self.model_path, self.path, model=model)
        if verify_hashes:
            root = self.path.resolve()
            listed = {(root / name).resolve() for name in self.manifest["files"]}
            for data_path in data_files:
                if data_path not in listed:
                    raise PackageError(
                        f"{self.model_path}: external-data file {data_path.relative_to(root).as_posix()!r} "
                        f"is not listed in the manifest, so its contents are unverified; {_REEXPORT}"
                    )

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
            raise PackageError(f"{mpath}: not valid JSON ({e}); {_REEXPORT}") from e
        if not isinstance(manifest, dict):
            raise PackageError(f"{mpath}: expected a JSON object, found {type(manifest).__name__}; {_REEXPORT}")
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise PackageError(
                f"{mpath}: format_version {version!r} is not supported "
                f"(this onnxopt reads version {FORMAT_VERSION}; re-export the package)"
            )
        for key, kind in (("dims", dict), ("io", dict), ("files", dict), ("dtype", str)):
            if key not in manifest:
                raise PackageError(f"{mpath}: required field {key!r} is missing; {_REEXPORT}")
            if not isinstance(manifest[key], kind):
                raise PackageError(
                    f"{mpath}: field {key!r} should be a JSON {'object' if kind is dict else 'string'}, "
                    f"found {type(manifest[key]).__name__}; {_REEXPORT}"
                )
        for name, entry in manifest["files"].items():
            if not isinstance(entry, dict):
                raise PackageError(f"{mpath}: files[{name!r}] should be a JSON object; {_REEXPORT}")
        return manifest

    def _verify_files(self) -> None:
        root = self.path.resolve()
        for name, entry in self.manifest["files"].items():
            path = (self.path / name).resolve()
            if not path.is_relative_to(root):
                # An absolute name, `..`, or a symlink to a file elsewhere on the machine.
                raise PackageError(
                    f"{self.path / MANIFEST_NAME}: file entry {name!r} leaves the package directory; "
                    f"refusing to read it ({_REEXPORT})"
                )
            if not path.is_file():
                raise PackageError(f"{self.path / name}: file listed in the manifest is missing; {_REEXPORT}")
            size = path.stat().st_size
            if size != entry.get("bytes"):
                raise PackageError(
                    f"{self.path / name}: size {size} bytes does not match the manifest "
                    f"({entry.get('bytes')} bytes); the file is truncated or was modified ({_REEXPORT})"
                )
            if sha256_file(path) != entry.get("sha256"):
                raise PackageError(
                    f"{self.path / name}: sha256 does not match the manifest; the file was modified "
                    f"after export (restore it, or {_REEXPORT})"
                )
        if MODEL_NAME not in self.manifest["files"]:
            raise PackageError(f"{self.path / MANIFEST_NAME}: lists no {MODEL_NAME}; {_REEXPORT}")

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
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PackageError(f"{path}: not valid JSON ({e}); {_REEXPORT}") from e

    def __repr__(self) -> str:
        return f"ModelPackage({str(self.path)!r})"


def _load_graph(model_path: Path):
    """The graph of `model_path` as an onnx_ir.Model; external tensors stay on disk, unread."""
    import onnx_ir as ir

    if not model_path.is_file():
        raise PackageError(f"{model_path}: model file is missing; {_REEXPORT}")
    try:
        return ir.load(model_path)
    except Exception as e:  # onnx-ir raises protobuf DecodeError and others for corrupt files
        raise PackageError(
            f"{model_path}: not a valid ONNX model ({type(e).__name__}: {e}); the file is corrupt ({_REEXPORT})"
        ) from e


def _check_graph_io(model, model_path: Path) -> None:
    # Garbage can parse as a protobuf: an empty file is a valid, empty ModelProto.
    if _REQUIRED_INPUT not in {v.name for v in model.graph.inputs}:
        raise PackageError(
            f"{model_path}: graph has no input {_REQUIRED_INPUT!r}, so it is not a causal LM package "
            f"(the file is corrupt or foreign; {_REEXPORT})"
        )
    if _REQUIRED_OUTPUT not in {v.name for v in model.graph.outputs}:
        raise PackageError(
            f"{model_path}: graph has no output {_REQUIRED_OUTPUT!r}, so it is not a causal LM package "
            f"(the file is corrupt or foreign; {_REEXPORT})"
        )


def _all_tensors(model) -> Iterator[tuple[str, object]]:
    """(name, tensor) of every initializer and tensor attribute: subgraphs and functions included,
    since ONNX Runtime reads external data for all of them."""
    import onnx_ir as ir

    graphs: dict[int, object] = {}
    for root in (model.graph, *model.functions.values()):
        graphs.setdefault(id(root), root)
        nodes = ir.traversal.RecursiveGraphIterator(root, enter_graph=lambda g: graphs.setdefault(id(g), g))
        for node in nodes:
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.TENSOR:
                    yield f"{node.name}.{attr.name}", attr.value
                elif attr.type == ir.AttributeType.TENSORS:
                    for i, tensor in enumerate(attr.value):
                        yield f"{node.name}.{attr.name}[{i}]", tensor
    for graph in graphs.values():
        for name, value in getattr(graph, "initializers", {}).items():
            yield name, value.const_value


def check_external_data(model_path: Path, package_dir: Path, *, model=None) -> list[Path]:
    """Refuse a graph whose external data leaves `package_dir` or runs past the end of its file.

    Model files are untrusted: an external-data location may be absolute, climb out with `..`, or
    point through a symlink to any file on the machine; a truncated data file would otherwise be
    read past its end by the runtime. Returns the resolved data files the graph reads. `model` is
    the already loaded onnx_ir.Model of `model_path`, if the caller has one.
    """
    import onnx_ir as ir

    model_path = Path(model_path)
    if model is None:
        model = _load_graph(model_path)
    root = Path(package_dir).resolve()
    sizes: dict[Path, int] = {}
    for name, tensor in _all_tensors(model):
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        location = tensor.location
        if os.path.isabs(location) or Path(location).is_absolute():
            raise PackageError(
                f"{model_path}: tensor {name!r} has an absolute external-data location "
                f"{location!r}; refusing to read outside the package (locations must be relative to it)"
            )
        data_path = (Path(package_dir) / location).resolve()
        if not data_path.is_relative_to(root):
            how = "" if ".." in Path(location).parts else " through a symlink"
            raise PackageError(
                f"{model_path}: tensor {name!r} external-data location {location!r} "
                f"leaves the package directory{how}; refusing to read it (the data file must be inside)"
            )
        if not data_path.is_file():
            # Also reached for optimum directories given to `export`, hence "the model", not "the package".
            raise PackageError(f"{model_path}: external-data file {location!r} is missing; re-export the model")
        size = sizes.setdefault(data_path, data_path.stat().st_size)
        end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
        if end > size:
            raise PackageError(
                f"{data_path}: external data is truncated ({size} bytes; tensor {name!r} "
                f"needs bytes up to {end}); re-export the model"
            )
    return list(sizes)
