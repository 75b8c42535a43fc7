"""The ops of domain `onnxopt`, by op type, for code that handles any of them (runtime graph split, typing).

Each op module provides DOMAIN, OP_TYPE, VERSION, DTYPES, `reference`, `infer_node` and `decompose`.
"""

from __future__ import annotations

from types import ModuleType

import onnx_ir as ir

from onnxopt.custom_ops import group_query_attention, linear, linear_fp8, swiglu

DOMAIN = "onnxopt"
OPS: dict[str, ModuleType] = {module.OP_TYPE: module for module in (swiglu, group_query_attention, linear, linear_fp8)}


def op_module(node: ir.Node) -> ModuleType | None:
    """The module of an `onnxopt` node's op; None for nodes of other domains."""
    if node.domain != DOMAIN:
        return None
    if node.op_type not in OPS:
        raise ValueError(f"Unknown op {DOMAIN}::{node.op_type} (node {node.name}); known: {sorted(OPS)}")
    return OPS[node.op_type]


def infer_types(graph: ir.Graph) -> int:
    """Type the outputs of every `onnxopt` node of `graph` (ONNX shape inference skips unknown domains)."""
    count = 0
    for node in graph:
        module = op_module(node)
        if module is not None:
            module.infer_node(node)
            count += 1
    return count


def custom_nodes(graph: ir.Graph) -> list[ir.Node]:
    """The `onnxopt` nodes of `graph` (and its subgraphs)."""
    return [node for node in graph.all_nodes() if node.domain == DOMAIN]


def decompose(model: ir.Model, *, quick_gelu: bool = True) -> int:
    """Replace every `onnxopt` node of `model` by its standard-op decomposition, in place; returns how many.

    For runtimes without our kernels: ORT CPU cannot load domain `onnxopt`, so `optimize --target cuda`
    verifies a decomposed copy of the graph it writes. `quick_gelu=False` uses only default-domain ops.
    Raises ValueError if an `onnxopt` op has no decomposition rule here.
    """
    from onnxopt.passes import gqa_custom, linear as linear_pass, swiglu as swiglu_pass  # passes import custom_ops: import late

    def to_microsoft(model: ir.Model) -> int:
        swap = gqa_custom.ToMicrosoft()
        swap(model)
        return swap.rewired

    def linear_ops(model: ir.Model) -> int:
        swap = linear_pass.Decompose()
        swap(model)
        return swap.rewired

    rules = {swiglu.OP_TYPE: swiglu_pass.decompose_rules(quick_gelu=quick_gelu).apply_to_model,
             group_query_attention.OP_TYPE: to_microsoft, linear.OP_TYPE: linear_ops,
             linear_fp8.OP_TYPE: linear_ops}  # one pass decomposes both projection ops
    count = 0
    for op_type in sorted({node.op_type for node in custom_nodes(model.graph)}):
        if op_type not in rules:
            raise ValueError(f"{DOMAIN}::{op_type} has no decomposition (known: {sorted(rules)})")
        count += rules[op_type](model)
    left = custom_nodes(model.graph)
    if left:
        raise ValueError(f"{len(left)} {DOMAIN} nodes were not decomposed (first: {left[0].op_type} {left[0].name})")
    return count
