"""Last-token logits: only each row's last real position goes through the LM head.

Generation reads one logits row per sequence, yet prefill computes [B, S, V]: for SmolLM2 a 128-token
prompt is 128 × 49152 × 576 multiply-adds in the LM head for one useful row. This pass gathers the
hidden state right before the LM-head MatMul (after the final norm, which is cheap):

    index_B     = Min(Cast<int64>(seqlens_k_B), S - 1)
    S - 1       = ReduceSum(Cast<int64>(Equal(input_ids, input_ids)), axes=[1], keepdims=0) - 1
    hidden_B1H  = GatherElements(hidden_BSH, Expand(Reshape(index_B, [B, 1, 1]), [1, 1, H]), axis=1)
    logits_B1V  = MatMul(hidden_B1H, weight_HV)                          (was logits_BSV)

S - 1 is computed on the device from input_ids itself (the sum of a row of ones), not from
Shape(input_ids): ORT computes shapes on the host, and a CUDA node reading a host-computed value gets
a host-to-device copy that a CUDA-graph capture refuses (onnxopt/runtime/cuda.py captures the decode
step of this graph). Four small kernels per step, ~2 us each on an H100; the same ops as the
seqlens_k subgraph, which ORT already runs on the device.

seqlens_k is the [B] int32 value passes/gqa_interface.py derives from attention_mask: for row b with
P_b tokens cached and n_b new ones (right-padded to S = max_b n_b), seqlens_k[b] = P_b + n_b - 1, and
the row's last real token sits at position n_b - 1 of this step. The index is that position when
- prefill from an empty cache (P_b = 0): min(S - 1, n_b - 1) = n_b - 1;
- decode, one token per row (S = 1): min(0, seqlens_k[b]) = 0;
- a continuation chunk that fills every row (n_b = S; always so at batch 1): min(S - 1, P_b + S - 1) = S - 1.
A ragged continuation (P_b > 0 and n_b < S) is not covered; neither our runtime nor onnxruntime-genai
feeds one. Perplexity needs every position: `onnxopt optimize --full-logits` leaves this step out.

The export's `concat` interface (attention_mask + past_key_values.*, the `portable` target) has no
seqlens_k; its contract is left padding (onnxopt/runtime/kv_cache.py, and onnxruntime-genai's), so
every row's last real token is at S - 1 and the gather is a Slice:

    hidden_B1H  = Slice(hidden_BSH, starts=[-1], ends=[INT64_MAX], axes=[1])

Accepts a logits output made by a MatMul on a rank-3 hidden state with a static hidden size, any
float dtype, optionally followed by Casts. The manifest records `io.logits: "last"` (optimize.py).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.passes.gqa_interface import seqlens_k

LOGITS, INPUT_IDS = "logits", "input_ids"


class _Miss(Exception):
    """The graph is not in the form this pass rewrites; the message says why."""


def last_token_only(graph: ir.Graph) -> bool:
    """Whether the graph's logits are [B, 1, V] (this pass ran)."""
    logits = next((v for v in graph.outputs if v.name == LOGITS), None)
    return logits is not None and logits.shape is not None and len(logits.shape) == 3 and logits.shape[1] == 1


class LastTokenLogits(ir.passes.InPlacePass):
    def __init__(self):
        super().__init__()
        self.miss: str | None = None
        self.rewired = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        try:
            matmul, casts, seqlens = self._plan(graph)
        except _Miss as e:
            self.miss = str(e)
            return ir.passes.PassResult(model, modified=False)
        hidden = matmul.inputs[0]
        input_ids = next(v for v in graph.inputs if v.name == INPUT_IDS)
        if seqlens is None:  # concat interface: left-padded
            nodes = _slice_last(hidden, int(hidden.shape[2]))
        else:
            nodes = _gather_last(hidden, input_ids, seqlens, int(hidden.shape[2]))
        graph.insert_before(matmul, nodes)
        matmul.replace_input_with(0, nodes[-1].outputs[0])
        logits = casts[-1].outputs[0] if casts else matmul.outputs[0]
        batch, vocab = hidden.shape[0], logits.shape[2] if logits.shape is not None else None
        for value in [matmul.outputs[0], *(c.outputs[0] for c in casts)]:
            value.shape = ir.Shape([batch, 1, vocab])
        self.rewired = 1
        return ir.passes.PassResult(model, modified=True)

    def _plan(self, graph: ir.Graph) -> tuple[ir.Node, list[ir.Node], ir.Value]:
        """The LM-head MatMul, the Casts between it and `logits`, and seqlens_k; or _Miss."""
        logits = next((v for v in graph.outputs if v.name == LOGITS), None)
        if logits is None:
            raise _Miss(f"the graph has no {LOGITS!r} output")
        if last_token_only(graph):
            raise _Miss(f"{LOGITS!r} is already [B, 1, V] (last token only)")
        if not any(v.name == INPUT_IDS for v in graph.inputs):
            raise _Miss(f"the graph has no {INPUT_IDS!r} input (S = its second dimension)")
        seqlens = seqlens_k(graph)
        if seqlens is None and not _concat_interface(graph):
            raise _Miss("neither seqlens_k from attention_mask (gqa_interface's shared buffers) nor the "
                        "concat interface (attention_mask and past_key_values.* inputs)")
        casts, node = [], logits.producer()
        while node is not None and node.op_type == "Cast" and node.domain == "":
            casts.insert(0, node)
            node = node.inputs[0].producer()
        if node is None or node.op_type != "MatMul" or node.domain != "":
            found = "a graph input" if node is None else f"{node.domain or 'ai.onnx'}.{node.op_type}"
            raise _Miss(f"{LOGITS!r} is made by {found}, not an LM-head MatMul")
        for value in (node.outputs[0], *(c.outputs[0] for c in casts)):
            if len(value.uses()) != (0 if value is logits else 1):  # its shape is about to change
                raise _Miss(f"{node.name}: the LM-head output {value.name!r} has other consumers")
        hidden = node.inputs[0]
        if hidden.shape is None or len(hidden.shape) != 3 or not isinstance(hidden.shape[2], int):
            raise _Miss(f"{node.name}: LM-head input {hidden.name!r} is not [B, S, H] with a static H")
        return node, casts, seqlens


def _concat_interface(graph: ir.Graph) -> bool:
    names = {v.name for v in graph.inputs}
    return "attention_mask" in names and any(n.startswith("past_key_values.") for n in names)


def _slice_last(hidden: ir.Value, hidden_size: int) -> list[ir.Node]:
    """hidden_B1H = hidden_BSH[:, -1:, :] (left-padded rows end at S - 1)."""

    def constant(name, values):
        return ir.node("Constant", [], attributes={"value": ir.tensor(np.array(values, np.int64), name=name)},
                       name=f"{name}_const")

    starts, ends, axes = constant("last_token_start", [-1]), constant("last_token_end", [np.iinfo(np.int64).max]), \
        constant("last_token_axis", [1])
    last = ir.node("Slice", [hidden, starts.outputs[0], ends.outputs[0], axes.outputs[0]], name="last_token_hidden")
    out = last.outputs[0]
    out.name, out.dtype, out.shape = "last_token_hidden", hidden.dtype, ir.Shape([hidden.shape[0], 1, hidden_size])
    return [starts, ends, axes, last]


def _gather_last(hidden: ir.Value, input_ids: ir.Value, seqlens: ir.Value, hidden_size: int) -> list[ir.Node]:
    """Nodes computing hidden_B1H (the last one's output) from hidden_BSH, per the module docstring."""

    def constant(name, array):
        tensor = ir.tensor(np.array(array, np.int64), name=name)
        return ir.node("Constant", [], attributes={"value": tensor}, name=f"{name}_const")

    one = constant("last_token_one", [1])
    axis = constant("last_token_axis", [1])
    shape_1d = constant("last_token_index_shape", [-1, 1, 1])
    expand_to = constant("last_token_expand_shape", [1, 1, hidden_size])
    # S - 1 per row, on the device (module docstring): the sum of a row of ones, minus one.
    ones = ir.node("Equal", [input_ids, input_ids], name="last_token_ones")  # [B, S] bool
    ones_int = ir.node("Cast", [ones.outputs[0]], attributes={"to": ir.DataType.INT64}, name="last_token_ones_int")
    seq = ir.node("ReduceSum", [ones_int.outputs[0], axis.outputs[0]], attributes={"keepdims": 0},
                  name="last_token_seq_len")  # [B]: S
    last_position = ir.node("Sub", [seq.outputs[0], one.outputs[0]], name="last_token_max_index")  # [B]: S - 1
    lengths = ir.node("Cast", [seqlens], attributes={"to": ir.DataType.INT64}, name="last_token_seqlens")  # [B]
    index = ir.node("Min", [lengths.outputs[0], last_position.outputs[0]], name="last_token_index")  # [B]
    index_b11 = ir.node("Reshape", [index.outputs[0], shape_1d.outputs[0]], name="last_token_index_b11")
    index_b1h = ir.node("Expand", [index_b11.outputs[0], expand_to.outputs[0]], name="last_token_index_b1h")
    gather = ir.node("GatherElements", [hidden, index_b1h.outputs[0]], attributes={"axis": 1}, name="last_token_hidden")
    out = gather.outputs[0]
    out.name, out.dtype, out.shape = "last_token_hidden", hidden.dtype, ir.Shape([hidden.shape[0], 1, hidden_size])
    return [one, axis, shape_1d, expand_to, ones, ones_int, seq, last_position, lengths, index, index_b11, index_b1h,
            gather]
