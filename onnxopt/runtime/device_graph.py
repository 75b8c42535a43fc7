"""A package's graph on the GPU: ORT CUDA sessions and CuPy kernels on one stream, run over bound buffers.

    graph = DeviceGraph(model_path, session_options, cuda_ep_options, device_id)
    run = StepRun(graph, {"input_ids": ids, "past_key_values.0.key": kv0, "present.0.key": kv0, ...})
    run.run(run_options)          # launches only (the stream is ORT's user_compute_stream)
    run.value("logits")           # an output ORT allocated (CuPy view), when not bound by the caller

Loading applies passes/w8a8_integer.py: the `int8` scheme's Q/DQ MatMuls become MatMulInteger,
which ORT runs on the GPU; and, to a graph with `onnxopt` nodes (`optimize --target cuda`),
passes/linear.py: each float projection becomes onnxopt::Linear with the norm, SwiGLU, bias and
residual add around it (`fuse_linear=False` keeps ORT's MatMuls); with `fp8_linear=True`, before that,
passes/linear_fp8.py: the `fp8` scheme's Q/DQ MatMuls (outlier channels included) become
onnxopt::LinearFp8 with the same folds (on by default since the llama-8b end-to-end run of 2026-12-06,
docs/BENCHMARKS.md; needs compute capability 8.9+ and nvmath-python, else the Q/DQ graph stays). A
graph without `onnxopt` nodes (and without such MatMuls) is one session over the package's file. A
graph with them is split (runtime/segments.py): one session per segment, each built from bytes (or from a scratch directory past
protobuf's 2 GiB), and each op's `cuda` kernel between them. `StepRun` binds the caller's arrays by
device pointer (graph inputs, and outputs such as the shared KV buffers) and chains the values passed
between parts. With `static=True` (the decode step) the first run discovers those values' shapes
from ORT's own allocations, and every later run uses persistent buffers at fixed addresses, with
bindings made once, so that a step captured as a CUDA graph replays on new inputs.

Prefill form (ONNXOPT_FP8_SWIGLU_INPUT=prefill, the default; passes/linear_fp8.py): a prefill (`StepRun` not
static) runs `prefill_parts`, the parts with the SwiGLU of each gate/up + down LinearFp8 pair applied by
down (`prefill_form`), while the decode step keeps gate/up's SwiGLU: the prefill's faster form and the
decode's, on the same weights.

L2 prefetch (`ONNXOPT_L2_PREFETCH_MB`, off: on an H100 it made the llama-8b int4 step slower, 2.184 ms
at 0 MB, 2.434 at 16 and 2.719 at 32, docs/BENCHMARKS.md 2026-12-06; kept as an experiment for other
GPUs and batch sizes): a batch-1 decode step reads every
weight once, and its small kernels (the decode attention, the q/k/v and o GEMVs) leave the memory
bus partly idle. Each op part whose kernel takes a `prefetch` range (the op's `takes_prefetch`: Linear's
packed GEMV, the one-pass decode attention) prefetches up to that many MB of the next projections'
weights into L2 that no earlier part has claimed (`prefetch_ranges`), so that they are read during
that idle time.

Placement of the values between parts: on the device, except rank-0 integers, which stay on the host.
Those are shape arithmetic (total_sequence_length of the attention-mask interface), computed by ORT's
CPU kernels and read on the host by GroupQueryAttention; a device copy would put a device-to-host copy,
a synchronizing one, inside the captured step. At replay the host work of a captured step does not
run again, which is right for them because they depend only on shapes, constant over decode steps.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import weakref
from pathlib import Path

import numpy as np

from onnxopt.custom_ops.cuda import PREFETCH_LINE, cupy
from onnxopt.errors import PackageError
from onnxopt.runtime.segments import op_args

logger = logging.getLogger(__name__)


def _env_mb(name: str) -> float:
    value = os.environ.get(name, "") or "0"
    try:
        return max(0.0, float(value))
    except ValueError:
        logger.warning("%s=%r is not a number of MB; taken as 0 (off)", name, value)
        return 0.0


# MB of later weights each prefetching op part asks L2 for (module docstring); 0: off
L2_PREFETCH_MB = _env_mb("ONNXOPT_L2_PREFETCH_MB")

_ORT_TYPES = {"tensor(float16)": np.float16, "tensor(float)": np.float32, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


@dataclasses.dataclass(frozen=True)
class _Arg:
    """name, type and shape of a value as onnxruntime.NodeArg has them, for values of op parts."""

    name: str
    type: str
    shape: list | None


@dataclasses.dataclass
class _Part:
    kind: str  # "ort" or "op"
    inputs: list[str]
    outputs: list[str]
    session: object = None  # kind "ort"
    op: object = None  # kind "op": a custom_ops module with `cuda(*inputs, out=..., **attributes)`
    args: list | None = None  # kind "op": segments.Part.args
    attributes: dict | None = None  # kind "op"
    prefetch: tuple | None = None  # kind "op": (device pointer, bytes) its kernel prefetches into L2

    def launch(self, graph: "DeviceGraph", lookup, out):
        """Run an op part: its kernel on the inputs `lookup` gives (host values as NumPy), the outputs
        into `out` (one array, a tuple for several outputs; None entries are allocated by the op).
        Returns its outputs as a tuple."""
        def value(name):
            array = lookup(name)
            return array.numpy() if graph.on_host(name) and hasattr(array, "numpy") else array

        extra = {"prefetch": self.prefetch} if self.prefetch is not None else {}
        result = self.op.cuda(*op_args(self.args, value, graph.constants), out=out, **self.attributes, **extra)
        return result if isinstance(result, tuple) else (result,)


def _release_weights(pointers: frozenset) -> None:
    """Drop the custom ops' per-weight caches of a graph's constants (at these device pointers)."""
    from onnxopt.custom_ops import linear_fp8_gemm, linear_mma

    for module in (linear_fp8_gemm, linear_mma):
        module.release(pointers)


def prefill_form(parts: list, graph_outputs) -> tuple[list, int]:
    """The parts a prefill runs with ONNXOPT_FP8_SWIGLU_INPUT=prefill (passes/linear_fp8.py): each gate/up
    LinearFp8 part with activation "swiglu" whose output only the next part reads, as the X of a
    LinearFp8 without a norm or an input activation, becomes a plain projection writing the packed
    gate | up product, and that next part applies the SwiGLU to its input (input_activation "swiglu"):
    what passes/linear_fp8.py's swiglu_input makes of the graph, on the same weights and arguments.
    Other parts are the decode step's own. Returns (the list, how many pairs changed)."""
    from onnxopt.custom_ops import linear_fp8

    readers: dict[str, int] = {}
    for part in parts:
        for name in set(part.inputs):
            readers[name] = readers.get(name, 0) + 1
    form, moved = list(parts), 0
    for i, (first, second) in enumerate(zip(parts, parts[1:])):
        if not (first.kind == second.kind == "op" and first.op is linear_fp8 and second.op is linear_fp8
                and len(first.outputs) == 1 and first.outputs[0] not in graph_outputs
                and readers.get(first.outputs[0]) == 1 and second.args and second.args[0] == ("value", first.outputs[0])
                and (len(second.args) < 3 or second.args[2] is None)
                and first.attributes.get("activation", "") == "swiglu"
                and first.attributes.get("input_activation", "") == ""
                and second.attributes.get("input_activation", "") == ""):
            continue
        form[i] = dataclasses.replace(first, attributes={**first.attributes, "activation": ""})
        form[i + 1] = dataclasses.replace(second, attributes={**second.attributes, "input_activation": "swiglu"})
        moved += 1
    return form, moved


def prefetch_ranges(weights: list, capable: list, budget: int, line: int = PREFETCH_LINE) -> list:
    """Per part, the L2 prefetch range (pointer, bytes) its kernel issues, or None: each `capable`
    part takes up to `budget` bytes (whole lines) of the first later part's weight (`weights`: per part
    (pointer, bytes) or None) not yet claimed by an earlier part, continuing where that claim ended."""
    ranges: list = [None] * len(weights)
    claimed: dict[int, int] = {}
    for i, able in enumerate(capable):
        if not able or budget < line:
            continue
        for j in range(i + 1, len(weights)):
            if weights[j] is None:
                continue
            pointer, size = weights[j]
            done = claimed.get(j, 0)
            take = min(budget, size - done) // line * line
            if take <= 0:
                continue
            ranges[i] = (pointer + done, take)
            claimed[j] = done + take
            break
    return ranges


class DeviceGraph:
    """ORT CUDA-EP sessions (one, or one per segment) and CuPy launches in graph order; it answers
    get_inputs / get_outputs / get_providers for the whole graph like an InferenceSession."""

    def __init__(self, model_path, session_options, cuda_options: dict, device_id: int, *, fuse_linear: bool = True,
                 packed_linear: bool = True, fp8_linear: bool = True):
        import onnx_ir as ir

        from onnxopt.passes import linear, linear_fp8, w8a8_integer
        from onnxopt.runtime import segments

        self.device_id = device_id
        self._providers = [("CUDAExecutionProvider", cuda_options), "CPUExecutionProvider"]
        self._session_options = session_options
        self.model_path = Path(model_path)
        self.constants: dict = {}  # initializers the op parts read, on the device (CuPy)
        self._op_args: dict[str, _Arg] = {}  # the op parts' values, typed as ORT NodeArgs are
        model = ir.load(self.model_path)  # external data stays on disk until a segment reads it
        # The int8 scheme's Q/DQ MatMuls as MatMulInteger (ORT's CUDA EP does not fuse Q/DQ itself)
        self.int8_matmuls = w8a8_integer.apply(model)
        if self.int8_matmuls:
            logger.info("%s: %d W8A8 MatMuls run as MatMulInteger", self.model_path, self.int8_matmuls)
        # A cuda-target graph (it has onnxopt nodes, so it is split anyway): the fp8 scheme's Q/DQ
        # projections become onnxopt::LinearFp8 (passes/linear_fp8.py; before FuseLinear, which would
        # take their outlier MatMuls as float projections), the float ones onnxopt::Linear, both with
        # their norms, SwiGLU, bias and residual adds (passes/linear.py)
        self.fp8_linear_ops = 0
        if fp8_linear and segments.has_custom_nodes(model):
            capability = int(cupy().cuda.Device(device_id).compute_capability)
            if capability < 89:
                logger.warning("%s: fp8_linear needs compute capability 8.9+ (device %d has %d); the fp8 "
                               "Q/DQ MatMuls stay", self.model_path, device_id, capability)
            elif (missing := _fp8_gemm_missing()) and linear_fp8.count(model.graph)[0]:
                logger.warning("%s: %s; the fp8 Q/DQ MatMuls stay (ORT's kernels, slower)", self.model_path, missing)
            else:
                fuse8 = linear_fp8.FuseLinearFp8()
                fuse8(model)
                self.fp8_linear_ops = fuse8.rewired
                logger.info("%s: %d fp8 MatMuls run as onnxopt::LinearFp8 (folded %s)%s", self.model_path,
                            fuse8.rewired, fuse8.folded, f"; refused {fuse8.refused}" if fuse8.refused else "")
        self.linear_ops = 0
        if fuse_linear and segments.has_custom_nodes(model):
            fuse = linear.FuseLinear(packed=packed_linear)  # packed: MatMulNBits too (passes/linear.py)
            fuse(model)
            self.linear_ops = fuse.rewired
            logger.info("%s: %d MatMuls run as onnxopt::Linear (folded %s)%s", self.model_path, fuse.rewired,
                        fuse.folded, f"; {fuse.miss}" if fuse.miss else "")
        if not segments.has_custom_nodes(model) and not self.int8_matmuls:
            del model
            session = self._session(str(self.model_path))
            self.parts = [_Part("ort", [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()], session)]
            self.plan_inputs = self.parts[0].inputs
            self.plan_outputs = self.parts[0].outputs
        else:
            plan = segments.split(model)
            del model
            self.parts = []
            cp = cupy()
            with tempfile.TemporaryDirectory(prefix="onnxopt-segments-") as scratch:
                for index, part in enumerate(plan.parts):
                    if part.kind == "op":
                        for name, tensor in part.constants.items():  # one device copy per initializer
                            if name not in self.constants:
                                with cp.cuda.Device(device_id):
                                    self.constants[name] = cp.asarray(_device_form(tensor))
                        for name, (type_name, shape) in part.types.items():
                            self._op_args.setdefault(name, _Arg(name, type_name, shape))
                        self.parts.append(_Part("op", part.inputs, part.outputs, op=part.op, args=part.args,
                                                attributes=part.attributes))
                        continue
                    data = segments.serialize(part.model)
                    if data is None:  # past protobuf's limit: a file with external data ORT reads itself
                        path = Path(scratch) / f"segment_{index}.onnx"
                        ir.save(part.model, path, external_data=f"segment_{index}.onnx.data")
                        data = str(path)
                    part.model = None  # free the weights read for this segment
                    self.parts.append(_Part("ort", part.inputs, part.outputs, self._session(data)))
                    del data
            self.plan_inputs, self.plan_outputs = plan.inputs, plan.outputs
            if self.constants:  # what the ops made once per weight (FP8 plans, repacked weights) holds
                # these constants: dropped with this graph
                weakref.finalize(self, _release_weights, frozenset(a.data.ptr for a in self.constants.values()))
            logger.info("%s: split at %d onnxopt nodes into %d ORT segments", self.model_path,
                        sum(p.kind == "op" for p in self.parts), sum(p.kind == "ort" for p in self.parts))
        self.prefill_parts, self.prefill_swiglu_moves = None, 0
        if self.fp8_linear_ops and linear_fp8.SWIGLU_INPUT_PREFILL:
            self.prefill_parts, self.prefill_swiglu_moves = prefill_form(self.parts, set(self.plan_outputs))
            logger.info("%s: prefill applies %d SwiGLUs in down's LinearFp8 (ONNXOPT_FP8_SWIGLU_INPUT=prefill)",
                        self.model_path, self.prefill_swiglu_moves)
        if L2_PREFETCH_MB > 0:
            self._assign_prefetch(int(L2_PREFETCH_MB * 2 ** 20))
        self._args = {}
        for part in self.parts:
            if part.kind == "ort":
                for arg in (*part.session.get_inputs(), *part.session.get_outputs()):
                    self._args.setdefault(arg.name, arg)
        for name, arg in self._op_args.items():  # values only op parts read or write (a KV buffer)
            self._args.setdefault(name, arg)

    def _assign_prefetch(self, budget: int) -> None:
        """Give each prefetching op part its range of later weights (module docstring)."""
        weights, capable = [], []
        for part in self.parts:
            arg = getattr(part.op, "WEIGHT_ARG", None) if part.kind == "op" else None
            source = part.args[arg] if arg is not None and arg < len(part.args) else None
            array = self.constants.get(source[1]) if source is not None and source[0] != "value" else None
            weights.append(None if array is None else (array.data.ptr, array.nbytes))
            takes = getattr(part.op, "takes_prefetch", None) if part.kind == "op" else None
            capable.append(takes is not None and takes(array))
        for part, prefetch in zip(self.parts, prefetch_ranges(weights, capable, budget)):
            part.prefetch = prefetch
        taken = [p for p in self.parts if p.prefetch is not None]
        logger.info("%s: %d op parts prefetch %.1f MB of later weights into L2 a step", self.model_path, len(taken),
                    sum(p.prefetch[1] for p in taken) / 2 ** 20)

    def _session(self, model):
        import onnxruntime as ort

        try:
            return ort.InferenceSession(model, sess_options=self._session_options, providers=self._providers)
        except Exception as e:  # ORT raises its own Fail/InvalidGraph/NotImplemented types
            raise PackageError(f"{self.model_path}: ONNX Runtime (CUDA) cannot load the graph ({e})") from e

    @property
    def segmented(self) -> bool:
        return len(self.parts) > 1

    def get_inputs(self):
        return [self._args[name] for name in self.plan_inputs]

    def get_outputs(self):
        return [self._args[name] for name in self.plan_outputs]

    def get_providers(self):
        return self.parts[0].session.get_providers()

    def on_host(self, name: str) -> bool:
        """A value passed between parts that stays in host memory (the module docstring)."""
        arg = self._args.get(name)
        return arg is not None and arg.shape == [] and arg.type in ("tensor(int64)", "tensor(int32)")


def _fp8_gemm_missing() -> str:
    """Why LinearFp8's prefill GEMM cannot run here ('' when it can): nvmath-python's cuBLASLt bindings."""
    from onnxopt.custom_ops import linear_fp8_gemm
    from onnxopt.custom_ops.cuda import GpuUnavailable

    try:
        linear_fp8_gemm._nvmath()
    except GpuUnavailable as e:
        return str(e)
    return ""


class StepRun:
    """One way of running the graph over fixed arrays: `fixed` maps graph input and output names to
    CuPy arrays (bound by device pointer) or NumPy arrays (host inputs such as total_sequence_length).
    Graph outputs not in `fixed` are allocated by ORT and read with `value`."""

    def __init__(self, graph: DeviceGraph, fixed: dict, *, static: bool = False):
        self.graph, self.fixed, self.static = graph, fixed, static
        # a prefill (not static) runs the prefill form where the graph has one (`prefill_form`)
        self.parts = graph.parts if static or graph.prefill_parts is None else graph.prefill_parts
        self._values: dict = {}
        self._prepared = None  # static: per part, its binding (ORT) or (inputs, out) arrays (op)

    def value(self, name: str):
        return self.fixed[name] if name in self.fixed else self._values[name]

    def run(self, run_options) -> None:
        if self._prepared is not None:
            for part, prepared in zip(self.parts, self._prepared):
                if part.kind == "ort":
                    part.session.run_with_iobinding(prepared, run_options)
                else:
                    part.launch(self.graph, self.value, prepared)
            return
        self._run_discovering(run_options)
        if self.static:
            self._persist()

    def _run_discovering(self, run_options) -> None:
        """Run with ORT allocating every value not fixed; keep them (CuPy views / host OrtValues)."""
        graph = self.graph
        values = self._values = {}
        for part in self.parts:
            if part.kind == "op":
                given = [self.fixed.get(name) for name in part.outputs]
                outs = part.launch(graph, self.value, given[0] if len(given) == 1 else tuple(given))
                for name, array in zip(part.outputs, outs):
                    if name not in self.fixed:
                        values[name] = array
                continue
            binding = part.session.io_binding()
            for name in part.inputs:
                _bind_any(binding, name, self.value(name), graph.device_id)
            allocated = []
            for name in part.outputs:
                if name in self.fixed:
                    _bind_any(binding, name, self.fixed[name], graph.device_id, output=True)
                else:
                    binding.bind_output(name, *(("cpu", 0) if graph.on_host(name) else ("cuda", graph.device_id)))
                allocated.append(name not in self.fixed)
            part.session.run_with_iobinding(binding, run_options)
            for name, ort_value, mine in zip(part.outputs, binding.get_outputs(), allocated):
                if mine:
                    values[name] = ort_value if graph.on_host(name) else _from_ortvalue(ort_value)

    def _persist(self) -> None:
        """Persistent buffers shaped as the discovering run's values, and the bindings over them."""
        cp = cupy()
        graph = self.graph
        buffers = {}
        for name, value in self._values.items():
            if graph.on_host(name):
                buffers[name] = np.array(value.numpy())  # 0-d, holds what the discovering run computed
            else:
                buffers[name] = cp.empty(value.shape, dtype=value.dtype)
        self._values = buffers
        prepared = []
        for part in self.parts:
            if part.kind == "op":  # the outputs to write: fixed or persistent arrays
                outs = tuple(self.value(name) for name in part.outputs)
                prepared.append(outs[0] if len(outs) == 1 else outs)
                continue
            binding = part.session.io_binding()
            for name in part.inputs:
                _bind_any(binding, name, self.value(name), graph.device_id)
            for name in part.outputs:
                _bind_any(binding, name, self.value(name), graph.device_id, output=True)
            prepared.append(binding)
        self._prepared = prepared


def _device_form(array: np.ndarray) -> np.ndarray:
    """An initializer as CuPy can hold it: float8 (ml_dtypes, e.g. LinearFp8's E4M3 weight) as its bytes."""
    if array.dtype.itemsize == 1 and array.dtype.kind == "V":  # ml_dtypes' float8 types are void-kind to NumPy
        return array.view(np.uint8)
    return array


def _bind_any(binding, name: str, array, device_id: int, *, output: bool = False) -> None:
    """Bind a CuPy array by device pointer, a NumPy array by host pointer, or an OrtValue as it is."""
    if isinstance(array, np.ndarray):
        assert array.flags.c_contiguous, name
        method = binding.bind_output if output else binding.bind_input
        method(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
    elif hasattr(array, "data_ptr") and hasattr(array, "device_name"):  # an OrtValue
        (binding.bind_ortvalue_output if output else binding.bind_ortvalue_input)(name, array)
    else:
        bind_device(binding, name, array, device_id, output=output)


def bind_device(binding, name: str, array, device_id: int, *, output: bool = False) -> None:
    """Bind a C-contiguous CuPy array by device pointer (no copy)."""
    assert array.flags.c_contiguous, name
    method = binding.bind_output if output else binding.bind_input
    method(name, "cuda", device_id, np.dtype(array.dtype), list(array.shape), array.data.ptr)


def _from_ortvalue(value):
    """A CuPy view of a CUDA OrtValue; the view keeps the OrtValue alive."""
    cp = cupy()
    dtype = np.dtype(_ORT_TYPES[value.data_type()])
    shape = tuple(value.shape())
    nbytes = int(np.prod(shape)) * dtype.itemsize
    memory = cp.cuda.UnownedMemory(value.data_ptr(), nbytes, owner=value)
    return cp.ndarray(shape, dtype=dtype, memptr=cp.cuda.MemoryPointer(memory, 0))
