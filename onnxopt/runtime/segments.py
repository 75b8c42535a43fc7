"""Split a graph at its `onnxopt` nodes into ONNX Runtime segments and custom-op launches.

ONNX Runtime cannot run domain `onnxopt`. The CUDA runtime (runtime/cuda.py) runs a graph that has such
nodes (`optimize --target cuda` keeps `onnxopt::SwiGLU`) as a sequence of parts in the graph's
topological order: each maximal run of other nodes is one ORT model (a *segment*), each `onnxopt` node a
launch of its kernel (custom_ops/, ../shared/DESIGN.md "Custom ops").

    plan = split(ir.load(path))            # consumes the loaded model
    for part in plan.parts:
        part.kind                          # "ort" or "op"
        part.inputs, part.outputs          # value names, in the part's order
        part.model                         # "ort": a standalone ir.Model; serialize(part.model) -> bytes
        part.op                            # "op": the custom_ops module (reference, cuda, ...)

A value produced in one part and read in a later one (a *boundary*: the packed gate/up projection and
the SwiGLU output between layers, the residual stream) becomes an output of its producer and an input of
each part that reads it. Graph inputs (input_ids, the KV cache, seqlens) go to every part that reads them,
under their own names, and graph outputs come from the part that makes them, so a caller binds the KV
buffers to the segments exactly as to the whole graph. An initializer read by several segments (the
rotary caches; a tied embedding read by both the Gather and the LM head) is copied into each: ORT holds
one copy per session.

`run_reference` runs a plan on the CPU with ORT segments and each op's NumPy reference; tests check it
against the same graph with its custom nodes decomposed, which is what proves a split correct.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType

import numpy as np
import onnx_ir as ir

from onnxopt.custom_ops import registry

# protobuf refuses to serialize a message of 2 GiB or more; larger segments are saved to a directory
PROTO_LIMIT = 2**31 - 2**20


@dataclasses.dataclass
class Part:
    kind: str  # "ort" or "op"
    inputs: list[str]
    outputs: list[str]
    model: ir.Model | None = None  # kind "ort"
    op: ModuleType | None = None  # kind "op": a custom_ops module
    node_name: str | None = None  # kind "op"
    # kind "op": the node's inputs in order, each ("value", name), ("const", name) or None (absent);
    # the constants' tensors (NumPy, read once); its attributes; ORT-style types of its values
    args: list | None = None
    constants: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    attributes: dict = dataclasses.field(default_factory=dict)
    types: dict[str, tuple[str, list]] = dataclasses.field(default_factory=dict)

    def call_args(self, lookup, constants: dict | None = None) -> list:
        """The op's positional inputs: `lookup(name)` for values, the constants (from `constants`, e.g.
        their device copies, else the NumPy tensors), None for absent inputs."""
        return op_args(self.args, lookup, self.constants if constants is None else constants)


def op_args(args: list, lookup, constants: dict) -> list:
    """Positional inputs of an op part from its `args` (Part.args): values by `lookup(name)`, constants
    from `constants` by name, None for absent inputs."""
    return [None if a is None else lookup(a[1]) if a[0] == "value" else constants[a[1]] for a in args]


@dataclasses.dataclass
class Plan:
    parts: list[Part]
    inputs: list[str]  # the graph's inputs, in its order
    outputs: list[str]  # the graph's outputs, in its order

    @property
    def segments(self) -> list[Part]:
        return [p for p in self.parts if p.kind == "ort"]

    @property
    def boundaries(self) -> list[str]:
        """Values passed between parts (neither graph inputs nor graph outputs), in production order."""
        ends = set(self.inputs) | set(self.outputs)
        return [name for part in self.parts for name in part.outputs if name not in ends]


def has_custom_nodes(model: ir.Model) -> bool:
    return bool(registry.custom_nodes(model.graph))


def split(model: ir.Model) -> Plan:
    """The plan of `model` (see the module docstring). The model's nodes move into the parts: do not
    use `model` afterwards. A graph without `onnxopt` nodes becomes one segment."""
    graph = model.graph
    if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
           for node in graph for attr in node.attributes.values()):
        raise ValueError("splitting a graph with subgraphs (If/Loop/Scan) is not supported")
    graph.sort()
    groups: list[tuple[str, list[ir.Node]]] = []
    for node in graph:
        if registry.op_module(node) is not None:  # raises for an unknown onnxopt op
            groups.append(("op", [node]))
        elif groups and groups[-1][0] == "ort":
            groups[-1][1].append(node)
        else:
            groups.append(("ort", [node]))
    graph_inputs = [v.name for v in graph.inputs]
    graph_outputs = [v.name for v in graph.outputs]
    initializers = dict(graph.initializers)
    produced = {out.name for _, nodes in groups for node in nodes for out in node.outputs}
    # which parts read each non-initializer value (graph inputs and node outputs)
    readers: dict[str, set[int]] = {}
    for index, (_, nodes) in enumerate(groups):
        for node in nodes:
            for value in node.inputs:
                if value is not None and value.name not in initializers:
                    readers.setdefault(value.name, set()).add(index)
    for name in graph_outputs:
        if name in graph_inputs or name not in produced:
            raise ValueError(f"graph output {name!r} is not computed by a node; cannot split")

    opsets = dict(model.opset_imports)
    graph.outputs.clear()
    graph.remove([node for _, nodes in groups for node in nodes], safe=False)
    parts = []
    loaded: dict[str, np.ndarray] = {}  # initializers op parts read, read once (the rotary tables of every layer)
    for index, (kind, nodes) in enumerate(groups):
        made = {out.name for node in nodes for out in node.outputs}
        inputs, outputs = [], []
        for node in nodes:
            for value in node.inputs:
                if value is not None and value.name not in initializers and value.name not in made and value.name not in inputs:
                    inputs.append(value.name)
        for node in nodes:
            for out in node.outputs:
                if out.name in graph_outputs or any(r > index for r in readers.get(out.name, ())):
                    outputs.append(out.name)
        if kind == "op":
            node = nodes[0]
            args, constants = [], {}
            for value in node.inputs:
                if value is None:
                    args.append(None)
                elif value.name in initializers:
                    args.append(("const", value.name))
                    if value.name not in loaded:  # a copy: a view would pin the package's memory map, which
                        # a segment reading the same initializer closes when it serializes (BufferError)
                        loaded[value.name] = np.array(value.const_value.numpy(), copy=True)
                    constants[value.name] = loaded[value.name]
                else:
                    args.append(("value", value.name))
            types = {v.name: _ort_type(v) for v in (*node.inputs, *node.outputs) if v is not None and v.name not in initializers}
            attributes = {name: attr.value for name, attr in node.attributes.items()}
            parts.append(Part("op", inputs, outputs, op=registry.op_module(node), node_name=node.name, args=args,
                              constants=constants, attributes=attributes, types=types))
            continue
        parts.append(Part("ort", inputs, outputs, model=_segment_model(model, nodes, inputs, outputs, initializers, opsets, index)))
    return Plan(parts, graph_inputs, graph_outputs)


_ORT_NAMES = {ir.DataType.FLOAT: "float", ir.DataType.FLOAT16: "float16", ir.DataType.INT64: "int64",
              ir.DataType.INT32: "int32", ir.DataType.BOOL: "bool"}


def _ort_type(value: ir.Value) -> tuple[str, list]:
    """(ORT type string, shape with ints, names or None) of a value, as onnxruntime.NodeArg gives them."""
    dtype = value.dtype
    type_name = f"tensor({_ORT_NAMES.get(dtype, dtype.name.lower() if dtype else 'unknown')})"
    shape = None if value.shape is None else [d if isinstance(d, int) else (d.value if d.value else None) for d in value.shape]
    return type_name, shape


def _segment_model(model: ir.Model, nodes, inputs: list[str], outputs: list[str], initializers: dict,
                   opsets: dict, index: int) -> ir.Model:
    """A standalone model of `nodes` (already removed from their graph): fresh input values replace the
    values made elsewhere, and each initializer read becomes this segment's own value over the same tensor."""
    fresh: dict[str, ir.Value] = {}
    consts: dict[str, ir.Value] = {}
    made = {out.name: out for node in nodes for out in node.outputs}
    for node in nodes:
        for i, value in enumerate(node.inputs):
            if value is None or value.name in made:
                continue
            if value.name in initializers:
                if value.name not in consts:
                    src = initializers[value.name]
                    consts[value.name] = ir.Value(name=src.name, shape=src.shape, type=src.type, const_value=src.const_value)
                node.replace_input_with(i, consts[value.name])
            else:
                if value.name not in fresh:
                    fresh[value.name] = ir.Value(name=value.name, shape=value.shape, type=value.type)
                node.replace_input_with(i, fresh[value.name])
    graph = ir.Graph([fresh[name] for name in inputs], [made[name] for name in outputs], nodes=nodes,
                     initializers=list(consts.values()), opset_imports=opsets, name=f"segment_{index}")
    return ir.Model(graph, ir_version=model.ir_version, producer_name="onnxopt segment")


def serialize(model: ir.Model) -> bytes | None:
    """The segment as ModelProto bytes with its weights inline (read from the package's external data),
    for `onnxruntime.InferenceSession(bytes)`; None when it would pass protobuf's 2 GiB limit (save it
    to a directory with `ir.save(..., external_data=...)` instead)."""
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if size >= PROTO_LIMIT:
        return None
    proto = ir.to_proto(ir.external_data.load_to_model(model))
    return proto.SerializeToString()


def run_reference(plan: Plan, feeds: dict[str, np.ndarray], *, session_options=None) -> dict[str, np.ndarray]:
    """Run `plan` on the CPU: ORT CPU sessions for the segments, each op's NumPy `reference` (tests)."""
    import onnxruntime as ort

    values = dict(feeds)
    for part in plan.parts:
        if part.kind == "op":
            outs = part.op.reference(*part.call_args(values.__getitem__), **part.attributes)
            outs = outs if isinstance(outs, tuple) else (outs,)
        else:
            data = serialize(part.model)
            if data is None:
                raise ValueError("segment too large for the in-memory reference runner")
            session = ort.InferenceSession(data, sess_options=session_options, providers=["CPUExecutionProvider"])
            outs = session.run(part.outputs, {name: values[name] for name in part.inputs})
        values.update(zip(part.outputs, outs))
    return {name: values[name] for name in plan.outputs}
