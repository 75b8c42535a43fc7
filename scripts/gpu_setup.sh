#!/usr/bin/env bash
# Make this checkout importable on the lent GPU machine and pick a transformers the exporter works with.
#
# Runs ON the GPU machine, from the project root, after ../shared/gpu/DEVICE.md's install (the five
# `.gpu/bin/install.sh` calls put onnxruntime-gpu and onnxruntime-genai-cuda into /tmp/site).
# Carry `.gpu/wheels` (a transformers 4.57 fallback, made here by
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .gpu/wheels transformers==4.57.6 huggingface_hub==0.36.0 tokenizers==0.22.1
# ) in the call that runs this script. It writes /tmp/onnxopt-env.sh; every later command on that
# machine starts with `. /tmp/onnxopt-env.sh`.
#
# - onnxopt: `pip install -e` (no deps, no index) into the image's Python, so setup.cfg's package_dir
#   (passes/ -> onnxopt.passes, ...) holds; PYTHONPATH alone cannot map the sibling folders.
# - transformers: the image has 5.x; our exporter is tested with 4.57. A tiny random Llama is exported
#   with 5.x first and optimized (GQA must fuse: 5.x exports a different mask graph); only if that fails does 4.57 (+ its huggingface_hub and tokenizers) go to /tmp/tf457,
#   ahead of the image's packages on PYTHONPATH.
set -euo pipefail
[ -f /tmp/site/.installed ] || { echo "onnxruntime-gpu is not in /tmp/site: run the DEVICE.md install first" >&2; exit 1; }
export PYTHONPATH=/tmp/site
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/tmp/onnxopt-pip.log 2>&1 \
  || { cat /tmp/onnxopt-pip.log >&2; exit 1; }

check_export() {
  (cd /tmp && timeout 300 python3 - <<'PY'
import logging, tempfile, pathlib
logging.basicConfig(level=logging.ERROR)
import onnxopt, onnxopt.passes.pipeline, transformers
d = pathlib.Path(tempfile.mkdtemp())
onnxopt.export(str(d / "ckpt"), d / "pkg", random_init="tiny", progress=False)
onnxopt.optimize(d / "pkg", d / "opt", target="cpu", progress=False)
layout = onnxopt.package.ModelPackage(d / "opt").io["kv_cache"]["layout"]
assert layout == "gqa-shared", f"optimize left layout {layout!r}: GQA did not fuse on this export"
print("export+optimize ok with transformers", transformers.__version__)
PY
  )
}

if [ -n "${SKIP_EXPORT_CHECK:-}" ]; then  # known good here (transformers 5.17 exported and fused, 2026-11-24)
  echo "export PYTHONPATH=/tmp/site" > /tmp/onnxopt-env.sh
elif check_export 2>/tmp/onnxopt-export-check.log; then
  echo "export PYTHONPATH=/tmp/site" > /tmp/onnxopt-env.sh
else
  echo "transformers $(python3 -c 'import transformers; print(transformers.__version__)') failed to export:" >&2
  tail -3 /tmp/onnxopt-export-check.log >&2
  ls .gpu/wheels/transformers-4.57*.whl >/dev/null 2>&1 || { echo "carry .gpu/wheels (transformers 4.57)" >&2; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/tf457 .gpu/wheels/*.whl
  export PYTHONPATH=/tmp/tf457:/tmp/site
  check_export
  echo "export PYTHONPATH=/tmp/tf457:/tmp/site" > /tmp/onnxopt-env.sh
fi
cat >> /tmp/onnxopt-env.sh <<'ENV'
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1
ENV
. /tmp/onnxopt-env.sh
python3 - <<'PY'
import cupy, onnxruntime as ort, onnxruntime_genai as og, torch, transformers, onnx_ir, onnxscript, onnxopt
print("onnxruntime", ort.__version__, ort.get_available_providers())
print("genai", og.__version__, "| cupy", cupy.__version__, "| torch", torch.__version__, "| transformers", transformers.__version__,
      "| onnx-ir", onnx_ir.__version__, "| onnxscript", onnxscript.__version__)
print("device", cupy.cuda.runtime.getDeviceProperties(0)["name"].decode())
PY
