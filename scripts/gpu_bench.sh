#!/usr/bin/env bash
# Time one random-init shape on the GPU machine (after scripts/gpu_setup.sh); JSON and log to $OUT.
#   bash scripts/gpu_bench.sh llama-1b [ENGINES] [CPUS]
set -uo pipefail
shape=${1:?shape}
engines=${2:-onnxopt-cuda,onnxopt-cuda-nopdl,genai,genai-graph,hf}  # the cuda-target package: gpu_prepare.sh SHAPE CPUS "" cuda
cpus=${3:-}
. /tmp/onnxopt-env.sh
out=${OUT:-/tmp/out}; mkdir -p "$out"
# A background preparation of the same shape must finish first.
if [ -f /tmp/prepare-$shape.log ] && [ ! -f /tmp/prepare-$shape.done ]; then
  while [ ! -f /tmp/prepare-$shape.done ] && [ ! -f /tmp/prepare-$shape.failed ]; do sleep 5; done
  [ -f /tmp/prepare-$shape.failed ] && { tail -20 /tmp/prepare-$shape.log; exit 1; }
fi
runner=()
[ -n "$cpus" ] && runner=(taskset -c "$cpus")
"${runner[@]}" python3 scripts/bench_decode.py --device cuda --model "$shape" --prompt-tokens 128 --new-tokens 128 \
  --repeats 3 --engines "$engines" --out "$out" 2> "$out/bench-$shape.log"
rc=$?
grep -E "optimizer report|expected fusions|nodes per decoder|capture|failed|Error" "$out/bench-$shape.log" | head -20
exit $rc
