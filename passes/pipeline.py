"""Optimizer pipelines: per target, an ordered list of named steps (data, not code paths).

A step builds either an onnxscript RewriteRuleSet (a local fusion; its match count is reported)
or an onnx-ir in-place pass (whole-graph work). `build` returns None when the step's module is not
available in this checkout; the step is then skipped and reported "not available".

    report = run_pipeline(model, "cpu", num_layers=30)
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import time
from collections.abc import Callable

import onnx_ir as ir
from onnxscript.rewriter import RewriteRuleSet

from onnxopt.errors import UserError
from onnxopt.passes import cleanup, ort_fusions
from onnxopt.passes.gqa_interface import GQASharedBufferInterface
from onnxopt.passes.report import PipelineReport, StepResult, nodes_per_layer

logger = logging.getLogger(__name__)

TARGETS = ("cpu", "cuda", "portable")


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    build: Callable[[int], RewriteRuleSet | ir.passes.PassBase | None]  # num_layers -> rules or pass
    expected: Callable[[int], int] | None = None  # num_layers -> matches this step should make


def _optional_rules(module: str, function: str = "rules") -> Callable[[int], RewriteRuleSet | None]:
    """`function()` of a module that may not exist yet (another engineer's work in progress)."""

    def build(num_layers: int) -> RewriteRuleSet | None:
        try:
            mod = importlib.import_module(f"onnxopt.passes.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"onnxopt.passes.{module}":
                raise
            return None
        rules = getattr(mod, function, None)
        return rules() if callable(rules) else None

    return build


def _per_layer(n: int) -> Callable[[int], int]:
    return lambda num_layers: n * num_layers


CPU = (
    Step("cleanup", lambda L: cleanup.cleanup()),
    Step("shape_optimization", lambda L: ort_fusions.shape_optimization_rules()),
    Step("cleanup_shapes", lambda L: cleanup.cleanup()),
    # Two norms per layer (plus the final one); skip_rms then absorbs the residual Adds.
    Step("rms_normalization", lambda L: ort_fusions.rms_normalization_rules(), _per_layer(2)),
    # After rms_normalization: the skip pattern consumes the fused SimplifiedLayerNormalization.
    Step("skip_rms_normalization", lambda L: ort_fusions.skip_rms_normalization_rules(), _per_layer(2)),
    Step("rotary_embedding", lambda L: ort_fusions.rotary_embedding_rules(), _per_layer(2)),
    # After rotary_embedding: it replaces the cos/sin computation the RotaryEmbedding nodes read.
    Step("cos_sin_cache", lambda L: ort_fusions.cos_sin_cache_rules(), _per_layer(2)),
    Step("cse", lambda L: cleanup.cse()),
    Step("sdpa", lambda L: ort_fusions.sdpa_rules(), _per_layer(1)),
    # The SDPA rewrite adds nodes without shapes; the GQA check reads shapes.
    Step("shape_inference", lambda L: cleanup.shape_inference()),
    Step("gqa", lambda L: ort_fusions.gqa_rules(), _per_layer(1)),
    # Each GQA rewrite derives its own sequence lengths; CSE merges them into one shared pair.
    Step("cleanup_gqa", lambda L: cleanup.cleanup()),
    # Needs every layer's GQA; leaves the graph unchanged (and says why) otherwise.
    Step("gqa_interface", lambda L: GQASharedBufferInterface(L), _per_layer(1)),
    # Packing runs after attention fusion: the GQA pattern matches three separate projections.
    Step("pack_qkv", _optional_rules("pack_qkv")),
    Step("swiglu", _optional_rules("swiglu")),
    # ORT CPU cannot run domain `onnxopt`: the SwiGLU node goes back to standard ops (packed weights stay).
    Step("swiglu_decompose", _optional_rules("swiglu", "decompose_rules")),
    Step("cleanup_final", lambda L: cleanup.cleanup()),
)

PIPELINES: dict[str, tuple[Step, ...] | None] = {"cpu": CPU, "cuda": None, "portable": None}


def pipeline(target: str) -> tuple[Step, ...]:
    if target not in PIPELINES:
        raise UserError(f"--target {target!r}: expected one of {', '.join(TARGETS)}")
    steps = PIPELINES[target]
    if steps is None:
        raise UserError(f"--target {target}: not yet implemented (available: cpu)")
    return steps


def run_step(model: ir.Model, step: Step, num_layers: int) -> StepResult:
    """Apply one step in place; returns what it did."""
    started = time.perf_counter()
    work = step.build(num_layers)
    nodes_before = sum(1 for _ in model.graph)
    note = None
    if work is None:
        matches, note = None, "not available"
    elif isinstance(work, RewriteRuleSet):
        matches = work.apply_to_model(model)
    else:
        result = work(model)
        assert result.model is model, f"{step.name}: expected an in-place pass"
        matches = getattr(work, "rewired", None)
        note = getattr(work, "miss", None)
    expected = step.expected(num_layers) if step.expected and work is not None else None
    if note is None and expected is not None and (matches or 0) < expected:
        note = f"expected {expected} matches"
    seconds = time.perf_counter() - started
    nodes_after = sum(1 for _ in model.graph)
    logger.info("%s: %s matches, %d -> %d nodes, %.2fs", step.name, matches, nodes_before, nodes_after, seconds)
    return StepResult(step.name, matches, seconds, nodes_after, expected=expected, note=note)


def run_pipeline(model: ir.Model, target: str, *, num_layers: int, progress=None, stop_after: str | None = None) -> PipelineReport:
    """Run the target's pipeline on `model` in place (all of it, or up to and including `stop_after`).

    `progress` is an onnxopt.progress.Steps (or None)."""
    report = PipelineReport(target=target, num_layers=num_layers, nodes_before=nodes_per_layer(model, num_layers))
    for step in pipeline(target):
        if progress is not None:
            progress.next(step.name)
        report.steps.append(run_step(model, step, num_layers))
        if step.name == stop_after:
            break
    report.nodes_after = nodes_per_layer(model, num_layers)
    return report
