"""onnxscript's ORT fusion rule sets, reused as our named pipeline steps.

The order follows onnxscript/rewriter/ort_fusions/_core.py (`fuse_xformers`), which is the order
the patterns depend on: the rotary and cos/sin-cache fusions feed the SDPA pattern, and the GQA
pattern consumes the SDPA node, the rotary nodes and the KV concat. The rule sets are onnxscript's
module-level objects; the one stateful rule (cos_sin_cache) clears its state after each graph.

Fused ops (com.microsoft contrib ops, ORT docs/ContribOperators.md): SimplifiedLayerNormalization,
SkipSimplifiedLayerNormalization, RotaryEmbedding, GroupQueryAttention; SDPA is an onnxscript
intermediate function that the GQA rule consumes (or that is inlined again by `cleanup`).
"""

from __future__ import annotations

from onnxscript.rewriter import RewriteRuleSet
from onnxscript.rewriter.ort_fusions import (
    cos_sin_cache,
    gqa,
    rms_normalization,
    rotary_embedding,
    sdpa,
    shape_optimization,
    skip_normalization,
)


def shape_optimization_rules() -> RewriteRuleSet:
    """Folds Shape/Concat arithmetic the dynamo exporter leaves around reshapes."""
    return shape_optimization.rules


def rms_normalization_rules() -> RewriteRuleSet:
    return rms_normalization.rms_normalization_ruleset


def skip_rms_normalization_rules() -> RewriteRuleSet:
    return skip_normalization.skip_rms_normalization_ruleset


def rotary_embedding_rules() -> RewriteRuleSet:
    return rotary_embedding.rotary_embedding_rules


def cos_sin_cache_rules() -> RewriteRuleSet:
    return cos_sin_cache.cos_sin_cache_rules


def sdpa_rules() -> RewriteRuleSet:
    return sdpa.sdpa_rules


def gqa_rules() -> RewriteRuleSet:
    return gqa.gqa_rules
