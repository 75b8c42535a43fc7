"""fp16 conversion: weights, activations and the KV cache in float16; logits stay float32.

What becomes float16: every float32 value that depends on the *data* of `input_ids` or of a float
graph input (the past KV cache): the token stream and everything computed from it. A `Shape`/`Size`
node passes no data, so shape arithmetic on activations stays as it is. Float32 initializers read by
those nodes become float16 (weights; a constant also read by a float32 node gets a Cast instead), and
a `Cast(to=FLOAT)` among them casts to FLOAT16.

What stays float32, and why:
- Position math (from position_ids / attention_mask / sequence lengths): the rotary angles
  pos * inv_freq and their cos/sin, and the additive attention mask. In float16 an angle near
  position 1000 has a spacing of 0.5 rad, so the rotation would be wrong; these values are computed in
  float32 and cast to float16 where an activation reads them (one Cast each, [T, D/2] or [B,1,S,T]).
- Norm statistics: SimplifiedLayerNormalization / RMSNormalization / LayerNormalization accumulate in
  `stash_type` = float32 (set here explicitly; ONNX RMSNormalization spec and ORT contrib ops). ORT's CPU
  SkipSimplifiedLayerNormalization converts fp16 rows to float32 before summing (no attribute to set).
- Softmax: inside GroupQueryAttention ORT CPU computes Q·K^T, softmax and P·V in float32 and rounds only
  the output (onnxruntime/contrib_ops/cpu/bert/gqa_attention_base.h, MlasConvertHalfToFloatBuffer), as
  does its CUDA kernel (flash / memory-efficient attention accumulate in float32).
- `logits`: a Cast back to float32 at the end, for sampling.

ORT CPU has no float16 MatMul kernel; it inserts Casts around such nodes itself (InsertCastTransformer),
so a float16 graph runs there (slowly) and the verify step works on this machine.
The pass reads value dtypes: run it on a shape-inferred graph (the pipeline's graphs are).
onnxruntime.transformers.float16 / onnxconverter-common convert protobufs and would cast the position math
to float16 too; this pass works on onnx-ir and keeps it float32.
"""

from __future__ import annotations

import onnx_ir as ir

FLOAT, FLOAT16 = ir.DataType.FLOAT, ir.DataType.FLOAT16
FLOAT32_OUTPUTS = ("logits",)
_NO_DATA = frozenset({"Shape", "Size"})  # outputs depend on an input's shape, not its values
_NORMS_WITH_STASH = frozenset({"SimplifiedLayerNormalization", "RMSNormalization", "LayerNormalization"})


def _activation_nodes(graph: ir.Graph) -> set[int]:
    """ids of the nodes that read, transitively, the data of input_ids or of a float graph input."""
    seeds = [v for v in graph.inputs if v.name == "input_ids" or v.dtype in (FLOAT, FLOAT16)]
    found: set[int] = set()
    stack = list(seeds)
    while stack:
        value = stack.pop()
        for node, _ in value.uses():
            if id(node) in found or node.op_type in _NO_DATA:
                continue
            found.add(id(node))
            stack.extend(node.outputs)
    return found


class ConvertToFloat16(ir.passes.InPlacePass):
    """Converts the model in place; `rewired` counts the values made float16 (the report's matches)."""

    def __init__(self, float32_outputs=FLOAT32_OUTPUTS):
        super().__init__()
        self.float32_outputs = tuple(float32_outputs)
        self.rewired = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        active = _activation_nodes(graph)
        casts: dict[int, ir.Value] = {}  # id(float32 value) -> its float16 Cast
        converted: set[int] = set()

        def to_float16(value: ir.Value) -> None:
            if value.dtype == FLOAT and id(value) not in converted:
                value.dtype = FLOAT16
                converted.add(id(value))

        kept = {v.name for v in graph.outputs if v.name in self.float32_outputs and v.dtype == FLOAT}
        for node in list(graph):  # topological: inputs are settled before their readers
            if id(node) not in active or (node.op_type == "Cast" and node.outputs[0].name in kept):
                continue  # not an activation, or the float32 logits Cast of an earlier run
            for index, value in enumerate(node.inputs):
                if value is None or value.dtype != FLOAT or id(value) in converted:
                    continue
                producer = value.producer()
                if producer is not None and id(producer) in active:
                    continue  # converted when its producer was visited
                if value.is_initializer() and all(id(user) in active for user, _ in value.uses()):
                    value.const_value = ir.tensor(value.const_value.numpy().astype("float16"), name=value.name)
                    to_float16(value)
                elif value.is_graph_input():
                    to_float16(value)  # the past KV cache
                else:
                    node.replace_input_with(index, self._cast(graph, node, value, casts))
            if node.op_type == "Cast" and node.attributes["to"].as_int() == FLOAT:
                node.attributes["to"] = ir.AttrInt64("to", FLOAT16)
            if node.op_type in _NORMS_WITH_STASH:
                node.attributes["stash_type"] = ir.AttrInt64("stash_type", FLOAT)
            for value in node.outputs:
                to_float16(value)
        self._float32_outputs(graph)
        self.rewired = len(converted)
        return ir.passes.PassResult(model, modified=bool(converted))

    @staticmethod
    def _cast(graph: ir.Graph, reader: ir.Node, value: ir.Value, casts: dict[int, ir.Value]) -> ir.Value:
        """A float16 copy of a float32 value, made once and placed before its first float16 reader."""
        if id(value) not in casts:
            cast = ir.node("Cast", [value], attributes={"to": FLOAT16}, name=f"{value.name}_fp16")
            cast.outputs[0].name = f"{value.name}_fp16"
            cast.outputs[0].dtype, cast.outputs[0].shape = FLOAT16, value.shape
            graph.insert_before(reader, cast)
            casts[id(value)] = cast.outputs[0]
        return casts[id(value)]

    def _float32_outputs(self, graph: ir.Graph) -> None:
        """Graph outputs named in float32_outputs get a Cast back to float32 under their own name."""
        for i, value in enumerate(graph.outputs):
            if value.name not in self.float32_outputs or value.dtype != FLOAT16:
                continue
            name = value.name
            value.name = f"{name}_fp16"
            cast = ir.node("Cast", [value], attributes={"to": FLOAT}, name=f"{name}_fp32")
            out = cast.outputs[0]
            out.name, out.dtype, out.shape = name, FLOAT, value.shape
            graph.append(cast)
            graph.outputs[i] = out
