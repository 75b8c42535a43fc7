"""`onnxopt::GroupQueryAttention` (opset 1): rotary, KV append and attention over a shared KV buffer.

The CUDA target's attention node. It has the interface and the arithmetic of the subset of
com.microsoft::GroupQueryAttention (ORT docs/ContribOperators.md) that our optimizer emits, so that
its decomposition is that node itself; what it changes is how the CUDA runtime runs it: in decode one
CuPy kernel per layer (rotary, append and attention split over the keys) instead of ORT's four
(sequence lengths, memset, unpack/rotary/append, attention), spreading short caches over more of the
GPU; in prefill two.

Spec
----
Inputs   qkv                    [B, S, (H + 2 Hk) D]  packed query | key | value of the new tokens
         past_key, past_value   [B, Hk, T, D]  one buffer per tensor, shared with the present outputs
         seqlens_k              [B] int32      tokens of row b after this step, minus 1 (n_b - 1)
         total_sequence_length  [] int32       read on the host: == S means "first prompt"
         cos_cache, sin_cache   [P, R]         rotary tables (do_rotary = 1), rotary_dim = 2R <= D
Outputs  output                 [B, S, H D]
         present_key, present_value  [B, Hk, T, D]  = past with the new K/V written in place
Attrs    num_heads H, kv_num_heads Hk (H % Hk == 0), scale (0: 1/sqrt(D)), local_window_size
         (-1: none), do_rotary (0/1); rotary_interleaved must be 0.
Dtypes   float16, float32 (qkv, the caches and the tables alike).

Semantics (row b, new token i < S):
    past_b = 0 if total_sequence_length == S (first prompt, rows right-padded) else seqlens_k[b] + 1 - S
    p      = past_b + i                        its position
    q, k   = rotate(q, p), rotate(k, p)        x1 = x[:R], x2 = x[R:2R]: (x1 c - x2 s, x2 c + x1 s), rest kept;
                                               computed in float32, rounded to the dtype
    present[b, :, p] = k, v                    (every new token, padding included, as ORT does)
    keys   j in [lo, p]                        lo = max(0, p + 1 - local_window_size) with a window
                                               (W keys, the token's own included, as ORT does), else 0
    out    = softmax(scale q . K_j) . V_j      in float32, rounded once; query head h reads kv head h // (H/Hk)

Realisations (../shared/DESIGN.md, "Custom ops"):
- NumPy reference: `reference` (tests check it against ORT CPU's com.microsoft node).
- Decomposition: `decompose` below, the com.microsoft::GroupQueryAttention node with the same inputs
  and attributes (what the CPU target keeps; `optimize --target cuda` verifies through it).
- CuPy kernels, `cuda`: in prefill `gqa_rope_append` (grid: H + 2Hk heads x S x B) writes the rotated
  query to a scratch [B, S, H, D] and the rotated key and the value into the cache; then, for float16
  at head sizes 64 and 128, `gqa_flash_prefill` (grid: S / (16 FLASH_WARPS) x H x B) runs flash
  attention on the tensor cores: each block takes 16 query rows a warp of one head through the keys in
  tiles of 64 (P rounded to float16 for P.V, float32 accumulators; H100 2026-12-06, llama-8b heads, a
  2048-token prompt: 332-380 us a layer against 7,235 for the CUDA-core kernel,
  `scripts/gpu_gqa_probe.py --prefill`; 8 warps and double-buffered tiles, FLASH_WARPS / FLASH_STAGES,
  were within 10 % of the default either way).
  Otherwise `gqa_attend` (grid: splits x Hk x B S) gives each block one kv head's G = H/Hk query heads
  of one token over one chunk of keys. In decode (S = 1) one launch does it all: each block rotates its queries, and the block
  whose chunk holds the new position appends the new key and value (for head sizes 64 and 128
  `gqa_decode_vec` does this in registers, in one pass; the kernels' CUDA C is in
  custom_ops/group_query_attention_kernels.py). Each block has
  scores in shared memory, softmax, P.V, in float32. With several splits each block writes its
  (max, sum, P.V) and the last block to finish (a counter per (token, kv head), reset by it) merges
  them, so one launch does the whole attention. The loop is bound by memory latency, not bandwidth:
  for head sizes 64 and 128 (`gqa_attend_vec`) a decode block loads all of its keys and values in one
  round of 16-byte loads (256 keys at head size 64 with 512 threads), so at most one split per 256
  cached positions. The number of splits is fixed by the cache size T, not the current length: a
  captured CUDA graph replays the same grid while the length, read on the device from seqlens_k, grows.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from onnxopt.custom_ops.group_query_attention_kernels import SOURCE as _SOURCE

DOMAIN = "onnxopt"
OP_TYPE = "GroupQueryAttention"
VERSION = 1
DTYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16})
# com.microsoft attributes this op takes (others, e.g. softcap or smooth_softmax, keep the ORT node)
ATTRIBUTES = ("num_heads", "kv_num_heads", "scale", "local_window_size", "do_rotary", "rotary_interleaved")
MAX_GROUP = 8  # query heads per kv head the kernels take
MAX_HEAD_SIZE = 256
DECODE_CHUNK = 64  # keys per block in decode (S == 1) for the generic kernel (the vec one: one round)
PREFILL_CHUNK = 1024  # most keys per block in prefill (shared memory: G * chunk floats)
THREADS = 128


def supported(attributes: dict, head_size: int | None) -> str | None:
    """Why a com.microsoft GQA node with these attribute values cannot become this op (None: it can)."""
    extra = sorted(set(attributes) - set(ATTRIBUTES))
    if extra:
        return f"attributes {extra} are not supported"
    if attributes.get("rotary_interleaved", 0):
        return "interleaved rotary is not supported"
    h, hk = attributes.get("num_heads"), attributes.get("kv_num_heads")
    if not h or not hk or h % hk:
        return f"num_heads {h} is not a multiple of kv_num_heads {hk}"
    if h // hk > MAX_GROUP:
        return f"{h // hk} query heads per kv head (at most {MAX_GROUP})"
    if head_size is None or head_size % 2 or head_size > MAX_HEAD_SIZE:
        return f"head size {head_size} (even and at most {MAX_HEAD_SIZE} needed)"
    return None


def _split_qkv(qkv: np.ndarray, h: int, hk: int, d: int):
    b, s, _ = qkv.shape
    q = qkv[..., : h * d].reshape(b, s, h, d)
    k = qkv[..., h * d : (h + hk) * d].reshape(b, s, hk, d)
    v = qkv[..., (h + hk) * d :].reshape(b, s, hk, d)
    return q, k, v


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [S, heads, D] at the positions of cos/sin [S, R] (non-interleaved), in float32 -> x's dtype."""
    r = cos.shape[-1]
    xf = x.astype(np.float32)
    c, s = cos[:, None, :].astype(np.float32), sin[:, None, :].astype(np.float32)
    x1, x2 = xf[..., :r], xf[..., r : 2 * r]
    out = xf.copy()
    out[..., :r] = x1 * c - x2 * s
    out[..., r : 2 * r] = x2 * c + x1 * s
    return out.astype(x.dtype)


def past_lengths(seqlens_k: np.ndarray, total_sequence_length, s: int) -> np.ndarray:
    """past_b per row (module docstring)."""
    if int(np.asarray(total_sequence_length)) == s:
        return np.zeros(len(seqlens_k), dtype=np.int64)
    return np.asarray(seqlens_k, dtype=np.int64) + 1 - s


def reference(qkv, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache=None, sin_cache=None, *,
              num_heads: int, kv_num_heads: int, scale: float = 0.0, local_window_size: int = -1,
              do_rotary: int = 0, rotary_interleaved: int = 0):
    """(output, present_key, present_value) as the module docstring defines them (NumPy, new arrays).
    The inputs are the node's, in order: key and value must be None (packed qkv)."""
    if key is not None or value is not None:
        raise ValueError("GroupQueryAttention: only packed qkv is supported (key and value inputs absent)")
    if rotary_interleaved:
        raise ValueError("GroupQueryAttention: interleaved rotary is not supported")
    h, hk = num_heads, kv_num_heads
    b_size, s, _ = qkv.shape
    d = past_key.shape[3]
    scale = scale or 1.0 / math.sqrt(d)
    q, k, v = _split_qkv(qkv, h, hk, d)
    present_key, present_value = past_key.copy(), past_value.copy()
    out = np.zeros((b_size, s, h, d), dtype=np.float32)
    group = h // hk
    for b, past in enumerate(past_lengths(seqlens_k, total_sequence_length, s)):
        pos = past + np.arange(s)
        qb, kb = q[b], k[b]
        if do_rotary:
            qb, kb = _rotate(qb, cos_cache[pos], sin_cache[pos]), _rotate(kb, cos_cache[pos], sin_cache[pos])
        present_key[b][:, pos] = kb.transpose(1, 0, 2)
        present_value[b][:, pos] = v[b].transpose(1, 0, 2)
        keys = present_key[b].astype(np.float32)  # [Hk, T, D]
        values = present_value[b].astype(np.float32)
        for i, p in enumerate(pos):
            lo = max(0, p + 1 - local_window_size) if local_window_size >= 0 else 0
            for head in range(h):
                g = head // group
                scores = keys[g, lo : p + 1] @ qb[i, head].astype(np.float32) * np.float32(scale)
                weights = np.exp(scores - scores.max())
                out[b, i, head] = (weights / weights.sum()) @ values[g, lo : p + 1]
    return out.reshape(b_size, s, h * d).astype(qkv.dtype), present_key, present_value


def infer_node(node: ir.Node) -> None:
    """Output types: output [B, S, H*D] in qkv's dtype, presents as the past buffers (onnx-ir)."""
    qkv, past_key, past_value = node.inputs[0], node.inputs[3], node.inputs[4]
    h = node.attributes.get_int("num_heads")
    out, present_key, present_value = node.outputs
    if qkv is not None and qkv.dtype is not None:
        if qkv.dtype not in DTYPES:
            raise ValueError(f"GroupQueryAttention accepts {sorted(d.name for d in DTYPES)}, got {qkv.dtype.name}")
        out.dtype = qkv.dtype
    if qkv is not None and qkv.shape is not None and len(qkv.shape) == 3 and past_key is not None and past_key.shape is not None:
        d = past_key.shape[3]
        out.shape = ir.Shape([qkv.shape[0], qkv.shape[1], h * d if isinstance(d, int) else None])
    for present, past in ((present_key, past_key), (present_value, past_value)):
        if past is not None:
            present.dtype = past.dtype
            present.shape = past.shape


def decompose(node: ir.Node) -> ir.Node:
    """The com.microsoft::GroupQueryAttention node with this node's inputs and attributes (not inserted)."""
    return ir.Node("com.microsoft", "GroupQueryAttention", inputs=list(node.inputs),
                   attributes=list(node.attributes.values()), num_outputs=len(node.outputs), name=node.name)


def from_microsoft(node: ir.Node) -> ir.Node:
    """This op's node for a com.microsoft::GroupQueryAttention node (not inserted; check `supported`)."""
    return ir.Node(DOMAIN, OP_TYPE, inputs=list(node.inputs), attributes=list(node.attributes.values()),
                   num_outputs=len(node.outputs), version=VERSION, name=node.name)


# ---------------------------------------------------------------------------------------------- CUDA

_MOD = "onnxopt_gqa"
# gqa_attend_vec's head sizes (others run gqa_attend), and its block: at most this many threads, and
# shared memory for P.V partial sums of at most RED_BYTES (one row per warp)
VEC_HEAD_SIZES = (64, 128)
VEC_THREADS = 512
RED_BYTES = 32 * 1024
# U, gqa_decode_vec's key rows a thread has in flight (a template argument), per head size: a block
# covers 256 keys, so a 256-key cache is one split (no merge of partials). H100, llama-8b heads
# (32/8 x 128), 2026-12-06 09:48 UTC, `gpu_gqa_probe.py --round-rows 2 4 8 --threads 256 512`, us a layer
# replayed: 256 keys U 4 8.06 (2 splits), U 8 6.67 (1 split); 1280 keys 10.22 / 10.35. The int4 decode
# step (128 -> 128): 2.221 ms with U 4, 2.180 with U 8. ROUND_ROWS (an int) overrides it for every size.
DECODE_ROUND_ROWS = {64: 4, 128: 8}
ROUND_ROWS = None
ATTEND_ROUND_ROWS = 4  # gqa_attend_vec's U (prefill chunks, and decode where the one pass cannot run): U 8 was slower
# The decode launch's kernel for those head sizes: gqa_decode_vec (one pass, registers) where the rotary
# half-width is a multiple of the 16-byte vector (else, and with "gqa_attend_vec", the two-pass kernel;
# scripts/gpu_gqa_probe.py --kernel times both: on an H200, 2026-12-04, llama-1b heads, 6.21 against
# 9.33 us a layer at 256 keys, 9.82 against 13.71 at 1280)
DECODE_KERNEL = "gqa_decode_vec"
# The prefill launch's kernel for float16 at head sizes 64 and 128: "gqa_flash_prefill" (tensor cores,
# one block per 16 FLASH_WARPS query rows of a head) or "gqa_attend" (the CUDA-core kernels, one block per token)
PREFILL_KERNEL = "gqa_flash_prefill"
FLASH_HEAD_SIZES = (64, 128)
FLASH_WARPS = 4  # gqa_flash_prefill's block: 16 query rows a warp (4 or 8)
FLASH_STAGES = 1  # its key/value buffers: 1 (each reloaded while the other is used) or 2 (double-buffered)
FLASH_KEYS = 64  # key rows of its tiles
# Its key tiles valid for every row of the block (inside the causal range, the window and the cache)
# skip the mask (1) or not (0): the same scores either way (GPU test, bit for bit). Most tiles of a long
# prompt are below the diagonal; the tile loop is 654 SASS instructions without the mask against 849
# with it (nvcc 13.0, sm_90, head 128). Not yet timed on a GPU (`gpu_gqa_probe.py --prefill 2048
# --head-size 128 --kernel gqa_flash_prefill/4/1/1 gqa_flash_prefill/4/1/0`).
FLASH_SKIP_MASK = 1
# The prefill's rotary + append: gqa_rope_append_vec (a 16-byte slice a thread, blocks of ROPE_THREADS)
# where rope_append_vec allows, else gqa_rope_append (an element a thread). H100 profile of the llama-8b
# 2048-token prefill, 2026-12-06: gqa_rope_append took 66 us a layer, about 3x its bytes at 3 TB/s
# (docs/BENCHMARKS.md); the slice kernel 15 us (09:55 UTC, 2.1 -> 0.5 ms a prefill)
ROPE_APPEND_VEC = True
ROPE_THREADS = 256
_EXPRESSIONS = ("gqa_rope_append<float>", "gqa_rope_append<half_bits>", "gqa_attend<float>", "gqa_attend<half_bits>")



def _function(expression: str):
    """A kernel of the module; a `gqa_attend_vec<T, D, G, U>` instance is its own module, compiled the
    first time a model of that head size and grouping needs it."""
    from onnxopt.custom_ops.cuda import declare_module, raw_function

    if expression.startswith(("gqa_attend_vec<", "gqa_decode_vec<", "gqa_flash_prefill<", "gqa_rope_append_vec<")):
        name = _MOD + "_" + "".join(c if c.isalnum() else "_" for c in expression)
        declare_module(name, (expression,))
        return raw_function(name, _SOURCE, expression)
    declare_module(_MOD, _EXPRESSIONS)
    return raw_function(_MOD, _SOURCE, expression)


def vec_threads(group: int, head_size: int, itemsize: int = 2) -> int:
    """Block size of gqa_attend_vec: the most warps (<= VEC_THREADS / 32) whose P.V rows fit RED_BYTES."""
    warps = min(VEC_THREADS // 32, RED_BYTES // (4 * group * head_size))
    return 32 * max(1, warps)


def decode_round_rows(head_size: int) -> int:
    """gqa_decode_vec's U for a head size: ROUND_ROWS where set, else DECODE_ROUND_ROWS."""
    return ROUND_ROWS or DECODE_ROUND_ROWS.get(head_size, ATTEND_ROUND_ROWS)


def round_keys(group: int, head_size: int, itemsize: int = 2, round_rows: int | None = None) -> int:
    """Keys one round of a vec kernel's block covers (module docstring of the kernel); U defaults to
    gqa_decode_vec's."""
    rows_per_warp = 32 * (16 // itemsize) // head_size
    return vec_threads(group, head_size, itemsize) // 32 * rows_per_warp * (round_rows or decode_round_rows(head_size))


def launch_shape(s: int, cache_len: int, first: bool, group: int, head_size: int, itemsize: int = 2,
                 round_rows: int | None = None):
    """(threads, chunk, splits, red rows) of the attention launch: block size, keys per block, blocks
    per (token, kv head), rows of P.V partial sums in shared memory. `round_rows`: U of the decode
    kernel (default gqa_decode_vec's, decode_round_rows; ATTEND_ROUND_ROWS where gqa_attend_vec decodes)."""
    longest = s if first else cache_len
    vec = head_size in VEC_HEAD_SIZES
    threads = vec_threads(group, head_size, itemsize) if vec else THREADS
    rows = threads // 32 if vec else max(1, THREADS // head_size)
    if s == 1:  # decode: one round per block (vec), so every key is one trip to memory
        chunk = round_keys(group, head_size, itemsize, round_rows) if vec else DECODE_CHUNK
    else:  # shared memory (44 KiB): q [G][D] + p [G][chunk] + red [rows][G][D] floats
        fit = (44 * 1024 // 4 - group * head_size * (1 + rows)) // group
        chunk = min(PREFILL_CHUNK, max(32, fit // 32 * 32), -(-longest // 32) * 32)
    return threads, chunk, max(1, -(-longest // chunk)), rows


def one_pass_rotary(half_width: int, itemsize: int, table=None) -> bool:
    """Whether gqa_decode_vec can rotate in 16-byte slices: the rotary half-width (0: no rotary) a
    multiple of the vector, and the tables (a CuPy array, when given) 16-byte aligned."""
    return half_width % (16 // itemsize) == 0 and (table is None or half_width == 0 or table.data.ptr % 16 == 0)


def rope_append_vec(qkv, cos, sin, key_cache, value_cache, qbuf, half_width: int) -> bool:
    """Whether the prefill's rotary + append runs as gqa_rope_append_vec: ROPE_APPEND_VEC, head sizes 64
    and 128, the rotary in 16-byte slices, and every buffer 16-byte aligned (CuPy arrays)."""
    return (ROPE_APPEND_VEC and key_cache.shape[-1] in VEC_HEAD_SIZES
            and one_pass_rotary(half_width, qkv.dtype.itemsize, cos) and one_pass_rotary(half_width, qkv.dtype.itemsize, sin)
            and all(a.data.ptr % 16 == 0 for a in (qkv, key_cache, value_cache, qbuf)))


def flash_prefill(itemsize: int, head_size: int) -> bool:
    """Whether a prefill launch (S > 1) runs gqa_flash_prefill: float16 at head sizes 64 and 128."""
    return PREFILL_KERNEL == "gqa_flash_prefill" and itemsize == 2 and head_size in FLASH_HEAD_SIZES


def plan(s: int, cache_len: int, first: bool, group: int, head_size: int) -> tuple[int, int]:
    """(chunk, splits) of a float16 attention launch: keys per block and blocks per (token, kv head)."""
    _, chunk, splits, _ = launch_shape(s, cache_len, first, group, head_size)
    return chunk, splits


def takes_prefetch(weight=None) -> bool:
    """cuda()'s `prefetch` range is issued by the one-pass decode kernel (runtime/device_graph.py)."""
    return True


def cuda(qkv, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache=None, sin_cache=None, *,
         num_heads: int, kv_num_heads: int, scale: float = 0.0, local_window_size: int = -1,
         do_rotary: int = 0, rotary_interleaved: int = 0, out=None, prefetch=None):
    """GroupQueryAttention on the GPU, launch only: the node's inputs in order, qkv, caches, seqlens_k
    (int32) and the tables CuPy arrays (key and value None), total_sequence_length a host scalar.
    Writes the new K/V into past_key/past_value in place and returns (output, past_key, past_value). `out` (optional): (output, present_key, present_value)
    preallocated; the presents must be the past buffers themselves (the shared-buffer interface).
    `prefetch` (device pointer, bytes): a later kernel's weights the one-pass decode kernel prefetches
    into L2 (runtime/device_graph.py; the other kernels ignore it)."""
    from onnxopt.custom_ops.cuda import cupy, launch, persistent, prefetch_args

    cp = cupy()
    if key is not None or value is not None:
        raise ValueError("GroupQueryAttention: only packed qkv is supported (key and value inputs absent)")
    if rotary_interleaved:
        raise ValueError("GroupQueryAttention: interleaved rotary is not supported")
    if qkv.dtype not in (cp.float16, cp.float32) or past_key.dtype != qkv.dtype or past_value.dtype != qkv.dtype:
        raise ValueError(f"GroupQueryAttention: qkv and caches must share float16 or float32, got {qkv.dtype}, {past_key.dtype}")
    h, hk = int(num_heads), int(kv_num_heads)
    b_size, s, width = qkv.shape
    _, _, tcap, d = past_key.shape
    group = h // hk
    if h % hk or group > MAX_GROUP or width != (h + 2 * hk) * d or d > MAX_HEAD_SIZE:
        raise ValueError(f"GroupQueryAttention: unsupported heads {h}/{hk} x {d} for qkv width {width}")
    for name, cache in (("past_key", past_key), ("past_value", past_value)):
        if not cache.flags.c_contiguous or cache.shape != (b_size, hk, tcap, d):
            raise ValueError(f"GroupQueryAttention: {name} must be a C-contiguous [B, Hk, T, D] buffer, got {cache.shape}")
    output = None
    if out is not None:
        output, present_key, present_value = out
        present_key = past_key if present_key is None else present_key
        present_value = past_value if present_value is None else present_value
        if present_key.data.ptr != past_key.data.ptr or present_value.data.ptr != past_value.data.ptr:
            raise ValueError("GroupQueryAttention: present_key/present_value must be the past buffers (shared KV)")
    if output is None:
        output = cp.empty((b_size, s, h * d), dtype=qkv.dtype)
    qkv = cp.ascontiguousarray(qkv)
    seqlens = cp.ascontiguousarray(seqlens_k, dtype=cp.int32)
    first = int(np.asarray(total_sequence_length)) == s
    rotary = bool(do_rotary)
    if rotary:
        cos = cp.ascontiguousarray(cos_cache, dtype=qkv.dtype)
        sin = cp.ascontiguousarray(sin_cache, dtype=qkv.dtype)
        positions, r = cos.shape
    else:
        cos = sin = qkv  # not read
        positions, r = 0, 0
    suffix = "<half_bits>" if qkv.dtype == cp.float16 else "<float>"
    # Decode (s == 1) may be captured: its scratch stays at fixed addresses (and nothing is allocated
    # inside a capture). Prefill runs eagerly and takes fresh, stream-ordered pool memory.
    if s == 1:
        def scratch(kind, shape, dtype, zero=False):
            return persistent(kind, shape, dtype, zero=zero)
    else:
        def scratch(kind, shape, dtype, zero=False):
            return (cp.zeros if zero else cp.empty)(shape, dtype=dtype)
    fused = s == 1  # decode: one launch (rotary and append inside the attention kernel)
    if fused:
        qbuf = qkv  # not read
    else:
        qbuf = scratch("q", (b_size, s, h, d), qkv.dtype)
        if rope_append_vec(qkv, cos, sin, past_key, past_value, qbuf, r):
            slices = (h + 2 * hk) * d // (16 // qkv.dtype.itemsize)
            threads = min(ROPE_THREADS, -(-slices // 32) * 32)
            _function(f"gqa_rope_append_vec<{suffix[1:-1]}, {d}>")(
                (-(-slices // threads), s, b_size), (threads,),
                (qkv, cos, sin, seqlens, past_key, past_value, qbuf, np.int32(s), np.int32(h), np.int32(hk),
                 np.int32(r), np.int32(positions), np.int32(tcap), np.int32(first), np.int32(rotary)))
        else:
            _function("gqa_rope_append" + suffix)(
                (h + 2 * hk, s, b_size), (min(THREADS, d),),
                (qkv, cos, sin, seqlens, past_key, past_value, qbuf, np.int32(s), np.int32(h), np.int32(hk),
                 np.int32(d), np.int32(r), np.int32(positions), np.int32(tcap), np.int32(first), np.int32(rotary)))
        if flash_prefill(qkv.dtype.itemsize, d):
            kernel = _function(f"gqa_flash_prefill<{d}, {FLASH_WARPS}, {FLASH_STAGES}, {FLASH_SKIP_MASK}>")
            shared = 2 * FLASH_STAGES * FLASH_KEYS * d * qkv.dtype.itemsize
            if shared > 48 * 1024 and kernel.max_dynamic_shared_size_bytes < shared:  # past the default limit
                kernel.max_dynamic_shared_size_bytes = shared
            kernel((-(-s // (16 * FLASH_WARPS)), h, b_size), (32 * FLASH_WARPS,),
                   (qbuf, past_key, past_value, seqlens, output, np.int32(s), np.int32(h), np.int32(hk), np.int32(tcap),
                    np.int32(first), np.int32(local_window_size), np.float32(scale or 1.0 / math.sqrt(d))),
                   shared_mem=shared)
            return output, past_key, past_value
    one_pass = (fused and d in VEC_HEAD_SIZES and DECODE_KERNEL == "gqa_decode_vec" and qkv.data.ptr % 16 == 0
                and one_pass_rotary(r, qkv.itemsize, cos) and one_pass_rotary(r, qkv.itemsize, sin))
    u = decode_round_rows(d) if one_pass else ATTEND_ROUND_ROWS
    threads, chunk, splits, rows = launch_shape(s, tcap, first, group, d, qkv.dtype.itemsize, u)
    tokens = b_size * s
    if splits > 1:
        part_m = scratch("m", (tokens * h * splits,), np.float32)
        part_l = scratch("l", (tokens * h * splits,), np.float32)
        part_acc = scratch("acc", (tokens * h * splits * d,), np.float32)
        counters = scratch("counters", (tokens * hk,), np.int32, zero=True)
    else:  # not read
        part_m = part_l = part_acc = scratch("unused", (1,), np.float32)
        counters = scratch("unused_counters", (1,), np.int32)
    shared = 4 * (group * d + group * chunk + rows * group * d)
    kernel = f"gqa_attend_vec<{suffix[1:-1]}, {d}, {group}, {u}>" if d in VEC_HEAD_SIZES else "gqa_attend" + suffix
    if one_pass:
        kernel, shared = f"gqa_decode_vec<{suffix[1:-1]}, {d}, {group}, {u}>", 4 * rows * group * d
    launch(
        _function(kernel), (splits, hk, tokens), (threads,),
        (qbuf, past_key, past_value, seqlens, output, part_m, part_l, part_acc, counters,
         np.int32(s), np.int32(h), np.int32(hk), np.int32(d), np.int32(tcap), np.int32(chunk), np.int32(splits),
         np.int32(first), np.int32(local_window_size), np.float32(scale or 1.0 / math.sqrt(d)),
         np.int32(fused), qkv, cos, sin, np.int32(r), np.int32(positions), np.int32(rotary),
         *prefetch_args(prefetch if one_pass else None)),
        shared_mem=shared, dependent=one_pass)
    return output, past_key, past_value
