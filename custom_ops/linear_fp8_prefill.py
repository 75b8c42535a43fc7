"""The prefill side of `onnxopt::LinearFp8` on the GPU (custom_ops/linear_fp8.py has the spec, the
reference and `cuda`, which calls these for rows past the decode GEMV): the quantize kernel, the
cuBLASLt FP8 GEMM with the outlier product and the epilogue in one of the paths of
custom_ops/linear_fp8_kernels.py's docstring, and `cuda_mlp`, gate/up and down (the SwiGLU on down's
input) as one launch sequence that never writes gate/up's packed product with its outlier channels
(runtime/device_graph.py pairs the two ops' parts)."""

from __future__ import annotations

import os
import types

import numpy as np

from onnxopt.custom_ops.linear_fp8 import INPUTS, _check_input_activation, _checked, _compute_capability, _ptr, cuda


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


def _outlier_kernel_takes(n: int, n_out: int, outlier_weight) -> bool:
    """Whether linear_fp8_swiglu_outliers takes N (gate | up) and n outlier channels: N/2 a multiple of
    8 (16-byte units), n even and the outlier weights 4-byte aligned (32-bit operand loads)."""
    return (n // 2) % 8 == 0 and n_out % 2 == 0 and (n_out == 0 or outlier_weight.data.ptr % 4 == 0)


def swiglu_path(act: bool, n: int, n_out: int, out, outlier_weight) -> str | None:
    """linear_fp8_kernels.SWIGLU for a projection with SwiGLU: "mma" where its kernel takes the shapes
    and pointers (a 16-byte aligned output too), else "epilogue" in its place; None without SwiGLU."""
    from onnxopt.custom_ops import linear_fp8_kernels as kernels

    path = kernels.SWIGLU if act else None
    if path == "mma" and not (_outlier_kernel_takes(n, n_out, outlier_weight) and out.data.ptr % 16 == 0):
        path = "epilogue"
    return path


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


def swiglu_outliers(quant: int, d, a_out, outlier_weight, rows: int, n: int, y=None, x_scale2=None, index2=None,
                     q2=None, a2=None):
    """linear_fp8_swiglu_outliers<quant> on d [rows, N] (module linear_fp8_kernels)."""
    from onnxopt.custom_ops import linear_fp8_kernels as kernels
    from onnxopt.custom_ops.cuda import launch

    n_out = 0 if a_out is None else int(a_out.shape[1])
    n2 = 0 if index2 is None else int(index2.size)
    launch(kernels.function(f"linear_fp8_swiglu_outliers<{quant}>"), (-(-(n // 2) // 32), -(-rows // 64)), (128,),
           (d, _ptr(a_out), _ptr(outlier_weight), _ptr(y), np.int32(rows), np.int32(n), np.int32(n_out), _ptr(x_scale2),
            _ptr(index2), _ptr(q2), _ptr(a2), np.int32(n2)))


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
    path = swiglu_path(act, n, n_out, out, outlier_weight)
    fused = fused_plan(weight, w_scale, x_scale, rows, dtype, bias, residual, act, path, cached)
    if fused is not None and path == "mma":
        # float16 D = x_scale w_scale q.W, then outlier product (tensor cores) + SwiGLU in one pass over D
        d = buffer("d", (rows, n), dtype)
        fused(q, d)
        swiglu_outliers(0, d, a_out, outlier_weight, rows, n, y=out.reshape(rows, n // 2))
        return out
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


# -- gate/up and down as one launch sequence ----------------------------------------------------------

MLP_PAIR = os.environ.get("ONNXOPT_FP8_MLP_PAIR", "1") != "0"


def pairs(first_attributes: dict, second_attributes: dict) -> bool:
    """Whether two LinearFp8 nodes, the first's output the second's X and read by nothing else, run as
    `cuda_mlp`: gate/up without activation, then down with the SwiGLU input (passes/linear_fp8.py
    swiglu_input) -- the runtime's pairing (runtime/device_graph.py); off with ONNXOPT_FP8_MLP_PAIR=0."""
    return MLP_PAIR and _gate_up_and_down(first_attributes, second_attributes)


def _gate_up_and_down(first_attributes: dict, second_attributes: dict) -> bool:
    return (first_attributes.get("activation", "") == "" and first_attributes.get("input_activation", "") == ""
            and second_attributes.get("input_activation", "") == "swiglu")


def cuda_mlp(gate_up: list, down: list, *, gate_up_attributes: dict, down_attributes: dict, out=None):
    """gate/up's LinearFp8 then down's (input_activation "swiglu") on the GPU, the first's output the
    second's X: `gate_up` and `down` are their inputs in the spec's order (down's X ignored), the
    attributes their nodes'. Returns down's Y, the same values as the two `cuda` calls up to float16
    roundings.

    For prefill rows (neither op's decode GEMV), float16, gate/up without bias or residual, down's K a
    multiple of 8 and an even number of gate/up's outlier channels: gate/up's FP8 GEMM writes its
    product D without the outlier channels, and `linear_fp8_swiglu_outliers<1>` adds their product on
    the tensor cores, applies SwiGLU, rounds to float16 and quantizes with down's x_scale, writing
    down's codes and outlier channels; down's GEMMs follow. So gate/up's outlier product makes no pass
    over its [rows, 2K] output (its own GEMM and D as the FP8 GEMM's C: 235 MB a layer for llama-8b at
    2048 rows), and down's quantize kernel is that kernel. Otherwise the two `cuda` calls."""
    from onnxopt.custom_ops import linear_fp8_kernels as kernels
    from onnxopt.custom_ops.cuda import GpuUnavailable, cupy, device_id, persistent

    cp = cupy()
    if _compute_capability(device_id()) < 89:
        raise GpuUnavailable(f"LinearFp8 needs compute capability 8.9+; device {device_id()} has "
                             f"{_compute_capability(device_id())}")
    gate_up = list(gate_up) + [None] * (len(INPUTS) - len(gate_up))
    down = list(down) + [None] * (len(INPUTS) - len(down))
    x, weight, gamma, residual, bias, w_scale, x_scale, index, outlier_weight = gate_up
    n1, k1 = weight.shape
    rows = int(np.prod(x.shape[:-1], dtype=np.int64))
    k2 = down[1].shape[1]
    fits = (_gate_up_and_down(gate_up_attributes, down_attributes)
            and x.dtype == cp.float16 and bias is None and residual is None and n1 == 2 * k2
            and _outlier_kernel_takes(n1, 0 if index is None else int(index.size), outlier_weight)
            and rows > 0 and x.flags.c_contiguous
            and kernels.gemv_rows(rows, k1) is None and kernels.gemv_rows(rows, k2) is None
            and all(a is None or a.flags.c_contiguous for a in gate_up[1:] + down[1:]))
    plan = fused_plan(weight, w_scale, x_scale, rows, x.dtype, None, None, False, None, True) if fits else None
    if plan is None:
        mid_shape = (*x.shape[:-1], n1)
        mid = persistent("linear_fp8_mlp_mid", mid_shape, x.dtype) if rows <= 64 else cp.empty(mid_shape, x.dtype)
        cuda(*gate_up, out=mid, **gate_up_attributes)
        return cuda(mid, *down[1:], out=out, **down_attributes)
    _, w2, gamma2, residual2, bias2, w_scale2, x_scale2, index2, outlier_weight2 = down
    activation2 = down_attributes.get("activation", "")
    _check_input_activation(down_attributes.get("input_activation", ""), gamma2)
    packed = types.SimpleNamespace(shape=(*x.shape[:-1], n1), dtype=x.dtype)  # gate/up's output, never made
    _, out = _checked(cp, packed, w2, gamma2, residual2, bias2, w_scale2, x_scale2, index2, outlier_weight2,
                      activation2 == "swiglu", out, True)
    buffer = buffers(cp, rows)
    q, a_out = quantize(x.reshape(rows, k1), gamma, x_scale, index, rows, k1, 1 if gamma is not None else 0,
                         float(gate_up_attributes.get("epsilon", 1e-5)), buffer)
    d = buffer("mlp_d", (rows, n1), x.dtype)
    plan(q, d)
    n2 = 0 if index2 is None else int(index2.size)
    q2 = buffer("mlp_codes", (rows, k2), cp.uint8)
    a2 = buffer("mlp_outlier_inputs", (rows, n2), x.dtype) if n2 else None
    swiglu_outliers(1, d, a_out, outlier_weight, rows, n1, x_scale2=x_scale2, index2=index2, q2=q2, a2=a2)
    return products(q2, a2, w2, w_scale2, x_scale2, residual2, bias2, outlier_weight2, activation2 == "swiglu", out,
                     rows, True, buffer)
