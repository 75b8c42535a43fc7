"""The ops of domain `onnxopt`, by op type, for code that handles any of them (runtime graph split, typing).

Each op module provides DOMAIN, OP_TYPE, VERSION, DTYPES, `reference`, `infer_node` and `decompose`.
"""

from __future__ import annotations

from types import ModuleType

import onnx_ir as ir

from onnxopt.custom_ops import swiglu

DOMAIN = "onnxopt"
OPS: dict[str, ModuleType] = {module.OP_TYPE: module for module in (swiglu,)}


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
