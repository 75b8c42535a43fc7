"""`onnxopt::Linear` (opset 1): a projection with its neighbours fused in: the RMSNorm before it, the
bias, the SwiGLU and the residual add after it.

Batch-1 decode reads every weight once per token, so each projection is a matrix-vector product bound
by memory bandwidth; what costs is everything around it. ORT runs a decoder layer as ~10 kernels
(norms, MatMuls, SwiGLU, adds), each a separate trip through memory and a launch of its own. The CUDA
runtime rewrites each fp16/fp32 MatMul with a constant weight into this op when it loads a package
(passes/linear.py), absorbing the (Skip)SimplifiedLayerNormalization, bias Add and SwiGLU around it:
a Llama layer becomes four Linear launches and one attention launch.

Spec
----
Inputs   X         [..., K]
         W         [N, K]      the weight, transposed (row n is output n's weights: contiguous loads)
         gamma     [K]         optional: RMSNorm of X, scaled by gamma, before the product
         residual  [..., Ny]   optional: added to the output
         bias      [N]         optional: added to the product
         scales    [N * k_blocks]  with bits: the block scales (X's dtype)
         zero_points               with bits: uint8 [N * ceil(k_blocks * bits / 8)], optional
Output   Y         [..., Ny]   Ny = N, or N / 2 with activation "swiglu"
Attrs    activation ("" or "swiglu": W's rows are gate | up, Y = silu(gate) * up), epsilon (RMSNorm's);
         bits (0: W is float; 4 or 8: W is com.microsoft MatMulNBits' B, uint8 [N, k_blocks,
         block_size * bits / 8], with its scales and zero points, calibration/blockwise.py), block_size
Dtypes   float16, float32: all float inputs and Y share one.

Semantics, per row x of X, in float32, rounded once to the dtype at the end (with bits, W is first
dequantized as MatMulNBits does: W[n, k] = (q[n, k] - zero_point[n, k // block_size]) * scale[...],
zero point 2^(bits-1) where none is given):
    a = x / sqrt(mean(x^2) + epsilon) * gamma         with gamma, else x
    z = a . W^T + bias                                 bias where given
    z = silu(z[:N/2]) * z[N/2:]                        with "swiglu"
    y = round(z + residual)                            residual where given
The unfused graph rounds the normalized input, the product and the SwiGLU input to the dtype as
well: in float16 the two differ by a few units in the last place (tests bound it).

Realisations (../shared/DESIGN.md, "Custom ops"):
- NumPy reference: `reference`.
- Decomposition: `decompose` (SimplifiedLayerNormalization, MatMul with Transpose(W), Add,
  Split/QuickGelu/Mul, Add) -- the nodes the runtime pass absorbed, so ORT CPU runs it.
- CuPy kernels, `cuda` (their CUDA C in custom_ops/linear_kernels.py). At most MAX_GEMV_ROWS rows
  (decode, small batches): `linear_gemv`, one launch with nothing staged: each warp issues one round
  of 16-byte weight loads covering its share of its rows (KS warps split a row's K) and reads X beside them from L1/L2 (gamma: staged in shared memory
  while the weights are on their way; read per chunk from L1/L2 it cost ~3 us a launch); the norm is a
  scale of the dot product (its sum of squares reduces with it), so no block waits for a norm
  before its weights are on the way. With "swiglu" a warp owns gate row j and up row j, and writes
  silu(gate) * up. More rows (prefill): `linear_prep` (the norm, one block per row; `linear_prep_vec`
  in 16-byte slices where aligned), a cuBLAS GEMM (cupy.matmul on W's transpose view), then bias,
  SwiGLU (custom_ops/swiglu.py) and the residual (`linear_add_vec`, 16-byte vectors, where aligned).
  With bits, float16 and a block size that is a multiple of 64 (4 bits) or 32 (8 bits): the tensor-core
  GEMV of custom_ops/linear_mma.py (codes to half2 by bit operations, mma.sync with float32 sums, on
  the weight repacked once into fragment order); for one float16 row, custom_ops/linear_half2.py (the
  default, PACKED_GEMV = "half2": x staged once per block, codes to half2 by bit operations; H100,
  llama-8b, 4 bits: 67 us of projections a layer against 148 for float16 Linear). Otherwise `linear_nbits_gemv`, the float GEMV's scheme
  over the packed rows (a 16-byte load holds 32 4-bit or 16 8-bit weights, inside one block since
  block_size is a multiple of that), a chunk's dot product scaled once: scale * (sum q x - zero_point *
  sum x); it converts every code to float on its own and was measured at 0.7-1.3 TB/s of packed bytes
  on an H200 (2026-12-04, llama-8b shapes), no faster than float16. Past MAX_GEMV_ROWS rows
  `linear_dequantize` writes W in the dtype (a temporary) for the GEMM, so prefill computes with W
  rounded to the dtype.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.custom_ops import linear_half2, linear_kernels, linear_mma

DOMAIN = "onnxopt"
OP_TYPE = "Linear"
VERSION = 1
DTYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16})
ACTIVATIONS = ("", "swiglu")
WEIGHT_ARG = 1  # the input another op part may prefetch (runtime/device_graph.py)
MAX_GEMV_ROWS = 8  # rows up to which the GEMV kernel runs (decode at batch <= 8); a GEMM past it
THREADS = 256  # GEMV block: 8 warps
LOAD_ROUND = 8  # U in the kernel: 16-byte loads per lane per weight row in one round
# The decode GEMV on packed weights where several apply: "half2" (linear_half2.py, one float16 row; then
# "mma" for 2..8 rows), "mma" (linear_mma.py, tensor cores; float16, block sizes of 64/32+), "simt"
# (linear_nbits_gemv). scripts/gpu_linear_probe.py --packed-gemv times them. H100, llama-8b shapes,
# 4 bits, 8 layers and the 8-bit LM head (2026-12-06): half2 970 us, mma 1222, float16 Linear 1533.
PACKED_GEMV = "half2"
PACKED_GEMVS = ("mma", "half2", "simt")


BITS = (0, 4, 8)  # 0: a float weight


def dequantized(weight, scales, zero_points, *, bits: int, block_size: int, k: int) -> np.ndarray:
    """A packed (MatMulNBits) weight as float32 [N, K]: calibration/blockwise.py's reference."""
    from onnxopt.calibration.blockwise import QuantizedWeight, dequantize

    n = weight.shape[0]
    k_blocks = -(-k // block_size)
    if weight.dtype != np.uint8 or weight.size != n * k_blocks * block_size * bits // 8:
        raise ValueError(f"Linear bits={bits}: W must be uint8 [N, {k_blocks}, {block_size * bits // 8}], got "
                         f"{weight.dtype} {weight.shape}")
    if zero_points is None:  # MatMulNBits' default zero point, 2^(bits-1), packed as the op stores it
        mid = np.full((n, -(-k_blocks * bits // 8) * (8 // bits)), 1 << (bits - 1), np.uint8)
        zero_points = (mid[:, 0::2] | (mid[:, 1::2] << 4)) if bits == 4 else mid
    qw = QuantizedWeight(bits, block_size, k, n, np.asarray(weight).reshape(n, k_blocks, -1),
                         np.asarray(scales, np.float32).reshape(-1), np.asarray(zero_points).reshape(-1))
    return dequantize(qw).T


def reference(x, weight, gamma=None, residual=None, bias=None, scales=None, zero_points=None, *, activation: str = "",
              epsilon: float = 1e-5, bits: int = 0, block_size: int = 0):
    """Y as the module docstring defines it (NumPy)."""
    if bits:
        weight = dequantized(weight, scales, zero_points, bits=bits, block_size=block_size, k=x.shape[-1])
    n, k = weight.shape
    if activation not in ACTIVATIONS:
        raise ValueError(f"Linear: activation {activation!r} (expected one of {ACTIVATIONS})")
    if x.shape[-1] != k or (activation == "swiglu" and n % 2):
        raise ValueError(f"Linear: input last axis {x.shape[-1]} does not fit weight [N, K] = {weight.shape}")
    a = x.astype(np.float32)
    if gamma is not None:
        a = a / np.sqrt(np.mean(a * a, axis=-1, keepdims=True) + np.float32(epsilon)) * gamma.astype(np.float32)
    return reference_epilogue(a @ weight.astype(np.float32).T, bias, residual, activation=activation, dtype=x.dtype)


def reference_epilogue(z, bias=None, residual=None, *, activation: str, dtype):
    """The spec's steps after the product z [..., N] (float32): + bias, SwiGLU, + residual, one rounding
    to `dtype` (custom_ops/linear_fp8.py shares them)."""
    if bias is not None:
        z = z + bias.astype(np.float32)
    if activation == "swiglu":
        half = z.shape[-1] // 2
        gate, up = z[..., :half], z[..., half:]
        with np.errstate(over="ignore"):  # exp(-gate) = inf for a very negative gate: silu's limit, 0
            z = gate / (1.0 + np.exp(-gate)) * up
    if residual is not None:
        z = z + residual.astype(np.float32)
    return z.astype(dtype)


def attributes_of(node: ir.Node) -> dict:
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    return {"activation": attrs.get("activation", ""), "epsilon": float(attrs.get("epsilon", 1e-5)),
            "bits": int(attrs.get("bits", 0)), "block_size": int(attrs.get("block_size", 0))}


def infer_node(node: ir.Node) -> None:
    """Type Y: X's dtype, X's shape with the last axis N (N / 2 with "swiglu"; N from W)."""
    x, w = node.inputs[0], node.inputs[1]
    y = node.outputs[0]
    quantized = attributes_of(node)["bits"] > 0  # W is uint8; the scales carry the dtype
    if quantized and len(node.inputs) > 5:
        w_dtype = node.inputs[5].dtype if node.inputs[5] is not None else None
    else:
        w_dtype = None if w is None or quantized else w.dtype
    dtype = x.dtype if x is not None and x.dtype is not None else w_dtype
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"Linear accepts {sorted(d.name for d in DTYPES)}, got {dtype.name}")
        y.dtype = dtype
    n = w.shape[0] if w is not None and w.shape is not None and len(w.shape) == (3 if quantized else 2) else None
    if isinstance(n, int) and attributes_of(node)["activation"] == "swiglu":
        n //= 2
    if x is not None and x.shape is not None and len(x.shape) >= 1:
        y.shape = ir.Shape([*x.shape[:-1], n if isinstance(n, int) else None])


def make_node(x: ir.Value, weight_t: ir.Value, gamma=None, residual=None, bias=None, scales=None, zero_points=None, *,
              activation: str = "", epsilon: float = 1e-5, bits: int = 0, block_size: int = 0,
              name: str | None = None) -> ir.Node:
    """A Linear node (inputs as the spec; absent optional inputs trimmed from the end)."""
    if bits not in BITS or (bits and (scales is None or block_size < 16)):
        raise ValueError(f"Linear: bits {bits} (one of {BITS}; 4 and 8 need scales and a block_size)")
    inputs = [x, weight_t, gamma, residual, bias, scales, zero_points]
    while inputs[-1] is None:
        inputs.pop()
    attrs = [ir.AttrString("activation", activation), ir.AttrFloat32("epsilon", float(epsilon))]
    if bits:
        attrs += [ir.AttrInt64("bits", bits), ir.AttrInt64("block_size", block_size)]
    node = ir.Node(DOMAIN, OP_TYPE, inputs, attrs, num_outputs=1, version=VERSION, name=name)
    infer_node(node)
    return node


def decompose(node: ir.Node) -> tuple[list[ir.Node], ir.Value]:
    """Standard-op nodes (ORT contrib ops allowed) computing the Linear node's Y: (nodes, their Y)."""
    tape = ir.tape.Tape()
    inputs = list(node.inputs) + [None] * (7 - len(node.inputs))
    x, weight_t, gamma, residual, bias, scales, zero_points = inputs
    attrs = attributes_of(node)
    a = x
    if gamma is not None:
        a = tape.op("SimplifiedLayerNormalization", [a, gamma], {"axis": -1, "epsilon": attrs["epsilon"], "stash_type": 1})
    if attrs["bits"]:  # the MatMulNBits node the runtime pass absorbed
        n, k_blocks, blob = weight_t.shape
        nbits = {"K": k_blocks * blob * 8 // attrs["bits"], "N": n, "bits": attrs["bits"], "block_size": attrs["block_size"]}
        if x.shape is not None and isinstance(x.shape[-1], int):
            nbits["K"] = x.shape[-1]
        y = tape.op("MatMulNBits", [a, weight_t, scales] + ([zero_points] if zero_points is not None else []), nbits,
                    domain="com.microsoft")
    else:
        y = tape.op("MatMul", [a, tape.op("Transpose", [weight_t], {"perm": [1, 0]})])
    y = decompose_epilogue(tape, y, bias, residual, attrs["activation"])
    return list(tape.nodes), y


def decompose_epilogue(tape, y, bias, residual, activation: str):
    """The nodes of the spec's steps after the product y (bias Add, SwiGLU as Split/QuickGelu/Mul,
    residual Add) on `tape`; returns their output (custom_ops/linear_fp8.py shares them)."""
    if bias is not None:
        y = tape.op("Add", [y, bias])
    if activation == "swiglu":
        gate, up = tape.op_multi_out("Split", [y], {"axis": -1, "num_outputs": 2}, num_outputs=2)
        y = tape.op("Mul", [tape.op("QuickGelu", [gate], {"alpha": 1.0}, domain="com.microsoft"), up])
    if residual is not None:
        y = tape.op("Add", [y, residual])
    return y


_MOD = "onnxopt_linear"


def _function(expression: str):
    """A kernel of the module; each `linear_gemv<T, M, R, KS, ACT>` instance is its own module, compiled
    the first time a model needs it (a model uses three or four)."""
    from onnxopt.custom_ops.cuda import declare_module, raw_function

    name = _MOD + "_" + "".join(c if c.isalnum() else "_" for c in expression)
    declare_module(name, (expression,))
    return raw_function(name, linear_kernels.SOURCE, expression)


def gemv_shape(rows: int, n: int, k: int, itemsize: int, sm_count: int, *, swiglu: bool = False) -> tuple[int, int, int] | None:
    """(M, R, KS) of the GEMV launch for `rows` rows, or None when the GEMM path takes it: M the
    instance's row count (1, 2, 4 or 8); KS warps share a weight row (each K slice at most LOAD_ROUND
    chunks of 32 16-byte loads, so one round of loads covers it; 8 warps a block); R weight rows per
    warp (2 when that still gives two blocks per SM, else 1; "swiglu": 2, gate and up)."""
    if rows < 1 or rows > MAX_GEMV_ROWS:
        return None
    m = next(v for v in (1, 2, 4, 8) if v >= rows)
    chunks = -(-k // (32 * (16 // itemsize)))
    ks = next(v for v in (1, 2, 4, 8) if v * LOAD_ROUND >= chunks or v == 8)
    groups = (THREADS // 32) // ks
    r = 2 if swiglu or -(-n // (groups * 2)) >= 2 * sm_count else 1
    return m, r, ks


def _ptr(array):
    """A kernel argument for an optional input: the array, or a null pointer."""
    return np.uint64(0) if array is None else array


def checked_out(cp, x, n: int, k: int, act: bool, gamma, residual, bias, out, *, op: str = "Linear"):
    """Check the inputs around the product against X [..., K] and N (every weight form, LinearFp8's
    too: `op` names it in the message); returns (rows, out) with `out` the given C-contiguous [..., Ny]
    array or a new one."""
    if act and n % 2:
        raise ValueError(f"{op}: swiglu needs an even N (gate | up rows), got {n}")
    for name, value, size in (("gamma", gamma, k), ("bias", bias, n)):
        if value is not None and (value.dtype != x.dtype or value.size != size):
            raise ValueError(f"{op}: {name} must be {x.dtype} of {size} elements, got {value.dtype} {value.shape}")
    shape = (*x.shape[:-1], n // 2 if act else n)
    if residual is not None and (residual.dtype != x.dtype or tuple(residual.shape) != shape):
        raise ValueError(f"{op}: residual must be {x.dtype} {shape}, got {residual.dtype} {residual.shape}")
    if out is None:
        out = cp.empty(shape, dtype=x.dtype)
    elif tuple(out.shape) != shape or out.dtype != x.dtype or not out.flags.c_contiguous:
        raise ValueError(f"{op} out: expected a C-contiguous {x.dtype} array of shape {shape}, got {out.dtype} {out.shape}")
    return int(np.prod(x.shape[:-1], dtype=np.int64)), out


def takes_prefetch(weight) -> bool:
    """Whether a launch on this weight issues cuda()'s `prefetch` range: the packed (uint8) weight's decode
    GEMV does (linear_half2.py); the float GEMV and the prefill paths ignore it (runtime/device_graph.py)."""
    return weight is not None and weight.dtype.itemsize == 1


def _cuda_nbits(x, weight, gamma, residual, bias, scales, zero_points, *, activation, epsilon, bits, block_size, out,
                prefetch=None):
    """Linear with a packed weight on the GPU: the NBits GEMV for decode rows, else the weight
    dequantized into a temporary for the float path (prefill runs eagerly, so it may allocate).
    `prefetch`: an L2 prefetch range for the half2 GEMV (cuda())."""
    from onnxopt.custom_ops.cuda import cupy

    cp = cupy()
    if x.dtype not in (cp.float16, cp.float32):
        raise ValueError(f"Linear: x must be float16 or float32, got {x.dtype}")
    k = x.shape[-1]
    n = weight.shape[0]
    k_blocks = -(-k // max(block_size, 1))
    if bits not in (4, 8) or block_size < 16 or weight.dtype != cp.uint8 or weight.size != n * k_blocks * block_size * bits // 8:
        raise ValueError(f"Linear bits={bits} block_size={block_size}: W must be uint8 [N, {k_blocks}, "
                         f"{block_size * bits // 8}], got {weight.dtype} {weight.shape}")
    if scales is None or scales.dtype != x.dtype or scales.size != n * k_blocks:
        raise ValueError(f"Linear: scales must be {x.dtype} of {n * k_blocks} elements")
    if zero_points is not None and (zero_points.dtype != cp.uint8 or zero_points.size != n * (-(-k_blocks * bits // 8))):
        raise ValueError(f"Linear: zero_points must be uint8 of {n * (-(-k_blocks * bits // 8))} elements")
    suffix = "half_bits" if x.dtype == cp.float16 else "float"
    vals = 128 // bits  # codes per 16-byte load
    act = activation == "swiglu"
    rows, out = checked_out(cp, x, n, k, act, gamma, residual, bias, out)
    if rows == 0:
        return out
    if (PACKED_GEMV == "half2" and linear_half2.supports(rows, bits, block_size, k, x.dtype.itemsize, n)
            and weight.flags.c_contiguous and scales.flags.c_contiguous):  # half2 arithmetic (linear_half2.py)
        linear_half2.gemv(cp.ascontiguousarray(x), weight, scales, zero_points, gamma,
                          None if residual is None else cp.ascontiguousarray(residual), bias, out, n=n, k=k, bits=bits,
                          block_size=block_size, activation=activation, epsilon=epsilon, prefetch=prefetch)
        return out
    if (rows <= MAX_GEMV_ROWS and x.dtype == cp.float16 and PACKED_GEMV != "simt" and linear_mma.supports(bits, block_size, k)
            and weight.flags.c_contiguous and scales.flags.c_contiguous):  # tensor cores (linear_mma.py)
        linear_mma.gemv(cp.ascontiguousarray(x), weight, scales, zero_points, gamma,
                        None if residual is None else cp.ascontiguousarray(residual), bias, out, rows=rows, n=n, k=k,
                        bits=bits, block_size=block_size, activation=activation, epsilon=epsilon)
        return out
    if rows <= MAX_GEMV_ROWS and k % vals == 0 and block_size % vals == 0:
        m = next(v for v in (1, 2, 4, 8) if v >= rows)
        r = 2 if act else 1
        units = n // 2 if act else n
        x = cp.ascontiguousarray(x)
        residual = None if residual is None else cp.ascontiguousarray(residual)
        _function(f"linear_nbits_gemv<{suffix}, {m}, {r}, {bits}, {int(act)}>")(
            (-(-units // (THREADS // 32)),), (THREADS,),
            (x, cp.ascontiguousarray(weight), scales, _ptr(zero_points), _ptr(gamma), _ptr(residual), _ptr(bias), out,
             np.int32(rows), np.int32(k), np.int32(n), np.int32(block_size), np.int32(gamma is not None),
             np.float32(epsilon)))
        return out
    dense = dequantize_cuda(weight, scales, zero_points, n=n, k=k, bits=bits, block_size=block_size, dtype=x.dtype)
    return cuda(x, dense, gamma, residual, bias, activation=activation, epsilon=epsilon, out=out)


# The prefill's dequantize kernel where the shapes allow: "out16" (linear_dequantize_out16, a 16-byte
# output vector a thread) or "vec" (linear_dequantize_vec, a 16-byte chunk of codes a thread: 255 us for
# llama-8b's int4 gate/up on an H100, 2026-12-06, 920 GB/s written; each of its store instructions
# covers a quarter of every 64 bytes). With out16 the int4 package's 2048-token first token went from
# 71.5 to 59.2 ms (H100, 09:55 UTC).
DEQUANTIZE = "out16"


def dequantize_cuda(weight, scales, zero_points, *, n: int, k: int, bits: int, block_size: int, dtype, kernel=None):
    """W [N, K] in `dtype` from MatMulNBits' packed weight (CuPy arrays; the shapes checked by the caller)."""
    from onnxopt.custom_ops.cuda import cupy, sm_count

    cp = cupy()
    kernel = kernel or DEQUANTIZE
    suffix = "half_bits" if dtype == cp.float16 else "float"
    vals = 128 // bits  # codes per 16-byte load
    vec = 16 // np.dtype(dtype).itemsize  # values per 16-byte output vector
    weight, scales = cp.ascontiguousarray(weight), cp.ascontiguousarray(scales)
    dense = cp.empty((n, k), dtype=dtype)
    if kernel == "out16" and k % vec == 0 and block_size % vec == 0 and weight.data.ptr % 8 == 0 and n < 2**31:
        _function(f"linear_dequantize_out16<{suffix}, {bits}>")(
            (n, -(-(k // vec) // THREADS)), (THREADS,),
            (weight, scales, _ptr(zero_points), dense, np.int32(k), np.int32(block_size)))
    elif k % vals == 0 and block_size % vals == 0:  # a 16-byte chunk of codes a thread
        _function(f"linear_dequantize_vec<{suffix}, {bits}>")(
            (min(-(-n * (k // vals) // THREADS), 16 * sm_count()),), (THREADS,),
            (weight, scales, _ptr(zero_points), dense, np.int32(k), np.int32(n), np.int32(block_size)))
    else:
        _function(f"linear_dequantize<{suffix}, {bits}>")(
            (-(-k // THREADS), n), (THREADS,),
            (weight, scales, _ptr(zero_points), dense, np.int32(k), np.int32(block_size)))
    return dense


def cuda(x, weight, gamma=None, residual=None, bias=None, scales=None, zero_points=None, *, activation: str = "",
         epsilon: float = 1e-5, bits: int = 0, block_size: int = 0, out=None, prefetch=None):
    """Linear on the GPU (launches only): CuPy arrays as in the spec; `out` (optional) a C-contiguous
    [..., Ny] array written in place. `prefetch` (device pointer, bytes): a later kernel's weights the
    packed decode GEMV prefetches into L2 (runtime/device_graph.py; ignored by the other paths)."""
    from onnxopt.custom_ops import swiglu
    from onnxopt.custom_ops.cuda import cupy, persistent, sm_count
    from onnxopt.custom_ops.cuda import launch as launch_kernel

    cp = cupy()
    if activation not in ACTIVATIONS:
        raise ValueError(f"Linear: activation {activation!r} (expected one of {ACTIVATIONS})")
    if bits:
        return _cuda_nbits(x, weight, gamma, residual, bias, scales, zero_points, activation=activation,
                           epsilon=epsilon, bits=bits, block_size=block_size, out=out, prefetch=prefetch)
    n, k = weight.shape
    if x.dtype not in (cp.float16, cp.float32) or weight.dtype != x.dtype:
        raise ValueError(f"Linear: x and weight must share float16 or float32, got {x.dtype}, {weight.dtype}")
    act = activation == "swiglu"
    if x.shape[-1] != k or k % (16 // x.dtype.itemsize) or (act and n % 2):
        raise ValueError(f"Linear: input {x.shape} does not fit weight [N, K] = {weight.shape} (K a multiple of 16 bytes)")
    rows, out = checked_out(cp, x, n, k, act, gamma, residual, bias, out)
    ny = n // 2 if act else n
    if rows == 0:
        return out
    x = cp.ascontiguousarray(x)
    weight = cp.ascontiguousarray(weight)
    residual = None if residual is None else cp.ascontiguousarray(residual)
    suffix = "half_bits" if x.dtype == cp.float16 else "float"
    launch = gemv_shape(rows, n, k, x.dtype.itemsize, sm_count(), swiglu=act)
    if launch is not None:
        m, r, ks = launch
        groups = (THREADS // 32) // ks
        units = n // 2 if act else -(-n // r)
        launch_kernel(
            _function(f"linear_gemv<{suffix}, {m}, {r}, {ks}, {int(act)}>"), (-(-units // groups),), (THREADS,),
            (x, weight, _ptr(gamma), _ptr(residual), _ptr(bias), out, np.int32(rows), np.int32(k), np.int32(n),
             np.int32(gamma is not None), np.float32(epsilon)),
            shared_mem=LOAD_ROUND * ks * 32 * 16 if gamma is not None else 0, dependent=True)  # gamma of a round
        return out
    small = rows <= 64  # a batch decode step (may be captured): persistent buffers
    a = x.reshape(rows, k)
    if gamma is not None:
        staged = persistent("linear_normed", (rows, k), x.dtype) if small else cp.empty((rows, k), dtype=x.dtype)
        gamma = cp.ascontiguousarray(gamma)
        prep = "linear_prep_vec" if _aligned16(a, gamma, staged) else "linear_prep"  # (K: checked above)
        _function(f"{prep}<{suffix}>")((rows,), (THREADS,), (a, gamma, staged, np.int32(k), np.float32(epsilon)))
        a = staged
    y = out.reshape(rows, ny)
    z = (persistent("linear_product", (rows, n), x.dtype) if small else cp.empty((rows, n), dtype=x.dtype)) if act else y
    cp.matmul(a, weight.T, out=z)
    if bias is not None:
        cp.add(z, bias, out=z)
    if act:
        swiglu.cuda(z, out=y)
    if residual is not None:
        add_residual(y, residual.reshape(rows, ny))
    return out


def _aligned16(*arrays) -> bool:
    return all(a.data.ptr % 16 == 0 for a in arrays)


def add_residual(y, residual) -> None:
    """y += residual in place (CuPy arrays of one shape and dtype, C-contiguous): `linear_add_vec` where
    both are 16-byte aligned and whole vectors, else cupy.add."""
    from onnxopt.custom_ops.cuda import cupy

    cp = cupy()
    vec = 16 // y.dtype.itemsize
    if y.size % vec or not _aligned16(y, residual) or y.dtype not in (cp.float16, cp.float32):
        cp.add(y, residual, out=y)
        return
    n16 = y.size // vec
    suffix = "half_bits" if y.dtype == cp.float16 else "float"
    _function(f"linear_add_vec<{suffix}>")((-(-n16 // THREADS),), (THREADS,), (y, residual, np.int64(n16)))
