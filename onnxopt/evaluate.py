"""Perplexity of a model package on a text file, over strided sliding windows.

    result = onnxopt.evaluate("smollm2", "prideprejudice.txt", max_tokens=16384)   # EvalResult(ppl, tokens)

The method is Hugging Face's strided perplexity (transformers docs, "Perplexity of fixed-length
models"), with each token scored exactly once: windows of `window` tokens start every `stride`
tokens; a window scores only the targets the previous window did not, so every scored token t sees
at least `window - stride` tokens of context (all of them near the start). With x_0..x_{N-1}:

    NLL = -sum_{t=1}^{N-1} log p(x_t | x_{max(0, b(t))} .. x_{t-1})      b(t): start of the window scoring t
    PPL = exp(NLL / (N - 1))

x_0 has no context and is not scored. log p comes from a log-softmax over the logits in float32
(shifted by the row max), summed in float64. Every position's logits are needed: a package whose
graph returns last-token logits only is refused (calibration/forward.py).

`device="cuda"` runs each window as the CUDA runtime's prefill (runtime/cuda.py `prompt_logits`: its
fused kernels, cuBLASLt's FP8 GEMMs for an `fp8` package, whatever settings the process has), so the
perplexity is that of the numerics a GPU deployment computes. It needs an fp16 package optimized for
the GPU with every position's logits (`optimize --target cuda --full-logits`).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from onnxopt.errors import UserError
from onnxopt.package import ModelPackage
from onnxopt.progress import bar

DEFAULT_MAX_TOKENS = 16384
DEFAULT_WINDOW = 1024
DEFAULT_STRIDE = 512


@dataclasses.dataclass
class EvalResult:
    ppl: float
    tokens: int  # targets scored (N - 1, or fewer when stride == window)
    nll: float  # summed negative log-likelihood, nats

    def to_json(self) -> dict:
        return {"ppl": self.ppl, "tokens": self.tokens}


def windows(n: int, window: int, stride: int):
    """(begin, end, first_target) of each window over n tokens: targets [first_target, end) are
    scored from the logits at positions [first_target - 1 - begin, end - 1 - begin)."""
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        first = max(prev_end, begin + 1)
        if first < end:
            yield begin, end, first
        prev_end = end
        if end == n:
            return


def token_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """-sum_i log softmax(logits[i])[targets[i]] for logits [T, V], in float64."""
    logits = logits.astype(np.float32, copy=False)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=-1, dtype=np.float64))  # [T]
    picked = shifted[np.arange(len(targets)), targets].astype(np.float64)
    return float((log_norm - picked).sum())


def resolve_window(window: int | None, stride: int | None, max_context: int) -> tuple[int, int]:
    """The window and stride to use: by default min(DEFAULT_WINDOW, context) and half the window."""
    window = min(DEFAULT_WINDOW, max_context) if window is None else window
    stride = (window // 2 if window < DEFAULT_WINDOW else DEFAULT_STRIDE) if stride is None else stride
    check_window(window, stride, max_context)
    return window, stride


def check_window(window: int, stride: int, max_context: int) -> None:
    if window < 2:
        raise UserError(f"--window {window}: must be at least 2 tokens")
    if window > max_context:
        raise UserError(f"--window {window}: must be at most the model's context of {max_context} tokens")
    if not 1 <= stride <= window:
        raise UserError(f"--stride {stride}: must be between 1 and --window ({window})")


def perplexity(package, tokens, *, window: int | None = None, stride: int | None = None, progress: bool = True, runner=None, desc: str = "eval") -> EvalResult:
    """Perplexity of `package` over the token ids `tokens` (see the module docstring)."""
    from onnxopt.calibration.forward import WindowRunner

    package = package if isinstance(package, ModelPackage) else ModelPackage(package)
    tokens = np.asarray(tokens, dtype=np.int64)
    window, stride = resolve_window(window, stride, package.dims["max_context"])
    if len(tokens) < 2:
        raise UserError(f"evaluation data: {len(tokens)} token(s); perplexity needs at least 2")
    runner = runner or WindowRunner(package)
    spans = list(windows(len(tokens), window, stride))
    nll, scored = 0.0, 0
    with bar(total=len(tokens) - 1, desc=desc, unit="tok", disable=not progress) as pbar:
        for begin, end, first in spans:
            logits = runner(tokens[begin:end])["logits"][0]  # [S, V]
            nll += token_nll(logits[first - 1 - begin : end - 1 - begin], tokens[first:end])
            scored += end - first
            pbar.update(end - first)
            pbar.set_postfix_str(f"ppl {math.exp(nll / scored):.3f}")
    return EvalResult(ppl=math.exp(nll / scored), tokens=scored, nll=nll)


def cuda_runner(package: ModelPackage, **runtime_options):
    """A `perplexity` runner over the CUDA runtime: ids [S] -> {"logits": [1, S, V]} (module docstring)."""
    from onnxopt.runtime.cuda import CudaRuntime

    runtime = CudaRuntime(package, cuda_graph=False, **runtime_options)

    def run(ids):
        return {"logits": runtime.prompt_logits(ids)[None]}

    return run


DEVICES = ("cpu", "cuda")


def evaluate(package, data, *, max_tokens: int | None = DEFAULT_MAX_TOKENS, window: int | None = None,
             stride: int | None = None, progress: bool = True, desc: str = "eval", device: str = "cpu") -> EvalResult:
    """Perplexity of `package` on the first `max_tokens` tokens of the text file `data`, run on `device`
    ("cpu": ORT's CPU EP; "cuda": the CUDA runtime, module docstring)."""
    from onnxopt.calibration.forward import require_full_logits
    from onnxopt.calibration.reader import check_data_file, read_tokens
    from onnxopt.runtime.tokenizer import TextTokenizer

    if device not in DEVICES:
        raise UserError(f"--device {device!r}: expected one of {', '.join(DEVICES)}")
    package = package if isinstance(package, ModelPackage) else ModelPackage(package)
    check_data_file(data)
    require_full_logits(package)
    if max_tokens is not None and max_tokens < 2:
        raise UserError(f"--max-tokens {max_tokens}: must be at least 2")
    window, stride = resolve_window(window, stride, package.dims["max_context"])
    tokenizer = TextTokenizer(package.path, eos_token_ids=[])
    tokens = read_tokens(tokenizer, data, max_tokens=max_tokens)
    runner = cuda_runner(package) if device == "cuda" else None
    return perplexity(package, tokens, window=window, stride=stride, progress=progress, desc=desc, runner=runner)


@dataclasses.dataclass
class DecodeDrift:
    """How far a runtime's decode steps are from a prefill over the same tokens (`decode_drift`)."""

    steps: int  # decode steps compared
    max_abs: float  # the largest |logit difference|
    rms: float  # rms of the logit differences
    mean_kl: float  # mean KL(prefill || decode) over the steps, nats
    top1_agree: float  # share of steps whose top tokens agree
    mode: str = ""  # how the decode steps ran ("graph": a captured CUDA graph; "eager")


def drift(decode: np.ndarray, prefill: np.ndarray, mode: str = "") -> DecodeDrift:
    """`DecodeDrift` of decode-step logits [steps, V] against the prefill's logits of the same positions."""
    decode, prefill = np.asarray(decode, np.float64), np.asarray(prefill, np.float64)
    if decode.shape != prefill.shape or decode.ndim != 2 or not len(decode):
        raise ValueError(f"drift: logits of shapes {decode.shape} and {prefill.shape}; expected the same [steps, V]")
    diff = np.abs(decode - prefill)

    def log_softmax(z):
        z = z - z.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))

    lp, lq = log_softmax(prefill), log_softmax(decode)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    return DecodeDrift(steps=len(decode), max_abs=float(diff.max()), rms=float(np.sqrt(np.mean(diff * diff))),
                       mean_kl=float(kl.mean()), top1_agree=float(np.mean(decode.argmax(-1) == prefill.argmax(-1))),
                       mode=mode)


def decode_drift(package, prompts, *, new_tokens: int, runtime=None) -> DecodeDrift:
    """The CUDA runtime's decode steps against its prefill, over the same tokens: each prompt (token ids)
    decodes `new_tokens` greedy tokens with each step's logits kept, then one prefill of prompt +
    generated tokens gives the logits of those positions. For a weight-only package the prefill
    dequantizes the weights to float16 and sums in cuBLAS's float32, so the drift is the decode GEMVs'
    arithmetic (and the decode attention's) on a real model. `package` needs every position's logits
    (`optimize --target cuda --full-logits`); `runtime`: a CudaRuntime over it (default: a new one)."""
    from onnxopt.calibration.forward import require_full_logits
    from onnxopt.runtime.cuda import CudaRuntime
    from onnxopt.runtime.sampling import SamplingParams

    package = package if isinstance(package, ModelPackage) else ModelPackage(package)
    require_full_logits(package)
    if new_tokens < 2:
        raise UserError(f"new_tokens {new_tokens}: must be at least 2 (the first token comes from the prefill)")
    rt = runtime or CudaRuntime(package)
    decoded, prefilled = [], []
    for prompt in prompts:
        prompt = [int(t) for t in prompt]
        generated, logits = [], []
        for step in rt.iter_steps([prompt], max_new_tokens=new_tokens, params=SamplingParams(), pad=0, eos=[],
                                  stop_at_eos=False, with_logits=True):
            generated.append(int(step.tokens[0]))
            logits.append(step.logits[0].get().astype(np.float32))
        # step 0's token comes from the prompt's prefill; step i >= 1 ran at position len(prompt) + i - 1
        full = rt.prompt_logits(prompt + generated[:-1])
        decoded.append(np.stack(logits[1:]))
        prefilled.append(full[len(prompt):len(prompt) + len(logits) - 1])
    return drift(np.concatenate(decoded), np.concatenate(prefilled), mode=rt.last_mode)
