"""The runtime: ONNX Runtime sessions and the KV-cache generation loop."""

from onnxopt.runtime.generator import GenerationResult, Generator, Step, TextStream
from onnxopt.runtime.sampling import Sampler, SamplingParams

__all__ = ["GenerationResult", "Generator", "Sampler", "SamplingParams", "Step", "TextStream"]
