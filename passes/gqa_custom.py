"""GroupQueryAttention for the CUDA runtime: com.microsoft::GroupQueryAttention <-> onnxopt::GroupQueryAttention.

    GroupQueryAttention(qkv, None, None, past_k, past_v, seqlens_k, total, cos, sin)   com.microsoft
        <==>  the same inputs, outputs and attributes                                   onnxopt

`optimize --target cuda` ends with `ToCustom`: the CUDA runtime then runs each layer's attention with
its own kernels (custom_ops/group_query_attention.py; the op's spec says what changes and why). The
node stays com.microsoft (and `miss` says why) when it is not of the form that op takes: packed QKV,
no softcap or smooth softmax, non-interleaved rotary, at most MAX_GROUP query heads per kv head.
`ToMicrosoft` is the decomposition (custom_ops.registry.decompose): ORT CPU runs the com.microsoft node.

Both are node-for-node swaps: the outputs keep their names, so `present.{i}.*` and the report's layer
attribution are unchanged.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxopt.custom_ops import group_query_attention as gqa


def _swap(graph: ir.Graph, node: ir.Node, new: ir.Node) -> None:
    old = list(node.outputs)
    for before, after in zip(old, new.outputs):
        after.name, after.shape, after.type = before.name, before.shape, before.type
        before.name = None
    ir.convenience.replace_nodes_and_values(graph, node, [node], [new], old, list(new.outputs))


def _head_size(node: ir.Node) -> int | None:
    past = node.inputs[3] if len(node.inputs) > 3 else None
    if past is None or past.shape is None or len(past.shape) != 4 or not isinstance(past.shape[3], int):
        return None
    return past.shape[3]


class ToCustom(ir.passes.InPlacePass):
    """com.microsoft GroupQueryAttention -> onnxopt GroupQueryAttention where the op takes it."""

    def __init__(self):
        super().__init__()
        self.rewired = 0
        self.miss: str | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.rewired, reasons = 0, []
        for node in list(model.graph):
            if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft":
                continue
            attrs = {name: attr.value for name, attr in node.attributes.items()}
            why = gqa.supported(attrs, _head_size(node))
            if why is None and (len(node.inputs) < 7 or node.inputs[1] is not None or node.inputs[2] is not None):
                why = "query, key and value are not packed in one input"
            if why is None and attrs.get("do_rotary", 0) and (len(node.inputs) < 9 or node.inputs[7] is None):
                why = "do_rotary without cos/sin caches"
            if why is None and len(node.inputs) > 9:
                why = "inputs past sin_cache (position_ids, attention_bias) are not supported"
            if why is not None:
                reasons.append(f"{node.name}: {why}")
                continue
            _swap(model.graph, node, gqa.from_microsoft(node))
            self.rewired += 1
        if self.rewired:
            model.opset_imports.setdefault(gqa.DOMAIN, gqa.VERSION)
        self.miss = f"{len(reasons)} kept as com.microsoft (first: {reasons[0]})" if reasons else None
        return ir.passes.PassResult(model, modified=bool(self.rewired))


class ToMicrosoft(ir.passes.InPlacePass):
    """onnxopt GroupQueryAttention -> com.microsoft GroupQueryAttention (the decomposition)."""

    def __init__(self):
        super().__init__()
        self.rewired = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.rewired = 0
        for node in list(model.graph):
            if node.op_type == gqa.OP_TYPE and node.domain == gqa.DOMAIN:
                _swap(model.graph, node, gqa.decompose(node))
                self.rewired += 1
        if self.rewired:
            model.opset_imports.setdefault("com.microsoft", 1)
        return ir.passes.PassResult(model, modified=bool(self.rewired))
