"""GroupQueryAttention with shared past/present buffers, fed by onnxruntime-genai's interface.

After onnxscript's `gqa` fusion every layer has one com.microsoft GroupQueryAttention node
(ORT docs/ContribOperators.md, "com.microsoft.GroupQueryAttention") whose `seqlens_k` and
`total_sequence_length` are derived from `position_ids` (ReduceMax ...), and whose past/present
are concat-shaped ([B, Hkv, P, D] -> [B, Hkv, P+S, D]). This pass rewrites the graph to the
contract in ../shared/DESIGN.md ("Graph contract after optimize"), the one onnxruntime-genai feeds:

    inputs   input_ids [B, S] int64, attention_mask [B, T] int64,
             past_key_values.{i}.key|value [B, Hkv, Tmax, D]
    outputs  logits [B, S, V], present.{i}.key|value [B, Hkv, Tmax, D]

- attention_mask is right-padded: attention_mask[b, :n_b] = 1 and 0 after, where n_b = tokens of
  row b after this step and T = max_b n_b. Row b's new tokens are input_ids[b, :n_b - P_b].
- The graph computes GQA's lengths once from it, in the form genai's model builder emits
  (builders/base.py, make_attention_mask_reformatting_for_gqa):
      seqlens_k [B] int32             = Cast(ReduceSum(attention_mask, axes=[1], keepdims=0) - 1) = n_b - 1
      total_sequence_length [] int32  = Cast(Gather(Shape(attention_mask), 1))                   = T
- The runtime binds past and present of each KV tensor to the same [B, Hkv, Tmax, D] buffer; GQA
  then writes the new K/V in place at each row's position (past_present_share_buffer) and
  present_sequence_length = max(past_sequence_length, total_sequence_length) = Tmax.
- The rotary cos/sin cache was computed for positions [0, max(position_ids)]; it now covers
  [0, max_positions) (the model's context; the rotary_cache step then stores it as initializers,
  as GQA's cos_cache/sin_cache [max_positions, rotary_dim/2] are meant to be), or, when
  max_positions is not given, [0, total_sequence_length), computed each run. Either contains
  every position GQA looks up.
- `position_ids` and the subgraphs that only fed the old GQA inputs go away.

The pass changes nothing unless every decoder layer has a GQA node of the expected form, the graph
has an int64 attention_mask input, and neither it nor position_ids has another consumer; `miss`
then says why (the report prints it).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

ATTENTION_MASK = "attention_mask"
# Names of the two values computed from attention_mask (not graph inputs).
SEQLENS_K = "seqlens_k"
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"
MAX_SEQUENCE_LENGTH = "max_sequence_length"
# Inputs whose old consumers (mask building, position-derived lengths) the rewrite cuts.
CUT_INPUTS = (ATTENTION_MASK, "position_ids")
# GroupQueryAttention input/output indices (ContribOperators.md).
_PAST_KEY, _PAST_VALUE, _SEQLENS_K, _TOTAL_SEQ, _COS, _SIN = 3, 4, 5, 6, 7, 8
_PRESENT_KEY, _PRESENT_VALUE = 1, 2


def gqa_nodes(graph: ir.Graph) -> list[ir.Node]:
    """The GroupQueryAttention nodes: com.microsoft's, or ours of the same interface (passes/gqa_custom.py)."""
    return [n for n in graph if n.op_type == "GroupQueryAttention" and n.domain in ("com.microsoft", "onnxopt")]


def seqlens_k(graph: ir.Graph) -> ir.Value | None:
    """The [B] int32 seqlens_k this pass computed from attention_mask, or None before it ran."""
    nodes = gqa_nodes(graph)
    value = nodes[0].inputs[_SEQLENS_K] if nodes and len(nodes[0].inputs) > _SEQLENS_K else None
    return value if value is not None and value.name == SEQLENS_K else None


class _Miss(Exception):
    """The graph is not in the form this pass rewrites; the message says why."""


class GQASharedBufferInterface(ir.passes.InPlacePass):
    def __init__(self, num_layers: int, *, max_positions: int | None = None):
        super().__init__()
        self.num_layers = num_layers
        self.max_positions = max_positions
        self.miss: str | None = None
        self.rewired = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        try:
            nodes, ranges = self._plan(graph)
        except _Miss as e:
            self.miss = str(e)
            return ir.passes.PassResult(model, modified=False)
        mask = _input(graph, ATTENTION_MASK)
        lengths = _lengths_from_mask(mask)
        graph.insert_before(next(iter(graph)), lengths)
        seqlens, total = lengths[-2].outputs[0], lengths[-1].outputs[0]
        for node in nodes:
            node.replace_input_with(_SEQLENS_K, seqlens)
            node.replace_input_with(_TOTAL_SEQ, total)
            for index in (_PAST_KEY, _PAST_VALUE):
                past = node.inputs[index]
                past.shape = ir.Shape([past.shape[0], past.shape[1], MAX_SEQUENCE_LENGTH, past.shape[3]])
            for index in (_PRESENT_KEY, _PRESENT_VALUE):
                node.outputs[index].shape = node.inputs[_PAST_KEY].shape
        for range_node in ranges:
            limit_type = range_node.inputs[1].dtype
            if self.max_positions is not None:
                # Range(0, limit, 1) -> Range(0, max_positions, 1): a constant subgraph, which the
                # rotary_cache step folds into cos/sin initializers (passes/rotary_cache.py).
                limit = ir.Value(name=f"{range_node.name}_max_positions")
                limit.const_value = ir.tensor(np.array(self.max_positions, dtype=limit_type.numpy()))
                limit.dtype, limit.shape = limit_type, ir.Shape([])
                graph.register_initializer(limit)
                range_node.replace_input_with(1, limit)
                continue
            # Range(0, limit, 1) -> Range(0, total_sequence_length, 1) in the limit's own dtype.
            cast = ir.node("Cast", [total], attributes={"to": limit_type}, name=f"{range_node.name}_total_length")
            graph.insert_before(range_node, cast)
            range_node.replace_input_with(1, cast.outputs[0])
        common_passes.RemoveUnusedNodesPass()(model)
        position_ids = _input(graph, "position_ids")
        if position_ids is not None and not position_ids.uses():
            graph.inputs.remove(position_ids)
        self.rewired = len(nodes)
        return ir.passes.PassResult(model, modified=True)

    def _plan(self, graph: ir.Graph) -> tuple[list[ir.Node], list[ir.Node]]:
        """The GQA nodes and the position-dependent Range nodes of the rotary cache; or _Miss."""
        if seqlens_k(graph) is not None or _input(graph, SEQLENS_K) is not None:
            raise _Miss(f"GroupQueryAttention already reads {SEQLENS_K!r} (shared-buffer form)")
        mask = _input(graph, ATTENTION_MASK)
        if mask is None or mask.dtype != ir.DataType.INT64 or mask.shape is None or len(mask.shape) != 2:
            raise _Miss(f"the graph has no int64 [B, T] {ATTENTION_MASK!r} input")
        nodes = gqa_nodes(graph)
        if len(nodes) != self.num_layers:
            raise _Miss(f"GroupQueryAttention fused in {len(nodes)} of {self.num_layers} decoder layers")
        outputs = {v.name for v in graph.outputs}
        for node in nodes:
            if len(node.inputs) <= _TOTAL_SEQ or len(node.outputs) <= _PRESENT_VALUE:
                raise _Miss(f"{node.name}: GroupQueryAttention without past/present or sequence lengths")
            for index in (_PAST_KEY, _PAST_VALUE):
                value = node.inputs[index]
                if value is None or not value.is_graph_input() or not value.name.startswith("past_key_values."):
                    raise _Miss(f"{node.name}: past input {index} is not a past_key_values graph input")
            for index in (_PRESENT_KEY, _PRESENT_VALUE):
                if node.outputs[index].name not in outputs:
                    raise _Miss(f"{node.name}: present output {index} is not a graph output")
        for index in (_SEQLENS_K, _TOTAL_SEQ):
            if len({id(n.inputs[index]) for n in nodes}) != 1:
                raise _Miss(f"GroupQueryAttention nodes do not share one input {index} (sequence lengths)")
        removed = {_input(graph, name) for name in CUT_INPUTS} - {None}
        ranges = []
        for node in nodes:
            for index in (_COS, _SIN):
                if index < len(node.inputs) and node.inputs[index] is not None:
                    ranges += [r for r in _position_ranges(node.inputs[index], removed) if r not in ranges]
        for r in ranges:
            start, delta = (_constant(r.inputs[i]) for i in (0, 2))
            if start != 0 or delta != 1:
                raise _Miss(f"{r.name}: rotary cache positions are not Range(0, n, 1)")
        cut = {(id(n), i) for n in nodes for i in (_SEQLENS_K, _TOTAL_SEQ)} | {(id(r), 1) for r in ranges}
        still_used = _reaches(graph, removed, cut)
        if still_used:
            raise _Miss(f"graph inputs {', '.join(sorted(still_used))} are used beyond GroupQueryAttention")
        return nodes, ranges


def _lengths_from_mask(mask: ir.Value) -> list[ir.Node]:
    """Nodes computing seqlens_k and total_sequence_length from attention_mask (genai's form);
    the last two produce them."""

    def constant(name, array):
        return ir.node("Constant", [], attributes={"value": ir.tensor(array, name=name)}, name=f"{name}_const")

    axis, one = constant("mask_axis_1", np.array([1], np.int64)), constant("mask_one", np.array(1, np.int64))
    total_tokens = ir.node("ReduceSum", [mask, axis.outputs[0]], attributes={"keepdims": 0}, name="mask_row_tokens")
    last = ir.node("Sub", [total_tokens.outputs[0], one.outputs[0]], name="mask_last_position")
    shape = ir.node("Shape", [mask], name="mask_shape")
    width = ir.node("Gather", [shape.outputs[0], one.outputs[0]], attributes={"axis": 0}, name="mask_width")
    seqlens = ir.node("Cast", [last.outputs[0]], attributes={"to": ir.DataType.INT32}, name="mask_seqlens_k")
    total = ir.node("Cast", [width.outputs[0]], attributes={"to": ir.DataType.INT32}, name="mask_total_sequence_length")
    seqlens.outputs[0].name, total.outputs[0].name = SEQLENS_K, TOTAL_SEQUENCE_LENGTH
    seqlens.outputs[0].dtype = total.outputs[0].dtype = ir.DataType.INT32
    seqlens.outputs[0].shape, total.outputs[0].shape = ir.Shape([mask.shape[0]]), ir.Shape([])
    return [axis, one, total_tokens, last, shape, width, seqlens, total]


def _input(graph: ir.Graph, name: str) -> ir.Value | None:
    return next((v for v in graph.inputs if v.name == name), None)


def _constant(value: ir.Value | None):
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return None if tensor is None or tensor.size != 1 else int(tensor.numpy().item())


def _ancestors(values, cut: set = frozenset()) -> set[int]:
    """ids of every value `values` depend on (themselves included), not crossing (node, input) in cut."""
    seen, stack = set(), list(values)
    while stack:
        v = stack.pop()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        producer = v.producer()
        if producer is not None:
            stack += [x for i, x in enumerate(producer.inputs) if (id(producer), i) not in cut]
    return seen


def _position_ranges(value: ir.Value, removed: set[ir.Value]) -> list[ir.Node]:
    """Range nodes above `value` whose limit depends on one of the `removed` graph inputs."""
    found = []
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if v is None or id(v) in seen or v.producer() is None:
            continue
        seen.add(id(v))
        node = v.producer()
        if node.op_type == "Range" and node.domain == "" and any(id(r) in _ancestors([node.inputs[1]]) for r in removed):
            found.append(node)
        stack += list(node.inputs)
    return found


def _reaches(graph: ir.Graph, removed: set[ir.Value], cut: set) -> set[str]:
    """Names of the `removed` inputs that graph outputs still depend on once `cut` edges are gone."""
    live = _ancestors(graph.outputs, cut)
    return {v.name for v in removed if id(v) in live}
