"""GPU time of the batch-1 float16 GEMVs of a decode step under cuBLAS, against the copy bandwidth.

    python scripts/gpu_gemv_probe.py [llama-1b|llama-8b ...]

Per weight shape [K, N] (x [1, K]): µs per call, 200 calls replayed from one torch CUDA graph (so
Python launch cost is excluded; CuPy refuses cuBLAS calls inside a capture), and the GB/s of reading
W; then the per-token sum over the shape's layers and LM head. The same weight is read back to back,
so a matrix that fits in L2 (50 MB on an H100) reads faster than HBM allows.

Measured 2026-11-24 on the lent H100 (ORT/torch cuBLAS, CUDA 13): the GEMVs of the llama-1b shape
sum to 0.897 ms a token and those of llama-8b to 5.43 ms, against decode steps of 1.493 ms and
6.545 ms (onnxopt, CUDA graph): about 0.6 ms (1b) and 1.1 ms (8b) a token go to the other ops. A
split-K CuPy GEMV tried the same day was slower than cuBLAS on every shape (1b sum 1.29 ms) and
was not kept.
"""

import sys

SHAPES = {  # (hidden, intermediate, layers, q+k+v width, vocab)
    "llama-1b": (2048, 8192, 16, 2048 + 2 * 512, 128256),
    "llama-8b": (4096, 14336, 32, 4096 + 2 * 1024, 128256),
}


def time_matmul(k: int, n: int, reps: int = 200) -> float:
    """cuBLAS GPU time per call (fp16 x [1, K] @ W [K, N]), `reps` calls in one CUDA graph."""
    import torch

    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    w = torch.randn(k, n, device="cuda", dtype=torch.float16)
    out = torch.empty(1, n, device="cuda", dtype=torch.float16)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        for _ in range(10):
            torch.matmul(x, w, out=out)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            torch.matmul(x, w, out=out)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / reps


def main() -> None:
    for shape in sys.argv[1:] or ["llama-1b"]:
        h, inter, layers, qkv, vocab = SHAPES[shape]
        rows = [("qkv", h, qkv), ("o", h, h), ("gate_up", h, 2 * inter), ("down", inter, h), ("lm_head", h, vocab)]
        total = 0.0
        print(f"{shape}: weight [K, N] fp16, x [1, K], cuBLAS")
        for name, k, n in rows:
            us = time_matmul(k, n)
            count = 1 if name == "lm_head" else layers
            total += us * count
            print(f"  {name:<8} [{k:>5}, {n:>6}] x{count:<3} {us:7.1f} µs {k * n * 2 / us / 1e3:6.0f} GB/s")
        print(f"  sum of GEMVs per token: {total / 1000:.3f} ms")


if __name__ == "__main__":
    main()
