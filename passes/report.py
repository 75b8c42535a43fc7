"""The optimizer's report: per step matches and time, nodes per decoder layer, missed fusions."""

from __future__ import annotations

import collections
import dataclasses
import re
import statistics

import onnx_ir as ir

_LAYER = re.compile(r"\blayers\.(\d+)\b")


@dataclasses.dataclass
class StepResult:
    name: str
    matches: int | None  # rewrites made; None when the step does not count (a cleanup) or was skipped
    seconds: float
    nodes: int  # graph nodes after the step
    expected: int | None = None
    note: str | None = None  # "not available", or why an expected fusion did not fire

    @property
    def missed(self) -> bool:
        return self.expected is not None and (self.matches or 0) < self.expected

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "matches": self.matches,
            "seconds": round(self.seconds, 4),
            "nodes": self.nodes,
            "expected": self.expected,
            "note": self.note,
        }


@dataclasses.dataclass
class PipelineReport:
    target: str
    num_layers: int
    nodes_before: dict
    nodes_after: dict | None = None
    steps: list[StepResult] = dataclasses.field(default_factory=list)
    verify: dict | None = None  # {"max_abs_diff_prefill", "max_abs_diff_decode", ...} when verified

    @property
    def missed(self) -> list[StepResult]:
        return [s for s in self.steps if s.missed]

    def to_json(self) -> dict:
        return {
            "target": self.target,
            "num_layers": self.num_layers,
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "steps": [s.to_json() for s in self.steps],
            "missed": [f"{s.name}: {s.note}" for s in self.missed],
            "verify": self.verify,
        }

    def format_text(self) -> str:
        lines = [f"target {self.target}", f"{'step':<24}{'matches':>9}{'seconds':>10}{'nodes':>8}  note"]
        for s in self.steps:
            matches = "-" if s.matches is None else str(s.matches)
            lines.append(f"{s.name:<24}{matches:>9}{s.seconds:>10.3f}{s.nodes:>8}  {s.note or ''}".rstrip())
        before, after = self.nodes_before, self.nodes_after or {}
        lines.append(
            f"nodes per decoder layer: {before['per_layer']} -> {after.get('per_layer')}; "
            f"total {before['total']} -> {after.get('total')}"
        )
        if after.get("ops_per_layer"):
            ops = ", ".join(f"{op} {n}" for op, n in after["ops_per_layer"].items())
            lines.append(f"ops per decoder layer after: {ops}")
        missed = self.missed
        lines.append(
            "expected fusions that did not fire: " + ("; ".join(f"{s.name} ({s.note})" for s in missed) if missed else "none")
        )
        if self.verify:
            lines.append(
                "verified against the unfused graph: max |dlogits| prefill "
                f"{self.verify['max_abs_diff_prefill']:.2e}, decode {self.verify['max_abs_diff_decode']:.2e}"
            )
        return "\n".join(lines)


def _layer_of(node: ir.Node) -> int | None:
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes", "") or node.name
    found = _LAYER.findall(scopes)
    return int(found[-1]) if found else None


def node_layers(model: ir.Model) -> dict[int, list[ir.Node]]:
    """Decoder layer -> its nodes. A node keeps the layer its exporter recorded (torch name scopes);
    a node made by a rewrite has none and takes the highest layer among its inputs' producers."""
    layers: dict[int, list[ir.Node]] = collections.defaultdict(list)
    seen: dict[int, int | None] = {}
    for node in model.graph:  # topological order
        layer = _layer_of(node)
        if layer is None:
            inherited = [seen.get(id(v.producer())) for v in node.inputs if v is not None and v.producer() is not None]
            inherited = [x for x in inherited if x is not None]
            layer = max(inherited) if inherited else None
        seen[id(node)] = layer
        if layer is not None:
            layers[layer].append(node)
    return layers


def nodes_per_layer(model: ir.Model, num_layers: int) -> dict:
    layers = node_layers(model)
    counts = [len(layers.get(i, [])) for i in range(num_layers)]
    ops = collections.Counter(n.op_type for n in layers.get(num_layers // 2, []))
    return {
        "total": sum(1 for _ in model.graph),
        "per_layer": int(statistics.median(counts)) if counts else 0,
        "ops_per_layer": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
    }
