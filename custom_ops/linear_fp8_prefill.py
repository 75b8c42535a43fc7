"""The prefill side of `onnxopt::LinearFp8` on the GPU (custom_ops/linear_fp8.py has the spec, the
reference and `cuda`, which calls these for rows past the decode GEMV): the quantize kernel, the
cuBLASLt FP8 GEMM with the outlier product and the epilogue in one of the paths of
custom_ops/linear_fp8_kernels.py's docstring."""

from __future__ import annotations

import numpy as np

from onnxopt.custom_ops.linear_fp8 import _ptr


def buffers(cp, rows: int):
    """The prefill's temporaries: a batch decode step of more rows than the GEMV takes (it may be
    captured) gets persistent buffers, one per kind and shape; a prefill allocates (it runs eagerly)."""
    from onnxopt.custom_ops.cuda import persistent

    small = rows <= 64

    def buffer(kind, shape, dtype):
        return persistent(f"linear_fp8_{kind}", shape, dtype) if small else cp.empty(shape, dtype=dtype)
    return buffer


def quantize(x, gamma, x_scale, outlier_index, rows: int, k: int, mode: int, epsilon: float, buffer):
    """Prefill's first kernel: x [rows, K] ([rows, 2K] in mode 2) normalized / through SwiGLU and
    quantized to E4M3 codes q [rows, K] (bytes), and its outlier channels a_out [rows, n] (or None)."""
    from onnxopt.custom_ops import linear_fp8_kernels as kernels
    from onnxopt.custom_ops.cuda import cupy

    cp = cupy()
    n_out = 0 if outlier_index is None else int(outlier_index.size)
    suffix = "half_bits" if x.dtype == cp.float16 else "float"
    q = buffer("codes", (rows, k), cp.uint8)
    a_out = buffer("outlier_inputs", (rows, n_out), x.dtype) if n_out else None
    slices = next((v for v in kernels.QUANTIZE_WARP_SLICES if k <= 256 * v), None)
    if kernels.QUANTIZE == "warp" and mode != 2 and x.dtype == cp.float16 and slices is not None:
        kernels.function(f"linear_fp8_quantize_warp<{slices}>")(
            (-(-rows // 8),), (256,),
            (x, _ptr(gamma), x_scale, _ptr(outlier_index), q, _ptr(a_out), np.int32(rows), np.int32(k),
             np.int32(n_out), np.int32(mode), np.float32(epsilon)))
    else:
        kernels.function(f"linear_fp8_quantize<{suffix}>")(
            (rows,), (kernels.THREADS,),
            (x, _ptr(gamma), x_scale, _ptr(outlier_index), q, _ptr(a_out), np.int32(k), np.int32(n_out),
             np.int32(mode), np.float32(epsilon)))
    return q, a_out


def fused_plan(weight, w_scale, x_scale, rows: int, dtype, bias, residual, act: bool, swiglu_path, cached: bool):
    """The cuBLASLt FP8 GEMM with w_scale inside and float16 D (linear_fp8_gemm.Fp8Gemm), where the
    prefill takes it (linear_fp8_kernels.FUSED_SCALES, float16, no bias, no residual with SwiGLU); else None."""
    from onnxopt.custom_ops import linear_fp8_gemm as lt
    from onnxopt.custom_ops import linear_fp8_kernels as kernels
    from onnxopt.custom_ops.cuda import cupy

    cp = cupy()
    n = weight.shape[0]
    if not (kernels.FUSED_SCALES and swiglu_path != "epilogue" and dtype == cp.float16 and w_scale.dtype == cp.float32
            and bias is None and n % 8 == 0 and not (act and residual is not None)):
        return None
    return lt.gemm(weight, x_scale, rows, w_scale, cache=cached)


def products(q, a_out, weight, w_scale, x_scale, residual, bias, outlier_weight, act: bool, out, rows: int,
              cached: bool, buffer):
    """Prefill after the quantize kernel: the FP8 GEMM, the outlier product, the epilogue (w_scale, bias,
    SwiGLU, residual) into `out` [.., Ny]; the paths of linear_fp8_kernels' docstring."""
    from onnxopt.custom_ops import linear_fp8_gemm as lt
    from onnxopt.custom_ops import linear_fp8_kernels as kernels
    from onnxopt.custom_ops import swiglu
    from onnxopt.custom_ops.cuda import cupy

    cp = cupy()
    n = weight.shape[0]
    dtype = out.dtype
    n_out = 0 if a_out is None else int(a_out.shape[1])
    path = kernels.SWIGLU if act else None
    fused = fused_plan(weight, w_scale, x_scale, rows, dtype, bias, residual, act, path, cached)
    if fused is not None:  # float16 D = x_scale w_scale q.W + C in cuBLASLt (linear_fp8_gemm docstring)
        d = buffer("d", (rows, n), dtype) if act else out.reshape(rows, n)
        # (no swiglu with a residual): the first GEMM into D reads the residual as its C (C and D may
        # differ in cuBLASLt), the second adds D; no copy of the residual into D first
        c = None if residual is None else residual.reshape(rows, n)
        if n_out:  # the outlier product into D (plus the residual), as a cuBLASLt GEMM
            side = lt.half_gemm(outlier_weight, rows) if cached else None
            if side is not None:
                side(a_out, d, c)
            elif c is not None:
                cp.add(c, cp.matmul(a_out, outlier_weight.T), out=d)
            else:
                cp.matmul(a_out, outlier_weight.T, out=d)
            c = d
        fused(q, d, c)
        if act:
            swiglu.cuda(d, out=out.reshape(rows, n // 2))
        return out
    acc = buffer("acc", (rows, n), cp.float32)
    lt.gemm(weight, x_scale, rows, cache=cached)(q, acc)
    side = None
    if n_out:
        # The outlier product [rows, n] x [n, N] as a cuBLAS GEMM (tensor cores, microseconds) into a
        # temporary the epilogue adds: its cost is that [rows, N] write and read, about what computing
        # the n products of every output inside the epilogue costs on the FMA units (n = 32, llama-8b
        # shapes: ~2.8 G FMAs per layer at 2048 rows), and the epilogue stays elementwise.
        side = buffer("outlier_product", (rows, n), dtype)
        plan = lt.half_gemm(outlier_weight, rows) if cached and dtype == cp.float16 else None
        if plan is not None:  # a cached cuBLASLt plan: a fraction of cupy.matmul's host time
            plan(a_out, side)
        else:
            cp.matmul(a_out, outlier_weight.T, out=side)
    ny = n // 2 if act else n
    suffix = "half_bits" if dtype == cp.float16 else "float"
    kernels.function(f"linear_fp8_epilogue<{suffix}, {int(act)}>")(
        (rows, -(-ny // kernels.THREADS)), (kernels.THREADS,),
        (acc, w_scale, _ptr(side), _ptr(bias), _ptr(residual), out.reshape(rows, ny), np.int32(n)))
    return out
