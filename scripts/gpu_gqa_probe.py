"""Time onnxopt::GroupQueryAttention's decode kernel alone on the GPU (CUDA-graph replay of L layers),
or with --prefill its prefill launches (rotary + append, attention) on prompts of the given lengths.

    python scripts/gpu_gqa_probe.py [--heads 32 --kv-heads 8 --head-size 64 --tmax 256 1280]
        [--kernel gqa_decode_vec gqa_attend_vec] [--round-rows 2 4 8] [--threads 256 512]
    python scripts/gpu_gqa_probe.py --prefill 512 2048 --head-size 128 [--kernel gqa_flash_prefill/4/1 gqa_flash_prefill/4/1/0 gqa_flash_prefill/8/2 gqa_attend]

Prints microseconds per launch for the captured decode step (one launch per layer), or per prefill
layer (CUDA events around the eager launches, the median of --replays) with the attention's TFLOPS
(causal: S (S + 1) / 2 scores per head, 4 D flops each), so a change of a kernel can be judged
without the whole benchmark.
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def _replay_us(cp, graph, stream, replays: int) -> float:
    """Microseconds per replay of a captured graph (one warm-up replay first)."""
    graph.launch(stream)
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    start.record(stream)
    for _ in range(replays):
        graph.launch(stream)
    stop.record(stream)
    stop.synchronize()
    return cp.cuda.get_elapsed_time(start, stop) * 1e3 / replays


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-size", type=int, default=64)
    ap.add_argument("--tmax", type=int, nargs="+", default=[256, 1280, 4096])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--replays", type=int, default=200)
    ap.add_argument("--kernel", nargs="+", default=None,
                    help="kernels to time (group_query_attention.DECODE_KERNEL, or PREFILL_KERNEL with --prefill)")
    ap.add_argument("--round-rows", type=int, nargs="+", default=None,
                    help="decode: the vec kernels' key rows a thread has in flight (group_query_attention.ROUND_ROWS, "
                         "ATTEND_ROUND_ROWS) to sweep")
    ap.add_argument("--threads", type=int, nargs="+", default=None,
                    help="decode: the vec kernels' largest block (group_query_attention.VEC_THREADS) to sweep")
    ap.add_argument("--prefill", type=int, nargs="+", default=None, help="time the prefill of prompts this long")
    args = ap.parse_args()
    import cupy as cp

    from onnxopt.custom_ops import group_query_attention as gqa

    if args.prefill:
        prefill(cp, gqa, args)
        return
    args.kernel = args.kernel or ["gqa_decode_vec", "gqa_attend_vec"]

    h, hk, d, b = args.heads, args.kv_heads, args.head_size, args.batch
    rows = []
    # baseline: an empty kernel per layer, same graph shape (launch gaps inside a replayed graph)
    empty = cp.RawKernel(r'extern "C" __global__ void empty_kernel(int* x) { if (x[0] == 12345) x[0] = 0; }', "empty_kernel")
    flag = cp.zeros(1, dtype=cp.int32)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        for _ in range(args.layers):
            empty((32,), (128,), (flag,))
        graph = stream.end_capture()
        print(json.dumps({"empty_kernel_us": round(_replay_us(cp, graph, stream, args.replays) / args.layers, 2)}))
    sweep = [(k, t, u, n) for k in args.kernel
             for u in args.round_rows or [gqa.decode_round_rows(args.head_size) if k == "gqa_decode_vec" else gqa.ATTEND_ROUND_ROWS]
             for n in args.threads or [gqa.VEC_THREADS] for t in args.tmax]
    for kernel, tmax, round_rows, threads in sweep:
        gqa.DECODE_KERNEL, gqa.ROUND_ROWS, gqa.ATTEND_ROUND_ROWS, gqa.VEC_THREADS = kernel, round_rows, round_rows, threads
        rng = np.random.default_rng(0)
        layers = []
        for _ in range(args.layers):
            kv = [cp.asarray(rng.standard_normal((b, hk, tmax, d)).astype(np.float16)) for _ in range(2)]
            layers.append((cp.asarray(rng.standard_normal((b, 1, (h + 2 * hk) * d)).astype(np.float16)), *kv,
                           cp.empty((b, 1, h * d), dtype=cp.float16)))
        cos = cp.asarray(rng.standard_normal((tmax, d // 2)).astype(np.float16))
        sin = cp.asarray(rng.standard_normal((tmax, d // 2)).astype(np.float16))
        seqlens = cp.full(b, tmax - 2, dtype=cp.int32)  # a nearly full cache
        total = np.array(tmax, np.int32)
        stream = cp.cuda.Stream(non_blocking=True)
        with stream:
            def step():
                for qkv, k, v, out in layers:
                    gqa.cuda(qkv, None, None, k, v, seqlens, total, cos, sin, num_heads=h, kv_num_heads=hk, do_rotary=1,
                             out=(out, k, v))
            step()
            stream.synchronize()
            stream.begin_capture()
            step()
            graph = stream.end_capture()
            us = _replay_us(cp, graph, stream, args.replays) / args.layers
        kv_bytes = 2 * b * hk * (tmax - 1) * d * 2
        threads, chunk, splits, _ = gqa.launch_shape(1, tmax, False, h // hk, d, 2, round_rows)
        rows.append({"kernel": kernel, "tmax": tmax, "length": tmax - 1, "round_rows": round_rows, "threads": threads,
                     "chunk": chunk, "splits": splits, "us_per_layer": round(us, 2),
                     "kv_GBps": round(kv_bytes / us / 1e3, 1)})
        print(json.dumps(rows[-1]))


def prefill(cp, gqa, args) -> None:
    """Prefill launches of one layer per prompt length and kernel: median of --replays timings."""
    h, hk, d, b = args.heads, args.kv_heads, args.head_size, args.batch
    for kernel, s in [(k, n) for k in (args.kernel or ["gqa_flash_prefill", "gqa_attend"]) for n in args.prefill]:
        name = kernel
        kernel, *variant = kernel.split("/")  # gqa_flash_prefill/W/S[/M]: FLASH_WARPS W, FLASH_STAGES S, FLASH_SKIP_MASK M
        gqa.PREFILL_KERNEL = kernel
        gqa.FLASH_WARPS, gqa.FLASH_STAGES = (int(variant[0]), int(variant[1])) if variant else (4, 1)
        gqa.FLASH_SKIP_MASK = int(variant[2]) if len(variant) > 2 else 1
        rng = np.random.default_rng(0)
        qkv = cp.asarray(rng.standard_normal((b, s, (h + 2 * hk) * d)).astype(np.float16))
        k, v = (cp.zeros((b, hk, s, d), dtype=cp.float16) for _ in range(2))
        out = cp.empty((b, s, h * d), dtype=cp.float16)
        cos = cp.asarray(rng.standard_normal((s, d // 2)).astype(np.float16))
        sin = cp.asarray(rng.standard_normal((s, d // 2)).astype(np.float16))
        seqlens = cp.full(b, s - 1, dtype=cp.int32)
        total = np.array(s, np.int32)
        times = []
        for _ in range(args.replays + 1):
            start, stop = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            gqa.cuda(qkv, None, None, k, v, seqlens, total, cos, sin, num_heads=h, kv_num_heads=hk, do_rotary=1,
                     out=(out, k, v))
            stop.record()
            stop.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, stop) * 1e3)
        us = float(np.median(times[1:]))
        flops = 4.0 * d * h * b * s * (s + 1) / 2
        print(json.dumps({"kernel": name, "prompt": s, "heads": f"{h}/{hk}x{d}", "us_per_layer": round(us, 1),
                          "attention_TFLOPS": round(flops / us / 1e6, 1)}))


if __name__ == "__main__":
    main()
