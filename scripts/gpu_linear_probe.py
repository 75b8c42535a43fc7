"""Time onnxopt::Linear's decode GEMV alone on the GPU against cuBLAS (CuPy matmul) on the same shapes.

    python scripts/gpu_linear_probe.py [--hidden 2048 --intermediate 8192 --heads 32 --kv-heads 8
                                        --vocab 128256 --layers 16 --rows 1]

One decoder layer's four projections (q/k/v with the norm, o with the residual, gate/up with the norm
and SwiGLU, down with the residual) times --layers, and the LM head, each captured as a CUDA graph of
--layers launches and replayed: microseconds per launch and the weight bytes read per microsecond
(GB/s), so a change of the kernel can be judged without the whole benchmark. cuBLAS runs the bare
product (no norm, activation or add), eagerly (CuPy refuses cuBLAS inside a capture), on float16
weights. `--bits 4` (or 8) times Linear on MatMulNBits-packed weights instead (block --block-size, the
LM head at 8 bits as `quantize` keeps it); GB/s then counts the packed bytes read.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from gpu_gqa_probe import _replay_us  # scripts/ is on sys.path when run as a script


def _eager_us(cp, stream, launch, count: int, replays: int) -> float:
    """Microseconds per launch, launched eagerly (CuPy refuses cuBLAS calls inside a stream capture);
    back-to-back launches of large GEMVs, so launch overhead hides behind the previous kernel."""
    for _ in range(count):
        launch()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    start.record(stream)
    for _ in range(replays * count):
        launch()
    stop.record(stream)
    stop.synchronize()
    return cp.cuda.get_elapsed_time(start, stop) * 1e3 / (replays * count)


def _captured(cp, stream, launch, count: int):
    for _ in range(count):  # warm-up: compiles, and the packed GEMV repacks each weight (not in a capture)
        launch()
    stream.synchronize()
    stream.begin_capture()
    for _ in range(count):
        launch()
    return stream.end_capture()


def _random_packed(cp, n: int, k: int, bits: int, block_size: int):
    """Random MatMulNBits B, scales and zero points of an [N, K] weight (timing only: the values do not matter)."""
    k_blocks = -(-k // block_size)
    codes = cp.random.randint(0, 256, (n, k_blocks, block_size * bits // 8), dtype=cp.uint8)
    scales = cp.full(n * k_blocks, 0.01, dtype=cp.float16)
    zero_points = cp.full(n * -(-k_blocks * bits // 8), 0x88 if bits == 4 else 0x80, dtype=cp.uint8)
    return codes, scales, zero_points


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--replays", type=int, default=50)
    ap.add_argument("--bits", type=int, default=0, choices=[0, 4, 8],
                    help="time Linear on MatMulNBits-packed weights (block --block-size; LM head 8 bits) instead of float16")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--packed-gemv", default=None, help="with --bits: linear.PACKED_GEMV (mma, half2 or simt)")
    ap.add_argument("--plans", action="store_true",
                    help="with --packed-gemv half2: time every compiled (KS, U) plan of each shape, not only the chosen one")
    ap.add_argument("--persistent", type=int, default=None, choices=[0, 1, 2],
                    help="half2 GEMV: blocks per SM of the persistent grid (linear_half2.PERSISTENT; 0: one per row group)")
    args = ap.parse_args()
    import cupy as cp

    from onnxopt.custom_ops import linear, linear_half2

    if args.persistent is not None:
        linear_half2.PERSISTENT = args.persistent
    if args.packed_gemv:
        if args.packed_gemv not in linear.PACKED_GEMVS:
            ap.error(f"--packed-gemv: one of {', '.join(linear.PACKED_GEMVS)}")
        linear.PACKED_GEMV = args.packed_gemv
    hs, inter, d = args.hidden, args.intermediate, args.hidden // args.heads
    qkv = (args.heads + 2 * args.kv_heads) * d
    # name: (N, K, input width, activation, norm, residual)
    shapes = {"qkv+norm": (qkv, hs, hs, "", True, False), "o+residual": (hs, hs, hs, "", False, True),
              "gate_up+norm+swiglu": (2 * inter, hs, hs, "swiglu", True, False), "down+residual": (hs, inter, inter, "", False, True),
              "lm_head": (args.vocab, hs, hs, "", False, False)}
    rng = np.random.default_rng(0)
    stream = cp.cuda.Stream(non_blocking=True)
    rows = []
    for name, (n, k, kx, act, norm, res) in shapes.items():
        count = 1 if name == "lm_head" else args.layers
        weights = [cp.asarray((rng.standard_normal((n, k)) * 0.02).astype(np.float16)) for _ in range(count)]
        bits = (8 if name == "lm_head" else args.bits) if args.bits else 0  # the quantizer keeps the LM head at 8
        packed = [_random_packed(cp, n, k, bits, args.block_size) for _ in range(count)] if bits else []
        x = cp.asarray(rng.standard_normal((args.rows, kx)).astype(np.float16))
        gamma = cp.asarray(np.ones(k, np.float16)) if norm else None
        residual = cp.asarray(rng.standard_normal((args.rows, n)).astype(np.float16)) if res else None
        out = cp.empty((args.rows, n // 2 if act else n), dtype=cp.float16)
        product = cp.empty((args.rows, n), dtype=cp.float16)
        xk = cp.asarray(rng.standard_normal((args.rows, k)).astype(np.float16))
        nbytes = sum(a.nbytes for a in packed[0]) if packed else n * k * 2  # codes, scales, zero points
        half2 = bool(packed) and linear.PACKED_GEMV == "half2" and linear_half2.supports(args.rows, bits, args.block_size, k, 2)
        chosen = linear_half2.plan(k, bits) if half2 else None
        chunks = k // (128 // bits) if bits else 0
        chosen = None if chosen is None else (*chosen, linear_half2.PERSISTENT)
        plans = ([(*p, persistent) for p in linear_half2.PLANS if -(-chunks // p[0]) <= 32 * p[1] for persistent in (0, 1, 2)]
                 if half2 and args.plans else [chosen])
        for plan in plans:
            with stream:
                it = iter(range(10**9))

                def ours():
                    i = next(it) % count
                    if plan is not None:
                        q, scales, zp = packed[i]
                        linear_half2.gemv(x, q, scales, zp, gamma, residual, None, out, n=n, k=k, bits=bits,
                                          block_size=args.block_size, activation=act, epsilon=1e-5, plan_override=plan)
                    elif packed:
                        q, scales, zp = packed[i]
                        linear.cuda(x, q, gamma, residual, None, scales, zp, activation=act, out=out, bits=bits,
                                    block_size=args.block_size)
                    else:
                        linear.cuda(x, weights[i], gamma, residual, activation=act, out=out)

                def cublas():
                    w = weights[next(it) % count]
                    cp.matmul(xk, w.T, out=product)

                timing = {"onnxopt": _replay_us(cp, _captured(cp, stream, ours, count), stream, args.replays) / count,
                          "cublas": _eager_us(cp, stream, cublas, count, args.replays) if plan == plans[0] else None}
            row = {"op": name, "N": n, "K": k, "bits": bits or 16, "packed_gemv": linear.PACKED_GEMV if bits else None,
                   "plan": None if plan is None else list(plan), "chosen": plan == chosen,
                   "onnxopt_us": round(timing["onnxopt"], 2), "onnxopt_GBps": round(nbytes / timing["onnxopt"] / 1e3)}
            if timing["cublas"] is not None:
                cublas_row = {"cublas_us": round(timing["cublas"], 2), "cublas_GBps": round(nbytes / timing["cublas"] / 1e3)}
            row.update(cublas_row)
            print(json.dumps(row), flush=True)
            if plan == chosen:
                rows.append(row)
        weights.clear()
        packed.clear()
    per_token = sum(r["onnxopt_us"] * (1 if r["op"] == "lm_head" else args.layers) for r in rows)
    per_token_cublas = sum(r["cublas_us"] * (1 if r["op"] == "lm_head" else args.layers) for r in rows)
    print(json.dumps({"projections_us_per_token": round(per_token, 1), "cublas_us_per_token": round(per_token_cublas, 1)}))


if __name__ == "__main__":
    main()
