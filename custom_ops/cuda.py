"""CuPy access for the `onnxopt` kernels: a lazy import and kernels compiled once per device.

CuPy is an optional dependency (the `gpu` extra); nothing here imports it at module import time, so
the CPU install can import every op module. Kernels are CUDA C compiled by NVRTC through public CuPy
APIs (`cupy.RawModule`, `cupy.ElementwiseKernel`) and memoized per (device, kernel): the first call on a
device compiles (CuPy also keeps its on-disk cache), later calls reuse the loaded module.

    cp = cupy()                                   # or a GpuUnavailable error saying what to install
    fn = raw_function("sampling", SOURCE, "sample_rows<float>")
    ew = elementwise("swiglu", lambda cp: cp.ElementwiseKernel(...))
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from collections.abc import Callable
from types import ModuleType

from onnxopt.errors import UserError


class GpuUnavailable(UserError):
    """CuPy or a CUDA device is missing; the message says what to install or use instead."""


logger = logging.getLogger(__name__)

_MODULES: dict[tuple[int, str], object] = {}
_ELEMENTWISE: dict[tuple[int, str], object] = {}


def cupy() -> ModuleType:
    """The cupy module, or GpuUnavailable naming the extra to install."""
    try:
        import cupy as cp
    except ImportError as e:
        raise GpuUnavailable(
            "CuPy is not installed: the CUDA runtime needs the `gpu` extra (pip install 'onnxopt[gpu]', "
            "which brings cupy-cuda13x and onnxruntime-gpu)"
        ) from e
    return cp


def device_id() -> int:
    return cupy().cuda.Device().id


def raw_function(name: str, source: str, expression: str, *, options: tuple[str, ...] = ("--std=c++17",)):
    """The kernel `expression` (a name or template instance listed in `name_expressions`) of the
    RawModule `name` built from `source`, compiled once per device.

    All template instances a module may need are compiled together; pass the same `source` for the
    same `name` (the key is the name, not the text, so a kernel module owns its name).
    """
    cp = cupy()
    key = (device_id(), name)
    module = _MODULES.get(key)
    if module is None:
        expressions = _EXPRESSIONS.get(name, (expression,))
        module = cp.RawModule(code=source, options=options, name_expressions=expressions)
        _MODULES[key] = module
    return module.get_function(expression)


_EXPRESSIONS: dict[str, tuple[str, ...]] = {}

# Programmatic dependent launch (compute capability 9.0+; on by default, ONNXOPT_PDL=0 or `pdl = False`
# here turns it off): a kernel launched with `dependent=True` may start while the kernel before it on
# the stream is still running; it loads what no earlier kernel writes (its weights), then waits in
# grid_wait() (HALF_PRELUDE) for the previous grid to finish, and lets the next one start. CuPy's
# launch has no launch attributes, so such a launch goes through the driver's cuLaunchKernelEx
# (ctypes) with CuPy's function handle and stream; stream capture records the programmatic edge.
# Measured on an H200 (2026-12-04, docs/BENCHMARKS.md): llama-1b decode 1072.8 -> 1207.2 tok/s,
# llama-8b 233.1 -> 246.4, the same greedy tokens.
pdl = os.environ.get("ONNXOPT_PDL", "1") != "0"
_PDL_ATTRIBUTE = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: id, pad to 8, a 64-byte value union
    _fields_ = [("id", ctypes.c_uint), ("pad", ctypes.c_uint), ("value", ctypes.c_int), ("rest", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig (cuda.h)
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)), ("count", ctypes.c_uint)]


@functools.lru_cache(maxsize=None)
def _driver_launch():
    lib = ctypes.CDLL("libcuda.so.1")
    fn = lib.cuLaunchKernelEx
    fn.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


@functools.lru_cache(maxsize=None)
def _pdl_capable(device: int) -> bool:
    return int(cupy().cuda.Device(device).compute_capability) >= 90


def _kernel_argument(a):
    import numpy as np

    if hasattr(a, "data") and hasattr(a.data, "ptr"):  # a CuPy array
        return ctypes.c_void_p(a.data.ptr)
    for kind, ctype in ((np.int32, ctypes.c_int32), (np.uint32, ctypes.c_uint32), (np.int64, ctypes.c_int64),
                        (np.uint64, ctypes.c_uint64), (np.float32, ctypes.c_float)):
        if isinstance(a, kind):
            return ctype(a.item())
    raise TypeError(f"dependent launch: unsupported kernel argument {type(a).__name__}")


def launch(kernel, grid: tuple, block: tuple, args: tuple, *, shared_mem: int = 0, dependent: bool = False) -> None:
    """Launch a RawKernel on the current stream; `dependent` (a kernel that calls grid_wait() before it
    reads or writes anything an earlier kernel may touch): a programmatic dependent launch when `pdl`
    is on and the device has it, else an ordinary launch."""
    global pdl
    if not (dependent and pdl and _pdl_capable(device_id())):
        kernel(grid, block, args, shared_mem=shared_mem)
        return
    grid, block = tuple(grid) + (1,) * (3 - len(grid)), tuple(block) + (1,) * (3 - len(block))
    values = [_kernel_argument(a) for a in args]
    pointers = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values])
    attribute = _LaunchAttribute(id=_PDL_ATTRIBUTE, value=1)
    config = _LaunchConfig((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), shared_mem,
                           cupy().cuda.get_current_stream().ptr, ctypes.pointer(attribute), 1)
    try:
        status = _driver_launch()(ctypes.byref(config), kernel.kernel.ptr, pointers, None)
    except (OSError, AttributeError) as e:  # no libcuda.so.1 or a driver without cuLaunchKernelEx (< 12.0)
        status = f"{type(e).__name__}: {e}"
    if status:  # the kernel is correct launched the ordinary way too (its grid_wait() is then a no-op)
        pdl = False
        logger.warning("dependent launches off for this process: cuLaunchKernelEx of %s failed (%s)", kernel.name, status)
        kernel(grid, block, args, shared_mem=shared_mem)


PREFETCH_LINE = 128  # bytes: prefetch_l2's unit (HALF_PRELUDE)


def prefetch_args(prefetch: tuple | None) -> tuple:
    """Kernel arguments of an L2 prefetch range (device pointer, bytes), prefetch_l2's: the pointer and
    its PREFETCH_LINE lines; (0, 0) for none."""
    import numpy as np

    if not prefetch or prefetch[1] <= 0:
        return np.uint64(0), np.uint32(0)
    return np.uint64(prefetch[0]), np.uint32(-(-int(prefetch[1]) // PREFETCH_LINE))


def declare_module(name: str, expressions: tuple[str, ...]) -> None:
    """Declare every kernel (template instance) of RawModule `name`, so one compilation serves all."""
    _EXPRESSIONS[name] = expressions


def elementwise(name: str, build: Callable[[ModuleType], object]):
    """`build(cupy)` (an ElementwiseKernel or ReductionKernel), made once per device."""
    cp = cupy()
    key = (device_id(), name)
    kernel = _ELEMENTWISE.get(key)
    if kernel is None:
        kernel = _ELEMENTWISE[key] = build(cp)
    return kernel


# CUDA C shared by the kernels of float16 / float32 ops: half_bits (float16 as its bits), to_f (to
# float), store (round to the pointer's type) and round_to (round through a type, back to float).
HALF_PRELUDE = r"""typedef unsigned short half_bits;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(half_bits x) { float f; asm("{ cvt.f32.f16 %0, %1; }" : "=f"(f) : "h"(x)); return f; }
__device__ __forceinline__ void store(float* p, float x) { *p = x; }
__device__ __forceinline__ void store(half_bits* p, float x) { half_bits h; asm("{ cvt.rn.f16.f32 %0, %1; }" : "=h"(h) : "f"(x)); *p = h; }
__device__ __forceinline__ float round_to(float x, const float*) { return x; }
__device__ __forceinline__ float round_to(float x, const half_bits*) { half_bits h; asm("{ cvt.rn.f16.f32 %0, %1; }" : "=h"(h) : "f"(x)); return to_f(h); }
// 16 bytes as 16 / sizeof(T) floats (the type tag: a pointer of the element type)
__device__ __forceinline__ void unpack(const uint4& raw, float* f, const half_bits*) {
    const unsigned int w[4] = {raw.x, raw.y, raw.z, raw.w};
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = to_f((half_bits)(w[i] & 0xffffu));
        f[2 * i + 1] = to_f((half_bits)(w[i] >> 16));
    }
}
__device__ __forceinline__ void unpack(const uint4& raw, float* f, const float*) {
    f[0] = __uint_as_float(raw.x); f[1] = __uint_as_float(raw.y); f[2] = __uint_as_float(raw.z); f[3] = __uint_as_float(raw.w);
}
// float16 bits of a float (rounded to nearest even); half2 arithmetic on two float16 in 32 bits
__device__ __forceinline__ unsigned int half_of(float x) {
    half_bits h; asm("{ cvt.rn.f16.f32 %0, %1; }" : "=h"(h) : "f"(x)); return h;
}
// unpack's inverse: 16 / sizeof(T) floats as 16 bytes of T (float16 rounded to nearest even)
__device__ __forceinline__ uint4 pack(const float* f, const half_bits*) {
    return make_uint4(half_of(f[0]) | (half_of(f[1]) << 16), half_of(f[2]) | (half_of(f[3]) << 16),
                      half_of(f[4]) | (half_of(f[5]) << 16), half_of(f[6]) | (half_of(f[7]) << 16));
}
__device__ __forceinline__ uint4 pack(const float* f, const float*) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
}
__device__ __forceinline__ unsigned int hsub2(unsigned int a, unsigned int b) {
    unsigned int d; asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b)); return d;
}
__device__ __forceinline__ unsigned int hfma2(unsigned int a, unsigned int b, unsigned int c) {
    unsigned int d; asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c)); return d;
}
// two floats as the float16 pair (lo, hi) in 32 bits, each rounded to nearest even
__device__ __forceinline__ unsigned int half2_of(float lo, float hi) {
    unsigned int r; asm("{ cvt.rn.f16x2.f32 %0, %1, %2; }" : "=r"(r) : "f"(hi), "f"(lo)); return r;
}
// c += a . b on the tensor cores (sm_80+): a the 16x16 float16 A fragment (rows g, g+8, g, g+8 of lane
// (g, c) = (lane / 4, lane % 4); k 2c, 2c+1, then 2c+8, 2c+9), (b0, b1) the 16x8 B fragment (column g,
// the same k), c the 16x8 float32 tile (rows g, g+8; columns 2c, 2c+1)
__device__ __forceinline__ void mma16816(float (&c)[4], const unsigned int (&a)[4], unsigned int b0, unsigned int b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// silu(v) = v / (1 + e^-v) by the SFU's exp and reciprocal: a few float32 ulps from expf and an IEEE
// division, under the float16 rounding that follows where it is used. Large -v: 1 + e^-v is inf and the
// quotient 0, silu's limit.
__device__ __forceinline__ float silu_fast(float v) { return __fdividef(v, 1.f + __expf(-v)); }
// Programmatic dependent launch (custom_ops/cuda.py `launch`): wait for the previous grid on the
// stream (a no-op without a dependent launch), then let the next one start (its blocks queue behind
// this grid's, all of which have started by then).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ void grid_wait() {
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}
#else
__device__ __forceinline__ void grid_wait() {}
#endif
// L2 prefetch of `lines` 128-byte lines from p (a later kernel's weights; runtime/device_graph.py
// assigns them), split over the grid's threads (one-dimensional blocks): fire and forget. On sm_90 each
// thread's share is one bulk prefetch (cp.async.bulk.prefetch.L2, no loop, no registers held), elsewhere
// a prefetch a line. It only moves reads into an earlier, latency-bound kernel: no value changes.
__device__ __forceinline__ void prefetch_l2(const unsigned char* p, unsigned int lines) {
    const unsigned int block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const unsigned int threads = gridDim.x * gridDim.y * gridDim.z * blockDim.x;
    const unsigned int t = block * blockDim.x + threadIdx.x, per = (lines + threads - 1) / threads;
    const unsigned int first = t * per, last = min(first + per, lines);
    if (first >= last) return;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(p + 128ull * first), "r"(128u * (last - first))
                 : "memory");
#else
    for (unsigned int i = first; i < last; ++i) asm volatile("prefetch.global.L2 [%0];" :: "l"(p + 128ull * i));
#endif
}
"""

_PERSISTENT: dict[tuple, object] = {}


def persistent(kind: str, shape: tuple, dtype, *, zero: bool = False):
    """A device array kept for the life of the process, one per (device, kind, shape, dtype): the buffers
    a captured step's kernels point at must outlive the capture, and nothing may be allocated inside
    one. `zero`: allocated zeroed."""
    import numpy as np

    cp = cupy()
    key = (device_id(), kind, tuple(shape), np.dtype(dtype).str)
    array = _PERSISTENT.get(key)
    if array is None:
        array = _PERSISTENT[key] = (cp.zeros if zero else cp.empty)(shape, dtype=dtype)
    return array


@functools.lru_cache(maxsize=None)
def _sm_count(device: int) -> int:
    return cupy().cuda.runtime.getDeviceProperties(device)["multiProcessorCount"]


def drop_weights(cache: dict, pointers) -> int:
    """Drop the entries of a per-weight cache whose key names its weight's device pointer second
    (key[1]) and that pointer is among `pointers` (a runtime's constants, as the runtime goes away:
    runtime/device_graph.py). Returns how many went."""
    gone = [key for key in cache if key[1] in pointers]
    for key in gone:
        del cache[key]
    return len(gone)


def sm_count() -> int:
    """Streaming multiprocessors of the current device (read once per device)."""
    return _sm_count(device_id())
