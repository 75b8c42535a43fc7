"""onnxopt: turn a causal LM into a fast, portable ONNX model package, and run it.

Python API:

    import onnxopt
    onnxopt.export("smollm2-135m", "smollm2-onnx")            # needs onnxopt[export]
    onnxopt.optimize("smollm2-onnx", "smollm2-opt")            # fused graph, verified
    onnxopt.evaluate("smollm2-onnx", "book.txt").ppl          # strided perplexity
    onnxopt.quantize("smollm2-onnx", "smollm2-int8", scheme="int8-wo", eval_data="book.txt")  # gated
    gen = onnxopt.load("smollm2-onnx")                         # ORT session + KV-cache loop
    print(gen.generate("The capital of France is", max_new_tokens=16).text)
    for piece in gen.stream([{"role": "user", "content": "Hi!"}], chat=True):
        print(piece, end="")
"""

from __future__ import annotations

__version__ = "0.1.0"

from onnxopt.errors import UserError  # noqa: E402

# Imported eagerly (cheap: torch loads only inside the call). A lazy wrapper importing the
# submodule on first call would be replaced by it: importing `onnxopt.export` binds the module as
# the package attribute `export`, so a second `onnxopt.export(...)` call failed with
# "'module' object is not callable".
from onnxopt.export import export  # noqa: E402
from onnxopt.optimize import optimize  # noqa: E402
from onnxopt.evaluate import evaluate  # noqa: E402
from onnxopt.quantize import quantize  # noqa: E402


def load(path, **kwargs):
    """Open a model package for generation; see `onnxopt.runtime.Generator`."""
    from onnxopt.runtime import Generator

    return Generator(path, **kwargs)


__all__ = ["UserError", "__version__", "evaluate", "export", "load", "optimize", "quantize"]
