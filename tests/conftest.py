"""Shared fixtures: small seeded models built in code, and the real model (SmolLM2) for `slow` tests.

Packages are exported once per session into pytest's temporary directory.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

HAS_TORCH = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="needs the export extra (torch, transformers)")


def tiny_config(family: str = "llama", **overrides) -> dict:
    """A seeded-random-sized config of a family, small enough to export in seconds."""
    config = {
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 320,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
        "eos_token_id": 2,
        "bos_token_id": 1,
    }
    config.update(overrides)
    return config


def make_hf_dir(path, family: str = "llama", seed: int = 0, **overrides):
    """Write a random-weight HF checkpoint of `family` (llama | qwen2 | mistral) to `path`."""
    import torch
    import transformers

    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }
    config_cls, model_cls = classes[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**tiny_config(family, **overrides))).eval()
    model.save_pretrained(str(path))
    return path


def make_family_checkpoint(path, family: str, *, sliding_window: int):
    """The tiny checkpoint the parity suites use per family: Mistral with a sliding window shorter
    than their prompts + decode, Qwen2 with random q/k/v biases (transformers zero-initializes
    them, so an export dropping them, or a pass mangling them, would not change the logits)."""
    import torch
    import transformers

    if family == "mistral":
        return make_hf_dir(path, family, sliding_window=sliding_window)
    make_hf_dir(path, family)
    if family == "qwen2":
        model = transformers.Qwen2ForCausalLM.from_pretrained(str(path)).eval()
        torch.manual_seed(1)
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.5)
        model.save_pretrained(str(path))
    return path


def onnx_model(text: str):
    """An onnx_ir.Model from ONNX textual syntax (onnx.parser): small graphs for rule unit tests."""
    import onnx
    import onnx_ir as ir

    return ir.from_proto(onnx.parser.parse_model(text))


def run_onnx(model, feeds: dict) -> list:
    """Outputs of `model` (onnx_ir.Model) on ORT's CPU EP."""
    import onnx_ir as ir
    import onnxruntime as ort

    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def apply_rules(rules, model) -> int:
    """Shape inference (with data propagation, as the pipeline's steps see it), then a rule set; the count."""
    import onnx_ir.passes.common as common_passes

    common_passes.ShapeInferencePass(data_prop=True)(model)
    return rules.apply_to_model(model)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    pytest.importorskip("torch")
    return make_hf_dir(tmp_path_factory.mktemp("tiny-hf"))


@pytest.fixture(scope="session")
def tiny_package(tiny_hf_dir, tmp_path_factory):
    """A fp32 package of a 2-layer random Llama (no tokenizer: tests feed token ids)."""
    import onnxopt

    return onnxopt.export(str(tiny_hf_dir), tmp_path_factory.mktemp("pkg") / "tiny", progress=False)


@pytest.fixture(scope="session")
def tiny_text_package(tmp_path_factory):
    """A package of the `tiny` random-init shape, which carries the SmolLM2 tokenizer (text in/out)."""
    pytest.importorskip("torch")
    import onnxopt

    ckpt = tmp_path_factory.mktemp("tiny-random") / "ckpt"
    return onnxopt.export(str(ckpt), tmp_path_factory.mktemp("pkg") / "tiny-text", random_init="tiny", progress=False)


@pytest.fixture(scope="session")
def smollm2_package(tmp_path_factory):
    """The real model, exported once per test session (about two minutes on 2 cores)."""
    pytest.importorskip("torch")
    import onnxopt
    from onnxopt.errors import SourceError
    from onnxopt.sources import smollm2_gguf

    try:
        smollm2_gguf()
    except SourceError as e:
        pytest.fail(str(e))  # the real-model suite must run in CI: a missing model is a failure
    return onnxopt.export("smollm2-135m", tmp_path_factory.mktemp("pkg") / "smollm2", progress=False)


@pytest.fixture(scope="session")
def smollm2_hf():
    """(model, tokenizer) of SmolLM2 in transformers, fp32, the reference for parity."""
    pytest.importorskip("torch")
    import transformers

    from onnxopt.sources import smollm2_gguf

    path = smollm2_gguf()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype="float32")
    return model.eval(), tok


def shared_input_matmuls(rng, k: int = 96, ns=(40, 24)):
    """(onnx_ir model, weights): MatMuls mm{i} sharing the input X [M, k], weights W{i} [k, n] drawn
    from `rng` (standard normal x 0.05, in order), outputs Y{i}: a quantization group."""
    import onnx_ir as ir

    x = ir.Value(name="X", shape=ir.Shape(["M", k]), type=ir.TensorType(ir.DataType.FLOAT))
    ws, nodes, inits = [], [], []
    for i, n in enumerate(ns):
        w = rng.standard_normal((k, n)).astype(np.float32) * 0.05
        wv = ir.Value(name=f"W{i}", shape=ir.Shape([k, n]), type=ir.TensorType(ir.DataType.FLOAT), const_value=ir.Tensor(w, name=f"W{i}"))
        node = ir.Node("", "MatMul", [x, wv], name=f"mm{i}", num_outputs=1)
        node.outputs[0].name = f"Y{i}"
        node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        ws.append(w)
        nodes.append(node)
        inits.append(wv)
    graph = ir.Graph([x], [nd.outputs[0] for nd in nodes], nodes=nodes, initializers=inits, opset_imports={"": 20})
    return ir.Model(graph, ir_version=10), ws
