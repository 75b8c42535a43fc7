"""fp8 prefill on the GPU: an fp16 package against its `fp8` child, the child's MatMuls run as
com.microsoft GemmFloat8 (passes/fp8_gemm.py), through the CUDA runtime's own loading path.

    python scripts/gpu_fp8_prefill.py --prepare llama-1b [--tokens 2048] [--repeats 7] [--out DIR]
    python scripts/gpu_fp8_prefill.py --fp16 PKG --fp8 PKG [--tokens 2048] ...

--prepare builds (and caches under $ONNXOPT_CACHE, as scripts/bench_decode_cuda.py does) the optimized
fp16 package of a random-init shape with last-token logits (so the LM head runs on one row, as in
serving), and its `fp8` child: W8A8 E4M3 rounded to nearest (`--method smoothquant`, alpha 0; no GPTQ
Hessian pass), calibrated on 8 windows of 64 random ids (calibration.table.random_ids_table) run
through the full-logits twin of the same export. Random weights have no perplexity to gate on.

Engines, each a CudaRuntime (decode eager: GemmFloat8 cannot be captured, see passes/fp8_gemm.py):
- fp16: the parent.
- fp8-qdq: the child as ORT's CUDA EP runs its Q/DQ graph today (weights dequantized per run).
- fp8-gemm-f32 / fp8-gemm-f16: the child with passes/fp8_gemm.py applied where DeviceGraph applies
  w8a8_integer (out_dtype float32 / float16).
Time: batch 1, a prompt of --tokens random ids, max_new_tokens 1: wall time from the call to the first
token on the host (the prefill, plus one sampling), after --warmup runs; the median of --repeats.
Table to stdout, JSON to --out/fp8_prefill.json.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
logger = logging.getLogger("gpu_fp8_prefill")
ENGINES = ("fp16", "fp8-qdq", "fp8-gemm-f32", "fp8-gemm-f16")


def prepare(shape: str) -> tuple[Path, Path]:
    """(fp16 package, its fp8 child), built once and cached."""
    import onnx_ir as ir

    import bench_decode_cuda as bench
    from onnxopt.calibration.table import random_ids_table
    from onnxopt.package import ModelPackage, staging_dir
    from onnxopt.quantize import _write_package, quantize_model

    out = bench.cache_dir(shape) / "onnxopt-fp16-last-fp8"
    keep = os.environ.get("ONNXOPT_BENCH_KEEP_EXPORT")
    os.environ["ONNXOPT_BENCH_KEEP_EXPORT"] = "1"  # both packages come from one export
    try:
        full = bench.prepare_onnxopt(shape, full_logits=True) if not (out / "onnxopt.json").is_file() else None
        fp16 = bench.prepare_onnxopt(shape, full_logits=False)
    finally:
        os.environ.pop("ONNXOPT_BENCH_KEEP_EXPORT") if keep is None else os.environ.update(ONNXOPT_BENCH_KEEP_EXPORT=keep)
    if full is None:
        return fp16, out
    # Calibration runs the full-logits twin (it needs every position's logits); the MatMul inputs it
    # observes carry the same names in the last-token graph, which differs only after the last layer.
    logger.info("calibrating %s on random ids, then W8A8 fp8 (round to nearest) of %s", full, fp16)
    table = random_ids_table(ModelPackage(full), windows=8, length=64)
    src = ModelPackage(fp16)
    model = ir.load(src.model_path)
    summary = quantize_model(model, bits=8, block_size=bench.QUANT_BLOCK, method="smoothquant", alpha=0.0, fmt="fp8",
                             table=table, vocab_size=src.dims["vocab_size"], progress=False)
    record = {"scheme": "fp8", "method": "smoothquant", "bits": 8, **summary, "gate": None,
              "calibration": "8 x 64 random ids"}
    with staging_dir(out, overwrite=True) as tmp:
        _write_package(src, model, tmp, quantization=record)
    return fp16, out


@contextlib.contextmanager
def fp8_gemm_at_load(out_dtype: str | None, counts: list):
    """DeviceGraph with passes/fp8_gemm.py applied next to w8a8_integer.apply (None: unchanged)."""
    from onnxopt.passes import fp8_gemm, w8a8_integer

    original = w8a8_integer.apply

    def both(model):
        counts.append(fp8_gemm.apply(model, out_dtype))
        return original(model) + counts[-1]

    if out_dtype is not None:
        w8a8_integer.apply = both
    try:
        yield
    finally:
        w8a8_integer.apply = original


def time_prefill(path: Path, out_dtype: str | None, tokens: int, warmup: int, repeats: int) -> dict:
    from onnxopt.runtime.cuda import CudaRuntime
    from onnxopt.runtime.sampling import SamplingParams

    counts: list[int] = []
    with fp8_gemm_at_load(out_dtype, counts):
        started = time.perf_counter()
        rt = CudaRuntime(path, cuda_graph=False)
        load_s = time.perf_counter() - started
    prompt = np.random.default_rng(0).integers(0, rt.vocab_size, tokens).tolist()
    walls = []
    for repeat in range(warmup + repeats):
        rt.stream.synchronize()
        started = time.perf_counter()
        steps = rt.iter_steps([prompt], max_new_tokens=1, params=SamplingParams(), pad=0, eos=[])
        next(steps)
        wall = (time.perf_counter() - started) * 1e3
        list(steps)
        if repeat >= warmup:
            walls.append(wall)
    del rt
    gc.collect()
    return {"ms": statistics.median(walls), "ms_min": min(walls), "ms_all": walls, "load_s": load_s,
            "gemm_float8": counts[0] if counts else 0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepare", metavar="SHAPE", help="build and use SHAPE's fp16 package and fp8 child (e.g. llama-1b)")
    parser.add_argument("--fp16", type=Path)
    parser.add_argument("--fp8", type=Path)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.prepare:
        args.fp16, args.fp8 = prepare(args.prepare)
    if args.fp16 is None or args.fp8 is None:
        parser.error("give --prepare SHAPE, or both --fp16 and --fp8")
    plan = {"fp16": (args.fp16, None), "fp8-qdq": (args.fp8, None), "fp8-gemm-f32": (args.fp8, "float32"),
            "fp8-gemm-f16": (args.fp8, "float16")}
    results = {}
    for name in args.engines.split(","):
        path, out_dtype = plan[name]
        logger.info("%s: %s, prefill of %d tokens", name, path, args.tokens)
        try:
            results[name] = time_prefill(path, out_dtype, args.tokens, args.warmup, args.repeats)
        except Exception as e:  # one engine failing (e.g. cuBLASLt refusing fp8 -> float16) still reports the others
            logger.exception("%s failed", name)
            results[name] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
    base = results.get("fp16", {}).get("ms")
    print(f"prefill of {args.tokens} tokens, batch 1 (median of {args.repeats}, ms)")
    print(f"{'engine':<14} {'ms':>9} {'min':>9} {'tok/s':>10} {'vs fp16':>8} {'GemmFloat8':>10}")
    for name, res in results.items():
        if "error" in res:
            print(f"{name:<14} failed: {res['error'][:120]}")
            continue
        speedup = f"{base / res['ms']:.2f}x" if base else "-"
        print(f"{name:<14} {res['ms']:9.2f} {res['ms_min']:9.2f} {args.tokens / res['ms'] * 1e3:10.0f} {speedup:>8} "
              f"{res['gemm_float8']:>10}")
    import onnxruntime as ort

    args.out.mkdir(parents=True, exist_ok=True)
    report = {"tokens": args.tokens, "batch": 1, "repeats": args.repeats, "warmup": args.warmup,
              "fp16": str(args.fp16), "fp8": str(args.fp8), "onnxruntime": ort.__version__, "engines": results,
              "speedup_vs_fp16": {n: base / r["ms"] for n, r in results.items() if base and "ms" in r}}
    (args.out / "fp8_prefill.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
