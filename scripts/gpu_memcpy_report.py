"""Which nodes make ORT's CUDA EP insert Memcpy nodes (they stop a decode step from being captured).

    python scripts/gpu_memcpy_report.py PACKAGE_DIR
Prints ORT's verbose placement lines about Memcpy and the CPU-placed nodes.
"""
import sys

import onnxruntime as ort

so = ort.SessionOptions()
so.log_severity_level = 0
so.log_verbosity_level = 1
so.optimized_model_filepath = "/tmp/memcpy-optimized.onnx"
ort.InferenceSession(f"{sys.argv[1]}/model.onnx", so, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
import onnx  # noqa: E402

m = onnx.load("/tmp/memcpy-optimized.onnx", load_external_data=False)
for node in m.graph.node:
    if node.op_type.startswith("Memcpy"):
        print("MEMCPY", node.op_type, list(node.input), "->", list(node.output))
producers = {o: n for n in m.graph.node for o in n.output}
consumers = {}
for n in m.graph.node:
    for i in n.input:
        consumers.setdefault(i, []).append(n)
for node in m.graph.node:
    if node.op_type.startswith("Memcpy"):
        src = producers.get(node.input[0])
        print("  from", src.op_type if src else "graph input", src.name if src else node.input[0],
              "to", [(c.op_type, c.name) for c in consumers.get(node.output[0], [])])
