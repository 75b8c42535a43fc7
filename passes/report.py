"""The optimizer's report: per step matches and time, nodes per decoder layer, missed fusions and why.

Why a fusion missed comes from onnxscript's match tracer (onnxscript/rewriter/_basics.py,
`MatchingTracer`, passed as `RewriteRuleSet.apply_to_model(model, tracer=...)`): for every rule it
keeps the attempts that got furthest (most pattern nodes matched; a failed check counts as further
than a structural mismatch). `MissTracer` keeps the furthest *failed* attempt per rule, also when the
rule fired elsewhere (a fusion that fired in 29 of 30 layers), and `why_missed` turns it into one
short line: "<rule>: <the rewriter's failure message> (at <node>, <n> pattern nodes matched)".
"""

from __future__ import annotations

import collections
import dataclasses
import re
import statistics

import onnx_ir as ir
from onnxscript.rewriter._basics import MatchingTracer, MatchInfo, MatchStatus

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
        lines.append("expected fusions that did not fire: " + ("" if missed else "none"))
        lines += [f"  {s.name}: {s.note}" for s in missed]  # one line each: the note carries the reason
        if self.verify:
            lines.append(
                "verified against the unfused graph: max |dlogits| prefill "
                f"{self.verify['max_abs_diff_prefill']:.2e}, decode {self.verify['max_abs_diff_decode']:.2e}"
            )
        return "\n".join(lines)


class MissTracer(MatchingTracer):
    """A MatchingTracer that keeps, per rule, the furthest attempt that did not succeed."""

    def log(self, rule, container, node, match_result, status) -> None:
        if status == MatchStatus.SUCCESS:
            return
        super().log(rule, container, node, match_result, status)


_REASON_CHARS = 200


def why_missed(tracer: MissTracer) -> str | None:
    """The furthest failed attempt over all rules, as one short line; None when nothing was tried."""
    best: tuple[int, str, MatchInfo] | None = None
    for rule, infos in tracer.best_matches_map.items():
        for info in infos[:1]:
            if best is None or info.score() > best[0]:
                best = (info.score(), getattr(rule, "name", None) or type(rule).__name__, info)
    if best is None:
        return None
    _, name, info = best
    reason = " ".join(str(info.match_result.reason or "no reason given").split())
    if len(reason) > _REASON_CHARS:
        reason = reason[: _REASON_CHARS - 3] + "..."
    kind = "check failed" if info.status == MatchStatus.CONDITION_FAILED else "pattern mismatch"
    where = info.root_node.name or info.root_node.op_type
    return f"{name}: {kind}: {reason} (at {where}, {len(info.match_result.nodes)} pattern nodes matched)"


def _layer_of(node: ir.Node) -> int | None:
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes", "") or node.name
    found = _LAYER.findall(scopes)
    return int(found[-1]) if found else None


_PRESENT = re.compile(r"^present\.(\d+)\.")


def node_layers(model: ir.Model) -> dict[int, list[ir.Node]]:
    """Decoder layer -> its nodes.

    A node keeps the layer its exporter recorded (torch name scopes, or optimum's node names); a
    node writing `present.{i}.*` is layer i (a fused GroupQueryAttention). A node made by a rewrite
    has neither. It takes the lowest layer among its consumers when it is downstream of a layer or
    all its consumers are in one layer (the packed QKV MatMul feeds its layer's attention; a norm on
    the residual stream feeds its own layer before later ones); else the highest layer among its
    inputs' producers (the final norm and the logits). Nodes shared by every layer (the rotary cache,
    the sequence lengths) are in none."""
    nodes = list(model.graph)  # topological order
    own: dict[int, int | None] = {}
    forward: dict[int, int | None] = {}
    for node in nodes:
        layer = _layer_of(node)
        if layer is None:
            present = [int(m.group(1)) for v in node.outputs if (m := _PRESENT.match(v.name or ""))]
            layer = min(present) if present else None
        own[id(node)] = layer
        inherited = [forward.get(id(v.producer())) for v in node.inputs if v is not None and v.producer() is not None]
        inherited = [x for x in inherited if x is not None]
        forward[id(node)] = layer if layer is not None else (max(inherited) if inherited else None)
    assigned: dict[int, int | None] = {}
    for node in reversed(nodes):
        layer = own[id(node)]
        if layer is None:
            consumers = {assigned.get(id(user)) for v in node.outputs for user, _ in v.uses()} - {None}
            if consumers and (forward[id(node)] is not None or len(consumers) == 1):
                layer = min(consumers)
            else:
                layer = forward[id(node)]
        assigned[id(node)] = layer
    layers: dict[int, list[ir.Node]] = collections.defaultdict(list)
    for node in nodes:
        if assigned[id(node)] is not None:
            layers[assigned[id(node)]].append(node)
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
