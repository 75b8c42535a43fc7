"""Llama (and SmolLM2, which is a Llama): RMSNorm, rotary, GQA, SwiGLU MLP, no biases.

Also declares the random-weight shapes used by benchmarks (`--random-init`): the real shapes of
Llama-3.2-1B and Llama-3-8B, and a tiny one for tests.
"""

from onnxopt.models._family import Family

LLAMA = Family(name="llama", model_types=("llama",), genai_model_type="llama")

_LLAMA3 = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "max_position_embeddings": 8192,
    "vocab_size": 128256,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
}

# Config overrides per shape; the rest is transformers' LlamaConfig default.
RANDOM_SHAPES: dict[str, dict] = {
    # Small enough for unit tests; vocab matches the SmolLM2 tokenizer shipped beside it.
    "tiny": {
        **_LLAMA3,
        "hidden_size": 64,
        "intermediate_size": 192,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 49152,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": True,
    },
    # Llama-3.2-1B: hidden 2048, 16 layers, 32/8 heads, FFN 8192, vocab 128256, tied embeddings.
    "llama-1b": {
        **_LLAMA3,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "tie_word_embeddings": True,
    },
    # Llama-3-8B: hidden 4096, 32 layers, 32/8 heads, FFN 14336, vocab 128256, untied.
    "llama-8b": {
        **_LLAMA3,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "tie_word_embeddings": False,
    },
}
