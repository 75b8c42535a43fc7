"""LinearFp8's prefill settings read from the environment when custom_ops/linear_fp8_kernels.py and
linear_fp8_gemm.py are imported: ONNXOPT_FP8_SWIGLU (the SwiGLU path), ONNXOPT_FP8_FAST_ACCUM and
ONNXOPT_FP8_AUTOTUNE. Each case imports them in a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys

_CODE = ("from onnxopt.custom_ops import linear_fp8_gemm as g, linear_fp8_kernels as k; "
         "print(k.SWIGLU, g.GEMM_FAST_ACCUM, g.AUTOTUNE)")
_NAMES = ("ONNXOPT_FP8_SWIGLU", "ONNXOPT_FP8_FAST_ACCUM", "ONNXOPT_FP8_AUTOTUNE")


def _settings(**env) -> tuple[list[str], str]:
    base = {k: v for k, v in os.environ.items() if k not in _NAMES}
    done = subprocess.run([sys.executable, "-c", _CODE], env={**base, **env}, capture_output=True, text=True,
                          check=True, timeout=120)
    return done.stdout.split(), done.stderr


def test_defaults_and_each_variable_picks_its_setting():
    assert _settings()[0] == ["gemm", "True", "False"]
    assert _settings(ONNXOPT_FP8_SWIGLU="epilogue", ONNXOPT_FP8_FAST_ACCUM="0", ONNXOPT_FP8_AUTOTUNE="1")[0] == \
        ["epilogue", "False", "True"]
    assert _settings(ONNXOPT_FP8_FAST_ACCUM="1")[0] == ["gemm", "True", "False"]


def test_an_unknown_swiglu_path_warns_and_takes_the_default():
    values, stderr = _settings(ONNXOPT_FP8_SWIGLU="mma")  # a path removed on 2026-12-06
    assert values[0] == "gemm"
    assert "ONNXOPT_FP8_SWIGLU='mma'" in stderr and "Traceback" not in stderr


def test_a_switch_that_is_not_0_or_1_warns_and_takes_the_default():
    values, stderr = _settings(ONNXOPT_FP8_FAST_ACCUM="false", ONNXOPT_FP8_AUTOTUNE="yes")
    assert values == ["gemm", "True", "False"]
    assert "ONNXOPT_FP8_FAST_ACCUM='false' is not 0 or 1" in stderr and "Traceback" not in stderr


def test_release_drops_the_plans_of_the_weights_given(monkeypatch):
    """linear_fp8_gemm.release (a runtime's finalizer, runtime/device_graph.py): the plans whose weight
    pointer (key[1]) is among those given go, the others stay."""
    from onnxopt.custom_ops import linear_fp8_gemm

    plans = {(0, 100, (64, 32), 7, 64, None, True): "a", (0, 100, (64, 32), 64, "half"): "b",
             (0, 200, (64, 32), 8, 64, None, True): "c"}
    monkeypatch.setattr(linear_fp8_gemm, "_PLANS", dict(plans))
    assert linear_fp8_gemm.release(frozenset({100, 300})) == 2
    assert list(linear_fp8_gemm._PLANS.values()) == ["c"]
