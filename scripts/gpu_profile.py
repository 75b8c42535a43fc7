"""Where a decode step's GPU time goes: the CUDA kernels of onnxopt's decode steps, by kernel, per token.

    python scripts/gpu_profile.py llama-1b [--package DIR | --target cuda] [--steps 32] [--out DIR]
    python scripts/gpu_profile.py llama-8b --package DIR --prefill --prompt-tokens 2048 [--fp8-swiglu-input]

Runs the benchmark's optimized fp16 package (scripts/bench_decode_cuda.py builds and caches it) on
onnxopt/runtime/cuda.py, prefills 128 random tokens, then records the decode steps with CUPTI through
torch.profiler (process-wide: it sees ONNX Runtime's and CuPy's kernels as well as torch's), once eager
and once replayed from the captured CUDA graph. Prints per mode: kernels per token, summed kernel time
per token, the wall time per token, and the kernels by total time, each marked GEMM or not; writes
profile-SHAPE.json under --out. With --prefill: the kernels of one prefill instead (after two warm ones),
summed over the prefill, and its wall time. Needs torch with CUDA on the GPU machine (scripts/gpu_setup.sh).
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
    return {"mode": rt.last_mode, "capture_error": rt.capture_error, "tokens": len(times),
            "wall_ms_per_token": 1e3 * wall, **kernel_table(prof, len(times))}


def profile_prefill(rt, prompt) -> dict:
    """One prefill of `prompt` (after two unprofiled ones: plans, kernels compiled, pools grown)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from onnxopt.runtime.sampling import SamplingParams

    def prefill():
        next(rt.iter_steps([prompt], max_new_tokens=1, params=SamplingParams(), pad=0, eos=[], stop_at_eos=False))
        torch.cuda.synchronize()

    prefill(), prefill()
    prof = profile(activities=[ProfilerActivity.CUDA])
    prof.start()
    start = time.perf_counter()
    prefill()
    wall = time.perf_counter() - start
    prof.stop()
    return {"mode": "prefill", "capture_error": None, "tokens": 1, "wall_ms_per_token": 1e3 * wall,
            **kernel_table(prof, 1)}


def kernel_table(prof, n: int) -> dict:
    """The profiler's device events by kernel name, per n tokens (or prefills)."""
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
    rows = sorted(({"kernel": k, "per_token": v["count"] / n, "us_per_token": v["us"] / n, "gemm": is_gemm(k)}
                   for k, v in kernels.items()), key=lambda r: -r["us_per_token"])
    return {
        **idle_gaps(events, n),
        "kernels_per_token": sum(r["per_token"] for r in rows),
        "kernel_us_per_token": sum(r["us_per_token"] for r in rows),
        "gemm_us_per_token": sum(r["us_per_token"] for r in rows if r["gemm"]),
        "other_us_per_token": sum(r["us_per_token"] for r in rows if not r["gemm"]),
        "kernels": rows,
    }


def idle_gaps(events: list, n: int, top: int = 8) -> dict:
    """Where the device sat idle: the time between one device event's end and the next one's start on
    the merged timeline (any stream), per n tokens, and the `top` longest gaps with the kernels around
    them. An eager prefill's wall time minus its kernel time is mostly these: the host behind the GPU."""
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)), e["name"]) for e in events
                   if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    gaps, end, before = [], None, None
    for start, stop, name in spans:
        if end is not None and start > end:
            gaps.append((start - end, before, name))
        if end is None or stop > end:
            end, before = stop, name
    gaps.sort(key=lambda g: -g[0])
    return {"idle_us_per_token": sum(g[0] for g in gaps) / n,
            "longest_gaps": [{"us": round(us, 1), "after": a[:80], "before": b[:80]} for us, a, b in gaps[:top]]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape")
    parser.add_argument("--package", type=Path, help="Profile this package instead of the benchmark's.")
    parser.add_argument("--target", choices=["cpu", "cuda"], default="cpu",
                        help="The benchmark's package of this optimizer target (cuda: engine onnxopt-cuda's).")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--prefill", action="store_true",
                        help="Profile one prefill of --prompt-tokens (eager) instead of the decode steps.")
    parser.add_argument("--fp8-swiglu-input", action="store_true",
                        help="An fp8 package's SwiGLU applied by down's LinearFp8 (passes/linear_fp8.py SWIGLU_INPUT).")
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
    from onnxopt.passes import linear_fp8

    linear_fp8.SWIGLU_INPUT = args.fp8_swiglu_input  # read as the runtime loads the package
    for graph in ((None,) if args.prefill else (False, True)):
        rt = CudaRuntime(package, cuda_graph=bool(graph))
        result = profile_prefill(rt, prompt) if args.prefill else profile_mode(rt, prompt, args.steps)
        report["modes"][result["mode"] if args.prefill else "graph" if graph else "eager"] = result
        how = "one prefill" if args.prefill else "captured" if graph else "launched per token"
        per = "prefill" if args.prefill else "token"
        print(f"\n== {args.shape} {result['mode']} ({how}): "
              f"{result['wall_ms_per_token']:.3f} ms/{per} wall, {result['kernels_per_token']:.1f} kernels/{per}, "
              f"kernel time {result['kernel_us_per_token']:.1f} us/{per} = GEMM {result['gemm_us_per_token']:.1f} "
              f"+ other {result['other_us_per_token']:.1f}" + (f"  capture error: {result['capture_error']}" if result["capture_error"] else ""))
        print(f"device idle {result['idle_us_per_token']:.1f} us/{per}; longest gaps (us, after -> before):")
        for gap in result["longest_gaps"]:
            print(f"  {gap['us']:>9.1f}  {gap['after'][:60]} -> {gap['before'][:60]}")
        print(f"{'us/' + per:>11} {'n/' + per:>10} {'gemm':>5}  kernel")
        for row in result["kernels"][:40]:
            print(f"{row['us_per_token']:>11.1f} {row['per_token']:>10.1f} {'y' if row['gemm'] else '':>5}  {row['kernel'][:150]}")
        del rt
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        name = f"profile-{args.shape}" + (f"-prefill{args.prompt_tokens}" if args.prefill else "")
        (args.out / f"{name}.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
