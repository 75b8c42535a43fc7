"""GroupQueryAttention fusion that checks what the attention mask computes (causal, sliding window).

onnxscript's `GroupQueryAttention` rule (ort_fusions/gqa.py) replaces the attention subgraph with
com.microsoft GroupQueryAttention, which applies a causal mask of its own and drops the graph's
mask. Its mask check is a no-op in onnxscript 0.7.2 (`_causal_mask_pattern.match` returns a failed
MatchResult, never None, so `if mask_match_result is None` never rejects), and the rewrite never
sets `local_window_size`: a Mistral graph with sliding_window = 8 fuses into plain causal attention
and its logits change once the context passes 8 tokens. This rule is that rule with a real check;
it also carries the SDPA's non-default `scale` over, which onnxscript's rewrite drops.

The mask subgraph is evaluated on ONNX Runtime (protobuf at the I/O edge only) with probe inputs:
batch 2, attention_mask all ones for row 0 and left-padded for row 1, past lengths P and new
lengths S covering prefill, chunked prefill and decode at total lengths T = P + S up to 2**17.
Writing q = P + i for query row i and key column j, the rule accepts exactly

    allowed[b, i, j] = (j <= q) and (j > q - W) and attention_mask[b, j] == 1      (W = inf: causal)

for every probe and every query row that is not padding; an additive mask must be 0 where allowed
and at most half the dtype's minimum (or -inf) elsewhere. W is read from the longest decode probe
(allowed keys = min(T, W)). Anything else (bidirectional or prefix masks, ALiBi-style biases, a mask
on other inputs) makes the rule reject the node with the reason, so attention stays unfused.

transformers' sliding window keeps key j for query q when q - j < sliding_window, i.e. W keys
including q itself. ORT's GroupQueryAttention takes `local_window_size` ("left_window_size for local
attention (like Mistral)", ContribOperators.md) and, measured on ORT 1.32 CPU against the unfused
graph (tiny Mistral, W = 8, prefill 7 + 8 decode steps), keeps the same W keys with
local_window_size = W (W - 1 and W - 2 change the logits by 0.14 and 0.25); onnxruntime-genai's model
builder also sets local_window_size to the config's window. Windows wider than the longest probe
(2**17 tokens) are not detected.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions import gqa

logger = logging.getLogger(__name__)

_DECODE_TOTALS = tuple(2**k for k in range(18))  # T = P + 1 of the decode probes: 1 ... 131072
_PREFILL = ((0, 9), (5, 6), (16, 3))  # (P, S): prefill and chunked prefill, short enough to be dense
_PAD = 2  # row 1's attention_mask starts with this many zeros (left padding)


class _Unsupported(Exception):
    """The mask is not causal / sliding-window causal over the probes; the message says how."""


def _elem_type(value: ir.Value) -> int:
    return ir.serde.serialize_value(value).type.tensor_type.elem_type


def _mask_model(model: ir.Model, graph: ir.Graph, mask: ir.Value):
    """An onnx ModelProto computing `mask` from the graph inputs it depends on."""
    import onnx

    nodes, inputs, initializers, seen, stack = set(), {}, {}, set(), [mask]
    while stack:
        value = stack.pop()
        if value is None or id(value) in seen:
            continue
        seen.add(id(value))
        if value.is_graph_input():
            inputs[value.name] = value
        elif value.producer() is None:
            if value.const_value is None:
                raise _Unsupported(f"the mask reads {value.name!r}, which is neither an input nor a constant")
            initializers[value.name] = value
        else:
            nodes.add(id(value.producer()))
            stack += list(value.producer().inputs)
    ordered = [n for n in graph if id(n) in nodes]
    other = sorted({f"{n.domain}::{n.op_type}" for n in ordered if n.domain not in ("", "ai.onnx")})
    if other:
        raise _Unsupported(f"the mask subgraph has non-standard ops ({', '.join(other)})")
    # Inputs are declared without static dims: past KV probes are fed with head size 1 (the mask
    # reads only their lengths), so a probe at T = 2**17 costs kilobytes, not the real cache.
    declared = [
        onnx.helper.make_tensor_value_info(v.name, _elem_type(v), [None] * len(v.shape or ())) for v in inputs.values()
    ]
    proto = onnx.helper.make_graph(
        [ir.serde.serialize_node(n) for n in ordered],
        "attention_mask_probe",
        declared,
        [onnx.helper.make_tensor_value_info(mask.name, _elem_type(mask), None)],
        [ir.serde.serialize_tensor(v.const_value) for v in initializers.values()],
    )
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items() if d in ("", "ai.onnx")]
    return onnx.helper.make_model(proto, opset_imports=opsets, ir_version=model.ir_version), list(inputs.values())


def _feeds(inputs: list[ir.Value], past: int, new: int) -> tuple[dict, np.ndarray]:
    batch, total = 2, past + new
    attention = np.ones((batch, total), np.int64)
    attention[1, :_PAD] = 0
    feeds = {}
    for value in inputs:
        if value.name == "input_ids":
            feeds[value.name] = np.full((batch, new), 3, np.int64)
        elif value.name == "attention_mask":
            feeds[value.name] = attention
        elif value.name == "position_ids":
            positions = np.cumsum(attention, axis=1)[:, past:] - 1
            feeds[value.name] = np.maximum(positions, 0).astype(np.int64)
        elif value.name.startswith("past_key_values.") and value.shape is not None and len(value.shape) == 4:
            heads = value.shape[1]
            if not isinstance(heads, int):
                raise _Unsupported(f"{value.name} has no static head count")
            # head size 1: the mask reads only the past length (see _mask_model)
            feeds[value.name] = np.zeros((batch, heads, past, 1), value.dtype.numpy())
        else:
            raise _Unsupported(f"the mask depends on graph input {value.name!r}")
    return feeds, attention


def _allowed(mask: np.ndarray, batch: int, new: int, total: int) -> np.ndarray:
    """[batch, new, total] bool from a [B|1, H|1, S, T] boolean or additive mask."""
    if mask.ndim != 4 or mask.shape[2:] != (new, total):
        raise _Unsupported(f"mask shape {mask.shape} is not [B, H, {new}, {total}]")
    if mask.dtype == np.bool_:
        allowed = mask
    else:
        allowed = mask == 0
        blocked = mask <= np.finfo(mask.dtype).min / 2
        if not (allowed | blocked).all():
            raise _Unsupported("the additive mask has values other than 0 and -inf/min (a bias, e.g. ALiBi)")
    if not (allowed == allowed[:, :1]).all():
        raise _Unsupported("the mask differs between heads")
    return np.broadcast_to(allowed[:, 0], (batch, new, total))


def _expected(attention: np.ndarray, past: int, new: int, window: int | None) -> np.ndarray:
    q = past + np.arange(new)[:, None]
    j = np.arange(past + new)[None, :]
    keep = (j <= q) & ((j > q - window) if window else True)
    return keep[None] & (attention[:, None, :] == 1)


def probe_window(model: ir.Model, graph: ir.Graph, mask: ir.Value) -> int | None:
    """W of a sliding-window causal mask, None for a causal one; raises _Unsupported otherwise."""
    import onnxruntime as ort

    proto, inputs = _mask_model(model, graph, mask)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    window, checked = None, []
    for total in _DECODE_TOTALS:
        if total <= _PAD:
            continue
        feeds, attention = _feeds(inputs, total - 1, 1)
        allowed = _allowed(session.run(None, feeds)[0], 2, 1, total)
        count = int(allowed[0, 0].sum())
        if window is None and count < total:
            window = count
        checked.append((total - 1, 1, allowed, attention))
    for past, new in _PREFILL:
        feeds, attention = _feeds(inputs, past, new)
        checked.append((past, new, _allowed(session.run(None, feeds)[0], 2, new, past + new), attention))
    for past, new, allowed, attention in checked:
        expected = _expected(attention, past, new, window)
        query_rows = attention[:, past:] == 1  # padding query rows are left out
        if not (allowed == expected)[query_rows].all():
            kind = f"sliding-window causal (W={window})" if window else "causal"
            raise _Unsupported(f"the mask is not {kind} with padding at past={past}, new={new}")
    return window


class MaskCheckedGQA(gqa.GroupQueryAttention):
    """onnxscript's GQA rule; the check also evaluates the mask, the rewrite sets local_window_size."""

    def __init__(self):
        super().__init__()
        self._windows: dict[int, int | None | str] = {}  # id(mask) -> W, None (causal) or why not

    def check(self, context, **bindings) -> pattern.MatchResult:
        result = super().check(context, **bindings)
        if not result:
            if isinstance(result, pattern.MatchResult):
                return result
            # onnxscript returns a bare False when the shapes do not bind (check_shape_bool).
            return pattern.MatchResult().fail("query/key/value/past shapes do not agree on B, S, D, Hkv, Dh")
        mask = bindings["mask"]
        if id(mask) not in self._windows:
            try:
                self._windows[id(mask)] = probe_window(context.model, context.graph_or_function, mask)
            except _Unsupported as e:
                self._windows[id(mask)] = f"attention mask: {e}"
            except Exception as e:  # ORT could not build or run the mask subgraph
                self._windows[id(mask)] = f"attention mask could not be evaluated ({type(e).__name__}: {e})"
            logger.info("GQA mask %s: %s", mask.name, self._windows[id(mask)])
        window = self._windows[id(mask)]
        if isinstance(window, str):
            return pattern.MatchResult().fail(window, mask)
        self._window = window
        # onnxscript's rewrite drops the SDPA's `scale` (set when it is not 1/sqrt(Dh)); GQA takes it too.
        sdpa = next((n for n in context.nodes if n.op_type == "SDPA"), None)
        self._scale = sdpa.attributes.get_float("scale", None) if sdpa is not None else None
        return pattern.MatchResult()

    def rewrite(self, op, **bindings):
        outputs = super().rewrite(op, **bindings)
        node = outputs[0].producer()
        if self._window is not None:
            node.attributes["local_window_size"] = ir.AttrInt64("local_window_size", self._window)
        if self._scale is not None:
            node.attributes["scale"] = ir.AttrFloat32("scale", self._scale)
        return outputs


def gqa_rules() -> pattern.RewriteRuleSet:
    """A new rule set per run: the probe results are cached per mask value of one graph."""
    return pattern.RewriteRuleSet([MaskCheckedGQA.rule()])
