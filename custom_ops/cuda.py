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
