"""sdpa_decompose: the intermediate SDPA node becomes standard ops computing softmax(q k^T * scale + mask) v."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnxopt.passes import sdpa_decompose

SDPA = """
<ir_version: 10, opset_import: ["" : 20, "ai.onnxruntime._fusion" : 1]>
g (float[1, 2, 3, 4] q, float[%(kshape)s] k, float[1, 2, 5, 4] v, float[1, 1, 3, 5] m) => (float[1, 2, 3, 4] y) {
    y = ai.onnxruntime._fusion.SDPA <key_format = "%(fmt)s"%(scale)s> (q, k, v, m)
}
"""


def _reference(q, k, v, m, scale):
    scores = q @ np.swapaxes(k, -1, -2) * scale + m
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    return (scores / scores.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("fmt, scale", [("BHSd", None), ("BHSd", 0.3), ("BSHd", None)])
def test_decomposition_matches_the_definition(fmt, scale):
    kshape = "1, 2, 5, 4" if fmt == "BHSd" else "1, 5, 2, 4"
    text = SDPA % {"kshape": kshape, "fmt": fmt, "scale": "" if scale is None else f", scale = {scale}"}
    model = ir.from_proto(onnx.parser.parse_model(text))
    assert sdpa_decompose.rules().apply_to_model(model) == 1
    assert {n.domain for n in model.graph} <= {""}
    rng = np.random.default_rng(0)
    q, v = rng.standard_normal((1, 2, 3, 4), np.float32), rng.standard_normal((1, 2, 5, 4), np.float32)
    k = rng.standard_normal((1, 2, 5, 4), np.float32)
    m = np.where(np.tril(np.ones((3, 5)), 2) > 0, 0, -np.inf).astype(np.float32)[None, None]
    feeds = {"q": q, "k": k if fmt == "BHSd" else k.transpose(0, 2, 1, 3), "v": v, "m": m}
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, feeds)[0]
    np.testing.assert_allclose(got, _reference(q, k, v, m, scale or 0.5), rtol=1e-5, atol=1e-6)


def test_unknown_key_format_stays():
    text = SDPA % {"kshape": "1, 2, 5, 4", "fmt": "BSdH", "scale": ""}
    model = ir.from_proto(onnx.parser.parse_model(text))
    assert sdpa_decompose.rules().apply_to_model(model) == 0
