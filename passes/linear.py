"""MatMul with its norm, SwiGLU, bias and residual add -> onnxopt::Linear (the CUDA runtime's projections).

Applied by the CUDA runtime when it loads a package with `onnxopt` nodes (`optimize --target cuda`),
like passes/w8a8_integer.py: the package keeps standard MatMuls (so `quantize`, the CPU runtime and
other tools read it), and the runtime gets one launch per projection (custom_ops/linear.py):

    SimplifiedLayerNormalization(h, g) -> MatMul(., W)       =>  Linear(h, W^T, gamma=g)
    SkipSimplifiedLayerNormalization(MatMul(a, Wo), h, g)    =>  s = Linear(a, Wo^T, residual=h)
        .output -> MatMul(., W2);  .sum -> s                      Linear(s, W2^T, gamma=g)
    onnxopt::SwiGLU(MatMul(x, Wgu))                          =>  Linear(x, Wgu^T, activation="swiglu")
    Add(MatMul(x, W), b)                                     =>  Linear(x, W^T, bias=b)

A MatMul becomes Linear when its weight is a constant [K, N] of the input's dtype (float16/float32)
and K a multiple of 16 bytes; the weight is stored transposed ([N, K], contiguous rows for the GEMV).
With `packed=True`, a weight-only quantized projection, com.microsoft MatMulNBits (4 or 8 bits) with
constant B, scales and zero points (no g_idx, no bias input), becomes Linear with `bits` and its packed
weight as is, when a 16-byte load of codes stays inside one block (K and block_size multiples of
128 / bits). The CUDA runtime asks for it by default (`CudaRuntime(packed_linear=False)` keeps ORT's
MatMulNBits): on an H100 (2026-12-06, llama-8b, int4-wo block 128) decode ran at 371.1 tok/s with it,
against 312.0 for ORT's MatMulNBits in an earlier run on a cpu-target package (2026-11-24; docs/BENCHMARKS.md).
A tied LM head, MatMul(x, Cast(Transpose(embedding))), gets the embedding table [V, H] cast.
A norm output other nodes also read (the last-token gather before the LM head) keeps a
SimplifiedLayerNormalization for them. Every fold requires the intermediate value to have no other
reader and not to be a graph output, so the graph computes the same function (`Decompose` restores
the standard ops; tests compare the two). The same folds extend onnxopt::LinearFp8 nodes, which
passes/linear_fp8.py makes of the `fp8` scheme's Q/DQ MatMuls (`fold_neighbours`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.custom_ops import linear, linear_fp8

# The fused projections the folds below extend: both take X, W [N, K], gamma, residual, bias as inputs
# 0-4 and the attributes activation and epsilon (passes/linear_fp8.py makes LinearFp8 nodes).
FUSED_OPS = {linear.OP_TYPE: linear, linear_fp8.OP_TYPE: linear_fp8}


def _attrs(node: ir.Node) -> dict:
    return {name: attr.value for name, attr in node.attributes.items()}


def _is_linear(node: ir.Node | None) -> bool:
    return node is not None and node.domain == linear.DOMAIN and node.op_type in FUSED_OPS


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def _set_input(node: ir.Node, index: int, value: ir.Value | None) -> None:
    """Set input `index` of a Linear node, growing its input list with absent inputs."""
    while len(node.inputs) <= index:
        node.resize_inputs(len(node.inputs) + 1)
    node.replace_input_with(index, value)


def _sole_reader(value: ir.Value) -> ir.Node | None:
    """The one node reading `value` (once), or None if several read it or it is a graph output."""
    if value.is_graph_output():
        return None
    uses = list(value.uses())
    if len(uses) != 1:
        return None
    return uses[0].node


_NP = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16}


def _weight(value: ir.Value | None, dtype) -> tuple[str, object] | None:
    """The MatMul weight as (name, thunk giving the [K, N] NumPy array) when it is a constant, or a
    constant through Transpose(perm=[1, 0]) and Cast nodes (a tied LM head reads the embedding table
    so, cast in a float16 graph); None when the GEMV cannot read it (computed, not the input's
    dtype, K not a multiple of 16 bytes)."""
    if value is None or value.dtype != dtype or dtype not in linear.DTYPES:
        return None
    if value.shape is None or len(value.shape) != 2 or not isinstance(value.shape[0], int):
        return None
    if value.shape[0] % (16 // np.dtype(_NP[dtype]).itemsize):
        return None
    chain = []
    source = value
    while source.const_value is None:
        producer = source.producer()
        if producer is None or producer.domain not in ("", "ai.onnx") or len(chain) > 4:
            return None
        attrs = _attrs(producer)
        if producer.op_type == "Transpose" and list(attrs.get("perm") or []) == [1, 0]:
            chain.append(np.transpose)
        elif producer.op_type == "Cast" and attrs.get("to") in _NP:
            chain.append(lambda a, to=_NP[attrs["to"]]: a.astype(to))
        else:
            return None
        source = producer.inputs[0]
        if source is None:
            return None

    def array() -> np.ndarray:
        a = source.const_value.numpy()
        for op in reversed(chain):
            a = op(a)
        return a

    return source.name + ("" if not chain else f".{len(chain)}"), array


class FuseLinear(ir.passes.InPlacePass):
    """The rewrites of the module docstring; `rewired` counts Linear nodes, `folded` what they absorbed."""

    def __init__(self, *, packed: bool = False):
        super().__init__()
        self.packed = packed  # MatMulNBits too (module docstring)
        self.rewired = 0
        self.folded: dict[str, int] = {}
        self.miss: str | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.rewired, self.folded = 0, {"swiglu": 0, "bias": 0, "residual": 0, "norm": 0}
        transposed: dict[str, ir.Value] = {}
        kept = 0
        for node in list(graph):
            if node.op_type == "MatMulNBits" and node.domain == "com.microsoft" and self.packed:
                new = _packed_linear(node)
                if new is None:
                    kept += 1
                else:
                    self._replace(graph, node, new)
                    self.rewired += 1
                continue
            if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
                continue
            x, w = node.inputs
            found = _weight(w, x.dtype or w.dtype)  # MatMul's inputs share a dtype (x may be untyped)
            if found is None:
                kept += 1
                continue
            key, array = found
            if key not in transposed:
                # a copy: a view (a transposed tied table is one) would pin the package's memory map
                tensor = ir.tensor(np.array(array().T, order="C", copy=True), name=f"{key}.T")
                transposed[key] = value = ir.Value(name=tensor.name, shape=ir.Shape(tensor.shape),
                                                   type=ir.TensorType(w.dtype), const_value=tensor)
                graph.register_initializer(value)
            new = linear.make_node(x, transposed[key], name=node.name)
            self._replace(graph, node, new)
            self.rewired += 1
        for node in reversed(list(graph)):  # the Transpose / Cast of tied LM heads, now unread
            if node.op_type in ("Transpose", "Cast") and not any(list(o.uses()) or o.is_graph_output() for o in node.outputs):
                graph.remove(node, safe=True)
        for name, value in list(graph.initializers.items()):
            if not list(value.uses()) and not value.is_graph_output() and not value.is_graph_input():
                graph.initializers.pop(name)  # the untransposed weights
        if self.rewired:
            model.opset_imports.setdefault(linear.DOMAIN, linear.VERSION)
            self.folded = fold_neighbours(graph)
        self.miss = (f"{kept} MatMuls kept (weight not a constant of the input's dtype, or a MatMulNBits the "
                     "GEMV cannot read)") if kept else None
        return ir.passes.PassResult(model, modified=bool(self.rewired))

    @staticmethod
    def _replace(graph: ir.Graph, old: ir.Node, new: ir.Node) -> None:
        out, made = old.outputs[0], new.outputs[0]
        made.name, out.name = out.name, None
        made.shape, made.type = out.shape or made.shape, out.type or made.type
        ir.convenience.replace_nodes_and_values(graph, old, [old], [new], [out], [made])


def fold_neighbours(graph: ir.Graph) -> dict[str, int]:
    """Fold into the Linear and LinearFp8 nodes of `graph` the bias Add, SwiGLU, residual add and norm
    around them (the module docstring's rules); returns how many of each."""
    folded = {"swiglu": 0, "bias": 0, "residual": 0, "norm": 0}
    _fold_bias(graph, folded)  # before SwiGLU: the bias is added to the gate | up product
    _fold_swiglu(graph, folded)
    _fold_skip_norm(graph, folded)  # before the plain norms: it moves its norm into its readers
    _fold_norm(graph, folded)
    return folded


def _fold_swiglu(graph: ir.Graph, folded: dict) -> None:
    """SwiGLU(Linear(...)) -> Linear(..., activation="swiglu"): the packed gate | up product's only
    reader; the Linear then writes the SwiGLU's output."""
    for node in list(graph):
        if node.domain != linear.DOMAIN or node.op_type != "SwiGLU":
            continue
        producer = node.inputs[0].producer() if node.inputs[0] is not None else None
        if not _is_linear(producer) or _input(producer, 3) is not None or linear.attributes_of(producer)["activation"]:
            continue
        if _sole_reader(producer.outputs[0]) is not node:
            continue
        producer.attributes["activation"] = ir.AttrString("activation", "swiglu")
        made, out = producer.outputs[0], node.outputs[0]
        made.shape, made.type = out.shape, out.type
        out.replace_all_uses_with(made, replace_graph_outputs=True)
        made.name, out.name = out.name, None
        graph.remove(node, safe=True)
        folded["swiglu"] += 1

def _fold_bias(graph: ir.Graph, folded: dict) -> None:
    for node in list(graph):
        if node.op_type != "Add" or node.domain not in ("", "ai.onnx"):
            continue
        for i in (0, 1):
            producer = node.inputs[i].producer() if node.inputs[i] is not None else None
            bias = node.inputs[1 - i]
            if (not _is_linear(producer) or _input(producer, 3) is not None or _input(producer, 4) is not None
                    or linear.attributes_of(producer)["activation"]):
                continue
            if _sole_reader(producer.outputs[0]) is not node or bias is None or bias.const_value is None:
                continue
            n = producer.inputs[1].shape[0]
            if bias.dtype != producer.outputs[0].dtype or bias.shape is None or list(bias.shape) != [n]:
                continue
            _set_input(producer, 4, bias)
            made, out = producer.outputs[0], node.outputs[0]
            out.replace_all_uses_with(made, replace_graph_outputs=True)
            made.name, out.name = out.name, None
            graph.remove(node, safe=True)
            folded["bias"] += 1
            break

def _fold_skip_norm(graph: ir.Graph, folded: dict) -> None:
    for node in list(graph):
        if node.op_type != "SkipSimplifiedLayerNormalization" or node.domain != "com.microsoft":
            continue
        if _input(node, 3) is not None or any(list(o.uses()) or o.is_graph_output()
                                              for o in node.outputs[1:3] if o is not None):
            continue
        for i in (0, 1):
            producer = node.inputs[i].producer() if node.inputs[i] is not None else None
            if not _is_linear(producer) or _input(producer, 3) is not None:
                continue
            if _sole_reader(producer.outputs[0]) is not node:
                continue
            gamma, epsilon = node.inputs[2], float(_attrs(node).get("epsilon", 1e-5))
            if gamma is None or gamma.const_value is None or gamma.dtype != producer.outputs[0].dtype:
                continue
            total_out = node.outputs[3] if len(node.outputs) > 3 else None
            if total_out is not None and total_out.is_graph_output():
                continue
            # the Linear now makes the sum (the residual stream); the norm moves into its readers
            _set_input(producer, 3, node.inputs[1 - i])
            total = producer.outputs[0]
            if total_out is not None:
                total_out.replace_all_uses_with(total)
                if total_out.name:
                    total.name, total_out.name = total_out.name, None
            folded["residual"] += 1
            _norm_readers(graph, folded, node, node.outputs[0], total, gamma, epsilon)
            graph.remove(node, safe=True)
            break

def _fold_norm(graph: ir.Graph, folded: dict) -> None:
    for node in list(graph):
        if node.op_type != "SimplifiedLayerNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        attrs = _attrs(node)
        if attrs.get("axis", -1) != -1 or any(list(o.uses()) for o in node.outputs[1:] if o is not None):
            continue
        gamma = node.inputs[1]
        if gamma is None or gamma.const_value is None or gamma.dtype != node.inputs[0].dtype:
            continue
        out = node.outputs[0]
        if out.is_graph_output():
            continue
        moved = 0
        for use in list(out.uses()):
            reader = use.node
            if _is_linear(reader) and use.idx == 0 and not _has_prologue(reader):
                reader.replace_input_with(0, node.inputs[0])
                _set_norm(reader, gamma, float(attrs.get("epsilon", 1e-5)))
                moved += 1
        folded["norm"] += moved
        if not list(out.uses()):
            graph.remove(node, safe=True)

def _norm_readers(graph: ir.Graph, folded: dict, node: ir.Node, normed: ir.Value, total: ir.Value, gamma: ir.Value,
                  epsilon: float) -> None:
    """Readers of the removed SkipSimplifiedLayerNormalization's output: Linear nodes normalize
    `total` themselves; any other reader gets a SimplifiedLayerNormalization of it."""
    rest = []
    for use in list(normed.uses()):
        reader = use.node
        if _is_linear(reader) and use.idx == 0 and not _has_prologue(reader):
            reader.replace_input_with(0, total)
            _set_norm(reader, gamma, epsilon)
            folded["norm"] += 1
        else:
            rest.append(use)
    if rest or normed.is_graph_output():
        norm = ir.Node("", "SimplifiedLayerNormalization", [total, gamma],
                       [ir.AttrInt64("axis", -1), ir.AttrFloat32("epsilon", epsilon), ir.AttrInt64("stash_type", 1)],
                       num_outputs=1, name=f"{node.name}/norm")
        made = norm.outputs[0]
        made.dtype, made.shape = normed.dtype, normed.shape
        graph.insert_after(node, norm)
        normed.replace_all_uses_with(made, replace_graph_outputs=True)
        made.name, normed.name = normed.name, None


def _packed_linear(node: ir.Node) -> ir.Node | None:
    """A MatMulNBits node as a Linear with its packed weight, or None when the GEMV cannot read it."""
    attrs = _attrs(node)
    x, b, scales = (_input(node, i) for i in range(3))
    zero_points = _input(node, 3)
    bits, block_size, k = int(attrs.get("bits", 4)), int(attrs.get("block_size", 0)), int(attrs.get("K", 0))
    if bits not in (4, 8) or any(_input(node, i) is not None for i in (4, 5)):  # g_idx, bias
        return None
    vals = 128 // bits  # codes per 16-byte load
    if k % vals or block_size % vals or x is None or x.dtype not in linear.DTYPES:
        return None
    if any(v is None or v.const_value is None for v in (b, scales)) or scales.dtype != x.dtype:
        return None
    if zero_points is not None and (zero_points.const_value is None or zero_points.dtype != ir.DataType.UINT8):
        return None  # float zero points: not in this GEMV
    return linear.make_node(x, b, scales=scales, zero_points=zero_points, bits=bits, block_size=block_size,
                            name=node.name)


def _has_prologue(node: ir.Node) -> bool:
    """Whether a Linear node already normalizes its input."""
    return _input(node, 2) is not None


def _set_norm(node: ir.Node, gamma: ir.Value, epsilon: float) -> None:
    _set_input(node, 2, gamma)
    node.attributes["epsilon"] = ir.AttrFloat32("epsilon", epsilon)


class Decompose(ir.passes.InPlacePass):
    """onnxopt::Linear and LinearFp8 -> standard ops (their modules' `decompose`); `rewired` counts them."""

    def __init__(self):
        super().__init__()
        self.rewired = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.rewired = 0
        for node in list(model.graph):
            if not _is_linear(node):
                continue
            nodes, y = FUSED_OPS[node.op_type].decompose(node)
            out = node.outputs[0]
            y.name, out.name = out.name, None
            y.shape, y.type = out.shape, out.type
            ir.convenience.replace_nodes_and_values(model.graph, node, [node], nodes, [out], [y])
            self.rewired += 1
        if self.rewired:
            model.opset_imports.setdefault("com.microsoft", 1)
        return ir.passes.PassResult(model, modified=bool(self.rewired))


def apply(model: ir.Model) -> int:
    """FuseLinear on `model` in place; returns how many Linear nodes it made."""
    fuse = FuseLinear()
    fuse(model)
    return fuse.rewired
