"""Qwen2: a Llama with biases on the q/k/v projections."""

from onnxopt.models._family import Family

QWEN2 = Family(name="qwen2", model_types=("qwen2",), qkv_bias=True, genai_model_type="qwen2")
