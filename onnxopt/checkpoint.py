"""Write a source's weights as a plain Hugging Face checkpoint (config + safetensors + tokenizer).

Tools that read only Hugging Face directories (onnxruntime-genai's model builder, for one) can then
run on exactly the weights `onnxopt export` sees. A GGUF is dequantized by transformers' GGUF
loader; transformers 4.57 refuses `save_pretrained` on a GGUF-loaded model, so the weights are
moved into a freshly built model of the same class (`load_state_dict`, strict) and that one is saved.

The checkpoint is cached: `dest` carries a stamp naming the source file (path, size, mtime) and the
dtype, and a second call with the same stamp returns `dest` without loading anything.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from onnxopt.errors import SourceError, UserError
from onnxopt.package import staging_dir
from onnxopt.sources import Source, resolve_source

logger = logging.getLogger(__name__)

STAMP_NAME = "onnxopt-checkpoint.json"
DTYPES = ("fp32", "fp16")


def write_hf_checkpoint(src: str, dest: str | Path, *, dtype: str = "fp32") -> Path:
    """Return a Hugging Face directory holding the weights of `src` (anything `onnxopt export` accepts).

    An `hf` source is already one and is returned as is (`dest` is not written). A GGUF source is
    dequantized and written to `dest` (atomically), unless `dest` already holds it.
    """
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    source = resolve_source(str(src))
    if source.kind == "hf":
        return source.path
    if source.kind != "gguf":
        raise SourceError(
            f"{src}: an ONNX directory has no torch weights to write as a Hugging Face checkpoint; "
            "give the Hugging Face directory or GGUF file it was exported from"
        )
    dest = Path(dest)
    stamp = _stamp(source, dtype)
    marker = dest / STAMP_NAME
    if marker.is_file() and _read_json(marker) == stamp:
        logger.info("reusing Hugging Face checkpoint %s", dest)
        return dest
    if dest.exists() and not marker.is_file() and any(dest.iterdir()):
        raise UserError(f"{dest}: exists and was not written by onnxopt; choose an empty path")
    with staging_dir(dest, overwrite=True) as tmp:
        _save_gguf_as_hf(source, tmp, dtype)
        (tmp / STAMP_NAME).write_text(json.dumps(stamp, indent=2) + "\n")
    logger.info("wrote Hugging Face checkpoint %s", dest)
    return dest


def _save_gguf_as_hf(source: Source, tmp: Path, dtype: str) -> None:
    import torch

    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    loaded = source.load_torch_model(torch_dtype)
    config = loaded.config
    config.dtype = torch_dtype
    # A model built from the config alone carries no trace of the GGUF loader, so it saves.
    fresh = type(loaded)(config).to(torch_dtype)
    result = fresh.load_state_dict(loaded.state_dict(), strict=True)
    if result.missing_keys or result.unexpected_keys:  # strict=True raises first; kept for clarity
        raise SourceError(f"{source.path}: weights do not match {type(loaded).__name__} ({result})")
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer = source.load_tokenizer()
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    else:
        logger.warning("%s: no tokenizer; the checkpoint has none", source.path)


def _stamp(source: Source, dtype: str) -> dict:
    stat = source.path.stat()
    return {
        "source": str(source.path.resolve()),
        "bytes": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "dtype": dtype,
    }


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
