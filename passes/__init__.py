"""Graph passes and fusion rules (onnx-ir + onnxscript rewriter); see the optimizer issue."""
