"""Architecture recipes: one small declared module per family.

A recipe says which Hugging Face configs it accepts and how to read the model's dimensions from
them. Shared code asks the registry (`family_for_config`) instead of branching on model types.
"""

from __future__ import annotations

from onnxopt.models._family import Dims, Family
from onnxopt.models.llama import LLAMA, RANDOM_SHAPES
from onnxopt.models.mistral import MISTRAL
from onnxopt.models.qwen2 import QWEN2
from onnxopt.errors import UnknownArchitectureError

FAMILIES: dict[str, Family] = {f.name: f for f in (LLAMA, QWEN2, MISTRAL)}


def family_for_config(config: dict, *, source: str = "config.json") -> Family:
    """The family whose recipe accepts this HF config, or a clear error naming what we support."""
    model_type = config.get("model_type")
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    supported = ", ".join(sorted(t for f in FAMILIES.values() for t in f.model_types))
    raise UnknownArchitectureError(
        f"{source}: unknown architecture model_type={model_type!r} "
        f"(architectures={config.get('architectures')}); supported: {supported}"
    )


__all__ = ["Dims", "Family", "FAMILIES", "RANDOM_SHAPES", "family_for_config"]
