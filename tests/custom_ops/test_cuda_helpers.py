"""custom_ops/cuda.py on a machine without CuPy: a clear error naming the extra, no import-time failure."""

from __future__ import annotations

import importlib.util
import os

import pytest

from onnxopt.custom_ops import cuda


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed here")
def test_without_cupy_the_error_names_the_gpu_extra():
    with pytest.raises(cuda.GpuUnavailable, match=r"onnxopt\[gpu\]"):
        cuda.cupy()


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed here")
def test_generate_on_cuda_without_cupy_is_a_user_error(tmp_path):
    from onnxopt.errors import UserError
    from onnxopt.runtime.cuda import CudaRuntime

    with pytest.raises(UserError, match="CuPy is not installed"):
        CudaRuntime(tmp_path)


def test_dependent_launch_structures_match_the_driver_layout():
    """cuLaunchKernelEx reads CUlaunchConfig and CUlaunchAttribute as cuda.h lays them out (64-bit)."""
    import ctypes

    from onnxopt.custom_ops import cuda as cuda_ops

    assert ctypes.sizeof(cuda_ops._LaunchAttribute) == 72 and cuda_ops._LaunchAttribute.value.offset == 8
    assert cuda_ops._LaunchConfig.shared.offset == 24 and cuda_ops._LaunchConfig.stream.offset == 32
    assert cuda_ops._LaunchConfig.attrs.offset == 40 and cuda_ops._LaunchConfig.count.offset == 48
    assert cuda_ops.pdl == (os.environ.get("ONNXOPT_PDL", "1") != "0")  # on unless ONNXOPT_PDL=0


def test_dependent_launch_arguments_keep_their_kernel_types():
    import ctypes

    import numpy as np

    from onnxopt.custom_ops.cuda import _kernel_argument

    class FakeArray:  # the attributes a CuPy array offers
        class data:
            ptr = 0x7F0000001000

    assert _kernel_argument(FakeArray()).value == 0x7F0000001000
    assert isinstance(_kernel_argument(np.int32(-3)), ctypes.c_int32) and _kernel_argument(np.int32(-3)).value == -3
    assert _kernel_argument(np.float32(0.5)).value == 0.5 and isinstance(_kernel_argument(np.float32(1)), ctypes.c_float)
    assert _kernel_argument(np.uint64(0)).value == 0
    with pytest.raises(TypeError, match="unsupported kernel argument"):
        _kernel_argument(3)


def test_a_failed_dependent_launch_falls_back_to_an_ordinary_one(monkeypatch, caplog):
    """A driver refusing cuLaunchKernelEx (old driver, odd device) must not fail the step: the launch
    is repeated the ordinary way and dependent launches go off for the process."""
    import numpy as np

    from onnxopt.custom_ops import cuda as cuda_ops

    class Stream:
        ptr = 0

    class FakeCupy:
        class cuda:
            @staticmethod
            def get_current_stream():
                return Stream()

    calls = []

    class Kernel:
        name = "k"

        class kernel:
            ptr = 1234

        def __call__(self, grid, block, args, shared_mem=0):
            calls.append((grid, block, args, shared_mem))

    monkeypatch.setattr(cuda_ops, "pdl", True)
    monkeypatch.setattr(cuda_ops, "cupy", lambda: FakeCupy)
    monkeypatch.setattr(cuda_ops, "device_id", lambda: 0)
    monkeypatch.setattr(cuda_ops, "_pdl_capable", lambda device: True)
    monkeypatch.setattr(cuda_ops, "_driver_launch", lambda: (lambda config, fn, params, extra: 801))  # NOT_SUPPORTED
    args = (np.int32(3), np.float32(0.5))
    cuda_ops.launch(Kernel(), (4,), (128,), args, shared_mem=64, dependent=True)
    assert calls == [((4, 1, 1), (128, 1, 1), args, 64)] and cuda_ops.pdl is False
    assert "dependent launches off" in caplog.text
    cuda_ops.launch(Kernel(), (2,), (32,), args, dependent=True)  # now ordinary at once
    assert len(calls) == 2
