"""RotaryCacheInitializers on the tiny Llama: cos/sin become [max_positions, rotary_dim/2]
initializers equal to what the graph computed per run, and nothing else is folded."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from conftest import needs_torch

pytestmark = needs_torch

MAX_POSITIONS = 48


def _through(tiny_package, step: str, max_context):
    from onnxopt.passes.pipeline import run_pipeline

    model = ir.load(tiny_package / "model.onnx")
    run_pipeline(model, "cpu", num_layers=2, max_context=max_context, stop_after=step)
    return model


def _session(model):
    import onnxruntime as ort

    proto = ir.serde.serialize_model(model)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _run(session, mask_width: int, past: int, seed: int = 0):
    """One step with `past` cached tokens (random K/V) and mask_width - past new ones, batch 1."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in session.get_inputs():
        if inp.name == "input_ids":
            feeds[inp.name] = rng.integers(0, 100, (1, mask_width - past), dtype=np.int64)
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones((1, mask_width), dtype=np.int64)
        else:  # past_key_values.*: [1, Hkv, Tmax, D] shared buffer
            _, heads, _, head = inp.shape
            feeds[inp.name] = rng.standard_normal((1, heads, MAX_POSITIONS, head)).astype(np.float32)
    return session.run(["logits"], feeds)[0]


def test_caches_become_initializers_and_give_the_same_logits(tiny_package):
    from onnxopt.passes.gqa_interface import gqa_nodes
    from onnxopt.passes.rotary_cache import RotaryCacheInitializers

    per_run = _through(tiny_package, "gqa_interface", None)  # Range(0, total_sequence_length) each run
    model = _through(tiny_package, "gqa_interface", MAX_POSITIONS)
    step = RotaryCacheInitializers(MAX_POSITIONS)
    assert step(model).modified and step.miss is None
    assert step.rewired == 2  # one cos and one sin cache, shared by both layers
    for node in gqa_nodes(model.graph):
        for index in (7, 8):
            cache = node.inputs[index]
            assert cache.const_value is not None and cache.name in model.graph.initializers
            assert cache.shape[0] == MAX_POSITIONS  # [max_positions, rotary_dim / 2]
    ops = {n.op_type for n in model.graph}
    assert not ops & {"Range", "Cos", "Sin"}, ops
    # Only the rotary subgraph was folded: the weights are the same initializers as before.
    weights = {name for name, v in per_run.graph.initializers.items() if v.const_value.size > 1024}
    assert weights <= set(model.graph.initializers)

    for width, past in ((9, 0), (20, 19), (MAX_POSITIONS, MAX_POSITIONS - 1)):
        np.testing.assert_allclose(_run(_session(model), width, past), _run(_session(per_run), width, past), rtol=0, atol=1e-5)


def test_unknown_context_leaves_the_cache_computed(tiny_package):
    from onnxopt.passes.rotary_cache import RotaryCacheInitializers

    model = _through(tiny_package, "gqa_interface", None)
    step = RotaryCacheInitializers(None)
    assert not step(model).modified and step.rewired == 0
    assert "max context is unknown" in step.miss
    assert {"Range", "Cos", "Sin"} <= {n.op_type for n in model.graph}


def test_no_gqa_no_change(tiny_package):
    from onnxopt.passes.rotary_cache import RotaryCacheInitializers

    model = ir.load(tiny_package / "model.onnx")  # the export: no GroupQueryAttention
    step = RotaryCacheInitializers(MAX_POSITIONS)
    assert not step(model).modified and step.miss is None
