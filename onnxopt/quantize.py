"""Quantization of a model package behind a perplexity gate: weight-only com.microsoft MatMulNBits
(`int8-wo`, `int4-wo`), and static W8A8 as ONNX Q/DQ in INT8 with SmoothQuant (`int8`) or in float8
E4M3 (`fp8`), both in calibration/smoothquant.py, their weights rounded to nearest (`smoothquant`) or
by GPTQ (`gptq`, calibration/gptq.py, the default for both) from input second moments measured in a
second calibration pass (calibration/hessian.py).

    report = onnxopt.quantize("smollm2", "smollm2-int4", scheme="int4-wo", method="awq",
                              calib_data=["emma.txt"], eval_data="prideprejudice.txt")

Every MatMul whose B is a constant W [K, N] (or the transpose of one: the LM head tied to the
embedding) becomes MatMulNBits(A, B_q, scales, zero_points) with `bits` 8 (`int8-wo`) or 4
(`int4-wo`), asymmetric per block of `block_size` input channels (calibration/blockwise.py has the
layout and the math). Methods:

- `rtn`: round to nearest.
- `awq`: per-input-channel scales s from the calibration table (calibration/awq.py); the weights are
  quantized as diag(s) W and the shared input x is multiplied by 1/s with one Mul per input. We use a
  Mul rather than folding 1/s into the op that produced x: x comes from RMSNorm (whose weight could
  absorb it), from attention (through V's output channels, shared by a GQA group, so only scales equal
  across the group could fold), from SwiGLU (through up's output channels), and after `optimize` from
  fused contrib ops (SkipSimplifiedLayerNormalization, packed QKV). A Mul works on all of them and costs
  K multiplications per token, next to K*N for the MatMul.

The LM head (49152 x 576 on SmolLM2, a fifth of the weights, and tied to the token embedding) is
quantized to 8 bits whatever the scheme (`lm_head="int8"`, the default; "keep" leaves it fp32,
"scheme" uses the scheme's bits): 4-bit rounding of the head costs more perplexity than all layers'
together on small models, while 8 bits costs little. The embedding's Gather keeps the fp32 table
(decode reads one row of it per token, so it costs disk, not bandwidth); sharing one quantized table
between Gather and head (com.microsoft GatherBlockQuantized) is not done yet.

The gate: the quantized package's perplexity on `eval_data` (first 16,384 tokens, onnxopt/evaluate.py)
against the parent's, recorded in the manifest; past `max_ppl_increase` percent (default per scheme)
nothing is written unless `force`. The parent's perplexity is cached per (graph, data, settings).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from onnxopt import __version__
from onnxopt.errors import UserError
from onnxopt.package import MODEL_NAME, TOKENIZER_FILES, ModelPackage, check_target, staging_dir, write_manifest
from onnxopt.progress import bar

logger = logging.getLogger(__name__)

SCHEMES = {"int8-wo": 8, "int4-wo": 4, "int8": 8, "fp8": 8}  # int8, fp8: W8A8 static (calibration/smoothquant.py)
W8A8 = ("int8", "fp8")
METHODS = ("rtn", "awq", "smoothquant", "gptq")
# The method when none is given: GPTQ rounding for fp8 (measured on SmolLM2 in docs/QUANTIZATION.md),
# SmoothQuant's round-to-nearest for int8, round-to-nearest for the weight-only schemes.
DEFAULT_METHOD = {"int8-wo": "rtn", "int4-wo": "rtn", "int8": "gptq", "fp8": "gptq"}  # chosen on mansfieldpark.txt (docs/QUANTIZATION.md)
W8A8_METHODS = ("smoothquant", "gptq")
# Windows of the calibration data for GPTQ's second pass (at most the table's): on SmolLM2, 32 x 512 tokens
# gave the same perplexity as 128 x 512 (docs/QUANTIZATION.md) in a quarter of the time.
DEFAULT_HESSIAN_SAMPLES = 32
DEFAULT_MAX_PPL_INCREASE = {"int8-wo": 0.5, "int4-wo": 10.0, "int8": 2.0, "fp8": 1.0}  # percent
# W8A8 defaults per scheme. int8: SmoothQuant alpha 0.9, and inputs whose max|x| passes 32x their
# 99.99th percentile stay weight-only. fp8: E4M3's exponent holds outliers (alpha 0, no exceptions);
# measured on SmolLM2 in docs/QUANTIZATION.md.
DEFAULT_ALPHA = {"int8": 0.9, "fp8": 0.0}
DEFAULT_OUTLIER_LIMIT = {"int8": 32.0, "fp8": None}
# --outlier-channels by default: fp8 keeps the 32 largest channels of each MatMul input in float (chosen
# on mansfieldpark.txt, docs/QUANTIZATION.md: SmolLM2 fp8 GPTQ +2.18 % -> +0.87 % on the gate text, disk
# 261 -> 281 MB, CPU decode unchanged), capped at an eighth of the narrowest input for small models;
# int8 passes its gate without them.
DEFAULT_OUTLIER_CHANNELS = {"int8": 0, "fp8": 32}
SCHEME_DEFAULT = "scheme"  # alpha / outlier_limit: take the scheme's default above
# accuracy_level 4: MatMulNBits quantizes A to int8 per block and runs integer kernels, the fast CPU
# path of ORT's MLAS for 4 and 8 bits (ContribOperators.md, MatMulNBits). 0 computes in float.
DEFAULT_ACCURACY_LEVEL = 4
_COPIED_FILES = ("config.json", "generation_config.json", "genai_config.json", *TOKENIZER_FILES)


class GateError(UserError):
    """The quantized package misses the perplexity gate."""


@dataclasses.dataclass
class WeightMatMul:
    """A MatMul whose B is a constant weight [K, N] (stored as is, or as its transpose)."""

    node: object  # ir.Node
    weight: object  # ir.Value, the initializer
    transposed: bool  # the initializer is [N, K] (MatMul(x, Transpose(E)): a tied LM head)

    def array(self) -> np.ndarray:
        w = self.weight.const_value.numpy().astype(np.float32, copy=False)
        return w.T if self.transposed else w

    @property
    def shape(self) -> tuple[int, int]:
        k, n = self.weight.shape.dims
        return (n, k) if self.transposed else (k, n)


def weight_matmuls(graph) -> list[WeightMatMul]:
    found = []
    for node in graph:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        b = node.inputs[1]
        transposed = False
        producer = b.producer()
        if producer is not None and producer.op_type == "Transpose" and _is_2d_weight(producer.inputs[0]):
            perm = producer.attributes.get("perm")
            if perm is None or list(perm.value) == [1, 0]:
                b, transposed = producer.inputs[0], True
        if _is_2d_weight(b):
            found.append(WeightMatMul(node, b, transposed))
    return found


def _is_2d_weight(value) -> bool:
    import onnx_ir as ir

    return (value is not None and value.const_value is not None and value.shape is not None
            and len(value.shape) == 2 and value.const_value.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16))


def _initializer(graph, name: str, array: np.ndarray):
    import onnx_ir as ir

    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.Tensor(array, name=name))
    graph.register_initializer(value)
    return value


def matmul_nbits(graph, node, a, qw, *, accuracy_level: int, float_dtype):
    """Replace MatMul `node` by MatMulNBits(a, qw) in `graph`; returns the new node."""
    import onnx_ir as ir

    base = node.name or "matmul"
    inputs = [
        a,
        _initializer(graph, f"{base}.qweight", qw.packed),
        _initializer(graph, f"{base}.scales", qw.scales.astype(float_dtype)),
        _initializer(graph, f"{base}.zero_points", qw.zero_points),
    ]
    attrs = [ir.AttrInt64("K", qw.K), ir.AttrInt64("N", qw.N), ir.AttrInt64("bits", qw.bits),
             ir.AttrInt64("block_size", qw.block_size), ir.AttrInt64("accuracy_level", accuracy_level)]
    new = ir.Node("com.microsoft", "MatMulNBits", inputs, attrs, name=f"{base}_Q{qw.bits}", num_outputs=1)
    old_out = node.outputs[0]
    new.outputs[0].name, new.outputs[0].shape, new.outputs[0].type = old_out.name, old_out.shape, old_out.type
    old_out.name = None  # the graph's value names stay unique; its consumers move to the new output
    ir.convenience.replace_nodes_and_values(graph, node, [node], [new], [old_out], [new.outputs[0]])
    return new


def _scaled_input(graph, a, inv_s: np.ndarray, float_dtype):
    """x * (1/s) before a group of AWQ-scaled MatMulNBits; returns the new value."""
    import onnx_ir as ir

    scale = _initializer(graph, f"{a.name}.awq_inv_scale", inv_s.astype(float_dtype))
    mul = ir.Node("", "Mul", [a, scale], name=f"{a.name}.awq_mul", num_outputs=1)
    mul.outputs[0].name = f"{a.name}.awq"
    mul.outputs[0].shape, mul.outputs[0].type = a.shape, a.type
    consumer = a.producer()
    if consumer is not None:
        graph.insert_after(consumer, mul)
    else:
        graph.insert_before(next(iter(graph)), mul)
    return mul.outputs[0]


def quantize_model(model, *, bits: int, block_size: int, method: str = "rtn", table: dict | None = None,
                   lm_head: str = "int8", vocab_size: int | None = None, accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
                   alpha: float | None = 0.9, act_ranges: dict | None = None, smooth_only: bool = False,
                   outlier_limit: float | None = None, fmt: str = "int8", hessians: dict | None = None,
                   gptq_options: dict | None = None, weight_only=None, outlier_channels: int = 0,
                   progress: bool = True, workers: int | None = None) -> dict:
    """Rewrite the onnx-ir `model` in place (see the module docstring); returns a summary for the manifest.

    The LM head is the MatMul with N == vocab_size. With method "awq", `table` is a calibration table
    (calibration/table.py) holding abs_mean and mean_square for every MatMul input. Method
    "smoothquant" makes W8A8 Q/DQ MatMuls instead (calibration/smoothquant.py), smoothing with `alpha`,
    in `fmt` "int8" or "fp8"; "gptq" makes the same graph with the weights rounded by GPTQ
    (calibration/gptq.py) from `hessians` {input name: E[x x^T]}, with `gptq_options` passed on. With
    either, the MatMuls reading an input named in `weight_only` stay weight-only 8-bit MatMulNBits, and
    `outlier_channels` n > 0 multiplies the n largest channels of every W8A8 input in float instead
    (LLM.int8()'s decomposition, calibration/smoothquant.py). With "rtn" and the W8A8 methods, `workers`
    threads (default: the cores, at most 4) round the weights ahead of the graph rewrite, as many
    matrices (RTN) or input groups (W8A8) at a time; the result is the same as one thread's."""
    import onnx_ir as ir

    from onnxopt.calibration import awq, blockwise, smoothquant

    graph = model.graph
    matmuls = weight_matmuls(graph)
    if not matmuls:
        raise UserError("the graph has no MatMul with a constant weight; nothing to quantize")
    head_bits = {"int8": 8, "scheme": bits, "keep": None}[lm_head]
    groups: dict[int, list[WeightMatMul]] = {}
    for mm in matmuls:
        groups.setdefault(id(mm.node.inputs[0]), []).append(mm)
    workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    rounded = None  # round to nearest: every weight's codes, in the loop's order, from a thread pool
    if method == "rtn":
        jobs = [(mm, head_bits if vocab_size is not None and mm.shape[1] == vocab_size else bits)
                for group in groups.values() for mm in group]
        jobs = [(mm, b) for mm, b in jobs if b is not None]
        rounded = _ordered_map(lambda job: (job[0], blockwise.quantize(job[1], job[2], block_size)),
                               ((mm, mm.array(), b) for mm, b in jobs), workers)
    w8a8 = method in W8A8_METHODS
    prepared = None  # W8A8: each group's smoothing and 8-bit weights (smoothquant.prepare), from a thread pool
    if w8a8 and not smooth_only:
        jobs = []
        for group in groups.values():
            a = group[0].node.inputs[0]
            body = [mm for mm in group if not (vocab_size is not None and mm.shape[1] == vocab_size)]
            if not body or a.name in (weight_only or ()) or \
                    _outlier_factor(table, a.name, body[0]) > (outlier_limit or np.inf):
                continue
            if outlier_channels >= body[0].shape[0]:
                raise UserError(f"--outlier-channels {outlier_channels}: MatMul input {a.name!r} has only "
                                f"{body[0].shape[0]} channels; keep fewer out of the 8-bit product")
            hessian = _hessian(hessians, a.name, body[0]) if method == "gptq" else None
            jobs.append((body[0], body, _stats(table, a.name, body[0]), hessian))
        options = {"alpha": alpha, "fmt": fmt, "outliers": outlier_channels, "gptq_options": gptq_options}
        prepared = _ordered_map(
            lambda job: (job[0], smoothquant.prepare(job[1], job[2], hessian=job[3], **options)),
            ((first, [mm.array() for mm in body], stats, hessian) for first, body, stats, hessian in jobs), workers)
    model.opset_imports.setdefault("com.microsoft", 1)
    summary = {"matmuls": 0, "lm_head": None, "awq": {"groups": 0, "alpha": {}}}
    errors = {"rtn": 0.0, "awq": 0.0}
    with bar(total=len(matmuls), desc=f"quantize {method}", unit="matmul", disable=not progress) as pbar, \
            contextlib.closing(rounded) if rounded else contextlib.nullcontext(), \
            contextlib.closing(prepared) if prepared else contextlib.nullcontext():
        for group in groups.values():
            a = group[0].node.inputs[0]
            heads = [mm for mm in group if vocab_size is not None and mm.shape[1] == vocab_size]
            body = [mm for mm in group if mm not in heads]
            scales = scaled = clips = None
            if w8a8 and body and (a.name in (weight_only or ()) or
                                  _outlier_factor(table, a.name, body[0]) > (outlier_limit or np.inf)):
                # Named by the caller (activation-sensitive), or massive activations (max|x| far beyond
                # its 99.99th percentile: one static per-tensor int8 step cannot hold both): this group
                # stays weight-only int8 (MatMulNBits below).
                summary.setdefault("weight_only_inputs", []).append(a.name)
            elif w8a8 and body:
                dtype = np.float16 if body[0].weight.const_value.dtype == ir.DataType.FLOAT16 else np.float32
                stats = _stats(table, a.name, body[0])
                hessian = _hessian(hessians, a.name, body[0]) if method == "gptq" and not smooth_only else None
                if outlier_channels >= body[0].shape[0]:
                    raise UserError(f"--outlier-channels {outlier_channels}: MatMul input {a.name!r} has only "
                                    f"{body[0].shape[0]} channels; keep fewer out of the 8-bit product")
                used, smoothed, error_ratio, outliers = smoothquant.rewrite(
                    graph, body, a, alpha=alpha, stats=stats, float_dtype=dtype, initializer=_initializer,
                    act_range=(act_ranges or {}).get(a.name), smooth_only=smooth_only, fmt=fmt, hessian=hessian,
                    gptq_options=gptq_options, outliers=0 if smooth_only else outlier_channels,
                    prepared=_next_ahead(prepared, body[0]) if prepared else None)
                if outliers:
                    summary.setdefault("outlier_channel_index", {})[a.name] = outliers
                summary.setdefault("smoothquant_alpha", {})[a.name] = used
                summary.setdefault("smoothed_inputs", {})[a.name] = smoothed
                if error_ratio is not None:
                    summary.setdefault("gptq", {"error_ratio": {}})["error_ratio"][a.name] = round(error_ratio, 4)
                summary["matmuls"] += len(body)
                pbar.update(len(body))
                body = []
                group = heads
            if method == "awq" and body:
                stats = _stats(table, a.name, body[0])
                found = awq.search_scales([mm.array() for mm in body], stats["abs_mean"], stats["mean_square"],
                                          bits=bits, block_size=block_size)
                scales, clips = found.scales, dict(zip(map(id, body), found.clips))
                summary["awq"]["groups"] += 1
                summary["awq"]["alpha"][a.name] = found.alpha
                errors["rtn"] += found.error_rtn
                errors["awq"] += found.error
            for mm in group:
                dtype = np.float16 if mm.weight.const_value.dtype == ir.DataType.FLOAT16 else np.float32
                if mm in heads:
                    summary["lm_head"] = {"bits": head_bits, "shape": list(mm.shape), "tied": mm.transposed}
                    if head_bits is None:
                        pbar.update(1)
                        continue
                    qw = _next_ahead(rounded, mm) if rounded else blockwise.quantize(mm.array(), head_bits, block_size)
                    matmul_nbits(graph, mm.node, a, qw, accuracy_level=accuracy_level, float_dtype=dtype)
                else:
                    if scales is not None:
                        qw = blockwise.quantize(mm.array() * scales[:, None], bits, block_size, clip=clips[id(mm)])
                    elif rounded:
                        qw = _next_ahead(rounded, mm)
                    else:
                        qw = blockwise.quantize(mm.array(), bits, block_size)
                    summary["matmuls"] += 1
                    if scales is not None and scaled is None:  # one Mul per input, shared by the group
                        scaled = _scaled_input(graph, a, 1.0 / scales, dtype)
                    source = scaled if scales is not None else a
                    matmul_nbits(graph, mm.node, source, qw, accuracy_level=accuracy_level, float_dtype=dtype)
                pbar.update(1)
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(model)  # the fp32 weights and the head's Transpose, unless still used
    if method == "awq" and errors["rtn"] > 0:
        # The searched objective, summed over groups: how much of RTN's weighted error AWQ keeps.
        summary["awq"]["error_ratio"] = round(errors["awq"] / errors["rtn"], 4)
    if method != "awq":
        del summary["awq"]
    return summary


def _ordered_map(fn, items, workers: int):
    """fn over `items` on `workers` threads, yielded in order, with at most `workers` items taken ahead
    (each may hold whole weight matrices and their float64 copies). NumPy releases the GIL in the
    arithmetic of blockwise.quantize and smoothquant.prepare."""
    import collections
    from concurrent.futures import ThreadPoolExecutor

    items = iter(items)
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="onnxopt-quantize") as pool:
        pending = collections.deque(pool.submit(fn, item) for _, item in zip(range(workers), items))
        while pending:
            result = pending.popleft().result()
            for item in items:  # refill one
                pending.append(pool.submit(fn, item))
                break
            yield result


def _next_ahead(results, mm):
    """The next result of one of quantize_model's pools (`_ordered_map` of (MatMul, result)): it must be
    `mm`'s, the loop's order."""
    done, result = next(results)
    if done is not mm:
        raise RuntimeError(f"quantize: computed {done.node.name!r} where {mm.node.name!r} was due (internal order)")
    return result


def _outlier_factor(table: dict | None, name: str, mm: WeightMatMul) -> float:
    """max|x| / (99.99th percentile of |x|) of a MatMul input, from the calibration table."""
    from onnxopt.calibration.observers import TensorObserver

    _stats(table, name, mm)  # present and of the right width
    obs = TensorObserver.from_json(table["tensors"][name])
    return max(abs(obs.min), obs.max) / max(obs.percentile(99.99), 1e-30)


def _hessian(hessians: dict | None, name: str, mm: WeightMatMul) -> np.ndarray:
    k = mm.shape[0]
    h = (hessians or {}).get(name)
    if h is None or np.shape(h) != (k, k):
        raise UserError(f"GPTQ: no input second moment of shape ({k}, {k}) for {name!r} (input of {mm.node.name!r}); "
                        "the Hessian pass observed another graph")
    return h


def _stats(table: dict | None, name: str, mm: WeightMatMul) -> dict:
    from onnxopt.calibration.table import tensor_stats

    if table is None:
        raise UserError("--method awq needs activation statistics: pass --calib TABLE or --calib-data FILE")
    stats = tensor_stats(table, name)
    k = mm.shape[0]
    if stats is None or len(stats["abs_mean"]) != k:
        raise UserError(
            f"calibration table: no statistics of width {k} for {name!r} (input of {mm.node.name!r}); "
            "the table was made for another graph: run `onnxopt calibrate` on this package"
        )
    return stats


def _cache_dir() -> Path:
    return Path(os.environ.get("ONNXOPT_CACHE") or Path.home() / ".cache" / "onnxopt")


def parent_perplexity(src: ModelPackage, eval_data, *, max_tokens: int, window: int, stride: int, progress: bool):
    """The parent's EvalResult, cached per (graph sha256, data sha256, settings) under $ONNXOPT_CACHE/ppl."""
    from onnxopt.calibration.reader import check_data_file, file_sha256
    from onnxopt.evaluate import EvalResult, evaluate

    key = {"model_sha256": src.manifest["files"][MODEL_NAME]["sha256"], "data_sha256": file_sha256(check_data_file(eval_data)),
           "max_tokens": max_tokens, "window": window, "stride": stride, "onnxopt": __version__}
    path = _cache_dir() / "ppl" / f"{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]}.json"
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
            if cached.get("key") == key:
                logger.info("parent perplexity from cache %s", path)
                return EvalResult(**cached["result"])
        except (json.JSONDecodeError, TypeError, KeyError):
            pass  # a damaged cache entry: compute again
    result = evaluate(src, eval_data, max_tokens=max_tokens, window=window, stride=stride, progress=progress, desc="eval parent")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "result": dataclasses.asdict(result)}))
        os.replace(tmp, path)
    except OSError as e:  # a read-only home: the cache is an optimization only
        logger.warning("cannot cache the parent's perplexity in %s (%s)", path, e)
    return result


def quantize(package, out, *, scheme: str, method: str | None = None, block_size: int = 32, calib=None, calib_data=None,
             eval_data, max_ppl_increase: float | None = None, force: bool = False, lm_head: str = "int8",
             accuracy_level: int = DEFAULT_ACCURACY_LEVEL, max_tokens: int = 16384, window: int | None = None,
             stride: int | None = None, calib_samples: int = 128, calib_seq_len: int = 512, overwrite: bool = False,
             alpha: float | str | None = SCHEME_DEFAULT, act_range: str = "minmax", range_samples: int = 32,
             outlier_limit: float | str | None = SCHEME_DEFAULT, hessian_samples: int = DEFAULT_HESSIAN_SAMPLES,
             act_order: bool = False, weight_only_inputs=(), outlier_channels: int | str = SCHEME_DEFAULT,
             progress: bool = True) -> dict:
    """Quantize the package at `package` into `out` behind the perplexity gate; returns the manifest's
    `quantization` record. Nothing is written when the gate fails (GateError) unless `force`.
    `method` defaults per scheme (DEFAULT_METHOD): "rtn" or "awq" for the weight-only schemes,
    "smoothquant" or "gptq" for `int8` and `fp8` (W8A8; gptq rounds the weights with GPTQ from input
    second moments measured over `hessian_samples` windows of the calibration data, sweeping in order
    of decreasing input energy with `act_order`). W8A8's `alpha` 0 means no smoothing and None a search
    per input (int8 only); their MatMul inputs with max|x| > `outlier_limit` x their 99.99th percentile
    stay weight-only int8 (0 or None: none do), and so do those named in `weight_only_inputs` (MatMul
    input tensor names: mixed precision by hand). Both default per scheme (DEFAULT_ALPHA,
    DEFAULT_OUTLIER_LIMIT). `outlier_channels` n > 0 keeps the n channels of each W8A8 input with the
    largest calibrated max|x| out of the 8-bit product, multiplied in float beside it (0: none; default
    per scheme, DEFAULT_OUTLIER_CHANNELS, at most an eighth of the narrowest MatMul input)."""
    from onnxopt.calibration.forward import require_full_logits
    from onnxopt.calibration.reader import check_data_file, file_sha256
    from onnxopt.calibration.table import calibrate, load_table, table_sha256
    from onnxopt.evaluate import evaluate, resolve_window

    import onnx_ir as ir

    if scheme not in SCHEMES:
        raise UserError(f"--scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")
    method = method or DEFAULT_METHOD[scheme]
    if method not in METHODS:
        raise UserError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if (scheme in W8A8) != (method in W8A8_METHODS):
        raise UserError(f"--method {method}: --scheme {scheme} takes "
                        + ("smoothquant or gptq (W8A8; --alpha 0 for no smoothing)" if scheme in W8A8 else
                           "rtn or awq (GPTQ is implemented for the W8A8 schemes only)"))
    if hessian_samples < 1:
        raise UserError(f"--hessian-samples {hessian_samples}: must be at least 1")
    weight_only_inputs = list(weight_only_inputs or ())
    if weight_only_inputs and scheme not in W8A8:
        raise UserError(f"--weight-only-input: keeps W8A8 MatMuls weight-only; --scheme {scheme} is weight-only already")
    default_outliers = outlier_channels == SCHEME_DEFAULT
    if default_outliers:
        outlier_channels = DEFAULT_OUTLIER_CHANNELS.get(scheme, 0)
    if outlier_channels and scheme not in W8A8:
        raise UserError(f"--outlier-channels: splits W8A8 MatMuls; --scheme {scheme} quantizes no activations")
    if outlier_channels < 0:
        raise UserError(f"--outlier-channels {outlier_channels}: must be 0 (none) or more")
    if outlier_channels and act_range != "minmax" and not default_outliers:  # fp8 + mse: its own error below
        raise UserError("--outlier-channels with --act-range mse: the MSE ranges are measured with every channel; "
                        "use --act-range minmax")
    if act_order and method != "gptq":
        raise UserError(f"--act-order: orders GPTQ's sweep; --method {method} has none (use --method gptq)")
    if act_range not in ("minmax", "mse"):
        raise UserError(f"--act-range {act_range!r}: choose minmax or mse")
    if alpha == SCHEME_DEFAULT:
        alpha = DEFAULT_ALPHA.get(scheme)
    if outlier_limit == SCHEME_DEFAULT:
        outlier_limit = DEFAULT_OUTLIER_LIMIT.get(scheme)
    if scheme == "fp8" and alpha is None:
        raise UserError("--alpha auto: the search models int8 rounding; give --scheme fp8 a number (default 0)")
    if scheme == "fp8" and act_range != "minmax":
        raise UserError("--act-range mse: the MSE clip models an int8 grid; --scheme fp8 takes minmax")
    if alpha is not None and not 0 <= alpha <= 1:
        raise UserError(f"--alpha {alpha}: SmoothQuant's migration strength must be between 0 and 1")
    from onnxopt.calibration.blockwise import BLOCK_SIZES

    if block_size not in BLOCK_SIZES:
        raise UserError(f"--block-size {block_size}: choose one of {', '.join(map(str, BLOCK_SIZES))}")
    if lm_head not in ("int8", "keep", "scheme"):
        raise UserError(f"--lm-head {lm_head!r}: choose int8, keep or scheme")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise UserError(f"--accuracy-level {accuracy_level}: choose 0 to 4 (ContribOperators.md, MatMulNBits)")
    if calib is not None and calib_data:
        raise UserError("--calib and --calib-data: give one of them, not both")
    if method == "rtn" and (calib is not None or calib_data):
        raise UserError("--calib/--calib-data: round-to-nearest uses no calibration; add --method awq or drop them")
    if method in ("awq", *W8A8_METHODS) and calib is None and not calib_data:
        raise UserError(f"--method {method} needs activation statistics: pass --calib TABLE or --calib-data FILE")
    if max_tokens is not None and max_tokens < 2:
        raise UserError(f"--max-tokens {max_tokens}: the gate needs at least 2 tokens of --eval-data")
    limit = DEFAULT_MAX_PPL_INCREASE[scheme] if max_ppl_increase is None else max_ppl_increase
    if not limit >= 0:
        raise UserError(f"--max-ppl-increase {max_ppl_increase}: must be a percentage >= 0")

    src = package if isinstance(package, ModelPackage) else ModelPackage(package)
    out = Path(out)
    check_target(out, overwrite=overwrite)
    if out.resolve() == src.path.resolve():
        raise UserError(f"{out}: output is the input package; choose another directory")
    if src.manifest.get("quantization"):
        raise UserError(f"{src.path}: already quantized ({src.manifest['quantization'].get('scheme')}); "
                        "quantize its unquantized parent instead")
    require_full_logits(src)  # the gate scores every position of both packages
    check_data_file(eval_data)
    window, stride = resolve_window(window, stride, src.dims["max_context"])
    for path in calib_data or ():
        check_data_file(path)
        if Path(path).resolve() == Path(eval_data).resolve():
            raise UserError(f"--calib-data {path}: is the evaluation file; calibrate on other text (e.g. emma.txt)")

    if weight_only_inputs or outlier_channels:  # checked before the calibration passes
        matmuls = weight_matmuls(ir.load(src.model_path).graph)
        inputs = {mm.node.inputs[0].name for mm in matmuls}
        unknown = [name for name in weight_only_inputs if name not in inputs]
        if unknown:
            raise UserError(f"--weight-only-input {unknown[0]}: no weight MatMul of {src.path} reads a tensor of that "
                            "name (`onnxopt calibrate` tables list them under tensors)")
        narrowest = min(matmuls, key=lambda mm: mm.shape[0])
        if default_outliers:  # a small model: outliers stay a small share of every input
            outlier_channels = min(outlier_channels, narrowest.shape[0] // 8)
        elif outlier_channels >= narrowest.shape[0]:
            raise UserError(f"--outlier-channels {outlier_channels}: MatMul input {narrowest.node.inputs[0].name!r} has "
                            f"only {narrowest.shape[0]} channels; keep fewer out of the 8-bit product")
        del matmuls, narrowest

    table, calib_record = None, None
    if method in ("awq", *W8A8_METHODS):
        if calib is not None:
            table = load_table(calib, src)
            calib_sha = file_sha256(calib)
        else:
            table = calibrate(src, calib_data, num_samples=calib_samples, seq_len=calib_seq_len, progress=progress)
            calib_sha = table_sha256(table)
        eval_sha = file_sha256(eval_data)
        if any(entry["sha256"] == eval_sha for entry in table["data"]):
            raise UserError(f"--eval-data {eval_data}: the calibration table was made from this very text; "
                            "evaluate on held-apart text")
        calib_record = {"table": str(calib) if calib is not None else None, "table_sha256": calib_sha,
                        "data": table["data"], "samples": table["samples_done"], "seq_len": table["seq_len"]}

    bits = SCHEMES[scheme]
    act_ranges = None
    if scheme == "int8" and act_range == "mse":
        act_ranges = smoothed_ranges(src, table, alpha=alpha, samples=range_samples, progress=progress)
        calib_record["act_range"] = {"method": "mse", "samples": range_samples}
    hessians = gptq_options = None
    if method == "gptq":
        hessians, calib_record["hessians"] = input_hessians(src, table, samples=hessian_samples, progress=progress)
        gptq_options = {"act_order": act_order}
    model = ir.load(src.model_path)
    summary = quantize_model(model, bits=bits, block_size=block_size, method=method, table=table, lm_head=lm_head,
                             vocab_size=src.dims["vocab_size"], accuracy_level=accuracy_level, alpha=alpha,
                             act_ranges=act_ranges, outlier_limit=outlier_limit, fmt="fp8" if scheme == "fp8" else "int8",
                             hessians=hessians, gptq_options=gptq_options, weight_only=weight_only_inputs,
                             outlier_channels=outlier_channels, progress=progress)
    del hessians
    if method == "gptq":
        from onnxopt.calibration.gptq import BLOCK_SIZE, DAMP

        summary.setdefault("gptq", {"error_ratio": {}}).update(
            {"damp": DAMP, "block_size": BLOCK_SIZE, "act_order": act_order, "grid": "per output channel, max|W|/qmax"})
    parent = parent_perplexity(src, eval_data, max_tokens=max_tokens, window=window, stride=stride, progress=progress)
    with staging_dir(out, overwrite=overwrite) as tmp:
        _write_package(src, model, tmp, quantization=None)
        del model  # the packed weights are on disk now
        result = evaluate(tmp, eval_data, max_tokens=max_tokens, window=window, stride=stride, progress=progress,
                          desc="eval quantized")
        delta = 100.0 * (result.ppl / parent.ppl - 1.0)
        passed = delta <= limit
        record = {
            "scheme": scheme, "method": method, "bits": bits, "block_size": block_size, "symmetric": scheme == "fp8",
            "accuracy_level": accuracy_level, **summary,
            **({"op": "QuantizeLinear/DequantizeLinear + MatMul (W8A8)", "alpha": "auto" if alpha is None else alpha,
                "outlier_limit": outlier_limit, "weight_only_named": weight_only_inputs,
                "outlier_channels": outlier_channels, **W8A8_FORMATS[scheme]}
               if scheme in W8A8 else {"op": "com.microsoft.MatMulNBits"}),
            "calibration": calib_record,
            "gate": {
                "data": str(Path(eval_data).resolve()), "data_sha256": file_sha256(eval_data), "tokens": result.tokens,
                "window": window, "stride": stride, "ppl_parent": parent.ppl, "ppl": result.ppl,
                "delta_pct": delta, "max_ppl_increase_pct": limit, "passed": passed, "forced": bool(force and not passed),
            },
        }
        if not passed and not force:
            raise GateError(
                f"{out}: perplexity rose {delta:.2f}% ({parent.ppl:.4f} -> {result.ppl:.4f}) on {eval_data}, past the "
                f"{limit}% allowed for {scheme}; nothing written (try {gate_advice(scheme, method, block_size)}raise "
                "--max-ppl-increase, or pass --force)"
            )
        _write_package(src, None, tmp, quantization=record)
    return record


def gate_advice(scheme: str, method: str, block_size: int) -> str:
    """The settings a gate refusal suggests, those not already used: a calibrated method, smaller blocks
    (weight-only), GPTQ rounding (W8A8); each followed by ", "."""
    tips = []
    if scheme in W8A8:
        if method != "gptq":
            tips.append("--method gptq")
    else:
        if method != "awq":
            tips.append("--method awq")
        if block_size > 32:  # the CLI's smaller block
            tips.append("--block-size 32")
    return "".join(f"{tip}, " for tip in tips)


W8A8_FORMATS = {
    "int8": {"weights": "int8 symmetric per output channel", "activations": "uint8 static per tensor"},
    "fp8": {"weights": "float8e4m3fn symmetric per output channel", "activations": "float8e4m3fn static per tensor"},
}


def input_hessians(src: ModelPackage, table: dict, *, samples: int, progress: bool) -> tuple[dict, dict]:
    """GPTQ's second calibration pass: ({MatMul input name: E[x x^T]}, a record of it) over the first
    `samples` windows of the table's own data (at most the table's), through the fp32 graph."""
    from onnxopt.calibration.hessian import collect_hessians
    from onnxopt.calibration.reader import file_sha256

    for entry in table["data"]:
        if not Path(entry["path"]).is_file() or file_sha256(entry["path"]) != entry["sha256"]:
            raise UserError(f"calibration table: its data file {entry['path']} is missing or changed since; GPTQ's "
                            "second pass reads it again (calibrate anew, or pass --calib-data)")
    samples = min(samples, table["samples_done"])
    observers = collect_hessians(src, [entry["path"] for entry in table["data"]], num_samples=samples,
                                 seq_len=table["seq_len"], progress=progress)
    hessians = {}
    for name, obs in observers.items():
        obs.sum /= max(obs.count, 1)  # in place: these matrices are most of the pass's memory
        hessians[name] = obs.sum
    tokens = max(obs.count for obs in observers.values())
    return hessians, {"samples": samples, "tokens": tokens, "graph": "fp32 (the parent's MatMul inputs)"}


def smoothed_ranges(src: ModelPackage, table: dict, *, alpha, samples: int, progress: bool) -> dict:
    """SmoothQuant's second calibration pass: {MatMul input name: (lo, hi)} of each smoothed input
    X diag(1/s), clipped to the MSE-optimal 8-bit range of its |x| histogram (observers.mse_range)
    instead of its min-max. Runs `samples` windows of the table's own data through the smoothed graph."""
    import onnx_ir as ir

    from onnxopt.calibration.observers import TensorObserver
    from onnxopt.calibration.table import calibrate

    smoothed = ir.load(src.model_path)
    summary = quantize_model(smoothed, bits=8, block_size=32, method="smoothquant", table=table, lm_head="keep",
                             vocab_size=src.dims["vocab_size"], alpha=alpha, smooth_only=True, progress=False)
    second = calibrate(src, [entry["path"] for entry in table["data"]], model=smoothed, num_samples=samples,
                       seq_len=table["seq_len"], progress=progress)
    ranges = {}
    for name, smoothed_name in summary["smoothed_inputs"].items():
        obs = TensorObserver.from_json(second["tensors"][smoothed_name])
        clip = obs.mse_range(8)
        ranges[name] = (max(obs.min, -clip), min(obs.max, clip))
    return ranges


def _write_package(src: ModelPackage, model, tmp: Path, *, quantization: dict | None) -> None:
    """Save the graph (when given) and copied files into `tmp`, then (re)write the manifest."""
    from onnxopt.export import _save_graph

    if model is not None:
        _save_graph(model, tmp, None)
        for name in _COPIED_FILES:
            if (src.path / name).is_file():
                shutil.copyfile(src.path / name, tmp / name)
    manifest = {
        **src.manifest,
        "created_by": f"onnxopt {__version__}",
        "quantized_from": {"path": str(src.path), "model_sha256": src.manifest["files"][MODEL_NAME]["sha256"]},
        "quantization": quantization,
    }
    manifest.pop("files", None)
    write_manifest(tmp, manifest)
