"""Attention with a concat KV cache -> one standard ONNX `Attention` node (opset 23), for target `portable`.

Abbreviations: B batch, Hq query heads, Hkv key/value heads, S new tokens, P past tokens, T = P+S, D head size.

    present_key_BHkvTD = Concat(past_key_BHkvPD, key_BHkvSD, axis=-2)         (same for value)
    key_BHqTD = Reshape(Expand(Unsqueeze(present_key_BHkvTD, [2]), ...), ...)   repeat-kv, absent when Hq = Hkv
    y_BHqSD = SDPA(query_BHqSD, key_BHqTD, value_BHqTD, mask)                  onnxscript's intermediate op
  ==>
    y_BHqSD, present_key_BHkvTD, present_value_BHkvTD =
        Attention(query_BHqSD, key_BHkvSD, value_BHkvSD, mask, past_key_BHkvPD, past_value_BHkvPD, scale=...)

SDPA(q, k, v, m) = softmax(scale * q k^T + m) v, with rows whose mask is all -inf giving 0 (the
IsNaN/Where the exporter emits, absorbed by onnxscript's `sdpa` rule, ort_fusions/sdpa.py).
Attention-23 (https://onnx.ai/onnx/operators/onnx__Attention.html) computes the same: it concatenates
past and new K/V itself (present = concat(past, new) on the sequence axis: the `concat` KV layout of
runtime/kv_cache.py), repeats K/V heads when Hq is a multiple of Hkv (GQA), adds a float `attn_mask`
(or applies a bool one), and scale defaults to 1/sqrt(D) like SDPA's. The export's own mask (causal and
padding, [B, 1, S, T]) is passed through, so `is_causal` stays 0 and its alignment with a past does not matter.
Checked on ONNX Runtime 1.32 CPU: GQA head counts, past/present, float -inf and bool masks, and fully
masked rows (output 0, no NaN) all match a NumPy reference within 2e-7 (fp32); fp16 runs as well.

Dtypes: float32, float16 (ORT CPU has both kernels). Needs opset 23 in the model (the `opset23` step).
"""

from __future__ import annotations

from onnxscript.rewriter import _fusion_utils, pattern

_SDPA_DOMAIN = "ai.onnxruntime._fusion"  # onnxscript's intermediate SDPA op (ort_fusions/sdpa.py)


class ConcatSDPAToAttention23(pattern.RewriteRuleClassBase):
    """SDPA over a concat KV cache (with repeat-kv when `repeat_kv`) -> Attention-23 with past/present."""

    def __init__(self, name: str, *, repeat_kv: bool):
        # remove_nodes=False: the matched nodes stay until dead-code removal, so a Concat or repeat-kv that
        # is also read elsewhere (a Shape left by the sdpa rule) does not block the rewrite.
        super().__init__(name, remove_nodes=False)
        self._repeat_kv = repeat_kv

    def _repeat(self, op, present_BHkvTD, name: str):
        if not self._repeat_kv:
            return present_BHkvTD
        expanded = op.Expand(op.Unsqueeze(present_BHkvTD, [2]), pattern.ANY_VALUE)
        return op.Reshape(expanded, pattern.ANY_VALUE, _outputs=[f"{name}_BHqTD"])

    def pattern(self, op, query_BHqSD, key_BHkvSD, value_BHkvSD, past_key_BHkvPD, past_value_BHkvPD):
        present_key_BHkvTD = op.Concat(past_key_BHkvPD, key_BHkvSD, axis=-2)
        present_value_BHkvTD = op.Concat(past_value_BHkvPD, value_BHkvSD, axis=-2)
        y_BHqSD = op.SDPA(
            query_BHqSD,
            self._repeat(op, present_key_BHkvTD, "key"),
            self._repeat(op, present_value_BHkvTD, "value"),
            pattern.Var("mask", can_match_none=True),
            _domain=_SDPA_DOMAIN,
            _outputs=["y_BHqSD"],
        )
        return y_BHqSD, present_key_BHkvTD, present_value_BHkvTD

    def check(self, context, query_BHqSD, key_BHkvSD, value_BHkvSD, past_key_BHkvPD, past_value_BHkvPD, y_BHqSD, **bound):
        """Every failed shape check raises MatchFailureError naming the value (onnxscript's _fusion_utils)."""
        result = pattern.MatchResult()
        key_format = y_BHqSD.producer().attributes.get("key_format")
        if key_format is not None and key_format.value != "BHSd":
            return result.fail(f"SDPA key format {key_format.value} is not BHSd.", y_BHqSD)
        dims: dict = {}
        _fusion_utils.check_shape(dims, query_BHqSD, ["B", "Hq", "S", "D"])
        for value in (key_BHkvSD, value_BHkvSD):
            _fusion_utils.check_shape(dims, value, ["B", "Hkv", "S", "D"])
        for value in (past_key_BHkvPD, past_value_BHkvPD):
            _fusion_utils.check_shape(dims, value, ["B", "Hkv", "P", "D"])
        if self._repeat_kv:
            # The repeated K/V must be [B, Hq, T, D]; their shapes stand in for the Expand/Reshape arguments.
            for name in ("key_BHqTD", "value_BHqTD"):
                _fusion_utils.check_shape(dims, bound[name], ["B", "Hq", "T", "D"])
        hq, hkv = dims["Hq"], dims["Hkv"]
        if not (isinstance(hq, int) and isinstance(hkv, int)):
            return result.fail(f"Head counts are not static (Hq={hq}, Hkv={hkv}).", query_BHqSD)
        if self._repeat_kv and hq % hkv:
            return result.fail(f"{hq} query heads are not a multiple of {hkv} key/value heads.", key_BHkvSD)
        if not self._repeat_kv and hq != hkv:
            return result.fail(f"{hq} query heads read {hkv} key/value heads without a repeat-kv.", key_BHkvSD)
        return result

    def rewrite(self, op, query_BHqSD, key_BHkvSD, value_BHkvSD, past_key_BHkvPD, past_value_BHkvPD, mask, y_BHqSD, **_):
        scale = y_BHqSD.producer().attributes.get("scale")
        attributes = {"scale": scale.value} if scale is not None and scale.value is not None else {}
        return op.Attention(
            query_BHqSD, key_BHkvSD, value_BHkvSD, mask, past_key_BHkvPD, past_value_BHkvPD, **attributes, _outputs=3
        )


def rules() -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet(
        [
            ConcatSDPAToAttention23.rule("Attention23-repeat-kv", repeat_kv=True),
            ConcatSDPAToAttention23.rule("Attention23", repeat_kv=False),
        ]
    )
