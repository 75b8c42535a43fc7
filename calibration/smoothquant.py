"""W8A8 INT8 with SmoothQuant (Xiao et al. 2022, arXiv:2211.10438) as ONNX Q/DQ, for ORT's CPU EP.

For MatMuls sharing an input X [.., K] with weights W_j [K, N_j]:

    s_k = max|X_k|^alpha / max_j max_n |W_j[k, n]|^(1 - alpha)          (s_k = 1 where either is 0)
    Y_j = (X diag(1/s)) (diag(s) W_j)                                   exact

Smoothing moves the activation outliers of a few channels into the weights, whose range per output
column is then quantized separately. alpha = 0 is plain W8A8 (no smoothing).

Quantization, static from the calibration table (no second pass: smoothing rescales channel k by 1/s_k,
so the smoothed tensor's range is min_k(min X_k / s_k) .. max_k(max X_k / s_k), from per-channel extrema):

    activations  uint8, per tensor, asymmetric: QuantizeLinear -> DequantizeLinear on X diag(1/s)
    weights      int8, per output column, symmetric: DequantizeLinear(W_q, scale[N], axis=1)

ORT's QDQ transformer turns DQ -> MatMul <- DQ into MatMulIntegerToFloat (integer GEMM, float output)
on the CPU EP.

`fmt="fp8"` (the `fp8` scheme) makes the same graph in float8 E4M3 (float8e4m3fn, largest finite 448):
symmetric everywhere (zero point 0 of type float8e4m3fn), weights per output column scale max|W|/448,
activations one static scale per tensor max|X'|/448. The products of two E4M3 values are exact in
fp32, so ORT's CPU EP (which dequantizes and multiplies in fp32) computes what an FP8 GEMM with fp32
accumulation does; the package runs anywhere ONNX Q/DQ of float8 runs (opset 19+). E4M3 keeps 3
mantissa bits at every magnitude, so one per-tensor scale holds both the outlier channels and the
rest, and smoothing matters far less than for int8 (the default alpha is 0 for fp8).

Outlier channels (`outlier_channels` n > 0, LLM.int8()'s decomposition, Dettmers et al. 2022,
arXiv:2208.07339): the n channels of X' = X diag(1/s) with the largest calibrated max|X'_k| (idx, sorted)
leave the 8-bit product and are multiplied in the graph's float dtype:

    Y_j = DQ(Q(X')) DQ(W'_q,j) + Gather(X, idx, axis=-1) W_j,float        W'_q,j[idx, :] = 0

The activation scale (or uint8 range) comes from the other channels' extrema; the outlier channels'
entries of Q(X') saturate (or clip), but meet the zeroed weight rows, so the 8-bit product is exactly
that of X' with those channels masked. W_j,float is W_j[idx, :] (round to nearest), or with GPTQ those
rows after absorbing the rounding error of the others (swept last, never rounded:
gptq.gptq_float_rows). One Gather per input serves the group; each MatMul gains a MatMul [.., n] x
[n, N_j] and an Add.

The LM head stays a weight-only 8-bit MatMulNBits (onnxopt/quantize.py), since its
output is the logits themselves, and so do inputs with massive activations (quantize's `outlier_limit`).
"""

from __future__ import annotations

import numpy as np

FP8_MAX = 448.0  # float8e4m3fn: the largest finite value (no infinities; saturating casts)
DEFAULT_ALPHA = 0.9  # chosen on mansfieldpark.txt (calibration-side text): alpha 0.5/0.8/0.9/0.95/1.0 gave +25.9/3.3/2.4/2.8/5.7% there


def smooth_scales(act_absmax: np.ndarray, weights, alpha: float) -> np.ndarray:
    """s [K] float32 (see the module docstring)."""
    w_absmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    a = np.asarray(act_absmax, dtype=np.float64)
    s = np.ones_like(a)
    ok = (a > 0) & (w_absmax > 0)
    s[ok] = a[ok] ** alpha / w_absmax[ok] ** (1 - alpha)
    return np.clip(s, 1e-5, 1e5).astype(np.float32)


def activation_qparams(channel_min: np.ndarray, channel_max: np.ndarray, s: np.ndarray) -> tuple[np.float32, np.uint8]:
    """uint8 scale and zero point of X diag(1/s), from X's per-channel extrema (range holds 0)."""
    lo = min(float((np.asarray(channel_min) / s).min()), 0.0)
    hi = max(float((np.asarray(channel_max) / s).max()), 0.0)
    scale = (hi - lo) / 255 if hi > lo else 1.0
    zero_point = int(np.clip(np.rint(-lo / scale), 0, 255))
    return np.float32(scale), np.uint8(zero_point)


def weight_qparams(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 W_q [K, N], float32 scale [N]): symmetric per output column."""
    scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale


def fp8_activation_scale(channel_min: np.ndarray, channel_max: np.ndarray, s: np.ndarray) -> np.float32:
    """E4M3 scale of X diag(1/s) (symmetric, per tensor), from X's per-channel extrema."""
    absmax = max(float(np.abs(np.asarray(channel_min) / s).max()), float(np.abs(np.asarray(channel_max) / s).max()))
    return np.float32(absmax / FP8_MAX if absmax > 0 else 1.0)


def fp8_weight_qparams(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float8e4m3fn W_q [K, N], float32 scale [N]): symmetric per output column, round to nearest even."""
    scale = (np.abs(w).max(axis=0) / FP8_MAX).astype(np.float32)
    scale[scale == 0] = 1.0
    return to_fp8(w / scale), scale


def to_fp8(x: np.ndarray) -> np.ndarray:
    """Saturating cast to float8e4m3fn, as ONNX QuantizeLinear(saturate=1) does (NaN stays NaN)."""
    import ml_dtypes

    return np.clip(np.asarray(x, dtype=np.float32), -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)


ALPHA_GRID = np.linspace(0.0, 1.0, 21)


def expected_error(weights, stats: dict, alpha: float) -> float:
    """E||X W - Q(X diag(1/s)) Q(diag(s) W)||^2 per token, summed over the group, with uncorrelated
    input channels: rounding X' = X diag(1/s) with step d (its min-max range / 255) adds noise of
    variance d^2 / 12 to every channel, which reaches the output through diag(s) W; rounding the weights
    adds (diag(s) W - Q)[k, n], reached by X'_k with E[X'_k^2] = m_k / s_k^2."""
    absmax = np.maximum(np.abs(stats["channel_min"]), np.abs(stats["channel_max"]))
    s = smooth_scales(absmax, weights, alpha).astype(np.float64) if alpha > 0 else np.ones(len(absmax))
    a_scale, _ = activation_qparams(stats["channel_min"], stats["channel_max"], s)
    total = 0.0
    for w in weights:
        ws = w.astype(np.float64) * s[:, None]
        q, w_scale = weight_qparams(ws.astype(np.float32))
        weight_err = np.square(ws - q * w_scale.astype(np.float64)).sum(axis=1)  # [K]
        total += float(np.asarray(stats["mean_square"]) / s**2 @ weight_err)
        total += float(a_scale) ** 2 / 12 * float(np.square(ws).sum())
    return total


def search_alpha(weights, stats: dict) -> float:
    """The alpha of ALPHA_GRID with the least `expected_error` for this group."""
    errors = [expected_error(weights, stats, float(alpha)) for alpha in ALPHA_GRID]
    return float(ALPHA_GRID[int(np.argmin(errors))])


def gptq_weights(weights, s: np.ndarray, hessian: np.ndarray, fmt: str, float_rows=(), **options) -> tuple[list, float]:
    """GPTQ rounding (calibration/gptq.py) of the smoothed weights diag(s) W_j of one group on the
    int8 or E4M3 grid with the same per-column scales as round-to-nearest; `hessian` is E[x x^T] of
    the unsmoothed input x, so x' = x diag(1/s) has diag(1/s) H diag(1/s). Rows `float_rows` (the
    outlier channels) are kept in float, zero in W_q. Returns ([(W_q, scale, float rows of diag(s) W_j
    [len(float_rows), N_j] float64)] per weight, the group's output error relative to
    round-to-nearest's, both measured with that H)."""
    from onnxopt.calibration import gptq

    qmax, grid, cast = _WEIGHT_GRIDS[fmt]
    smoothed = np.concatenate([w.astype(np.float64) * s[:, None] for w in weights], axis=1)  # [K, sum N_j]
    h = np.asarray(hessian, dtype=np.float64) / np.outer(s, s)
    float_rows = np.asarray(float_rows, dtype=np.int64)
    kept = np.setdiff1d(np.arange(len(smoothed)), float_rows)
    scale = np.abs(smoothed[kept]).max(axis=0) / qmax
    scale[scale == 0] = 1.0
    scale = scale.astype(np.float32)  # the graph's scale: GPTQ rounds against exactly this one
    g, rows = gptq.gptq_float_rows(smoothed, h, scale, grid, float_rows, **options)
    w_hat = g * scale.astype(np.float64)
    w_hat[float_rows] = rows
    g_rtn = grid(smoothed / scale)
    g_rtn[float_rows] = 0.0
    w_rtn = g_rtn * scale.astype(np.float64)
    w_rtn[float_rows] = smoothed[float_rows]
    err = gptq.output_error(smoothed, w_hat, h)
    err_rtn = gptq.output_error(smoothed, w_rtn, h)
    out, start = [], 0
    for w in weights:
        end = start + w.shape[1]
        out.append((cast(g[:, start:end]), scale[start:end], rows[:, start:end]))
        start = end
    return out, err / err_rtn if err_rtn > 0 else 1.0


def outlier_channels(absmax: np.ndarray, s: np.ndarray, n: int) -> np.ndarray:
    """The `n` channels with the largest max|X_k| / s_k (ties: the lower index), sorted: int64 [n]."""
    ranked = np.argsort(-(np.asarray(absmax, dtype=np.float64) / s), kind="stable")
    return np.sort(ranked[:n]).astype(np.int64)


# Per weight format: (largest grid value, rounding to the grid in units of the scale, cast of grid values).
_WEIGHT_GRIDS = {
    "int8": (127.0, lambda v: np.clip(np.rint(v), -127, 127).astype(np.float32), lambda g: g.astype(np.int8)),
    "fp8": (FP8_MAX, lambda v: to_fp8(v).astype(np.float32), lambda g: to_fp8(g)),
}


def smoothing(weights, stats: dict, alpha: float | None, fmt: str = "int8", outliers: int = 0):
    """(alpha, s, idx) of one group: alpha searched when None (int8 only), the smoothing scales s, and the
    `outliers` channels taken out of the 8-bit product (the module docstring)."""
    if alpha is None:
        if fmt != "int8":
            raise ValueError("alpha search models int8 rounding only; give fp8 an alpha")
        alpha = search_alpha(weights, stats)
    absmax = np.maximum(np.abs(stats["channel_min"]), np.abs(stats["channel_max"]))
    s = smooth_scales(absmax, weights, alpha) if alpha > 0 else np.ones(len(absmax), np.float32)
    idx = outlier_channels(absmax, s, outliers) if outliers else np.zeros(0, np.int64)
    return alpha, s, idx


def rounded_weights(weights, s: np.ndarray, idx: np.ndarray, fmt: str, hessian: np.ndarray | None = None,
                    gptq_options: dict | None = None) -> tuple[list, float | None]:
    """The group's 8-bit weights: [(W_q, scale, float rows of diag(s) W at idx)] per weight, and GPTQ's
    output error relative to round-to-nearest (None without `hessian`: round to nearest). A pure
    function of its arguments: quantize_model runs it on threads ahead of `rewrite`."""
    if hessian is not None:
        return gptq_weights(weights, s, hessian, fmt, float_rows=idx, **(gptq_options or {}))
    weight_q = fp8_weight_qparams if fmt == "fp8" else weight_qparams
    quantized = []
    for w in weights:
        ws = w.astype(np.float64) * s[:, None]
        rows = ws[idx]
        ws[idx] = 0.0  # the mask folded into the weight (module docstring)
        quantized.append((*weight_q(ws.astype(np.float32)), rows))
    return quantized, None


def prepare(weights, stats: dict, *, alpha: float | None, fmt: str = "int8", outliers: int = 0,
            hessian: np.ndarray | None = None, gptq_options: dict | None = None) -> dict:
    """`smoothing` and `rounded_weights` of one group, as `rewrite(..., prepared=)` takes them."""
    alpha, s, idx = smoothing(weights, stats, alpha, fmt, outliers)
    quantized, error_ratio = rounded_weights(weights, s, idx, fmt, hessian, gptq_options)
    return {"alpha": alpha, "s": s, "idx": idx, "quantized": quantized, "error_ratio": error_ratio}


def rewrite(graph, group, a, *, alpha: float | None, stats: dict, float_dtype, initializer,
            act_range: tuple[float, float] | None = None, smooth_only: bool = False, fmt: str = "int8",
            hessian: np.ndarray | None = None, gptq_options: dict | None = None,
            outliers: int = 0, prepared: dict | None = None) -> tuple[float, str, float | None, list[int]]:
    """Quantize the MatMuls `group` (WeightMatMul, sharing input `a`) to W8A8 Q/DQ in `graph`.

    `stats` holds the input's channel_min / channel_max; `initializer(graph, name, array)` registers
    a constant; `alpha` None searches it (search_alpha). `act_range` (lo, hi) replaces the min-max
    range of the smoothed input (a second calibration pass measures it); `smooth_only` stops after
    the Mul and the scaled fp32 weights (the graph that pass observes); `fmt` "fp8" quantizes to
    float8e4m3fn instead of int8 (the module docstring); `hessian` (E[x x^T] of `a`) rounds the weights
    with GPTQ (`gptq_weights`, `gptq_options` passed on) instead of to nearest; `outliers` n > 0 takes
    the n largest channels out of the 8-bit product (the module docstring). `prepared` (`prepare` of the
    same arguments, computed ahead) replaces the smoothing and the rounding here. Returns (alpha, the
    name of the smoothed input, GPTQ's output error relative to round-to-nearest or None, the outlier
    channels)."""
    import onnx_ir as ir

    weights = [mm.array() for mm in group] if prepared is None or smooth_only else None
    if prepared is not None:
        alpha, s, idx = prepared["alpha"], prepared["s"], prepared["idx"]
    else:
        alpha, s, idx = smoothing(weights, stats, alpha, fmt, outliers)
    absmax = np.maximum(np.abs(stats["channel_min"]), np.abs(stats["channel_max"]))
    if len(idx) and (act_range is not None or smooth_only or len(idx) >= len(absmax)):
        raise ValueError(f"{outliers} outlier channels: need min-max ranges and more than {outliers} channels")
    kept = np.setdiff1d(np.arange(len(absmax)), idx)  # the 8-bit product's channels (all when n = 0)
    if act_range is None:
        lo, hi, s_kept = np.asarray(stats["channel_min"])[kept], np.asarray(stats["channel_max"])[kept], s[kept]
    else:
        lo, hi, s_kept = np.asarray([act_range[0]]), np.asarray([act_range[1]]), np.ones(1)
    if fmt == "fp8":
        a_scale, a_zp = fp8_activation_scale(lo, hi, s_kept), to_fp8(0.0)
    else:
        a_scale, a_zp = activation_qparams(lo, hi, s_kept)
        a_zp = np.asarray(a_zp, dtype=np.uint8)
    base = a.name
    x = a
    nodes = []
    if alpha > 0:
        inv = initializer(graph, f"{base}.sq_inv_scale", (1.0 / s).astype(float_dtype))
        nodes.append(ir.Node("", "Mul", [x, inv], name=f"{base}.sq_mul", num_outputs=1))
        x = nodes[-1].outputs[0]
        x.name = f"{base}.sq"
    if smooth_only:
        _insert_chain(graph, a, nodes)
        for mm, w in zip(group, weights):
            scaled = initializer(graph, f"{mm.node.name or 'matmul'}.w_smoothed", (w * s[:, None]).astype(float_dtype))
            mm.node.replace_input_with(0, x)
            mm.node.replace_input_with(1, scaled)
        return alpha, x.name, None, []
    scale_v = initializer(graph, f"{base}.a_scale", np.asarray(a_scale, dtype=float_dtype))
    zp_v = initializer(graph, f"{base}.a_zero_point", np.asarray(a_zp))
    nodes.append(ir.Node("", "QuantizeLinear", [x, scale_v, zp_v], name=f"{base}.q", num_outputs=1))
    nodes[-1].outputs[0].name = f"{base}.q"
    nodes.append(ir.Node("", "DequantizeLinear", [nodes[-1].outputs[0], scale_v, zp_v], name=f"{base}.dq", num_outputs=1))
    x_dq = nodes[-1].outputs[0]
    x_dq.name = f"{base}.dq"
    _insert_chain(graph, a, nodes)
    if prepared is not None:
        quantized, error_ratio = prepared["quantized"], prepared["error_ratio"]
    else:
        quantized, error_ratio = rounded_weights(weights, s, idx, fmt, hessian, gptq_options)
    gathered = None
    if len(idx):  # one Gather of the outlier channels of the unsmoothed input, shared by the group
        idx_v = initializer(graph, f"{base}.outlier_idx", idx)
        gather = ir.Node("", "Gather", [a, idx_v], [ir.AttrInt64("axis", -1)], name=f"{base}.outlier_gather", num_outputs=1)
        gathered = gather.outputs[0]
        gathered.name = f"{base}.outliers"
        _insert_chain(graph, a, [gather])
    for mm, (q, w_scale, rows) in zip(group, quantized):
        name = mm.node.name or "matmul"
        wq = initializer(graph, f"{name}.w_{fmt}", q)
        ws = initializer(graph, f"{name}.w_scale", w_scale.astype(float_dtype))
        dq = ir.Node("", "DequantizeLinear", [wq, ws], [ir.AttrInt64("axis", 1)], name=f"{name}.w_dq", num_outputs=1)
        dq.outputs[0].name = f"{name}.w_dq"
        graph.insert_before(mm.node, dq)
        mm.node.replace_input_with(0, x_dq)
        mm.node.replace_input_with(1, dq.outputs[0])
        if gathered is not None:
            # x' = x diag(1/s) and the rows are of diag(s) W: the float rows of W itself are rows / s.
            w_rows = initializer(graph, f"{name}.w_outlier_rows", (rows / s[idx, None]).astype(float_dtype))
            _add_float_product(graph, mm.node, gathered, w_rows)
    return alpha, x.name, error_ratio, idx.tolist()


def _add_float_product(graph, node, gathered, w_rows) -> None:
    """node's output Y becomes Y + MatMul(gathered, w_rows) for all its consumers (graph outputs too;
    the name moves to the sum)."""
    import onnx_ir as ir

    name = node.name or "matmul"
    side = ir.Node("", "MatMul", [gathered, w_rows], name=f"{name}.outlier_matmul", num_outputs=1)
    side.outputs[0].name = f"{name}.outlier_out"
    y = node.outputs[0]
    add = ir.Node("", "Add", [side.outputs[0], side.outputs[0]], name=f"{name}.outlier_add", num_outputs=1)
    total = add.outputs[0]
    total.shape, total.type = y.shape, y.type
    y.replace_all_uses_with(total, replace_graph_outputs=True)
    add.replace_input_with(0, y)  # after the redirection, so the Add itself reads Y
    y_name, y.name = y.name, None
    total.name, y.name = y_name, f"{name}.w8a8_out"
    graph.insert_after(node, [side, add])


def _insert_chain(graph, a, nodes) -> None:
    """Insert `nodes` (each consuming the previous) right after the producer of `a`."""
    anchor = a.producer()
    for node in nodes:
        if anchor is None:
            graph.insert_before(next(iter(graph)), node)
        else:
            graph.insert_after(anchor, node)
        anchor = node
