"""`onnxopt inspect`: what a model package holds (dims, graph I/O, op histogram, files)."""

from __future__ import annotations

import collections
from pathlib import Path

from onnxopt.package import ModelPackage


def describe(path: str | Path) -> dict:
    import onnx_ir as ir

    package = ModelPackage(path)
    model = ir.load(package.model_path)  # external tensors stay on disk (loaded lazily)
    ops = collections.Counter(
        f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        for node in model.graph.all_nodes()
    )

    def io(values):
        return [
            {"name": v.name, "dtype": str(v.dtype), "shape": [str(d) for d in v.shape] if v.shape is not None else None}
            for v in values
        ]

    manifest = package.manifest
    return {
        "path": str(package.path),
        "source": manifest.get("source"),
        "family": manifest.get("family"),
        "dtype": manifest["dtype"],
        "dims": manifest["dims"],
        "opsets": dict(model.opset_imports),
        "nodes": sum(ops.values()),
        "ops": dict(ops.most_common()),
        "inputs": io(model.graph.inputs),
        "outputs": io(model.graph.outputs),
        "files": {name: entry["bytes"] for name, entry in manifest["files"].items()},
        "passes": manifest.get("passes", []),
        "quantization": manifest.get("quantization"),
        "runs_on": runs_on(package, model),
    }


def runs_on(package: ModelPackage, model) -> dict:
    """How each runtime would run the graph: {"cpu": ..., "cuda": ...}, a line each."""
    from onnxopt.custom_ops import registry
    from onnxopt.passes import w8a8_integer

    custom = registry.custom_nodes(model.graph)
    cpu = ("ONNX Runtime CPU EP, one session" if not custom else
           f"no: {len(custom)} onnxopt custom ops (optimize the unoptimized package with --target cpu)")
    layout = package.io.get("kv_cache", {}).get("layout")
    if layout != "gqa-shared":
        cuda = "no: needs an optimized package (GroupQueryAttention with shared KV buffers)"
    elif package.dtype != "fp16":
        cuda = f"no: needs float16 (dtype {package.dtype}); optimize with --dtype fp16 (or --target cuda)"
    else:
        cuda = (f"{_segments(model.graph)} ORT CUDA segments split at {len(custom)} onnxopt nodes (CuPy kernels)"
                if custom else "one ORT CUDA session")
        int8 = w8a8_integer.count(model.graph)
        if int8:
            cuda += f"; {int8} W8A8 MatMuls as MatMulInteger"
        cuda += "; decode step captured as one CUDA graph"
    return {"cpu": cpu, "cuda": cuda}


def _segments(graph) -> int:
    """ORT segments of a graph split at its onnxopt nodes (runtime/segments.py): runs of other nodes."""
    count, after_custom = 0, True
    for node in graph:  # a stored graph is in topological order
        custom = node.domain == "onnxopt"
        count += not custom and after_custom
        after_custom = custom
    return count


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_text(info: dict) -> str:
    d = info["dims"]
    src = info.get("source") or {}
    lines = [
        f"package   {info['path']}",
        f"source    {src.get('kind')} {src.get('name')} ({info.get('family')})",
        f"dtype     {info['dtype']}",
        f"dims      layers {d['num_layers']}, heads {d['num_heads']}/{d['num_kv_heads']} kv, head {d['head_size']}, "
        f"hidden {d['hidden_size']}, ffn {d['intermediate_size']}, vocab {d['vocab_size']}, context {d['max_context']}",
        "opsets    " + ", ".join(f"{k or 'ai.onnx'}={v}" for k, v in info["opsets"].items()),
        f"nodes     {info['nodes']}",
        "ops       " + ", ".join(f"{op} {n}" for op, n in info["ops"].items()),
        "inputs",
    ]
    lines += [f"  {v['name']:<32} {v['dtype']:<10} [{', '.join(v['shape'] or [])}]" for v in _folded(info["inputs"])]
    lines.append("outputs")
    lines += [f"  {v['name']:<32} {v['dtype']:<10} [{', '.join(v['shape'] or [])}]" for v in _folded(info["outputs"])]
    lines.append("files")
    lines += [f"  {name:<32} {_size(n):>10}" for name, n in info["files"].items()]
    for entry in info.get("passes") or []:
        if "target" not in entry:
            continue
        missed = entry.get("missed") or []
        lines.append(f"optimized target {entry['target']}, GroupQueryAttention in {entry.get('group_query_attention', 0)} layers")
        lines.append("  expected fusions that did not fire: " + ("none" if not missed else ""))
        lines += [f"    {m}" for m in missed]  # "step: expected N matches; rule: why (at node)"
    runs = info.get("runs_on") or {}
    lines += ["runs on", *(f"  {name:<5} {what}" for name, what in runs.items())]
    return "\n".join(lines)


def _folded(values: list[dict]) -> list[dict]:
    """Show per-layer KV names once, as `past_key_values.{0..N}.key`."""
    out, seen = [], set()
    for v in values:
        parts = v["name"].split(".")
        if len(parts) == 3 and parts[1].isdigit():
            key = (parts[0], parts[2])
            if key in seen:
                continue
            seen.add(key)
            count = sum(1 for w in values if w["name"].startswith(parts[0] + ".") and w["name"].endswith("." + parts[2]))
            v = {**v, "name": f"{parts[0]}.{{0..{count - 1}}}.{parts[2]}"}
        out.append(v)
    return out
