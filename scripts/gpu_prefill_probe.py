"""Where the prefill's time goes on the GPU, per part of a (split) graph: host time of each ORT run or
CuPy launch, and the wall time to the first token, for one-segment and split packages.

    python scripts/gpu_prefill_probe.py PKG [PKG ...] [--prompts 16,128,1024] [--repeats 5]

Each prompt length: one warm-up generation of 2 tokens, then `--repeats` timed ones; per part the
median host milliseconds of its `run` call (launch only; the stream is not synchronized in between)
and the median wall time from the call to the first token on the host.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("packages", nargs="+")
    parser.add_argument("--prompts", default="16,128,1024")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import numpy as np

    from onnxopt.runtime import device_graph
    from onnxopt.runtime.cuda import CudaRuntime
    from onnxopt.runtime.sampling import SamplingParams

    timings: dict[str, float] = {}
    runs: list[float] = []
    original_run = device_graph.StepRun._run_discovering

    def timed(self, run_options):  # host time of the discovering (prefill) run
        runs.clear()
        started = time.perf_counter()
        original_run(self, run_options)
        timings["discovering"] = (time.perf_counter() - started) * 1e3

    class Timed:  # an ORT session whose run_with_iobinding is timed
        def __init__(self, session):
            self.session = session

        def __getattr__(self, name):
            return getattr(self.session, name)

        def run_with_iobinding(self, binding, run_options=None):
            started = time.perf_counter()
            self.session.run_with_iobinding(binding, run_options)
            runs.append((time.perf_counter() - started) * 1e3)

    device_graph.StepRun._run_discovering = timed
    for path in args.packages:
        rt = CudaRuntime(path)  # decode replays its captured step: no ORT runs of its own after the warm-up
        for part in rt.session.parts:
            if part.kind == "ort":
                part.session = Timed(part.session)
        segments = sum(p.kind == "ort" for p in rt.session.parts)
        for length in map(int, args.prompts.split(",")):
            prompt = np.random.default_rng(0).integers(0, rt.vocab_size, length).tolist()
            walls, hosts, per_run = [], [], []
            for repeat in range(args.repeats + 1):
                rt.stream.synchronize()
                started = time.perf_counter()
                steps = rt.iter_steps([prompt], max_new_tokens=2, params=SamplingParams(), pad=0, eos=[])
                next(steps)
                wall = (time.perf_counter() - started) * 1e3
                list(steps)
                if repeat:
                    walls.append(wall)
                    hosts.append(timings["discovering"])
                    per_run.append(max(runs[: segments]) if runs else 0.0)
            print(f"{path}: {segments} ORT segments, prompt {length}: first token {statistics.median(walls):.2f} ms, "
                  f"prefill host launch {statistics.median(hosts):.2f} ms (slowest ORT run {statistics.median(per_run):.2f} ms)",
                  flush=True)


if __name__ == "__main__":
    main()
