"""The NumPy definition of the device sampling op (custom_ops/sampling.py) against the CPU Sampler.

The CuPy kernel is compared with this definition in tests/gpu/test_kernels.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from onnxopt.custom_ops import sampling
from onnxopt.runtime.sampling import Sampler, SamplingParams


@pytest.mark.parametrize("params", [
    SamplingParams(),
    SamplingParams(repetition_penalty=1.3),
    SamplingParams(temperature=0.7, top_k=20),
    SamplingParams(temperature=0.8, top_p=0.9),
    SamplingParams(temperature=1.2, top_k=40, top_p=0.8, repetition_penalty=1.3),
])
def test_warp_is_the_cpu_samplers_without_ties(params):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 5125)).astype(np.float32) * 3  # float32 normals: no ties
    seen = rng.random((4, 5125)) < 0.02
    history = [np.flatnonzero(row) for row in seen]
    expected = Sampler(params).warp(logits, history)
    np.testing.assert_array_equal(sampling.warp(logits, params, seen=seen), expected)


def test_a_tie_at_the_top_p_cut_is_kept_whole():
    logits = np.log(np.array([[0.5, 0.2, 0.2, 0.1]], dtype=np.float32))
    z = sampling.warp(logits, SamplingParams(temperature=1.0, top_p=0.6))
    assert np.isfinite(z[0, :3]).all() and np.isinf(z[0, 3])  # the sort would keep one of the 0.2s


def test_greedy_reference_is_argmax_and_draws_are_in_range():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((3, 769)).astype(np.float16)
    tokens, margin = sampling.reference(logits, SamplingParams())
    np.testing.assert_array_equal(tokens, logits.astype(np.float32).argmax(-1))
    assert np.isinf(margin).all()
    tokens, margin = sampling.reference(logits, SamplingParams(temperature=0.9, top_k=10, seed=5), step=3)
    assert ((0 <= tokens) & (tokens < 769)).all() and (margin >= 0).all()
    u = sampling.uniform(5, 3, 3)
    assert ((0 <= u) & (u < 1)).all() and len(set(u.tolist())) == 3
