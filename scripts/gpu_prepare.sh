#!/usr/bin/env bash
# Build the benchmark models of one random-init shape (HF checkpoint, optimized onnxopt package,
# onnxruntime-genai model) on the GPU machine, in the background, so a later call can time them.
#   bash scripts/gpu_prepare.sh llama-8b [CPUS] [BITS] [TARGETS]
#     CPUS: taskset list, e.g. 8-15 (default all); BITS: e.g. "4 8": also the int4/int8-wo packages
#     (quantized from the last target's package, after genai's model);
#     TARGETS: optimizer targets to build, "cpu" (default: the onnxopt engine's full-logits package),
#     "cuda" (the onnxopt-cuda engine's), or both; the exported package is kept until the last one
#   GENAI=0 skips onnxruntime-genai's model (15 GB and a minute or two for llama-8b) when no genai
#   engine will be timed; FP8=1 also builds the fp8 W8A8 package of the cuda target (speed only: synthetic
#   activation statistics, bench_decode_cuda.prepare_fp8; the engine onnxopt-cuda-fp8).
# Runs detached (setsid): it outlives this call; progress in /tmp/prepare-SHAPE.log, then a marker
# /tmp/prepare-SHAPE.done or /tmp/prepare-SHAPE.failed (scripts/gpu_bench.sh waits for it).
# The lent machine goes back after 30 s without a call in flight, taking this build with it: keep
# calls coming while it runs (e.g. one that polls for the marker), and mind its disk: 63 GB free on a
# fresh machine (2026-12-04); llama-8b takes 15 GB each for the HF checkpoint, the export (until
# optimized), our fp16 package and genai's model. With llama-1b's models (10 GB) built beside it,
# genai's llama-8b build ran out of space: remove /tmp/onnxopt-bench/llama-1b (and
# llama-8b/genai-builder.failed) and call bench_decode_cuda.prepare_genai("llama-8b") again (40 s).
set -euo pipefail
shape=${1:?shape}
cpus=${2:-0-$(($(nproc) - 1))}
bits=${3:-}
targets=${4:-cpu}
. /tmp/onnxopt-env.sh
rm -f "/tmp/prepare-$shape.done" "/tmp/prepare-$shape.failed"
cat > "/tmp/prepare-$shape.py" <<PY
import logging, os, sys
sys.path.insert(0, "scripts")
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
for noisy in ("onnxscript", "onnx_ir", "torch.onnx", "transformers"):
    logging.getLogger(noisy).setLevel(logging.ERROR)
import bench_decode_cuda as b
targets = "$targets".split()
for i, target in enumerate(targets):
    os.environ["ONNXOPT_BENCH_KEEP_EXPORT"] = "1" if i < len(targets) - 1 else "0"
    b.prepare_onnxopt("$shape", full_logits=target == "cpu", target=target)
try:
    if "${GENAI:-1}" != "0":
        b.prepare_genai("$shape")
except Exception:  # the benchmark still times the other engines; bench_decode_cuda reports this one
    logging.exception("onnxruntime-genai model builder failed")
for bits in [int(x) for x in "$bits".split()]:  # from the last target's package
    b.prepare_quantized("$shape", bits, targets[-1])
if "${FP8:-0}" == "1":
    b.prepare_fp8("$shape")
PY
setsid bash -c "nice -n 10 taskset -c $cpus python3 /tmp/prepare-$shape.py > /tmp/prepare-$shape.log 2>&1 \
  && touch /tmp/prepare-$shape.done || touch /tmp/prepare-$shape.failed" < /dev/null > /dev/null 2>&1 &
echo "preparing $shape in the background on cpus $cpus (log /tmp/prepare-$shape.log)"
