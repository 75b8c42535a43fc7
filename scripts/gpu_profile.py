"""Where a decode step's GPU time goes: the CUDA kernels of onnxopt's decode steps, by kernel, per token.

    python scripts/gpu_profile.py llama-1b [--package DIR | --target cuda] [--steps 32] [--out DIR]

Runs the benchmark's optimized fp16 package (scripts/bench_decode_cuda.py builds and caches it) on
onnxopt/runtime/cuda.py, prefills 128 random tokens, then records the decode steps with CUPTI through
torch.profiler (process-wide: it sees ONNX Runtime's and CuPy's kernels as well as torch's), once eager
and once replayed from the captured CUDA graph. Prints per mode: kernels per token, summed kernel time
per token, the wall time per token, and the kernels by total time, each marked GEMM or not; writes
profile-SHAPE.json under --out. Needs torch with CUDA on the GPU machine (scripts/gpu_setup.sh).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

GEMM_MARKERS = ("gemm", "gemv", "matmul", "nvjet", "cutlass", "sm90_xmma", "ampere_", "splitk", "nbits", "dequant")  # nvjet: cuBLAS on sm90


def is_gemm(name: str) -> bool:
    lower = name.lower()
    return any(marker in lower for marker in GEMM_MARKERS)


def profile_mode(rt, prompt, steps: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from onnxopt.runtime.sampling import SamplingParams

    prof = profile(activities=[ProfilerActivity.CUDA])
    times = []
    it = rt.iter_steps([prompt], max_new_tokens=steps + 2, params=SamplingParams(), pad=0, eos=[], stop_at_eos=False)
    next(it)  # prefill
    next(it)  # first decode step (captures the graph in graph mode)
    torch.cuda.synchronize()
    prof.start()
    start = time.perf_counter()
    for _ in it:
        times.append(time.perf_counter())
    torch.cuda.synchronize()
    prof.stop()
    wall = (times[-1] - start) / len(times)
    with tempfile.TemporaryDirectory() as tmp:  # the chrome trace: every device event with its duration
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    kernels = {}
    for event in events:
        if event.get("ph") != "X" or event.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        entry = kernels.setdefault(event["name"], {"count": 0, "us": 0.0})
        entry["count"] += 1
        entry["us"] += float(event.get("dur", 0.0))
    n = len(times)
    rows = sorted(({"kernel": k, "per_token": v["count"] / n, "us_per_token": v["us"] / n, "gemm": is_gemm(k)}
                   for k, v in kernels.items()), key=lambda r: -r["us_per_token"])
    return {
        "mode": rt.last_mode, "capture_error": rt.capture_error, "tokens": n, "wall_ms_per_token": 1e3 * wall,
        "kernels_per_token": sum(r["per_token"] for r in rows),
        "kernel_us_per_token": sum(r["us_per_token"] for r in rows),
        "gemm_us_per_token": sum(r["us_per_token"] for r in rows if r["gemm"]),
        "other_us_per_token": sum(r["us_per_token"] for r in rows if not r["gemm"]),
        "kernels": rows,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape")
    parser.add_argument("--package", type=Path, help="Profile this package instead of the benchmark's.")
    parser.add_argument("--target", choices=["cpu", "cuda"], default="cpu",
                        help="The benchmark's package of this optimizer target (cuda: engine onnxopt-cuda's).")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import bench_decode_cuda as bench

    from onnxopt.models import RANDOM_SHAPES
    from onnxopt.runtime.cuda import CudaRuntime

    package = args.package or (bench.prepare_onnxopt(args.shape) if args.target == "cpu"
                               else bench.prepare_onnxopt(args.shape, full_logits=False, target="cuda"))
    vocab = RANDOM_SHAPES[args.shape]["vocab_size"] if args.shape in RANDOM_SHAPES else 1000
    prompt = np.random.default_rng(0).integers(0, vocab, size=args.prompt_tokens).tolist()
    report = {"package": str(package), "shape": args.shape, "modes": {}}
    for graph in (False, True):
        rt = CudaRuntime(package, cuda_graph=graph)
        result = profile_mode(rt, prompt, args.steps)
        report["modes"]["graph" if graph else "eager"] = result
        print(f"\n== {args.shape} {result['mode']} ({'captured' if graph else 'launched per token'}): "
              f"{result['wall_ms_per_token']:.3f} ms/token wall, {result['kernels_per_token']:.1f} kernels/token, "
              f"kernel time {result['kernel_us_per_token']:.1f} us/token = GEMM {result['gemm_us_per_token']:.1f} "
              f"+ other {result['other_us_per_token']:.1f}" + (f"  capture error: {result['capture_error']}" if result["capture_error"] else ""))
        print(f"{'us/token':>9} {'n/token':>8} {'gemm':>5}  kernel")
        for row in result["kernels"][:40]:
            print(f"{row['us_per_token']:>9.1f} {row['per_token']:>8.1f} {'y' if row['gemm'] else '':>5}  {row['kernel'][:150]}")
        del rt
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"profile-{args.shape}.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
