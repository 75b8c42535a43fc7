"""What a family recipe declares, and the dimensions every recipe reads the same way."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Dims:
    """Model dimensions recorded in the manifest (names follow the manifest's `dims`)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    max_context: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Family:
    """A decoder-only family: which configs it accepts and its traits the passes care about."""

    name: str
    model_types: tuple[str, ...]
    # q/k/v projections carry a bias (Qwen2); the optimizer's QKV packing must keep it.
    qkv_bias: bool = False
    # Name onnxruntime-genai's model builder and genai_config.json use for this family.
    genai_model_type: str = ""

    def dims(self, config: dict) -> Dims:
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        return Dims(
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_size=int(config.get("head_dim") or hidden // heads),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            vocab_size=int(config["vocab_size"]),
            max_context=int(config.get("max_position_embeddings") or 2048),
        )
