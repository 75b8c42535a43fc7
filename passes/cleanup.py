"""Cleanup passes between fusions: constant folding, shape inference, dead-code removal, CSE.

These are onnxscript's optimizer and onnx-ir's common passes, composed as named pipeline steps.
Fusion patterns only match folded, shape-annotated graphs, so the pipeline runs `cleanup` before
the first fusion and again where a fusion leaves dead nodes behind (cos_sin_cache keeps its
matched nodes alive on purpose; see onnxscript/rewriter/ort_fusions/cos_sin_cache.py).
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript import rewriter
from onnxscript.optimizer import _constant_folding


def shape_inference() -> ir.passes.InPlacePass:
    return common_passes.ShapeInferencePass()


def remove_unused() -> ir.passes.Sequential:
    return ir.passes.Sequential(
        common_passes.RemoveUnusedNodesPass(),
        common_passes.RemoveUnusedFunctionsPass(),
        common_passes.RemoveUnusedOpsetsPass(),
    )


def cse() -> ir.passes.InPlacePass:
    return common_passes.CommonSubexpressionEliminationPass()


def cleanup() -> ir.passes.Sequential:
    """What onnxscript.optimizer.optimize_ir does, minus function inlining (our exports have none
    left) and NameFixPass (it would rename graph values other steps look up)."""
    return ir.passes.Sequential(
        _constant_folding.FoldConstantsPass(
            shape_inference=True,
            input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
            output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
        ),
        rewriter.RewritePass(rewriter._DEFAULT_REWRITE_RULES),
        remove_unused(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.DeduplicateInitializersPass(),
        common_passes.CommonSubexpressionEliminationPass(),
    )
