"""Rotary cos/sin caches as initializers.

GroupQueryAttention with do_rotary reads `cos_cache`/`sin_cache` [max_positions, rotary_dim/2] and
looks up each token's row by its position (ORT docs/ContribOperators.md, GroupQueryAttention inputs
7 and 8). The export computes them from the positions at run time (Range -> MatMul with inv_freq ->
Cos/Sin, times the rope attention scaling where the family has one). Once gqa_interface has fixed
the positions to Range(0, max_positions), that subgraph is constant; this pass evaluates exactly
the nodes feeding GQA's cos/sin inputs (onnxscript's constant folder, limited to those nodes, so no
weight elsewhere gets folded or duplicated) and stores the results as initializers:

    cos_cache[p, i] = cos(p * inv_freq[i]) (* scaling),  sin_cache likewise,  p < max_positions

Nothing is then computed per decode step, and the step has no shape that depends on the sequence
length (what CUDA-graph capture needs). `rewired` counts the caches stored; `miss` says why not.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.optimizer import _constant_folding

from onnxopt.passes.gqa_interface import _COS, _SIN, gqa_nodes


class RotaryCacheInitializers(ir.passes.InPlacePass):
    def __init__(self, max_positions: int | None):
        super().__init__()
        self.max_positions = max_positions
        self.rewired = 0
        self.miss: str | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        caches = {v for n in gqa_nodes(model.graph) for i in (_COS, _SIN) if len(n.inputs) > i and (v := n.inputs[i]) is not None}
        computed = [v for v in caches if v.const_value is None]
        if not computed:
            return ir.passes.PassResult(model, modified=False)
        if self.max_positions is None:
            self.miss = "the model's max context is unknown: the rotary cache stays computed per run"
            return ir.passes.PassResult(model, modified=False)
        feeding = _ancestors(computed)
        if any(v.is_graph_input() for n in feeding for v in n.inputs if v is not None):
            self.miss = "the rotary cache depends on a graph input (gqa_interface did not fix its positions)"
            return ir.passes.PassResult(model, modified=False)
        folder = _constant_folding.FoldConstantsPass(
            shape_inference=False,
            # should_fold decides for the size limits too, except the output one: that one must
            # let the [max_positions, rotary_dim/2] caches through (nothing else is folded).
            input_size_limit=0,
            output_size_limit=2**62,
            should_fold=lambda node: id(node) in {id(n) for n in feeding},
        )
        folder(model)
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        common_passes.RemoveUnusedNodesPass()(model)
        caches = {v for n in gqa_nodes(model.graph) for i in (_COS, _SIN) if len(n.inputs) > i and (v := n.inputs[i]) is not None}
        for v in caches:
            if v.const_value is not None:  # the folder keeps the symbolic shape it had
                v.shape = ir.Shape(v.const_value.shape)
        left = [v.name for v in caches if v.const_value is None]
        if left:
            self.miss = f"rotary cache {', '.join(sorted(left))} could not be evaluated at optimize time"
        self.rewired = len(caches) - len(left)
        return ir.passes.PassResult(model, modified=True)


def _ancestors(values: list[ir.Value]) -> list[ir.Node]:
    """The nodes computing `values`, stopping at constants and initializers."""
    seen: dict[int, ir.Node] = {}
    stack = [v.producer() for v in values if v.producer() is not None]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen[id(node)] = node
        for v in node.inputs:
            if v is not None and v.const_value is None and v.producer() is not None:
                stack.append(v.producer())
    return list(seen.values())
