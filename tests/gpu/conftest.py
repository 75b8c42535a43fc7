"""GPU tests: marker `gpu`; every test here skips cleanly without CuPy, a CUDA device or onnxruntime-gpu."""

from __future__ import annotations

import pytest


def _gpu_missing() -> str | None:
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed (the `gpu` extra)"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device"
    except Exception as e:  # CUDARuntimeError without a driver
        return f"no CUDA device ({e})"
    return None


GPU_MISSING = _gpu_missing()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if GPU_MISSING:
                item.add_marker(pytest.mark.skip(reason=GPU_MISSING))


@pytest.fixture(scope="session")
def ort_cuda():
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu)")
    return ort
