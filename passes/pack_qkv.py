"""QKV packing: one MatMul for the query, key and value projections, fed to GroupQueryAttention packed.

Abbreviations: B batch, S sequence, H hidden size, Dq = num_heads * head_size,
Dkv = kv_num_heads * head_size, D = Dq + 2 * Dkv.

    query_BSDq  = MatMul(x_BSH, w_q_HDq) [+ b_q_Dq]
    key_BSDkv   = MatMul(x_BSH, w_k_HDkv) [+ b_k_Dkv]
    value_BSDkv = MatMul(x_BSH, w_v_HDkv) [+ b_v_Dkv]
    GroupQueryAttention(query_BSDq, key_BSDkv, value_BSDkv, past_key, ...)
  ==>
    qkv_BSD = MatMul(x_BSH, concat([w_q, w_k, w_v], axis=1)) [+ concat([b_q, b_k, b_v])]
    GroupQueryAttention(qkv_BSD, None, None, past_key, ...)

ORT's com.microsoft::GroupQueryAttention takes "packed QKV with shape (batch_size, sequence_length, d) where d
is (num_heads * head_size + 2 * kv_num_heads * head_size)" in `query` with `key` and `value` omitted (the op
schema in onnxruntime 1.32, docs/ContribOperators.md), so no Split is emitted: 3 MatMuls (+ 3 Adds) -> 1 (+ 1).
Every GQA input after `value` and every attribute is carried over unchanged.

Variants: with bias Adds (Qwen2) and without (Llama, Mistral); the Adds are commuted.
Checks: weights (and biases) constant, all of one dtype (x's), one H, Dk == Dv, and the per-head sizes
agree with GQA's num_heads / kv_num_heads. Dtypes: any float dtype MatMul accepts (float32, float16, bfloat16).

This pass runs after the GQA fusion (ort_fusions.fuse_gqa), whose output it matches. The replaced weights
stay as unused initializers until `RemoveUnusedNodesPass` runs.

Where the consumer is not GroupQueryAttention (GQA fusion did not fire), `PackSiblingMatMuls` packs the
three projections into MatMul + Split instead. It is an `ir.passes.InPlacePass`, not a rewrite rule: a
pattern with three unconnected output nodes makes the rewriter try every pair of other MatMuls for each
MatMul (quadratic in the number of MatMuls), while grouping the uses of one value is linear.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

logger = logging.getLogger(__name__)


class PackQKVForGQA(pattern.RewriteRuleClassBase):
    def __init__(self, name: str, *, with_bias: bool):
        super().__init__(name)
        self._with_bias = with_bias

    def pattern(self, op, x_BSH, w_q, w_k, w_v, b_q, b_k, b_v):
        query_BSDq = op.MatMul(x_BSH, w_q)
        key_BSDkv = op.MatMul(x_BSH, w_k)
        value_BSDkv = op.MatMul(x_BSH, w_v)
        if self._with_bias:
            query_BSDq = op.Add(query_BSDq, b_q)
            key_BSDkv = op.Add(key_BSDkv, b_k)
            value_BSDkv = op.Add(value_BSDkv, b_v)
        return op.GroupQueryAttention(
            query_BSDq,
            key_BSDkv,
            value_BSDkv,
            _allow_other_inputs=True,  # past_key, past_value, seqlens_k, ...: carried over as they are
            _domain="com.microsoft",
            _outputs=["attention_BSDq", "present_key", "present_value"],
        )

    def check(self, context, x_BSH, w_q, w_k, w_v, attention_BSDq, b_q=None, b_k=None, b_v=None, **_):
        result = pattern.MatchResult()
        weights = (w_q, w_k, w_v)
        for w in weights:
            if w.const_value is None:
                return result.fail(f"Weight {w.name} is not a constant initializer.", w)
            if w.shape is None or len(w.shape) != 2:
                return result.fail(f"Weight {w.name} is not a matrix: shape {w.shape}.", w)
        if len({w.dtype for w in weights} | {x_BSH.dtype}) != 1:
            return result.fail(
                f"Dtypes differ: x {x_BSH.dtype}, q {w_q.dtype}, k {w_k.dtype}, v {w_v.dtype}.", list(weights)
            )
        if len({w.shape[0] for w in weights}) != 1:
            return result.fail(f"Weights differ in H: {[w.shape for w in weights]}.", list(weights))
        d_q, d_k, d_v = (w.shape[1] for w in weights)
        if d_k != d_v:
            return result.fail(f"Key and value widths differ ({d_k} != {d_v}); GQA packs equal widths.", [w_k, w_v])
        if self._with_bias:
            for b, d in ((b_q, d_q), (b_k, d_k), (b_v, d_v)):
                if b.const_value is None:
                    return result.fail(f"Bias {b.name} is not a constant initializer.", b)
                if b.dtype != w_q.dtype:
                    return result.fail(f"Bias {b.name} is {b.dtype}, weights are {w_q.dtype}.", b)
                if b.shape is None or b.shape.dims != (d,):
                    return result.fail(f"Bias {b.name} has shape {b.shape}, expected [{d}].", b)
        gqa = attention_BSDq.producer()
        num_heads = gqa.attributes.get_int("num_heads")
        kv_num_heads = gqa.attributes.get_int("kv_num_heads")
        if not num_heads or not kv_num_heads or d_q % num_heads or d_k % kv_num_heads:
            return result.fail(f"Widths {d_q}, {d_k} do not split into {num_heads}, {kv_num_heads} heads.", gqa)
        if d_q // num_heads != d_k // kv_num_heads:
            return result.fail(f"Query and key head sizes differ: {d_q // num_heads} != {d_k // kv_num_heads}.", gqa)
        return result

    def rewrite(self, op, x_BSH, w_q, w_k, w_v, attention_BSDq, b_q=None, b_k=None, b_v=None, **_):
        def packed(values, axis, kind):
            array = np.concatenate([v.const_value.numpy() for v in values], axis=axis)
            # Named after the attention output, which is unique in the graph: the source weights need
            # not be (CSE merges equal biases across layers).
            name = f"{attention_BSDq.name}.qkv_{kind}"
            return op.initializer(ir.tensor(array, name=name), name=name)

        qkv_BSD = op.MatMul(x_BSH, packed((w_q, w_k, w_v), 1, "weight"))
        if self._with_bias:
            qkv_BSD = op.Add(qkv_BSD, packed((b_q, b_k, b_v), 0, "bias"))
        gqa = attention_BSDq.producer()
        return _packed_gqa(op, qkv_BSD, gqa)


class SplitQKVIntoGQA(pattern.RewriteRuleClassBase):
    """GQA(Split(qkv_BSD, [Dq, Dkv, Dkv], axis=-1)) -> GQA(qkv_BSD, None, None): `PackSiblingMatMuls`'s output."""

    def pattern(self, op, qkv_BSD, sizes):
        query_BSDq, key_BSDkv, value_BSDkv = op.Split(qkv_BSD, sizes, axis=-1, _outputs=3)
        return op.GroupQueryAttention(
            query_BSDq,
            key_BSDkv,
            value_BSDkv,
            _allow_other_inputs=True,
            _domain="com.microsoft",
            _outputs=["attention_BSDq", "present_key", "present_value"],
        )

    def check(self, context, sizes, attention_BSDq, **_):
        result = pattern.MatchResult()
        if sizes.const_value is None:
            return result.fail("Split sizes are not constant.", sizes)
        gqa = attention_BSDq.producer()
        num_heads = gqa.attributes.get_int("num_heads")
        kv_num_heads = gqa.attributes.get_int("kv_num_heads")
        d_q, d_k, d_v = (int(d) for d in sizes.const_value.numpy())
        if d_k != d_v or not num_heads or not kv_num_heads or d_q * kv_num_heads != d_k * num_heads:
            heads = f"{num_heads}/{kv_num_heads}"
            return result.fail(f"Split sizes {[d_q, d_k, d_v]} are not q/k/v of {heads} heads.", sizes)
        return result

    def rewrite(self, op, qkv_BSD, attention_BSDq, **_):
        gqa = attention_BSDq.producer()
        return _packed_gqa(op, qkv_BSD, gqa)


def rules() -> pattern.RewriteRuleSet:
    """Packed-QKV GroupQueryAttention: from three MatMuls (with and without bias Adds, commuted) or a Split."""
    return pattern.RewriteRuleSet(
        [
            PackQKVForGQA.rule("PackQKVForGQA-bias", with_bias=True),
            PackQKVForGQA.rule("PackQKVForGQA", with_bias=False),
            SplitQKVIntoGQA.rule("SplitQKVIntoGQA"),
        ],
        commute=True,
    )


class PackSiblingMatMuls(ir.passes.InPlacePass):
    """x @ W1, x @ W2, x @ W3 (constant [H, Ni], x's dtype) -> Split(x @ concat([W1, W2, W3], 1), [N1, N2, N3]).

    Only groups of exactly `group_size` MatMuls reading one value are packed: three is q/k/v, and it leaves
    the gate/up pair of an MLP (two MatMuls) to the SwiGLU fusion. Bias Adds stay after the Split.
    Groups passed over are in `self.rejected` as (value name, reason), and logged at DEBUG.
    """

    def __init__(self, group_size: int = 3):
        super().__init__()
        self.group_size = group_size
        self.rejected: list[tuple[str, str]] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        groups: dict[ir.Value, list[ir.Node]] = {}
        for node in graph:  # graph order: each group's first node is where the packed MatMul goes
            if node.op_type == "MatMul" and node.domain == "" and node.inputs[0] is not None:
                groups.setdefault(node.inputs[0], []).append(node)
        self.rejected = []
        packed = 0
        for x, matmuls in groups.items():
            if len(matmuls) != self.group_size:
                continue
            reason = self._reject_reason(x, [n.inputs[1] for n in matmuls])
            if reason:
                self.rejected.append((x.name, reason))
                logger.debug("PackSiblingMatMuls: not packing the MatMuls of %s: %s", x.name, reason)
                continue
            self._pack(graph, x, matmuls)
            packed += 1
        return ir.passes.PassResult(model, modified=packed > 0)

    @staticmethod
    def _reject_reason(x: ir.Value, weights: list[ir.Value]) -> str | None:
        for w in weights:
            if w.const_value is None:
                return f"weight {w.name} is not a constant initializer"
            if w.shape is None or len(w.shape) != 2:
                return f"weight {w.name} is not a matrix: shape {w.shape}"
        if len({w.dtype for w in weights} | {x.dtype}) != 1:
            return f"dtypes differ: x {x.dtype}, weights {[w.dtype for w in weights]}"
        if len({w.shape[0] for w in weights}) != 1:
            return f"weights differ in H: {[w.shape for w in weights]}"
        return None

    @staticmethod
    def _pack(graph: ir.Graph, x: ir.Value, matmuls: list[ir.Node]) -> None:
        weights = [n.inputs[1].const_value.numpy() for n in matmuls]
        olds = [n.outputs[0] for n in matmuls]
        name = f"{olds[0].name}.packed"
        w = ir.tensor(np.concatenate(weights, axis=1), name=f"{name}_weight")
        sizes = ir.tensor(np.array([a.shape[1] for a in weights], np.int64), name=f"{name}_split")
        w_value, sizes_value = (
            ir.Value(name=t.name, shape=ir.Shape(t.shape), type=ir.TensorType(t.dtype), const_value=t)
            for t in (w, sizes)
        )
        graph.register_initializer(w_value)
        graph.register_initializer(sizes_value)
        matmul = ir.node("MatMul", [x, w_value])
        split = ir.node("Split", [matmul.outputs[0], sizes_value], {"axis": -1}, num_outputs=len(olds))
        graph.insert_before(matmuls[0], [matmul, split])
        ir.convenience.replace_all_uses_with(olds, split.outputs, replace_graph_outputs=True)
        graph.remove(matmuls, safe=True)
        for old, new in zip(olds, split.outputs):
            new.name, new.shape = old.name, old.shape
            if old.type is not None:
                new.type = old.type


def _packed_gqa(op, qkv_BSD, gqa: ir.Node):
    """`gqa` with the packed [B, S, Dq + 2*Dkv] projection as query and key/value omitted (ORT's
    packed-QKV form); every other input and attribute carried over."""
    return op.GroupQueryAttention(
        qkv_BSD,
        None,
        None,
        *gqa.inputs[3:],
        _domain="com.microsoft",
        _outputs=3,
        **{attr.name: attr for attr in gqa.attributes.values()},
    )
