"""Fold the head split and merge around Attention-23 into the ops themselves (3D form), for target `portable`.

Abbreviations: B batch, S new tokens, Hq / Hkv query / key-value heads, D head size, E = H * D.

    q_BHqSD = Transpose(Reshape(q_BSE, [B, S, Hq, D]), perm=[0, 2, 1, 3])      (same for k with Hkv, and v)
    y_BHqSD, present_key, present_value = Attention(RotaryEmbedding(q_BHqSD, cos, sin),
                                                    RotaryEmbedding(k_BHkvSD, cos, sin), v_BHkvSD, mask, past_key, past_value)
    y_BSE = Reshape(Transpose(y_BHqSD, perm=[0, 2, 1, 3]), [B, S, E])
  ==>
    y_BSE, present_key, present_value = Attention(RotaryEmbedding(q_BSE, cos, sin, num_heads=Hq),
                                                  RotaryEmbedding(k_BSE, cos, sin, num_heads=Hkv), v_BSE, mask,
                                                  past_key, past_value, q_num_heads=Hq, kv_num_heads=Hkv)

Both ops define their 3D input as exactly this split (https://onnx.ai/onnx/operators/onnx__Attention.html:
Q [B, S, Hq*D] with q_num_heads, output Y [B, S, Hq*D]; onnx__RotaryEmbedding.html: X [B, S, H*D] with
num_heads); past/present stay [B, Hkv, T, D]. ORT 1.32 CPU gives bit-identical results for both forms.
Eight Reshape/Transpose nodes per layer go away. Runs after `attention23`; dtypes float32, float16.
"""

from __future__ import annotations

from onnxscript.rewriter import _fusion_utils, pattern

_PERM = [0, 2, 1, 3]


class Attention23ThreeD(pattern.RewriteRuleClassBase):
    def __init__(self, name: str = "Attention23-3D"):
        # remove_nodes=False: shape nodes may still read the 4D values; dead-code removal takes them later.
        super().__init__(name, remove_nodes=False)

    @staticmethod
    def _heads(op, x_BSE, name: str):
        return op.Transpose(op.Reshape(x_BSE, pattern.ANY_VALUE, _outputs=[f"{name}_BSHD"]), perm=_PERM)

    def pattern(self, op, q_BSE, k_BSE, v_BSE, cos, sin, past_key, past_value):
        q_rot = op.RotaryEmbedding(self._heads(op, q_BSE, "q"), cos, sin, _outputs=["q_rot"])
        k_rot = op.RotaryEmbedding(self._heads(op, k_BSE, "k"), cos, sin, _outputs=["k_rot"])
        mask = pattern.Var("mask", can_match_none=True)
        y_BHSD, present_key, present_value = op.Attention(
            q_rot, k_rot, self._heads(op, v_BSE, "v"), mask, past_key, past_value, _outputs=["y_BHSD", "present_key", "present_value"]
        )
        y_BSE = op.Reshape(op.Transpose(y_BHSD, perm=_PERM), pattern.ANY_VALUE, _outputs=["y_BSE"])
        return y_BSE, present_key, present_value

    def check(self, context, q_BSE, k_BSE, v_BSE, q_BSHD, k_BSHD, v_BSHD, y_BSE, y_BHSD, **_):
        """Shapes stand in for the Reshape arguments; a failed shape check raises MatchFailureError."""
        result = pattern.MatchResult()
        dims: dict = {}
        _fusion_utils.check_shape(dims, q_BSHD, ["B", "S", "Hq", "D"])
        _fusion_utils.check_shape(dims, k_BSHD, ["B", "S", "Hkv", "D"])
        _fusion_utils.check_shape(dims, v_BSHD, ["B", "S", "Hkv", "D"])
        _fusion_utils.check_shape(dims, q_BSE, ["B", "S", "Eq"])
        _fusion_utils.check_shape(dims, k_BSE, ["B", "S", "Ekv"])
        _fusion_utils.check_shape(dims, v_BSE, ["B", "S", "Ekv"])
        # [B, S, ?]: with B and S bound, the element count fixes ? = Hq * D (inference may leave it unnamed).
        _fusion_utils.check_shape(dims, y_BSE, ["B", "S", "Ey"])
        hq, hkv, d = dims["Hq"], dims["Hkv"], dims["D"]
        if not all(isinstance(n, int) for n in (hq, hkv, d)) or dims["Eq"] != hq * d or dims["Ekv"] != hkv * d:
            return result.fail(f"Head split is not [.., E] -> [.., H, D] with static sizes ({dims}).", q_BSHD)
        if isinstance(dims["Ey"], int) and dims["Ey"] != hq * d:
            return result.fail(f"Head merge gives {dims['Ey']} features, not {hq * d}.", y_BSE)
        attention = y_BHSD.producer().attributes
        if "q_num_heads" in attention or "kv_num_heads" in attention:
            return result.fail("Attention already has head-count attributes.", y_BHSD)
        return result  # a RotaryEmbedding with position_ids has 4 inputs and does not match the pattern

    def rewrite(self, op, q_BSE, k_BSE, v_BSE, cos, sin, past_key, past_value, mask, q_BSHD, k_BSHD, y_BHSD, q_rot, k_rot, **_):
        hq, hkv = q_BSHD.shape[2], k_BSHD.shape[2]

        def rotary(x, node, heads):
            attributes = {name: attr.value for name, attr in node.attributes.items()}
            return op.RotaryEmbedding(x, cos, sin, **{**attributes, "num_heads": heads})

        attributes = {name: attr.value for name, attr in y_BHSD.producer().attributes.items()}
        return op.Attention(
            rotary(q_BSE, q_rot.producer(), hq),
            rotary(k_BSE, k_rot.producer(), hkv),
            v_BSE,
            mask,
            past_key,
            past_value,
            **attributes,
            q_num_heads=hq,
            kv_num_heads=hkv,
            _outputs=3,
        )


def rules() -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet([Attention23ThreeD.rule()])
