"""Launch the half2 4-bit GEMV (custom_ops/linear_half2.py) eagerly on llama-8b's gate/up and o shapes,
a few times each, for Nsight Compute to profile one launch. On the GPU machine:

    ncu --kernel-name regex:linear_half2 --launch-skip 2 --launch-count 1 \\
        --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \\
        python3 scripts/gpu_gemv_stalls.py

(--launch-skip 5 profiles o instead of gate/up.) The stall reasons per issued instruction come with
--metrics smsp__average_warps_issue_stalled_<reason>_per_issue_active.ratio for reasons such as
long_scoreboard, wait, math_pipe_throttle, barrier, not_selected (docs/BENCHMARKS.md has one run).
Nsight Compute locks the SM clock at its base (1.58 GHz on the H100), so its durations are longer than
scripts/gpu_linear_probe.py's.
"""

from __future__ import annotations

import sys

import numpy as np
from gpu_linear_probe import _random_packed  # scripts/ is on sys.path when run as a script


def main() -> None:
    import cupy as cp

    from onnxopt.custom_ops import linear_half2

    rng = np.random.default_rng(0)
    shapes = (("gate_up", 28672, 4096, "swiglu", True, False), ("o", 4096, 4096, "", False, True))
    for name, n, k, act, norm, res in shapes:
        q, scales, zp = _random_packed(cp, n, k, 4, 128)
        x = cp.asarray(rng.standard_normal((1, k)).astype(np.float16))
        gamma = cp.ones(k, cp.float16) if norm else None
        residual = cp.asarray(rng.standard_normal((1, n)).astype(np.float16)) if res else None
        out = cp.empty((1, n // 2 if act else n), cp.float16)
        for _ in range(3):
            linear_half2.gemv(x, q, scales, zp, gamma, residual, None, out, n=n, k=k, bits=4, block_size=128,
                              activation=act, epsilon=1e-5)
        cp.cuda.Device().synchronize()
        print(name, "launched 3 times", flush=True)


if __name__ == "__main__":
    sys.exit(main())
