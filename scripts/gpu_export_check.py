"""Export + optimize a tiny random Llama here and print the optimizer's report (which step missed).

    python scripts/gpu_export_check.py [DIR]
"""
import logging
import pathlib
import sys
import tempfile

logging.basicConfig(level=logging.ERROR)
import onnxopt  # noqa: E402
import transformers  # noqa: E402

d = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
onnxopt.export(str(d / "ckpt"), d / "pkg", random_init="tiny", progress=False, overwrite=True)
report = onnxopt.optimize(d / "pkg", d / "opt", target="cpu", progress=False, overwrite=True, verify=False)
print("transformers", transformers.__version__)
print(report.to_text() if hasattr(report, "to_text") else report)
