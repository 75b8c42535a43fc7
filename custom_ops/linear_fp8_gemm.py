"""The cuBLASLt GEMMs of `onnxopt::LinearFp8`'s prefill (custom_ops/linear_fp8.py runs them between
custom_ops/linear_fp8_kernels.py's quantize and epilogue kernels): the FP8 GEMM (`Fp8Gemm`, `gemm`) and
the float16 outlier GEMM (`HalfGemm`, `half_gemm`), each a cached plan per (weight, row bucket).

Why nvmath's low-level bindings (nvmath.bindings.cublasLt) and not `nvmath.linalg.advanced.Matmul`:
the stateful Matmul takes NumPy, CuPy or torch operands and reads their dtype names, and CuPy has no
float8 dtype (ml_dtypes types are not CuPy dtypes), so FP8 operands would need torch, which onnxopt
must not need at run time. The bindings take device pointers: the plan (descriptor, layouts, algorithm
from the heuristic, workspace) is made once per (weight, x_scale, rows) and cached; a call is one
cublasLtMatmul on the current CuPy stream, with no synchronization and no allocation (capturable).
cuBLASLt's FP8 GEMM on sm_89/sm_90 takes the "TN" layout only: in its column-major terms
D[N, M] = op(A) op(B) with A = W stored [N, K] row-major (= [K, N] column-major, transposed) and
B = q [M, K] row-major (= [K, M] column-major, not transposed); D [N, M] column-major is our row-major
[M, N]. A's scale is 1, B's is x_scale (a device pointer: the op's x_scale input).
"""

from __future__ import annotations

import logging
import os

import numpy as np

WORKSPACE = 32 * 1024 * 1024  # cuBLASLt workspace (the size NVIDIA recommends for Hopper)
# CUBLASLT_MATMUL_DESC_FAST_ACCUM. On (the default since 2026-12-06) the tensor cores keep Hopper's FP8
# partial sums in their own narrower accumulator: each FP8 GEMM 8-16 % faster on the llama-8b shapes, and
# SmolLM2's fp8 perplexity through the CUDA runtime 21.5382 -> 21.5577 (+0.09 %; H100, docs/QUANTIZATION.md).
# ONNXOPT_FP8_FAST_ACCUM=0 promotes them to float32, as the CPU Q/DQ graph sums.
def _switch(name: str, default: str) -> bool:
    """A 0/1 setting from the environment; another value warns and takes the default."""
    value = os.environ.get(name, "") or default
    if value not in ("0", "1"):
        logging.getLogger(__name__).warning("%s=%r is not 0 or 1; using %s", name, value, default)
        value = default
    return value == "1"


GEMM_FAST_ACCUM = _switch("ONNXOPT_FP8_FAST_ACCUM", "1")
# Plans are made per row bucket (`plan_rows`: the next power of two, at least PLAN_MIN_ROWS): one
# heuristic query per (weight, bucket), its algorithm run for every row count in the bucket (a layout
# pair per row count, made once). A prompt length not seen before then builds no plan in its bucket:
# a plan is ~0.1-0.2 ms of host time (H100, 2026-12-06: 222 us a projection when the probe rebuilt one
# per call), and a prefill builds two per projection, 256 for llama-8b. The algorithm is checked for each
# new row count (cublasLtMatmulAlgoCheck); where cuBLASLt refuses it, that row count gets its own plan.
PLAN_MIN_ROWS = 64
# A plan's algorithm: cuBLASLt's first heuristic, or with AUTOTUNE (env ONNXOPT_FP8_AUTOTUNE=1) the fastest
# of its first ALGO_CANDIDATES, timed on the plan's own shapes once per (kind, M bucket, N, K, types) and
# reused by every plan of that problem (TensorRT-LLM profiles its GEMMs the same way, ahead of time). The
# timing runs at the first prefill of a new bucket (about 8 x 4 GEMMs a shape), never inside a stream
# capture. Off until an H100 shows it faster end to end.
AUTOTUNE = _switch("ONNXOPT_FP8_AUTOTUNE", "0")
ALGO_CANDIDATES = 8
_TUNED: dict[tuple, int] = {}  # problem -> index of the fastest candidate
_PLAN_CACHE_SIZE = 4096
_LAYOUTS_PER_PLAN = 64


def _nvmath():
    """(cublasLt bindings, cublas bindings, nvmath) or GpuUnavailable naming the extra to install."""
    from onnxopt.custom_ops.cuda import GpuUnavailable

    try:
        import nvmath
        from nvmath.bindings import cublas, cublasLt
    except ImportError as e:
        raise GpuUnavailable("LinearFp8's prefill GEMM needs nvmath-python (cuBLASLt bindings): "
                             "pip install 'onnxopt[gpu]' (nvmath-python>=1.0)") from e
    return cublasLt, cublas, nvmath


class _LtPlan:
    """One cuBLASLt matmul plan in our row-major terms, D [M, N] = alpha op(q [M, K] @ W [N, K]^T) + beta C
    (cuBLASLt's TN, module docstring): descriptor, layouts, the heuristic's first algorithm, and the
    workspace. Subclasses set the types and the scale attributes; `__call__(q, d, c)` is one
    cublasLtMatmul on the current CuPy stream (no synchronization, no allocation: capturable)."""

    def _build(self, weight, m: int, *, ab_type, d_type, scales, refused) -> None:
        from onnxopt.custom_ops.cuda import cupy, persistent

        lt, cublas, nvmath = _nvmath()
        cp = cupy()
        self._lt = lt
        n, k = weight.shape
        self.shape = (m, n, k)  # m: the most rows (the bucket's); fewer take layouts of their own
        self._types = (ab_type, d_type)
        self._layouts: dict[int, tuple[int, int]] = {}  # rows below m -> (b, d) layouts
        self._exact: dict[int, _LtPlan] = {}  # rows whose layouts cuBLASLt refused the bucket's algorithm for
        self.remake = None  # rows -> a plan of this kind for exactly those rows (set by gemm / half_gemm)
        self.weight = weight  # kept alive: the plan holds its pointer (and the cache's key)
        self.handle = _handle(lt)
        self.workspace = persistent("linear_fp8_workspace", (WORKSPACE,), np.uint8)
        f32 = nvmath.CudaDataType.CUDA_R_32F
        self.desc = lt.matmul_desc_create(cublas.ComputeType.COMPUTE_32F, f32)
        attr = lt.MatmulDescAttribute
        self._set(attr.TRANSA, int(cublas.Operation.T))
        self._set(attr.TRANSB, int(cublas.Operation.N))
        scales(lt, attr)
        self.a_layout = lt.matrix_layout_create(ab_type, k, n, k)  # W: [K, N] column-major, op T
        self.b_layout = lt.matrix_layout_create(ab_type, k, m, k)  # q: [K, M] column-major, op N
        self.d_layout = lt.matrix_layout_create(d_type, n, m, n)  # D: [N, M] column-major = [M, N] row-major
        pref = lt.matmul_preference_create()
        size = np.array([WORKSPACE], dtype=lt.get_matmul_preference_attribute_dtype(
            lt.MatmulPreferenceAttribute.MAX_WORKSPACE_BYTES))
        lt.matmul_preference_set_attribute(pref, lt.MatmulPreferenceAttribute.MAX_WORKSPACE_BYTES, size.ctypes.data,
                                           size.nbytes)
        wanted = ALGO_CANDIDATES if AUTOTUNE else 1
        self._candidates = lt.MatmulHeuristicResult(wanted)  # kept alive: self.algo points into it
        found = np.zeros(1, dtype=np.int32)
        try:
            with cp.cuda.Device(weight.device.id):
                lt.matmul_algo_get_heuristic(self.handle, self.desc, self.a_layout, self.b_layout, self.d_layout,
                                             self.d_layout, pref, wanted, self._candidates.ptr, found.ctypes.data)
        except lt.cuBLASLtError as e:
            refused(f"cuBLASLt refused the plan for M, N, K = {self.shape}: {e}", e)
        finally:
            lt.matmul_preference_destroy(pref)
        if found[0] < 1:
            refused(f"cuBLASLt has no plan for M, N, K = {self.shape}", None)
        self.alpha = np.ones(1, dtype=np.float32)  # host scalars (pointer mode host)
        self.beta = np.zeros(1, dtype=np.float32)
        self.beta_one = np.ones(1, dtype=np.float32)
        # the call's constant arguments, read once (ndarray.ctypes.data costs microseconds a call)
        self._alpha_ptr, self._beta_ptrs = self.alpha.ctypes.data, (self.beta.ctypes.data, self.beta_one.ctypes.data)
        self._w_ptr, self._ws_ptr = weight.data.ptr, self.workspace.data.ptr
        self.algo_index = self._tuned(int(found[0])) if AUTOTUNE and found[0] > 1 else 0
        self.algo = self._candidate(self.algo_index) if self.algo_index else self._candidates

    def _candidate(self, index: int):
        """The heuristic result `index` (its first member is the algorithm cublasLtMatmul takes)."""
        size = self._lt.matmul_heuristic_result_dtype.itemsize
        return self._lt.MatmulHeuristicResult.from_ptr(self._candidates.ptr + index * size, 1)

    def _tuned(self, count: int) -> int:
        """Index of the fastest of `count` candidates on this plan's problem (AUTOTUNE): each run on
        zeroed operands of the bucket's shape, 1 + 3 times between CUDA events, the median of the 3 kept;
        cached per problem. Inside a stream capture (a captured batch decode past the GEMV's rows): 0."""
        from onnxopt.custom_ops.cuda import cupy

        cp = cupy()
        key = self.problem
        if key in _TUNED:
            return _TUNED[key]
        stream = cp.cuda.get_current_stream()
        if stream.is_capturing():
            return 0
        m, n, k = self.shape
        dtypes = {int(t): d for t, d in self._dtype_map().items()}
        q = cp.zeros((m, k), dtype=dtypes[int(self._types[0])])
        d = cp.zeros((m, n), dtype=dtypes[int(self._types[1])])
        times = []
        for index in range(count):
            algo = self._candidate(index)
            try:
                samples = []
                for run in range(4):
                    start, stop = cp.cuda.Event(), cp.cuda.Event()
                    start.record(stream)
                    self._enqueue(algo.ptr, q, d, None, self.b_layout, self.d_layout)
                    stop.record(stream)
                    stop.synchronize()
                    if run:
                        samples.append(cp.cuda.get_elapsed_time(start, stop))
                times.append(sorted(samples)[1])
            except self._lt.cuBLASLtError:  # a candidate that does not run here
                times.append(float("inf"))
        _TUNED[key] = best = int(np.argmin(times))
        return best

    @property
    def problem(self) -> tuple:
        """What the timing depends on, AUTOTUNE's cache key: kind, (M bucket, N, K), types, W scaled, fast
        accumulation."""
        return (type(self).__name__, self.shape, tuple(int(t) for t in self._types),
                getattr(self, "w_scale", None) is not None, GEMM_FAST_ACCUM)

    def _dtype_map(self) -> dict:
        _, _, nvmath = _nvmath()
        types = nvmath.CudaDataType
        return {types.CUDA_R_8F_E4M3: np.uint8, types.CUDA_R_16F: np.float16, types.CUDA_R_32F: np.float32}

    def _enqueue(self, algo_ptr: int, q, d, c, b_layout, d_layout) -> None:
        """One cublasLtMatmul on the current CuPy stream (D = alpha op(W) q + beta C, C = D where None)."""
        from onnxopt.custom_ops.cuda import cupy

        self._lt.matmul(self.handle, self.desc, self._alpha_ptr, self._w_ptr, self.a_layout,
                        q.data.ptr, b_layout, self._beta_ptrs[c is not None], (d if c is None else c).data.ptr,
                        d_layout, d.data.ptr, d_layout, algo_ptr, self._ws_ptr, WORKSPACE,
                        cupy().cuda.get_current_stream().ptr)

    def _set(self, attribute, value: int) -> None:
        buf = np.array([value], dtype=self._lt.get_matmul_desc_attribute_dtype(attribute))
        self._lt.matmul_desc_set_attribute(self.desc, attribute, buf.ctypes.data, buf.nbytes)

    def _layouts_for(self, rows: int) -> tuple[int, int]:
        """(b, d) layouts of `rows` rows (the plan's own for its bucket's count; made once for fewer)."""
        if rows == self.shape[0]:
            return self.b_layout, self.d_layout
        got = self._layouts.get(rows)
        if got is None:
            _, n, k = self.shape
            ab_type, d_type = self._types
            if len(self._layouts) >= _LAYOUTS_PER_PLAN:  # host descriptors, read when a call is enqueued
                for layout in self._layouts.pop(next(iter(self._layouts))):
                    self._lt.matrix_layout_destroy(layout)
            got = self._layouts[rows] = (self._lt.matrix_layout_create(ab_type, k, rows, k),
                                         self._lt.matrix_layout_create(d_type, n, rows, n))
        return got

    def __call__(self, q, d, c=None) -> None:

        m, n, k = self.shape
        rows = q.shape[0]
        assert 0 < rows <= m and q.shape == (rows, k) and d.shape == (rows, n)
        assert q.flags.c_contiguous and d.flags.c_contiguous
        assert c is None or (c.shape == d.shape and c.dtype == d.dtype and c.flags.c_contiguous)
        exact = self._exact.get(rows)
        if exact is not None:
            return exact(q, d, c)
        fresh = rows != m and rows not in self._layouts
        b_layout, d_layout = self._layouts_for(rows)
        if fresh and not self._algo_takes(b_layout, d_layout):
            # the bucket's algorithm does not take this row count (cublasLtMatmulAlgoCheck): a plan of its own
            if self.remake is None:
                raise RuntimeError(f"cuBLASLt: the plan for {m} rows does not take {rows}")
            exact = self._exact[rows] = self.remake(rows)
            return exact(q, d, c)
        # the algorithm is the heuristic result's first member (cublasLtMatmulHeuristicResult_t.algo)
        self._enqueue(self.algo.ptr, q, d, c, b_layout, d_layout)

    def _algo_takes(self, b_layout, d_layout) -> bool:
        """Whether the plan's algorithm runs on these layouts (cublasLtMatmulAlgoCheck, once per row count)."""
        result = self._lt.MatmulHeuristicResult(1)
        try:
            self._lt.matmul_algo_check(self.handle, self.desc, self.a_layout, b_layout, d_layout, d_layout,
                                       self.algo.ptr, result.ptr)
        except self._lt.cuBLASLtError:
            return False
        return True


class Fp8Gemm(_LtPlan):
    """D [M, N] float32 = x_scale * q [M, K] @ W [N, K]^T for E4M3 q and W (bytes on the device), one
    cuBLASLt plan (module docstring); `__call__(q, d)` launches on the current CuPy stream.

    With `w_scale` (float32 [N] on the device), D is float16 = x_scale * w_scale[n] * (q @ W^T)[:, n]
    + C: W's scale is cuBLASLt's outer-vector scale (CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F, one
    per row of its A), the sum is rounded once to float16, and `__call__(q, d, c)` adds a float16
    C [M, N] (beta 1; C may be D). No epilogue kernel then reads a float32 D back. Raises
    NotImplementedError where cuBLASLt or the bindings have no such plan."""

    def __init__(self, weight, x_scale, m: int, w_scale=None):
        from onnxopt.custom_ops.cuda import cupy, persistent

        _, _, nvmath = _nvmath()
        cp = cupy()
        # kept alive: the plan holds their pointers (and the cache's key: no other array can take them)
        self.x_scale, self.w_scale = x_scale, w_scale
        self.one = persistent("linear_fp8_one", (1,), np.float32)
        self.one.fill(1.0)

        def scales(lt, attr):
            if w_scale is not None:  # cuBLAS's A is W: one scale per output channel
                mode, vector = getattr(attr, "A_SCALE_MODE", None), getattr(lt, "MatmulMatrixScale", None)
                if mode is None or vector is None or not hasattr(vector, "OUTER_VEC_32F"):
                    raise NotImplementedError("nvmath-python's cuBLASLt bindings have no outer-vector scale mode")
                self._set(mode, int(vector.OUTER_VEC_32F))
                self._set(attr.A_SCALE_POINTER, w_scale.data.ptr)
                # B (q) as an outer vector too, x_scale in each of its M entries: cuBLASLt refused an outer
                # vector for A with a scalar for B (CUBLAS_STATUS_INVALID_VALUE, H100, 2026-12-06)
                self.x_scales = cp.empty(m, dtype=cp.float32)
                self.x_scales[...] = x_scale.reshape(())
                self._set(attr.B_SCALE_MODE, int(vector.OUTER_VEC_32F))
                self._set(attr.B_SCALE_POINTER, self.x_scales.data.ptr)
            else:  # scale 1
                self._set(attr.A_SCALE_POINTER, self.one.data.ptr)
                self._set(attr.B_SCALE_POINTER, x_scale.data.ptr)  # B is q: the activation scale
            self._set(attr.FAST_ACCUM, int(GEMM_FAST_ACCUM))

        def refused(message, error):
            if w_scale is not None:
                raise NotImplementedError(f"outer-vector FP8 GEMM: {message}") from error
            raise RuntimeError(f"FP8 GEMM (E4M3 TN, float32 D): {message}") from error

        f16, f32 = nvmath.CudaDataType.CUDA_R_16F, nvmath.CudaDataType.CUDA_R_32F
        self._build(weight, m, ab_type=nvmath.CudaDataType.CUDA_R_8F_E4M3, d_type=f16 if w_scale is not None else f32,
                    scales=scales, refused=refused)


class HalfGemm(_LtPlan):
    """D [M, N] float16 = a [M, n] @ W [N, n]^T (+ C), float32 sums: the outlier product of the fused
    path written straight into the output, or plus the residual (`__call__(a, d, residual)`),
    where the FP8 GEMM then adds its part (module docstring). One cached cuBLASLt plan, like Fp8Gemm."""

    def __init__(self, weight, m: int):
        _, _, nvmath = _nvmath()

        def refused(message, error):
            raise RuntimeError(f"outlier GEMM (float16 TN): {message}") from error

        f16 = nvmath.CudaDataType.CUDA_R_16F
        self._build(weight, m, ab_type=f16, d_type=f16, scales=lambda lt, attr: None, refused=refused)


_HANDLES: dict[int, int] = {}
_PLANS: dict[tuple, Fp8Gemm] = {}


def _handle(lt) -> int:
    from onnxopt.custom_ops.cuda import device_id

    device = device_id()
    if device not in _HANDLES:
        _HANDLES[device] = lt.create()
    return _HANDLES[device]


def _plan(key, make, refusals: tuple):
    """The plan cached under `key` (None: not cached), made by `make()` when missing; None, remembered,
    where `make` raises one of `refusals` (the caller's fallback then costs nothing the next time). The
    oldest plan goes past _PLAN_CACHE_SIZE."""
    if key is not None and key in _PLANS:
        return _PLANS[key]
    try:
        plan = make()
    except refusals:
        plan = None
    if key is not None:
        if len(_PLANS) >= _PLAN_CACHE_SIZE:
            _PLANS.pop(next(iter(_PLANS)))
        _PLANS[key] = plan
    return plan


def release(pointers) -> int:
    """Drop the cached plans of the weights at these device pointers (key[1]; a runtime's constants, as
    the runtime goes away: runtime/device_graph.py). A plan holds its weight and scales, so without this
    a dropped runtime's FP8 weights would stay on the device until later plans evict theirs. Returns
    how many plans went."""
    from onnxopt.custom_ops.cuda import drop_weights

    return drop_weights(_PLANS, pointers)


def plan_rows(m: int) -> int:
    """The row bucket of M rows: the plan made for it serves every row count up to it."""
    return max(PLAN_MIN_ROWS, 1 << (max(1, m) - 1).bit_length())


def _with_remake(plan, remake):
    if plan is not None:
        plan.remake = remake
    return plan


def half_gemm(weight, m: int) -> HalfGemm | None:
    """The cached outlier-GEMM plan for (device, weight, M's bucket) (HalfGemm), or None where cuBLASLt
    has none (the caller multiplies through CuPy then). Call it with M rows (at most its bucket)."""
    from onnxopt.custom_ops.cuda import device_id

    cap = plan_rows(m)
    return _plan((device_id(), weight.data.ptr, tuple(weight.shape), cap, "half"),
                 lambda: _with_remake(HalfGemm(weight, cap), lambda rows: HalfGemm(weight, rows)), (RuntimeError,))


def gemm(weight, x_scale, m: int, w_scale=None, *, cache: bool = True) -> Fp8Gemm | None:
    """The cached plan for (device, weight, x_scale, M's bucket[, w_scale], GEMM_FAST_ACCUM), for calls of M rows (at
    most the bucket). With w_scale (Fp8Gemm's float16 form): None where cuBLASLt has no such plan.
    `cache=False`: a plan for exactly this call's M only (operands that are one call's copies)."""
    from onnxopt.custom_ops.cuda import device_id

    if not cache:
        return _plan(None, lambda: Fp8Gemm(weight, x_scale, m, w_scale), () if w_scale is None else (NotImplementedError,))
    cap = plan_rows(m)
    key = (device_id(), weight.data.ptr, tuple(weight.shape), x_scale.data.ptr, cap,
           None if w_scale is None else w_scale.data.ptr, GEMM_FAST_ACCUM)
    return _plan(key, lambda: _with_remake(Fp8Gemm(weight, x_scale, cap, w_scale),
                                           lambda rows: Fp8Gemm(weight, x_scale, rows, w_scale)),
                 () if w_scale is None else (NotImplementedError,))
