"""The generation loop on an NVIDIA GPU: ORT's CUDA EP on our CuPy stream, device-resident KV cache,
logits and sampling; only token ids cross to the host. After one eager decode step the whole step
(the ORT run + the sampling and bookkeeping kernels) is captured as one CUDA graph and replayed per
token (../shared/DESIGN.md, "Runtime").

    rt = CudaRuntime(package)                     # Generator(path, device="cuda") builds one
    for step in rt.iter_steps([[1, 2, 3]], max_new_tokens=8, params=SamplingParams(), pad=0, eos=[2]):
        step.tokens                               # [B] int64 on the host

What runs where (all on `self.stream`; ORT gets it as the CUDA EP option `user_compute_stream`):
- prefill (eager): input_ids [B, S] right-padded, seqlens_k [B] = len_b - 1, total_sequence_length = S;
  ORT allocates the [B, S, V] logits; each row's last position is sampled.
- decode: input_ids [B, 1], seqlens_k [B], past/present [B, Hkv, Tmax, D] and logits [B, 1, V] are
  CuPy buffers bound once through IOBinding by device pointer and updated in place by the `advance`
  kernel (custom_ops/sampling.py), so a replayed graph sees new inputs at the same addresses.
  total_sequence_length is a host scalar (GroupQueryAttention reads it on the host) held at Tmax for
  every decode step: GQA takes each row's length from seqlens_k, and present_sequence_length =
  max(past, total) = Tmax either way, so a constant keeps the captured step valid for every token.
  (onnxruntime-genai's CUDA-graph mode likewise needs a static max_length.)
- Graphs with an `attention_mask` input instead of seqlens_k get a static [B, Tmax] mask in decode
  (the graph derives seqlens from its sum and the total from its width); `advance` sets one more 1.
- Tokens: `advance` appends each step's ids to a device history [Tmax, B]; one async copy of that row
  into pinned host memory per step. The host launches step k+1 before it waits for step k's ids, so
  the GPU never idles on the host (a row that stops wastes at most one step).

On compute capability 9.0+ the onnxopt::Linear GEMVs and the decode attention are programmatic
dependent launches (custom_ops/cuda.py `launch`; ONNXOPT_PDL=0 turns them off): each starts loading
its weights while the kernel before it finishes, and the captured graph keeps those edges.

Tmax is rounded up to a multiple of 256 (within the context) and the decode state (buffers, bindings,
captured graph) is kept for the next generation of the same batch, Tmax and sampling settings.

A graph with `onnxopt` nodes (`optimize --target cuda` keeps `onnxopt::SwiGLU`) runs split at them
(runtime/segments.py, `DeviceGraph` below): one ORT CUDA session per segment and each op's CuPy kernel
between them, all on the same stream, so one decode step (every segment and kernel) is still captured
as one CUDA graph. Values passed between parts live in device buffers (CuPy), except rank-0 integers
(the total_sequence_length that the attention-mask interface computes from shapes), which ORT computes
and GroupQueryAttention reads on the host. A graph without such nodes is one session over the
package's file, as before.

Capture limits seen on ORT 1.31.1 (tests/gpu):
- float32 graphs: ORT's CUDA GroupQueryAttention is float16/bfloat16 only, so GQA runs on the CPU EP
  with Memcpy nodes around it; decode tokens then go wrong. The runtime refuses float32 packages.
- a host-to-device Memcpy node (ORT inserts one when a CUDA node reads a value computed on the CPU
  from shapes) makes ORT wait on an event at the end of the run, which a capturing stream refuses.
  The last-token logits index Min(seqlens_k, S - 1) was one; passes/last_token_logits.py now
  computes S - 1 on the device.
- any other capture failure raises: the eager steps after a failed capture were seen to go wrong.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence

import numpy as np

from onnxopt.custom_ops import sampling as device_sampling
from onnxopt.custom_ops.cuda import GpuUnavailable, cupy
from onnxopt.errors import PackageError, UserError
from onnxopt.package import ModelPackage, kv_names
from onnxopt.runtime.device_graph import DeviceGraph, StepRun
from onnxopt.runtime.sampling import SamplingParams

logger = logging.getLogger(__name__)

_NP_DTYPES = {"fp32": np.float32, "fp16": np.float16}
_TMAX_ROUND = 256


@dataclasses.dataclass
class DeviceStep:
    """One generated position: tokens on the host; logits (CuPy [B, V]) only when asked for."""

    tokens: np.ndarray  # [B] int64
    logits: object | None
    done: np.ndarray  # [B] bool, rows finished before this step (their token is padding)


class CudaRuntime:
    """One ORT CUDA session over a `gqa-shared` package, its stream, and the decode state."""

    def __init__(self, package, *, session_options=None, provider_options=None, device_id: int = 0,
                 cuda_graph: bool = True, fuse_linear: bool = True, packed_linear: bool = True,
                 fp8_linear: bool = True):
        cp = cupy()
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise GpuUnavailable(
                f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (providers: "
                f"{ort.get_available_providers()}); install onnxruntime-gpu (the `gpu` extra)"
            )
        if cp.cuda.runtime.getDeviceCount() <= device_id:
            raise GpuUnavailable(f"no CUDA device {device_id} (CuPy sees {cp.cuda.runtime.getDeviceCount()})")
        self.package = package if isinstance(package, ModelPackage) else ModelPackage(package)
        layout = self.package.io.get("kv_cache", {}).get("layout")
        if layout != "gqa-shared":
            raise PackageError(
                f"{self.package.path}: the CUDA runtime needs an optimized package (KV-cache layout "
                f"'gqa-shared', got {layout!r}); run `onnxopt optimize` on it first"
            )
        if self.package.dtype != "fp16":
            # Seen on ORT 1.31.1: GQA then runs on the CPU EP inside the CUDA session, past/present
            # are copied across each step, and decode tokens go wrong (tests/gpu).
            raise PackageError(
                f"{self.package.path}: the CUDA runtime needs a float16 package (dtype is "
                f"{self.package.dtype!r}; ORT's CUDA GroupQueryAttention is float16/bfloat16 only); "
                "export with --dtype fp16 and optimize that"
            )
        dims = self.package.dims
        self.num_layers, self.num_kv_heads = dims["num_layers"], dims["num_kv_heads"]
        self.head_size, self.max_context = dims["head_size"], dims["max_context"]
        self.kv_dtype = _NP_DTYPES[self.package.dtype]
        self.names = kv_names(self.num_layers)
        self.device_id = device_id
        self.cuda_graph = cuda_graph
        with cp.cuda.Device(device_id):
            self.stream = cp.cuda.Stream(non_blocking=True)
        options = {"device_id": str(device_id), "user_compute_stream": str(self.stream.ptr), **(provider_options or {})}
        # ORT sessions on this stream: one over the package's file, or one per segment (DeviceGraph)
        # fp8_linear: an `fp8` package's Q/DQ MatMuls as onnxopt::LinearFp8 (runtime/device_graph.py)
        self.session = DeviceGraph(self.package.model_path, session_options, options, device_id, fuse_linear=fuse_linear,
                                   packed_linear=packed_linear, fp8_linear=fp8_linear)
        self._capture_failed = False  # after a failed capture: no more tries (later generations eager, untested)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self._mask_mode = "attention_mask" in inputs
        if not self._mask_mode and not {"seqlens_k", "total_sequence_length"} <= set(inputs):
            raise PackageError(f"{self.package.model_path}: expected inputs seqlens_k and total_sequence_length "
                               f"or attention_mask, got {sorted(inputs)}")
        self._ids_dtype = np.int32 if inputs["input_ids"].type == "tensor(int32)" else np.int64
        logits = next(o for o in self.session.get_outputs() if o.name == "logits")
        self.logits_dtype = np.float16 if logits.type == "tensor(float16)" else np.float32
        self.vocab_size = logits.shape[-1] if isinstance(logits.shape[-1], int) else dims["vocab_size"]
        self._run_options = ort.RunOptions()
        # No stream synchronization at the end of a run: the host waits only for token ids, and a
        # run inside a CUDA-graph capture must not synchronize (DESIGN.md, "Runtime").
        self._run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        self._state: _DecodeState | None = None
        self.capture_error: str | None = None  # why the last capture failed (None: captured or not tried)
        self.last_mode: str | None = None  # "graph" or "eager": how the last generation decoded

    # -- one generation -----------------------------------------------------------------------------
    def iter_steps(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, params: SamplingParams,
                   pad: int, eos: Sequence[int], stop_at_eos: bool = True, with_logits: bool = False,
                   ) -> Iterator[DeviceStep]:
        """Prefill then decode; the caller (Generator.iter_steps) has validated the prompts and budget.

        `with_logits` also yields each step's logits (a CuPy [B, V] copy made on the stream right
        after the step; tests use it).
        """
        batch, seq = len(prompts), max(len(p) for p in prompts)
        tmax = min(self.max_context, -(-(seq + max_new_tokens) // _TMAX_ROUND) * _TMAX_ROUND)
        eos_arr = np.asarray(list(eos), dtype=np.int64)
        done = np.zeros(batch, dtype=bool)
        with self._on_stream():  # not held across yields: the caller's CuPy work keeps its own stream
            state = self._state_for(batch, tmax, params)
            state.reset(prompts)
            logits = self._prefill(state, prompts, seq)  # launches only
            state.fetch(0)
            pending = [(0, logits.copy() if with_logits else None)]
        decoded, mode = 1, "eager"
        while pending:
            # Launch step `decoded` before waiting for the oldest pending one: the GPU runs one step
            # ahead of the host (its inputs are already on the device).
            if decoded < max_new_tokens:
                with self._on_stream():
                    mode = self._decode(state, first=decoded == 1)
                    state.fetch(decoded)
                    pending.append((decoded, state.logits[:, 0, :].copy() if with_logits else None))
                decoded += 1
            index, step_logits = pending.pop(0)
            tokens = state.wait(index)
            finished_before = done.copy()
            tokens[finished_before] = pad
            self.last_mode = mode
            yield DeviceStep(tokens=tokens, logits=step_logits, done=finished_before)
            if stop_at_eos:
                done |= np.isin(tokens, eos_arr)
            if done.all():
                break
        self.stream.synchronize()  # a step launched ahead must finish before the buffers are reused

    def _on_stream(self):
        cp = cupy()
        return _Both(cp.cuda.Device(self.device_id), self.stream)

    # -- pieces ---------------------------------------------------------------------------------------
    def _state_for(self, batch: int, tmax: int, params: SamplingParams) -> "_DecodeState":
        key = (batch, tmax, params)
        if self._state is None or self._state.key != key:
            self._state = None  # free the old buffers first
            self._state = _DecodeState(self, key)
        return self._state

    def prompt_logits(self, ids: Sequence[int]) -> np.ndarray:
        """The logits of every position of one prompt, [S, V] float32 on the host: a prefill from an
        empty cache, as a generation's (perplexity on the GPU: onnxopt/evaluate.py). Needs a package
        whose graph returns every position's logits (`optimize --full-logits`)."""
        cp = cupy()
        ids = [int(t) for t in ids]
        seq = len(ids)
        if not 1 <= seq <= self.max_context:
            raise UserError(f"prompt of {seq} tokens: must be 1 to {self.max_context} (the model's context)")
        tmax = min(self.max_context, -(-seq // _TMAX_ROUND) * _TMAX_ROUND)
        with self._on_stream():
            state = self._state_for(1, tmax, SamplingParams())
            state.reset([ids])
            all_logits = self._prefill_run(state, [ids], seq)
            if all_logits.shape[1] != seq:
                raise PackageError(f"{self.package.path}: its graph returns the last position's logits only; "
                                   "optimize it with --full-logits for every position's")
            host = cp.asnumpy(all_logits[0], stream=self.stream)
            self.stream.synchronize()
        return host.astype(np.float32, copy=False)

    def _prefill_run(self, state: "_DecodeState", prompts, seq: int):
        """Launch the prefill of right-padded `prompts` into `state`'s cache; their logits [B, S, V] (or
        [B, 1, V] for a last-token graph), on the device."""
        cp = cupy()
        batch = len(prompts)
        lengths = np.array([len(p) for p in prompts], dtype=np.int32)
        ids = np.full((batch, seq), 0, dtype=self._ids_dtype)
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = p  # right-padded
        ids_d = cp.asarray(ids)
        fixed = {"input_ids": ids_d}
        if self._mask_mode:
            fixed["attention_mask"] = cp.asarray((np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64))  # [B, S]
        else:
            fixed["seqlens_k"] = state.seqlens_k
            fixed["total_sequence_length"] = np.array(seq, dtype=np.int32)  # host scalar
        for i, (past, present) in enumerate(zip(self.names["past"], self.names["present"])):
            fixed[past] = fixed[present] = state.kv[i]
        run = StepRun(self.session, fixed)
        run.run(self._run_options)
        return run.value("logits")  # [B, S, V] (or [B, 1, V] for a last-token graph)

    def _prefill(self, state: "_DecodeState", prompts, seq: int):
        cp = cupy()
        batch = len(prompts)
        lengths = np.array([len(p) for p in prompts], dtype=np.int32)
        all_logits = self._prefill_run(state, prompts, seq)
        rows = cp.arange(batch)
        last = cp.asarray(lengths - 1) if all_logits.shape[1] == seq else cp.zeros(batch, dtype=cp.int64)
        logits = all_logits[rows, last]  # [B, V], a new array: the ORT output may go
        state.sampler(logits)
        state.advance()
        del all_logits
        return logits

    def _decode(self, state: "_DecodeState", *, first: bool) -> str:
        """Launch one decode step: the captured graph when there is one, else eager (capturing after
        the first eager step of a new state)."""
        if state.graph is not None:
            state.graph.launch(stream=self.stream)
            return "graph"
        state.step_eager()
        if first and self.cuda_graph and not state.capture_tried and not self._capture_failed:
            state.capture_tried = True
            self.stream.synchronize()  # the eager step has done its allocations; capture the next
            self.capture_error = state.capture()
            if self.capture_error is not None:
                # Seen on ORT 1.31.1: after an ORT run failed inside a capture, the following eager
                # steps gave wrong tokens, also with a new session over the same buffers. Until that
                # is understood, stop rather than continue with doubtful output.
                self._capture_failed = True
                raise RuntimeError(
                    f"CUDA-graph capture of the decode step failed ({self.capture_error}); the steps after "
                    "a failed capture are not trustworthy: run with cuda_graph=False (CudaRuntime) or "
                    "cuda_options={'cuda_graph': False} (Generator) for this package"
                )
        return "eager"


class _DecodeState:
    """The device buffers of one (batch, Tmax, sampling settings): KV cache, decode inputs and
    outputs, sampler, history; the decode binding; and the captured step."""

    def __init__(self, rt: CudaRuntime, key):
        cp = cupy()
        self.rt, self.key = rt, key
        batch, tmax, params = key
        self.batch, self.tmax = batch, tmax
        n = len(rt.names["past"])
        # kv[i]: [B, Hkv, Tmax, D], past and present of tensor i (GQA writes in place). Zeroed once so
        # unread slots are finite; GQA reads only each row's first seqlens_k + 1 positions.
        self.kv = cp.zeros((n, batch, rt.num_kv_heads, tmax, rt.head_size), dtype=rt.kv_dtype)
        self.input_ids = cp.zeros((batch, 1), dtype=rt._ids_dtype)  # [B, 1]
        self.seqlens_k = cp.zeros(batch, dtype=cp.int32)  # [B]
        self.mask = cp.zeros((batch, tmax), dtype=cp.int64) if rt._mask_mode else None  # [B, Tmax]
        self.total = np.array(tmax, dtype=np.int32)  # host scalar, constant over the decode steps
        self.logits = cp.empty((batch, 1, rt.vocab_size), dtype=rt.logits_dtype)  # [B, 1, V]
        self.sampler = device_sampling.DeviceSampler(params, batch, rt.vocab_size)
        self.history = cp.zeros((tmax, batch), dtype=cp.int64)  # [step, B]
        self._pinned = cp.cuda.alloc_pinned_memory(tmax * batch * 8)
        self.host = np.frombuffer(self._pinned, dtype=np.int64, count=tmax * batch).reshape(tmax, batch)
        self.events = [None] * tmax
        self.graph = None
        self.capture_tried = False
        self.bind()

    def bind(self) -> None:
        """The decode step over this state's buffers: fixed device addresses, so a captured step replays."""
        rt = self.rt
        fixed = {"input_ids": self.input_ids, "logits": self.logits}
        if self.mask is not None:
            fixed["attention_mask"] = self.mask
        else:
            fixed["seqlens_k"] = self.seqlens_k
            fixed["total_sequence_length"] = self.total
        for i, (past, present) in enumerate(zip(rt.names["past"], rt.names["present"])):
            fixed[past] = fixed[present] = self.kv[i]
        self.run = StepRun(rt.session, fixed, static=True)

    def reset(self, prompts) -> None:
        """Per generation: lengths, step counter, repetition mask, attention mask (on the stream)."""
        cp = cupy()
        lengths = np.array([len(p) for p in prompts], dtype=np.int32)
        self.seqlens_k[...] = cp.asarray(lengths - 1)
        self.sampler.step.fill(0)
        if self.sampler.seen is not None:
            self.sampler.seen.fill(0)
            self.sampler.mark_seen(prompts)
        if self.mask is not None:
            self.mask[...] = cp.asarray((np.arange(self.tmax)[None, :] < lengths[:, None]).astype(np.int64))

    def advance(self) -> None:
        device_sampling.advance(
            self.sampler.tokens, input_ids=self.input_ids, step=self.sampler.step, seqlens_k=self.seqlens_k,
            attention_mask=self.mask, seen=self.sampler.seen, history=self.history,
        )

    def step_eager(self) -> None:
        self.run.run(self.rt._run_options)
        self.sampler(self.logits[:, 0, :])
        self.advance()

    def capture(self) -> str | None:
        """Capture one decode step as a CUDA graph; None on success, else why it failed."""
        cp = cupy()
        stream = self.rt.stream
        try:
            # Relaxed: ORT may call cudaMalloc (its arena) inside the run; that is legal in this mode.
            mode = getattr(cp.cuda.runtime, "streamCaptureModeRelaxed", None)
            stream.begin_capture(mode) if mode is not None else stream.begin_capture()
        except Exception as e:  # CuPy raises CUDARuntimeError subclasses
            return f"begin_capture: {e}"
        try:
            self.step_eager()
        except Exception as e:  # an ORT node that cannot be captured, or a kernel launch that failed
            _abandon_capture(stream)
            return _first_line(e)
        try:
            graph = stream.end_capture()
            if hasattr(graph, "upload"):  # instantiate now, not at the first launch
                graph.upload(stream)
        except Exception as e:
            return f"end_capture: {e}"
        self.graph = graph
        return None

    def fetch(self, index: int) -> None:
        """Queue the copy of step `index`'s token ids to pinned host memory and mark it with an event."""
        cp = cupy()
        stream = self.rt.stream
        nbytes = self.batch * 8
        cp.cuda.runtime.memcpyAsync(
            self.host[index].ctypes.data, self.history[index].data.ptr, nbytes,
            cp.cuda.runtime.memcpyDeviceToHost, stream.ptr,
        )
        event = self.events[index] = cp.cuda.Event(block=False, disable_timing=True)
        event.record(stream)

    def wait(self, index: int) -> np.ndarray:
        self.events[index].synchronize()
        self.events[index] = None
        return self.host[index].copy()


class _Both:
    """Enter a CuPy device and stream together."""

    def __init__(self, device, stream):
        self.device, self.stream = device, stream

    def __enter__(self):
        self.device.__enter__()
        self.stream.__enter__()

    def __exit__(self, *exc):
        self.stream.__exit__(*exc)
        self.device.__exit__(*exc)


def _abandon_capture(stream) -> None:
    """End a failed capture so the stream runs eagerly again (CuPy's end_capture may raise first)."""
    cp = cupy()
    try:
        stream.end_capture()
    except Exception:  # the capture was invalidated; what matters is that the stream leaves capture mode
        pass
    runtime = cp.cuda.runtime
    try:
        if runtime.streamIsCapturing(stream.ptr):
            graph = runtime.streamEndCapture(stream.ptr)
            if graph:
                runtime.graphDestroy(graph)
    except Exception as e:  # an invalidated capture reports its error here; the stream is out of capture
        logger.debug("ending the failed capture: %s", e)
    _clear_last_cuda_error()


def _clear_last_cuda_error() -> None:
    """Reset the CUDA runtime's per-thread last error in every libcudart this process loaded.

    The failed capture leaves `cudaErrorStreamCaptureUnsupported` as the last error of ORT's runtime
    library; ORT checks cudaGetLastError() after its next kernel launch and would fail that run.
    """
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libcudart.so" in line}
    except OSError:
        return
    for path in paths:
        try:
            ctypes.CDLL(path).cudaGetLastError()
        except OSError as e:
            logger.debug("cannot reset the last CUDA error of %s: %s", path, e)


def _first_line(e: Exception) -> str:
    """The most telling line of an ORT/CUDA error: ORT prefixes its own source paths."""
    text = str(e).strip()
    lines = [line for line in text.splitlines() if line.strip()] or [type(e).__name__]
    failure = next((line for line in lines if "CUDA failure" in line), lines[0])
    return f"{type(e).__name__}: {failure[failure.find('CUDA failure'):] if 'CUDA failure' in failure else failure}"[:300]
