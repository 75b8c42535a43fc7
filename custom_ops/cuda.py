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

import functools
from collections.abc import Callable
from types import ModuleType

from onnxopt.errors import UserError


class GpuUnavailable(UserError):
    """CuPy or a CUDA device is missing; the message says what to install or use instead."""


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


def sm_count() -> int:
    """Streaming multiprocessors of the current device (read once per device)."""
    return _sm_count(device_id())
