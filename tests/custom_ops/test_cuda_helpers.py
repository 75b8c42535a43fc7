"""custom_ops/cuda.py on a machine without CuPy: a clear error naming the extra, no import-time failure."""

from __future__ import annotations

import importlib.util

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
