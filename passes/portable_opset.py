"""The `portable` graph contract: default-domain ONNX ops at opset 23 and nothing else.

- `ConvertOpset(23)`: onnxscript's version converter (onnxscript/version_converter) moves the export's
  default-domain opset (20 for torch 2.13's dynamo exporter) to 23, adapting nodes whose op changed;
  the opset-23 fusions (RMSNormalization, RotaryEmbedding, Attention) need it.
- `StandardOpsOnly`: the last step. It fails, naming the ops, when a node of another domain is left
  (an `onnxopt` custom op that was not decomposed, an onnxscript intermediate SDPA that nothing consumed,
  a com.microsoft op), or when the graph imports an opset other than 23: then the package would not
  load in "any ONNX runtime", and the optimizer writes nothing rather than a graph that breaks that promise.
"""

from __future__ import annotations

import collections

import onnx_ir as ir
from onnxscript import version_converter

from onnxopt.errors import UserError

PORTABLE_OPSET = 23


class ConvertOpset(ir.passes.InPlacePass):
    def __init__(self, version: int = PORTABLE_OPSET):
        super().__init__()
        self.version = version

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = model.opset_imports.get("")
        if before == self.version:
            return ir.passes.PassResult(model, modified=False)
        version_converter.convert_version(model, self.version)
        if model.opset_imports.get("") != self.version:
            raise UserError(f"the graph's opset {before} could not be converted to {self.version}")
        return ir.passes.PassResult(model, modified=True)


class StandardOpsOnly(ir.passes.InPlacePass):
    """Raises UserError unless every node is a default-domain op and the graph imports only opset 23."""

    def __init__(self, version: int = PORTABLE_OPSET):
        super().__init__()
        self.version = version

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        others = collections.Counter(f"{n.domain}::{n.op_type}" for n in model.graph.all_nodes() if n.domain not in ("", "ai.onnx"))
        if others:
            listed = ", ".join(f"{op} x{count}" for op, count in sorted(others.items()))
            raise UserError(
                f"target portable: ops outside the ONNX standard are left in the graph ({listed}); "
                "a fusion or decomposition did not apply to this architecture, so nothing was written"
            )
        version = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
        if version != self.version:
            raise UserError(f"target portable: the graph imports ONNX opset {version}, expected {self.version}")
        unused = [d for d in model.opset_imports if d not in ("", "ai.onnx")]
        for domain in unused:
            del model.opset_imports[domain]  # an import of an unused custom domain would still bind a runtime
        modified = bool(unused or model.functions)
        model.functions.clear()  # none is called: no node is outside the default domain
        return ir.passes.PassResult(model, modified=modified)
