#!/usr/bin/env bash
# Batches and long prompts on the GPU machine (after scripts/gpu_setup.sh): the batch 8 and 32
# (prompt 128 -> 128 new) and prompt 1024 -> 256 at batch 1, for onnxopt (the cuda-target package, last-token logits:
# a full-logits prefill of 32 x 1024 positions would materialize 17 GB of logits), genai with its
# CUDA graph, and transformers eager. JSON per configuration and a log under $OUT.
#   bash scripts/gpu_batch_bench.sh llama-1b [ENGINES]
set -uo pipefail
shape=${1:?shape}
engines=${2:-onnxopt-cuda,genai-graph,hf}  # onnxopt-cuda: the cuda-target package (last-token logits)
. /tmp/onnxopt-env.sh
out=${OUT:-/tmp/out}; mkdir -p "$out"
for cfg in "8 128 128" "32 128 128" "1 1024 256"; do
  set -- $cfg
  python3 scripts/bench_decode.py --device cuda --model "$shape" --batch "$1" --prompt-tokens "$2" --new-tokens "$3" \
    --repeats 2 --engines "$engines" --out "$out" 2>> "$out/batch-$shape.log" | tail -n +1
done
