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
from onnxopt.passes import cleanup, gqa_mask_window, ort_fusions, portable_attention, portable_attention_3d, portable_fusions, sdpa_decompose
from onnxopt.passes.contrib_shapes import RotaryEmbeddingShapes
from onnxopt.passes.float16 import ConvertToFloat16
from onnxopt.passes.gqa_custom import ToCustom
from onnxopt.passes.gqa_interface import GQASharedBufferInterface
from onnxopt.passes.last_token_logits import LastTokenLogits
from onnxopt.passes.optimum_forms import TorchScriptForms
from onnxopt.passes.portable_opset import ConvertOpset, StandardOpsOnly
from onnxopt.passes.rotary_cache import RotaryCacheInitializers
from onnxopt.passes.report import MissTracer, PipelineReport, StepResult, nodes_per_layer, why_missed

logger = logging.getLogger(__name__)

TARGETS = ("cpu", "cuda", "portable")


@dataclasses.dataclass(frozen=True)
class Model:
    """What a step may need to know about the model beyond its graph (the package's dims)."""

    num_layers: int
    max_context: int | None = None  # positions the rotary cache must cover; None: as the graph computes them


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    build: Callable[[Model], RewriteRuleSet | ir.passes.PassBase | None]  # the model -> rules or pass
    expected: Callable[[int], int] | None = None  # num_layers -> matches this step should make


def _optional_rules(module: str, function: str = "rules") -> Callable[[Model], RewriteRuleSet | None]:
    """`function()` of a module that may not exist yet (another engineer's work in progress)."""

    def build(model: Model) -> RewriteRuleSet | None:
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
    # Before every fusion: rewrites optimum's (TorchScript) op forms into those the rules below
    # match, and gives the head splits static shapes; a no-op on our dynamo exports.
    Step("torchscript_forms", lambda L: TorchScriptForms()),
    # Two norms per layer (plus the final one); skip_rms then absorbs the residual Adds.
    Step("rms_normalization", lambda L: ort_fusions.rms_normalization_rules(), _per_layer(2)),
    # After rms_normalization: the skip pattern consumes the fused SimplifiedLayerNormalization.
    Step("skip_rms_normalization", lambda L: ort_fusions.skip_rms_normalization_rules(), _per_layer(2)),
    Step("rotary_embedding", lambda L: ort_fusions.rotary_embedding_rules(), _per_layer(2)),
    # After rotary_embedding: it replaces the cos/sin computation the RotaryEmbedding nodes read.
    Step("cos_sin_cache", lambda L: ort_fusions.cos_sin_cache_rules(), _per_layer(2)),
    # Before sdpa: its check binds B, H, S, Dh across the RotaryEmbedding outputs and the keys.
    Step("rotary_shapes", lambda L: RotaryEmbeddingShapes()),
    Step("cse", lambda L: cleanup.cse()),
    Step("sdpa", lambda L: ort_fusions.sdpa_rules(), _per_layer(1)),
    # The SDPA rewrite adds nodes without shapes; the GQA check reads shapes.
    Step("shape_inference", lambda L: cleanup.shape_inference()),
    # onnxscript's GQA rule with a mask check that works: causal or sliding window (local_window_size).
    Step("gqa", lambda L: gqa_mask_window.gqa_rules(), _per_layer(1)),
    # After gqa: attention it did not take goes back to standard ops (no runtime has SDPA).
    Step("sdpa_decompose", lambda L: sdpa_decompose.rules()),
    # Each GQA rewrite derives its own sequence lengths; CSE merges them into one shared pair.
    Step("cleanup_gqa", lambda L: cleanup.cleanup()),
    # Needs every layer's GQA; leaves the graph unchanged (and says why) otherwise.
    Step("gqa_interface", lambda m: GQASharedBufferInterface(m.num_layers, max_positions=m.max_context), _per_layer(1)),
    # After gqa_interface: it made the rotary positions Range(0, max_context), a constant subgraph.
    Step("rotary_cache", lambda m: RotaryCacheInitializers(m.max_context)),
    # After gqa_interface: it gathers each row's last position with the seqlens_k computed there.
    # Left out by `optimize --full-logits` (FULL_LOGITS_SKIPS).
    Step("last_token_logits", lambda L: LastTokenLogits(), lambda L: 1),
    # Packing runs after attention fusion: the GQA pattern matches three separate projections.
    Step("pack_qkv", _optional_rules("pack_qkv")),
    Step("swiglu", _optional_rules("swiglu")),
    # ORT CPU cannot run domain `onnxopt`: the SwiGLU node goes back to standard ops (packed weights stay).
    Step("swiglu_decompose", _optional_rules("swiglu", "decompose_rules")),
    Step("cleanup_final", lambda L: cleanup.cleanup()),
)

# Steps `optimize --full-logits` leaves out: perplexity needs logits at every position.
FULL_LOGITS_SKIPS = ("last_token_logits",)

# The CPU fusions, but the onnxopt::SwiGLU node stays: the CUDA runtime runs it as a CuPy kernel
# (custom_ops/swiglu.py). ORT CPU cannot load it, so `optimize` verifies a decomposed copy.
CUDA = tuple(step for step in CPU if step.name != "swiglu_decompose")
# Last for the cuda target, after the float16 conversion (which knows com.microsoft's node, not ours):
# each layer's attention becomes onnxopt::GroupQueryAttention, run by our kernels (passes/gqa_custom.py).
CUDA_LAST = (Step("gqa_custom", lambda L: ToCustom(), _per_layer(1)),)

# Standard ONNX opset 23 only (passes/portable_*.py), the export's concat KV interface kept: ONNX's
# Attention takes past_key/past_value and returns present_key/present_value = concat(past, new).
PORTABLE = (
    Step("cleanup", lambda L: cleanup.cleanup()),
    Step("shape_optimization", lambda L: ort_fusions.shape_optimization_rules()),
    Step("cleanup_shapes", lambda L: cleanup.cleanup()),
    # As for cpu: optimum's (TorchScript) op forms into those the rules match; a no-op on our exports.
    Step("torchscript_forms", lambda L: TorchScriptForms()),
    # The opset-23 fusions emit ops of opset 23; the export imports opset 20 (optimum's 14+).
    Step("opset23", lambda L: ConvertOpset(23)),
    # Two norms per layer (plus the final one); the residual Adds stay (ONNX has no skip-RMSNorm).
    Step("rms_normalization23", lambda L: portable_fusions.rms_normalization_rules(), _per_layer(2)),
    Step("rotary_embedding23", lambda L: portable_fusions.rotary_embedding_rules(), _per_layer(2)),
    # Before sdpa: gives the rotary outputs their inputs' shapes, which the SDPA check binds (optimum graphs).
    Step("rotary_shapes", lambda L: RotaryEmbeddingShapes()),
    # Merges the per-layer Cos/Sin of the rotary rewrites into one pair.
    Step("cse", lambda L: cleanup.cse()),
    Step("sdpa", lambda L: ort_fusions.sdpa_rules(), _per_layer(1)),
    # The SDPA rewrite adds nodes without shapes; the attention check reads shapes.
    Step("shape_inference", lambda L: cleanup.shape_inference()),
    # Consumes the intermediate SDPA node, the KV Concats and the repeat-kv.
    Step("attention23", lambda L: portable_attention.rules(), _per_layer(1)),
    # Attention that attention23 did not take goes back to standard ops (no runtime has SDPA).
    Step("sdpa_decompose", lambda L: sdpa_decompose.rules()),
    Step("cleanup_attention", lambda L: cleanup.cleanup()),
    # After attention23 and its cleanup (the shapes it checks): Q/K/V go in as [B, S, H*D].
    Step("attention23_3d", lambda L: portable_attention_3d.rules(), _per_layer(1)),
    Step("cleanup_attention_3d", lambda L: cleanup.cleanup()),
    # The concat interface is left-padded: the last row of each prompt is position S - 1, a Slice.
    # Left out by `optimize --full-logits` (FULL_LOGITS_SKIPS).
    Step("last_token_logits", lambda L: LastTokenLogits(), lambda L: 1),
    Step("swiglu", _optional_rules("swiglu")),
    Step("swiglu_decompose", lambda L: _swiglu_standard_ops()),
    Step("cleanup_final", lambda L: cleanup.cleanup()),
    # Last: fails (naming them) if any non-standard op is left, rather than writing a non-portable graph.
    Step("standard_ops_only", lambda L: StandardOpsOnly(23)),
)

PIPELINES: dict[str, tuple[Step, ...] | None] = {"cpu": CPU, "cuda": CUDA, "portable": PORTABLE}

DTYPES = ("fp32", "fp16")
# Appended for `--dtype fp16`, after every fusion: the fusions match the export's float32 graph.
FLOAT16 = Step("float16", lambda L: ConvertToFloat16())


def _swiglu_standard_ops():
    """SwiGLU decomposed into Split, Sigmoid, Mul, Mul (no com.microsoft QuickGelu)."""
    from onnxopt.passes import swiglu

    return swiglu.decompose_rules(quick_gelu=False)


def pipeline(target: str, dtype: str = "fp32") -> tuple[Step, ...]:
    if target not in PIPELINES:
        raise UserError(f"--target {target!r}: expected one of {', '.join(TARGETS)}")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    steps = PIPELINES[target]
    if steps is None:
        raise UserError(f"--target {target}: not yet implemented (available: cpu)")
    return steps + ((FLOAT16,) if dtype == "fp16" else ()) + (CUDA_LAST if target == "cuda" else ())


def run_step(model: ir.Model, step: Step, num_layers: int, *, max_context: int | None = None) -> StepResult:
    """Apply one step in place; returns what it did."""
    started = time.perf_counter()
    work = step.build(Model(num_layers, max_context))
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
        why = _why_missed(work, model) if isinstance(work, RewriteRuleSet) else None
        if why:
            note += f"; {why}"
    seconds = time.perf_counter() - started
    nodes_after = sum(1 for _ in model.graph)
    logger.info("%s: %s matches, %d -> %d nodes, %.2fs", step.name, matches, nodes_before, nodes_after, seconds)
    return StepResult(step.name, matches, seconds, nodes_after, expected=expected, note=note)


def _why_missed(rules: RewriteRuleSet, model: ir.Model) -> str | None:
    """Match the rules again with a tracer, which rewrites nothing (onnxscript applies no rewrite
    when given a tracer): the furthest failed attempt among what is left unfused."""
    tracer = MissTracer()
    rules.apply_to_model(model, tracer=tracer)
    return why_missed(tracer)


def run_pipeline(
    model: ir.Model,
    target: str,
    *,
    num_layers: int,
    dtype: str = "fp32",
    max_context: int | None = None,
    progress=None,
    stop_after: str | None = None,
    skip=(),
) -> PipelineReport:
    """Run the target's pipeline on `model` in place (all of it, or up to and including `stop_after`),
    leaving out the steps named in `skip` (e.g. FULL_LOGITS_SKIPS); dtype "fp16" appends the float16 step.

    `progress` is an onnxopt.progress.Steps (or None)."""
    report = PipelineReport(target=target, num_layers=num_layers, nodes_before=nodes_per_layer(model, num_layers))
    for step in pipeline(target, dtype):
        if step.name in skip:
            continue
        if progress is not None:
            progress.next(step.name)
        report.steps.append(run_step(model, step, num_layers, max_context=max_context))
        if step.name == stop_after:
            break
    report.nodes_after = nodes_per_layer(model, num_layers)
    return report
