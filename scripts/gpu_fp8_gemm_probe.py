"""Time onnxopt::LinearFp8 against float16 onnxopt::Linear on the GPU, at llama-8b projection shapes.

    python scripts/gpu_fp8_gemm_probe.py [--rows 2048 1] [--outliers 32] [--repeats 20] [--fast-accum]
                                         [--out probe.jsonl]

One decoder layer's four projections as the CUDA runtime runs them (hidden 4096, intermediate 14336, 32
heads and 8 KV heads of 128): q/k/v [6144 x 4096] with the norm, o [4096 x 4096] with the residual,
gate/up [28672 x 4096] with the norm and SwiGLU, down [4096 x 14336] with the residual. Per --rows M:
- fp16: custom_ops/linear.py (M > 8: its norm kernel, cuBLAS GEMM through cupy.matmul, SwiGLU and adds;
  M <= 8: its GEMV);
- fp8: custom_ops/linear_fp8.py with --outliers channels (M past the GEMV: quantize kernel, cuBLASLt
  FP8 GEMM with w_scale and the additions inside and float16 out, or with float32 out and the
  epilogue kernel -- both paths timed, and the pieces alone; else its FP8-weight GEMV);
- torch (when importable): torch._scaled_mm on the same E4M3 operands and layout (TN, float32 and
  float16 out), an independent measure of what cuBLASLt's FP8 GEMM reaches on this GPU.
The fp16 weights are the fp8 weights dequantized (outlier columns in float16), so the two outputs differ
by the activation's E4M3 rounding only: the relative L2 difference is printed as a check.

Times: GPU time per call from cupyx.profiler.benchmark (CUDA events), the median of --repeats after
warm-up; a synchronized call also pays its own host time where that exceeds its GPU work. With --chain
N (default 10), the layer's four projections are also enqueued back to back N times between two
events, per path (fp16; fp8 with the module's defaults, all fused ("gemm"), all through the epilogue, with
the SwiGLU in down's op): what an eager prefill sees, the host running ahead of the GPU. Output: one JSON object per measurement, then a summary: microseconds per projection and per
layer, fp16 / fp8 ratio, TFLOP/s (2 M N K per call) and weight GB/s (weight bytes read per call).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import numpy as np

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM = 4096, 14336, 32, 8, 128
# name: (N, K, norm, SwiGLU, residual)
PROJECTIONS = {
    "qkv": ((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN, True, False, False),
    "o": (HIDDEN, HEADS * HEAD_DIM, False, False, True),
    "gate_up": (2 * INTERMEDIATE, HIDDEN, True, True, False),
    "down": (HIDDEN, INTERMEDIATE, False, False, True),
}


def _weights(cp, rng, n: int, k: int, outliers: int, dtype=np.float16):
    """(E4M3 bytes [N, K] on the device, w_scale float32 [N], outlier index int64 [n], outlier weights
    [N, n], the float16 weight [N, K] they mean): random, quantized per output row as the quantizer does."""
    from onnxopt.calibration.smoothquant import FP8_MAX, to_fp8

    w = rng.standard_normal((n, k), dtype=np.float32) / np.float32(np.sqrt(k))
    index = np.sort(rng.choice(k, outliers, replace=False)).astype(np.int64)
    outlier_w = np.ascontiguousarray(w[:, index].astype(dtype))  # a package's initializer is contiguous
    w[:, index] = 0.0  # the quantizer's zeroed outlier rows (columns of this [N, K] layout)
    w_scale = (np.abs(w).max(axis=1) / FP8_MAX).astype(np.float32)
    w_q = to_fp8(w / w_scale[:, None])
    dense = (w_q.astype(np.float32) * w_scale[:, None]).astype(dtype)
    dense[:, index] = outlier_w
    return (cp.asarray(w_q.view(np.uint8)), cp.asarray(w_scale), cp.asarray(index), cp.asarray(outlier_w),
            cp.asarray(dense))


def _median_us(fn, repeats: int) -> float:
    from cupyx.profiler import benchmark

    result = benchmark(fn, (), n_repeat=repeats, n_warmup=3)
    return float(np.median(result.gpu_times[0])) * 1e6


def _x_scale(cp, x, gamma, index):
    """The static activation scale calibration would give this input: max|a| / 448 over the kept channels."""
    a = x.astype(cp.float32)
    if gamma is not None:
        a = a / cp.sqrt(cp.mean(a * a, axis=-1, keepdims=True) + 1e-5) * gamma.astype(cp.float32)
    kept = cp.ones(x.shape[-1], dtype=bool)
    kept[index] = False
    return cp.asarray(np.float32(np.float16(float(cp.abs(a[:, kept]).max()) / 448)))


def _torch_scaled_mm(q, w_q, x_scale, out_dtype):
    """A call of torch._scaled_mm on the same E4M3 bytes (q [M, K] row-major, W [N, K] as its transpose)."""
    import torch

    a = torch.from_dlpack(q).view(torch.float8_e4m3fn)
    b = torch.from_dlpack(w_q).view(torch.float8_e4m3fn).t()  # [K, N] column-major: cuBLASLt's TN
    scale_a = torch.from_dlpack(x_scale.reshape(1)).reshape(())
    scale_b = torch.ones((), device=a.device, dtype=torch.float32)
    dtype = {"float32": torch.float32, "float16": torch.float16}[out_dtype]
    return lambda: torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=dtype)


def _chain_us(cp, calls, reps: int) -> tuple[float, float]:
    """(GPU µs, host µs) per pass of `calls` enqueued back to back `reps` times between two events with
    no synchronization: what an eager prefill sees, host time hidden wherever the GPU is behind."""
    for call in calls:
        call()
    cp.cuda.get_current_stream().synchronize()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    t0 = time.perf_counter()
    start.record()
    for _ in range(reps):
        for call in calls:
            call()
    end.record()
    host = time.perf_counter() - t0
    end.synchronize()
    return cp.cuda.get_elapsed_time(start, end) * 1e3 / reps, host * 1e6 / reps


# (FUSED_SCALES, SWIGLU) of the paths besides the module's default (chain "fp8"; "gemm" since 2026-12-06)
PATHS = {"fp8_epilogue": (False, "epilogue"), "fp8_fused": (True, "gemm")}


def _fp8_call(flags, args, act, out, input_activation=""):
    """A LinearFp8 call with linear_fp8_kernels' (FUSED_SCALES, SWIGLU) set to `flags` (None: the
    module's defaults)."""
    from onnxopt.custom_ops import linear_fp8, linear_fp8_kernels

    defaults = (linear_fp8_kernels.FUSED_SCALES, linear_fp8_kernels.SWIGLU)

    def call():
        linear_fp8_kernels.FUSED_SCALES, linear_fp8_kernels.SWIGLU = flags or defaults
        linear_fp8.cuda(*args, activation=act, out=out, input_activation=input_activation)
    return call


def probe(cp, rows: int, outliers: int, repeats: int, emit, chain: int = 0) -> dict:
    """Every measurement at `rows` rows; returns {projection: {kind: microseconds}}. With `chain`, also
    the whole layer's four projections back to back (`_chain_us`) per path."""
    from onnxopt.custom_ops import linear, linear_fp8, linear_fp8_gemm, linear_fp8_kernels

    rng = np.random.default_rng(rows)
    table = {}
    chains = {"fp16": [], "fp8": [], **{path: [] for path in PATHS}, "fp8_swiglu_in": []}
    defaults = (linear_fp8_kernels.FUSED_SCALES, linear_fp8_kernels.SWIGLU)
    for name, (n, k, norm, swiglu, residual) in PROJECTIONS.items():
        w_q, w_scale, index, outlier_w, dense = _weights(cp, rng, n, k, outliers)
        x = cp.asarray(rng.standard_normal((rows, k), dtype=np.float32).astype(np.float16))
        gamma = cp.asarray((1 + 0.1 * rng.standard_normal(k)).astype(np.float16)) if norm else None
        ny = n // 2 if swiglu else n
        res = cp.asarray(rng.standard_normal((rows, ny)).astype(np.float16)) if residual else None
        act = "swiglu" if swiglu else ""
        x_scale = _x_scale(cp, x, gamma, index)
        fp8_args = (x, w_q, gamma, res, None, w_scale, x_scale, index if outliers else None,
                    outlier_w if outliers else None)
        out16, out8 = cp.empty((rows, ny), cp.float16), cp.empty((rows, ny), cp.float16)
        if chain:
            chains["fp16"].append(functools.partial(linear.cuda, x, dense, gamma, res, activation=act, out=out16))
            chains["fp8"].append(_fp8_call(defaults, fp8_args, act, out8))
            for path, flags in PATHS.items():
                chains[path].append(_fp8_call(flags, fp8_args, act, out8))
            # the SwiGLU in down's LinearFp8 (passes/linear_fp8.py swiglu_input): gate/up writes the packed
            # product [rows, N], down reads a packed [rows, 2K] and applies SwiGLU as it quantizes
            if name == "gate_up":
                packed = cp.empty((rows, n), cp.float16)
                chains["fp8_swiglu_in"].append(_fp8_call(defaults, fp8_args, "", packed))
            elif name == "down":
                x2 = cp.asarray(rng.standard_normal((rows, 2 * k), dtype=np.float32).astype(np.float16))
                from onnxopt.custom_ops import swiglu as swiglu_op

                args2 = (x2, *fp8_args[1:6], _x_scale(cp, swiglu_op.cuda(x2), None, index), *fp8_args[7:])
                chains["fp8_swiglu_in"].append(_fp8_call(defaults, args2, act, out8, "swiglu"))
            else:
                chains["fp8_swiglu_in"].append(_fp8_call(defaults, fp8_args, act, out8))
        times = {
            "fp16": _median_us(lambda: linear.cuda(x, dense, gamma, res, activation=act, out=out16), repeats),
            "fp8": _median_us(lambda: linear_fp8.cuda(*fp8_args, activation=act, out=out8), repeats),
        }
        diff = float(cp.linalg.norm((out8 - out16).astype(cp.float32)) / cp.linalg.norm(out16.astype(cp.float32)))
        if linear_fp8_kernels.gemv_rows(rows, k) is None:  # the prefill path's pieces alone
            for path, flags in PATHS.items():  # each path alone (the default is one of them)
                times[f"{path}_path"] = _median_us(_fp8_call(flags, fp8_args, act, out8), repeats)
            linear_fp8_kernels.FUSED_SCALES, linear_fp8_kernels.SWIGLU = defaults
            q = cp.empty((rows, k), cp.uint8)
            a_out = cp.empty((rows, outliers), cp.float16)
            acc = cp.empty((rows, n), cp.float32)
            side = cp.empty((rows, n), cp.float16)
            null = np.uint64(0)
            index_arg, a_out_arg = (index, a_out) if outliers else (null, null)
            product = cp.empty((rows, n), cp.float16)
            quantize = linear_fp8_kernels.function("linear_fp8_quantize<half_bits>")
            epilogue = linear_fp8_kernels.function(f"linear_fp8_epilogue<half_bits, {int(swiglu)}>")
            plan = linear_fp8_gemm.gemm(w_q, x_scale, rows)
            times["fp8_quantize"] = _median_us(lambda: quantize(
                (rows,), (256,), (x, null if gamma is None else gamma, x_scale, index_arg, q, a_out_arg, np.int32(k),
                                  np.int32(outliers), np.int32(norm), np.float32(1e-5))), repeats)
            times["fp8_gemm"] = _median_us(lambda: plan(q, acc), repeats)
            if linear_fp8_gemm.GEMM_FAST_ACCUM:  # its error: the same sums with float32 promotion
                linear_fp8_gemm.GEMM_FAST_ACCUM = False
                try:
                    exact_plan = linear_fp8_gemm.Fp8Gemm(w_q, x_scale, rows)
                finally:
                    linear_fp8_gemm.GEMM_FAST_ACCUM = True
                exact = cp.empty_like(acc)
                exact_plan(q, exact)
                plan(q, acc)
                emit({"projection": name, "kind": "fast_accum_vs_exact", "rows": rows, "k": k,
                      "rel_l2": float(cp.linalg.norm(acc - exact) / cp.linalg.norm(exact)),
                      "max_rel": float(cp.abs(acc - exact).max() / cp.abs(exact).max())})
                del exact, exact_plan
            fused_plan = linear_fp8_gemm.gemm(w_q, x_scale, rows, w_scale)
            if fused_plan is not None:  # float16 D, w_scale inside (the fused path's GEMM)
                times["fp8_gemm_fp16_out"] = _median_us(lambda: fused_plan(q, product), repeats)
                # with C = D (beta 1): what the fused path runs when D holds the outlier product / residual
                times["fp8_gemm_fp16_out_plus_c"] = _median_us(lambda: fused_plan(q, product, product), repeats)
                if swiglu:  # the fused path's SwiGLU kernel on that D
                    from onnxopt.custom_ops import swiglu as swiglu_op

                    times["swiglu_kernel"] = _median_us(lambda: swiglu_op.cuda(product, out=out8), repeats)
            if outliers:
                times["fp8_outlier_gemm"] = _median_us(lambda: cp.matmul(a_out, outlier_w.T, out=side), repeats)
                half = linear_fp8_gemm.half_gemm(outlier_w, rows)  # the cached cuBLASLt plan the op uses
                if half is not None:
                    times["fp8_outlier_lt"] = _median_us(lambda: half(a_out, side), repeats)
                    times["fp8_outlier_lt_plus_c"] = _median_us(lambda: half(a_out, side, side), repeats)
            times["fp8_epilogue"] = _median_us(lambda: epilogue(
                (rows, -(-ny // 256)), (256,), (acc, w_scale, side if outliers else null, null,
                                                null if res is None else res, out8, np.int32(n))), repeats)
            times["fp16_gemm"] = _median_us(lambda: cp.matmul(x, dense.T, out=product), repeats)  # Linear's GEMM alone
            try:
                for out_dtype in ("float32", "float16"):
                    times[f"torch_scaled_mm_{out_dtype}"] = _median_us(_torch_scaled_mm(q, w_q, x_scale, out_dtype), repeats)
            except ImportError:
                pass
        if linear_fp8_kernels.gemv_rows(rows, k) is None:
            # The host cost of a prompt length not seen before: cuBLASLt plans are cached per (weight, M),
            # so such a prefill builds one FP8 plan and one outlier plan per projection (8 a llama-8b layer)
            builds = {"fp8": [], "outlier": []}
            for extra in range(1, 6):
                start = time.perf_counter()
                linear_fp8_gemm.Fp8Gemm(w_q, x_scale, rows + extra, w_scale if fused_plan is not None else None)
                builds["fp8"].append(time.perf_counter() - start)
                if outliers:
                    start = time.perf_counter()
                    linear_fp8_gemm.HalfGemm(outlier_w, rows + extra)
                    builds["outlier"].append(time.perf_counter() - start)
            emit({"projection": name, "kind": "host_plan_build", "rows": rows,
                  **{f"{key}_us": round(1e6 * float(np.median(v)), 1) for key, v in builds.items() if v}})
        for kind, us in times.items():
            gemm_flops = 2.0 * rows * n * k
            weight_bytes = n * k * (2 if kind.startswith("fp16") else 1)
            emit({"projection": name, "kind": kind, "rows": rows, "n": n, "k": k, "us": round(us, 2),
                  "tflops": round(gemm_flops / us / 1e6, 1), "weight_gbps": round(weight_bytes / us / 1e3, 1),
                  "outliers": outliers, **({"fp8_vs_fp16_rel_l2": round(diff, 4)} if kind == "fp8" else {})})
        table[name] = times
        w_q = w_scale = index = outlier_w = dense = x = None  # free the device arrays before the next shape
        if not chain:
            cp.get_default_memory_pool().free_all_blocks()
    for path, calls in chains.items():
        if calls:
            gpu, host = _chain_us(cp, calls, chain)
            emit({"projection": "layer", "kind": f"chain_{path}", "rows": rows, "us": round(gpu, 1),
                  "host_us": round(host, 1), "passes": chain, "outliers": outliers})
            table.setdefault("layer chain", {})[path] = gpu
    linear_fp8_kernels.FUSED_SCALES, linear_fp8_kernels.SWIGLU = defaults
    chains.clear()
    cp.get_default_memory_pool().free_all_blocks()
    return table


def summary(rows: int, table: dict) -> list[str]:
    """The table of one row count: TFLOP/s where the GEMMs run, weight GB/s for decode GEMVs."""
    decode = rows <= 8
    unit = "GB/s" if decode else "TF/s"

    def rate(name, kind, us):
        n, k = PROJECTIONS[name][:2]
        return n * k * (2 if kind == "fp16" else 1) / us / 1e3 if decode else 2.0 * rows * n * k / us / 1e6

    lines = [f"rows {rows}: microseconds per projection (ratio fp16 / fp8: the speed-up of fp8)",
             f"  {'projection':<10}{'fp16':>10}{'fp8':>10}{'ratio':>8}{'fp16 ' + unit:>12}{'fp8 ' + unit:>11}  pieces"]
    chain = table.pop("layer chain", None)
    for name, times in table.items():
        pieces = ", ".join(f"{kind} {us:.1f}" for kind, us in times.items() if kind not in ("fp16", "fp8"))
        lines.append(f"  {name:<10}{times['fp16']:>10.1f}{times['fp8']:>10.1f}{times['fp16'] / times['fp8']:>8.2f}"
                     f"{rate(name, 'fp16', times['fp16']):>12.1f}{rate(name, 'fp8', times['fp8']):>11.1f}  {pieces}")
    fp16, fp8 = sum(t["fp16"] for t in table.values()), sum(t["fp8"] for t in table.values())
    lines.append(f"  {'layer':<10}{fp16:>10.1f}{fp8:>10.1f}{fp16 / fp8:>8.2f}")
    if chain:
        lines.append("  layer, projections back to back (µs a pass; fp16 / path): " + ", ".join(
            f"{path} {us:.1f} ({chain['fp16'] / us:.2f}x)" for path, us in chain.items()))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[2048, 1], help="M: tokens per call (prefill, decode)")
    ap.add_argument("--outliers", type=int, default=32, help="outlier channels per input (the fp8 default)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--fast-accum", action="store_true", help="cuBLASLt FP8 fast accumulation (fewer sum bits)")
    ap.add_argument("--chain", type=int, default=10,
                    help="also time the layer's four projections back to back this many times per path (0: off)")
    ap.add_argument("--out", help="also write the JSON lines here")
    args = ap.parse_args()
    import cupy as cp

    from onnxopt.custom_ops import linear_fp8_gemm

    linear_fp8_gemm.GEMM_FAST_ACCUM = args.fast_accum or linear_fp8_gemm.GEMM_FAST_ACCUM  # before any plan is made
    device = cp.cuda.Device()
    name = cp.cuda.runtime.getDeviceProperties(device.id)["name"].decode()
    sink = open(args.out, "w") if args.out else None

    def emit(record):
        line = json.dumps({"device": name, **record})
        print(line, flush=True)
        if sink:
            sink.write(line + "\n")

    lines = []
    for rows in args.rows:
        lines += summary(rows, probe(cp, rows, args.outliers, args.repeats, emit, args.chain))
    if sink:
        sink.close()
    print(f"\n{name}, fast accumulation {'on' if args.fast_accum else 'off'}, {args.outliers} outlier channels")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
