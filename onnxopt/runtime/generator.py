"""The generation loop on ONNX Runtime: one session, IOBinding, preallocated KV buffers.

    gen = Generator("pkg")                         # or Generator(pkg, session_options=..., providers=...)
    gen.generate("Once upon a time", max_new_tokens=32).text
    for piece in gen.stream([{"role": "user", "content": "Hi"}], chat=True): ...

Batches are padded as the package's KV-cache layout wants (runtime/kv_cache.py): left-padded with
attention_mask and position_ids for `concat` exports, right-padded with onnxruntime-genai's
attention_mask for the optimizer's `gqa-shared` graphs; either way each row sees exactly its own
prompt. A graph with `io.logits == "last"` (passes/last_token_logits.py) returns [B, 1, V]: each
row's last position only, at prefill as at decode.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence

import numpy as np

from onnxopt.errors import GenerationError, PackageError
from onnxopt.package import ModelPackage, kv_names
from onnxopt.runtime.detokenize import IncrementalDetokenizer
from onnxopt.runtime.kv_cache import make_kv_layout, unsupported_interface
from onnxopt.runtime.sampling import Sampler, SamplingParams
from onnxopt.runtime.tokenizer import TextTokenizer

logger = logging.getLogger(__name__)

_NP_DTYPES = {"fp32": np.float32, "fp16": np.float16}


@dataclasses.dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # new tokens only
    prompt_tokens: int
    new_tokens: int
    finish_reason: str  # "eos" | "stop" | "length"
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "finish_reason": self.finish_reason,
            "tokens_per_second": round(self.tokens_per_second, 3),
        }


@dataclasses.dataclass
class Step:
    """One forward pass of the loop: the tokens chosen for each row and the logits they came from."""

    tokens: np.ndarray  # [B] int64
    logits: np.ndarray  # [B, V], last position of each row; valid until the next step
    done: np.ndarray  # [B] bool, rows finished before this step (their token is padding)


class Generator:
    """Runs a model package with ONNX Runtime.

    `session_options` and `providers` are passed to `onnxruntime.InferenceSession` unchanged, so an
    application keeps its own threading, logging and EP settings; `self.session` is the session.
    """

    def __init__(self, path, *, session_options=None, providers=None, verify_hashes: bool = True,
                 device: str = "cpu", cuda_options: dict | None = None):
        import onnxruntime as ort

        self.package = path if isinstance(path, ModelPackage) else ModelPackage(path, verify_hashes=verify_hashes)
        io = self.package.io
        problem = unsupported_interface(io)
        if problem:
            raise PackageError(f"{self.package.path}: {problem}")
        self.kv_layout = io["kv_cache"]["layout"]
        self.last_logits_only = io.get("logits", "all") == "last"
        dims = self.package.dims
        self.num_layers = dims["num_layers"]
        self.num_kv_heads = dims["num_kv_heads"]
        self.head_size = dims["head_size"]
        self.max_context = dims["max_context"]
        self.kv_dtype = _NP_DTYPES[self.package.dtype]
        self._names = kv_names(self.num_layers)
        self._has_position_ids = io.get("position_ids", True)
        if device not in ("cpu", "cuda"):
            raise GenerationError(f"--device {device!r}: expected cpu or cuda")
        self.device = device
        self._cuda = None  # device="cuda": runtime/cuda.py owns the session, buffers and loop
        if device == "cuda":
            from onnxopt.runtime.cuda import CudaRuntime

            self._cuda = CudaRuntime(self.package, session_options=session_options, **(cuda_options or {}))
            self.session = self._cuda.session
        else:
            try:
                self.session = ort.InferenceSession(
                    str(self.package.model_path), sess_options=session_options, providers=providers or ["CPUExecutionProvider"]
                )
            except Exception as e:  # ORT raises its own Fail/InvalidGraph/NotImplemented types
                if "onnxopt:" in str(e):  # a domain-onnxopt node: the cuda target's SwiGLU
                    raise PackageError(
                        f"{self.package.path}: has onnxopt custom ops (optimized for --target cuda), which ONNX "
                        "Runtime's CPU EP cannot run: use --device cuda, or optimize the unoptimized package with "
                        "--target cpu for the CPU"
                    ) from e
                raise PackageError(f"{self.package.model_path}: ONNX Runtime cannot load the graph ({e})") from e
        outputs = {o.name: o for o in self.session.get_outputs()}
        self.vocab_size = int(outputs["logits"].shape[-1]) if isinstance(outputs["logits"].shape[-1], int) else dims["vocab_size"]
        self._logits_dtype = np.float16 if outputs["logits"].type == "tensor(float16)" else np.float32
        eos = list(self.package.manifest.get("eos_token_ids") or [])
        gen_config = self.package.read_json("generation_config.json") or {}
        extra = gen_config.get("eos_token_id")
        for token in extra if isinstance(extra, list) else [extra]:
            if token is not None and token not in eos:
                eos.append(token)
        self.eos_token_ids = eos
        self._tokenizer = None

    # -- tokenizer ---------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            self._tokenizer = TextTokenizer(self.package.path, eos_token_ids=self.eos_token_ids)
        return self._tokenizer

    def encode_prompt(self, prompt, *, chat: bool = False) -> list[int]:
        """Token ids of one prompt: text, or chat messages (list of {'role','content'})."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            chat = True
        if chat:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            # The rendered template already holds its special tokens (as transformers does).
            return self.tokenizer.encode(text, add_special_tokens=False)
        if not isinstance(prompt, str):
            raise GenerationError(f"prompt: expected text or chat messages, got {type(prompt).__name__}")
        return self.tokenizer.encode(prompt, add_special_tokens=True)

    # -- the loop -----------------------------------------------------------------------------------
    def iter_steps(
        self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, sampler: Sampler | None = None,
        stop_at_eos: bool = True,
    ) -> Iterator[Step]:
        """Prefill then decode; yield one Step per generated position (at most max_new_tokens).

        Rows that produced an eos token are finished: they keep receiving padding, and their later
        tokens are meaningless. The loop ends when every row is finished or the budget is spent.
        """
        sampler = sampler or Sampler(SamplingParams())
        batch = len(prompts)
        if batch == 0:
            raise GenerationError("prompts: empty batch")
        lengths = [len(p) for p in prompts]
        if min(lengths) == 0:
            raise GenerationError("prompt: empty (no tokens)")
        seq = max(lengths)
        if seq >= self.max_context:
            raise GenerationError(
                f"prompt: {seq} tokens do not fit the model's context of {self.max_context} tokens; "
                f"shorten it to at most {self.max_context - 1} tokens to leave room for an answer"
            )
        if max_new_tokens < 1:
            raise GenerationError(f"--max-new-tokens {max_new_tokens}: must be >= 1")
        if seq + max_new_tokens > self.max_context:
            logger.warning("max_new_tokens reduced to %d to fit the context", self.max_context - seq)
            max_new_tokens = self.max_context - seq
        for ids in prompts:
            bad = [t for t in ids if not 0 <= int(t) < self.vocab_size]
            if bad:
                raise GenerationError(f"prompt: token id {bad[0]} is outside the vocabulary (size {self.vocab_size})")

        pad = self.eos_token_ids[0] if self.eos_token_ids else 0
        if self._cuda is not None:  # on the GPU: logits (CuPy, or None) stay on the device
            for s in self._cuda.iter_steps(prompts, max_new_tokens=max_new_tokens, params=sampler.params, pad=pad,
                                           eos=self.eos_token_ids, stop_at_eos=stop_at_eos):
                yield Step(tokens=s.tokens, logits=s.logits, done=s.done)
            return
        kv = make_kv_layout(
            self.kv_layout, self._names, self.num_kv_heads, self.head_size, self.kv_dtype,
            position_ids=self._has_position_ids,
        )
        input_ids = kv.start(prompts, max_new_tokens, pad)  # [B, S]
        positions = 1 if self.last_logits_only else seq  # logits rows per sequence at prefill
        logits_buf = np.empty((batch * positions * self.vocab_size,), dtype=self._logits_dtype)
        history = [np.asarray(ids, dtype=np.int64) for ids in prompts]
        done = np.zeros(batch, dtype=bool)
        eos = np.asarray(self.eos_token_ids, dtype=np.int64)
        binding = self.session.io_binding()
        rows, zeros = np.arange(batch), np.zeros(batch, dtype=np.int64)

        for step in range(max_new_tokens):
            new = 1 if self.last_logits_only else input_ids.shape[1]
            logits = logits_buf[: batch * new * self.vocab_size].reshape(batch, new, self.vocab_size)
            _bind(binding, "input_ids", input_ids)
            kv.bind(binding, _bind)
            _bind(binding, "logits", logits, output=True)
            self.session.run_with_iobinding(binding)

            last_index = zeros if self.last_logits_only else kv.last_index()
            last = logits[rows, last_index]  # [B, V], each row's last real position
            kv.advance()
            tokens = sampler(last, history).astype(np.int64)
            finished_before = done.copy()
            tokens[finished_before] = pad
            yield Step(tokens=tokens, logits=last, done=finished_before)

            if stop_at_eos:
                done |= np.isin(tokens, eos)
            if done.all():
                return
            if sampler.params.repetition_penalty != 1.0:
                history = [np.append(h, t) for h, t in zip(history, tokens)]
            input_ids = tokens[:, None]  # [B, 1]

    # -- text API -------------------------------------------------------------------------------------
    def generate(self, prompt, *, chat: bool = False, max_new_tokens: int = 128, stop: Sequence[str] = (), **sampling):
        """Generate for one prompt (returns a GenerationResult) or a list of prompts (returns a list).

        A prompt is text, or chat messages [{'role', 'content'}, ...]; `chat=True` wraps text as one
        user message. Sampling keywords: temperature, top_k, top_p, repetition_penalty, seed.
        """
        single = isinstance(prompt, str) or (isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict))
        run = TextStream(self, [prompt] if single else list(prompt), chat, max_new_tokens, stop, sampling, streaming=False)
        for _ in run:
            pass
        return run.results[0] if single else run.results

    def stream(self, prompt, *, chat: bool = False, max_new_tokens: int = 128, stop: Sequence[str] = (), **sampling):
        """A TextStream over one prompt's completion: iterate it for text pieces as soon as they are
        complete UTF-8 (never half a character, never part of a stop string); `.result` afterwards."""
        return TextStream(self, [prompt], chat, max_new_tokens, stop, sampling, streaming=True)

    def __repr__(self) -> str:
        return f"Generator({str(self.package.path)!r}, providers={self.session.get_providers()})"


def _bind(binding, name: str, array: np.ndarray, *, output: bool = False) -> None:
    """Bind a C-contiguous host array to a graph input or output without copying it."""
    assert array.flags.c_contiguous, name
    method = binding.bind_output if output else binding.bind_input
    method(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)


class TextStream:
    """Drives Generator.iter_steps for text prompts: detokenizes, applies stop strings, streams row 0."""

    def __init__(self, gen: Generator, prompts, chat, max_new_tokens, stop, sampling, *, streaming: bool):
        self._gen = gen
        self._params = SamplingParams(**sampling)
        self._stop = [s for s in stop if s]
        self._encoded = [gen.encode_prompt(p, chat=chat) for p in prompts]
        self._max_new_tokens = max_new_tokens
        self._streaming = streaming
        self.results: list[GenerationResult] = []

    @property
    def result(self) -> GenerationResult:
        if not self.results:
            raise RuntimeError("the stream has not been consumed yet")
        return self.results[0]

    def __iter__(self) -> Iterator[str]:
        gen, stop = self._gen, self._stop
        rows = len(self._encoded)
        detoks = [IncrementalDetokenizer(gen.tokenizer) for _ in range(rows)]
        reasons: list[str | None] = [None] * rows
        cut: list[int | None] = [None] * rows  # where a stop string starts in detoks[b].text
        eos = set(gen.eos_token_ids)
        hold = max((len(s) for s in stop), default=1) - 1  # a tail that may become a stop string
        emitted = 0  # characters of row 0 already streamed
        started = time.perf_counter()
        steps = gen.iter_steps(self._encoded, max_new_tokens=self._max_new_tokens, sampler=Sampler(self._params))
        for step in steps:
            for b, token in enumerate(step.tokens.tolist()):
                if reasons[b] is not None:
                    continue
                if token in eos:
                    reasons[b] = "eos"
                    continue
                delta = detoks[b].push(token)
                if stop and delta:
                    text = detoks[b].text
                    window = len(text) - len(delta) - hold
                    hits = [i for i in (text.find(s, max(0, window)) for s in stop) if i >= 0]
                    if hits:
                        reasons[b], cut[b] = "stop", min(hits)
            if self._streaming:
                text = detoks[0].text
                end = cut[0] if cut[0] is not None else (len(text) if reasons[0] else len(text) - hold)
                if end > emitted:
                    yield text[emitted:end]
                    emitted = end
            if all(reasons):
                steps.close()
                break
        elapsed = time.perf_counter() - started
        for b in range(rows):
            if reasons[b] is None:
                reasons[b] = "length"
            if cut[b] is None:
                detoks[b].flush()
            text = detoks[b].text if cut[b] is None else detoks[b].text[: cut[b]]
            self.results.append(
                GenerationResult(
                    text=text,
                    token_ids=detoks[b].ids,
                    prompt_tokens=len(self._encoded[b]),
                    new_tokens=len(detoks[b].ids),
                    finish_reason=reasons[b],
                    seconds=elapsed,
                )
            )
        if self._streaming and len(self.results[0].text) > emitted:
            yield self.results[0].text[emitted:]
