"""Mistral: a Llama layout; sliding-window attention when `sliding_window` is set in the config."""

from onnxopt.models._family import Family

MISTRAL = Family(name="mistral", model_types=("mistral",), genai_model_type="mistral")
