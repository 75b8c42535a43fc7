"""Which MatMulNBits accuracy_level is fastest on this CPU? One op at SmolLM2's MLP shapes.

    python scripts/probe_matmulnbits.py [--threads 4]

Times a chain of 8 MatMuls (576 -> 1536 -> 576 ...) as fp32 MatMul and as MatMulNBits at 8 and 4 bits
for accuracy levels 0 (fp32 compute), 1 and 4 (int8 activations), for one token (decode) and 128
tokens (prefill). Prints one table; the package's default (onnxopt/quantize.py) follows from it.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def chain(bits: int | None, level: int, layers: int = 8):
    import onnx_ir as ir

    from onnxopt.quantize import quantize_model

    rng = np.random.default_rng(0)
    x = ir.Value(name="X", shape=ir.Shape(["M", 576]), type=ir.TensorType(ir.DataType.FLOAT))
    value, nodes, inits = x, [], []
    for i in range(layers):
        k, n = (576, 1536) if i % 2 == 0 else (1536, 576)
        w = (rng.standard_normal((k, n)) * 0.03).astype(np.float32)
        wv = ir.Value(name=f"W{i}", shape=ir.Shape([k, n]), type=ir.TensorType(ir.DataType.FLOAT), const_value=ir.Tensor(w, name=f"W{i}"))
        node = ir.Node("", "MatMul", [value, wv], name=f"mm{i}", num_outputs=1)
        node.outputs[0].name = f"Y{i}"
        node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        nodes.append(node)
        inits.append(wv)
        value = node.outputs[0]
    model = ir.Model(ir.Graph([x], [value], nodes=nodes, initializers=inits, opset_imports={"": 20}), ir_version=10)
    if bits is not None:
        quantize_model(model, bits=bits, block_size=32, accuracy_level=level, progress=False)
    return ir.to_proto(model).SerializeToString()


def time_it(model_bytes: bytes, m: int, threads: int, repeat: int) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    session = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((m, 576)).astype(np.float32)
    for _ in range(10):
        session.run(None, {"X": x})
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        session.run(None, {"X": x})
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e6


def main() -> None:
    import onnxruntime as ort

    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    print(f"onnxruntime {ort.__version__}, {args.threads} threads, median of {args.repeat} runs, microseconds")
    print(f"{'graph':<24}{'M=1':>10}{'M=128':>10}")
    configs = [("fp32 MatMul", None, 0)] + [(f"{b}-bit level {lv}", b, lv) for b in (8, 4) for lv in (0, 1, 4)]
    for name, bits, level in configs:
        model = chain(bits, level)
        row = [time_it(model, m, args.threads, args.repeat) for m in (1, 128)]
        print(f"{name:<24}{row[0]:>10.1f}{row[1]:>10.1f}")


if __name__ == "__main__":
    main()
