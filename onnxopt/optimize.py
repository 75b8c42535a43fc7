"""Optimize a model package: run a target's pass pipeline, verify, write a new package.

    report = onnxopt.optimize("smollm2", "smollm2-opt")      # target "cpu", verified

The fused graph is checked against the unfused one on ONNX Runtime (`verify`, on by default): the
same random prefill and decode tokens go through both, each through its own interface (concat vs
gqa-shared), the logits must agree within `TOLERANCE` (fp16 graphs against the fp32 export, within a
bound relative to the logit scale) and greedy tokens from one prompt must agree. A graph with `onnxopt`
custom ops (target cuda) is verified through a copy with them decomposed. On a mismatch the pipeline is
re-run step by step to name the first step that broke parity, and nothing is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from onnxopt import __version__
from onnxopt.errors import UserError
from onnxopt.package import MODEL_NAME, TOKENIZER_FILES, ModelPackage, check_target, staging_dir, write_manifest
from onnxopt.progress import Steps

logger = logging.getLogger(__name__)

# Bound on max |logits(optimized) - logits(unoptimized)| at each prefill/decode step (`tolerance`).
# fp32, absolute: the fused kernels only reorder sums (seen 1e-7 on tiny models, 7e-5 on SmolLM2).
# fp16, relative to the step's logit scale max|logits(unoptimized)|: 8e-3 = 16 units of fp16 roundoff
# (2^-11). Weights, activations and the KV cache each round by up to 2^-11 relative; norms, softmax and
# rotary angles stay fp32 (passes/float16.py), so the error grows slowly with depth: seen 2.4e-3 (0.076
# at |logits| 32) on SmolLM2's 30 layers, 9e-4 on the tiny 2-layer models. A scale-free bound, since a
# random-init tiny model has logits near 0.5 and a trained one near 30.
TOLERANCE = {"fp32": 1e-3, "fp16": 8e-3}
# The dtype a target writes unless --dtype says otherwise; other targets keep the package's own.
DEFAULT_DTYPE = {"cuda": "fp16"}
_VERIFY_PROMPT_LENGTHS = (7, 4)  # two rows of different lengths: batched prefill pads one of them
_VERIFY_DECODE_STEPS = 8
_COPIED_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)


class VerificationError(UserError):
    """The optimized graph does not compute what the unoptimized one does."""


def optimize(
    package, out, *, target: str = "cpu", verify: bool = True, overwrite: bool = False, progress: bool = True,
    full_logits: bool = False, dtype: str | None = None,
):
    """Optimize the model package at `package` into a new package at `out`; returns the PipelineReport.

    `full_logits` keeps logits for every position ([B, S, V], which perplexity needs) instead of each
    row's last one ([B, 1, V], passes/last_token_logits.py). `dtype` ("fp32" | "fp16") defaults to the
    target's (DEFAULT_DTYPE: fp16 for cuda) or else the package's own."""
    import onnx_ir as ir

    from onnxopt.passes.pipeline import FULL_LOGITS_SKIPS, pipeline, run_pipeline

    src = package if isinstance(package, ModelPackage) else ModelPackage(package)
    out = Path(out)
    check_target(out, overwrite=overwrite)
    if out.resolve() == src.path.resolve():
        raise UserError(f"{out}: output is the input package; choose another directory")
    layout = src.io.get("kv_cache", {}).get("layout")
    if layout != "concat":
        raise UserError(
            f"{src.path}: already optimized (KV-cache layout {layout!r}); optimize the exported package instead"
        )
    dtype = _target_dtype(src, target, dtype)
    skip = FULL_LOGITS_SKIPS if full_logits else ()
    steps = [s for s in pipeline(target, dtype) if s.name not in skip]  # an unknown target fails before any work
    num_layers = src.dims["num_layers"]
    model = ir.load(src.model_path)
    with Steps([s.name for s in steps] + ["save", *(["verify"] if verify else [])], enabled=progress, desc="optimize") as bar:
        report = run_pipeline(
            model, target, num_layers=num_layers, max_context=src.dims.get("max_context"), dtype=dtype, progress=bar, skip=skip
        )
        with staging_dir(out, overwrite=overwrite) as tmp:
            bar.next("save")
            _write_package(src, model, report, tmp)
            if verify:
                bar.next("verify")
                try:
                    with _loadable_on_cpu(src, tmp, report, out.parent) as (candidate, decomposed):
                        report.verify = compare(src, candidate)
                    if decomposed:  # target cuda: ORT CPU ran the copy with standard ops in their place
                        report.verify["custom_ops_decomposed"] = decomposed
                except VerificationError as e:
                    broken = first_broken_step(src, target, out.parent, skip=skip, dtype=dtype)
                    raise VerificationError(f"{broken}: {e}") from e
    return report


def _target_dtype(src: ModelPackage, target: str, dtype: str | None) -> str:
    """The dtype to optimize to; a one-line UserError for a combination that cannot be made."""
    if dtype is None:
        dtype = DEFAULT_DTYPE.get(target, src.dtype)
    if src.dtype == "fp16" and dtype == "fp32":
        raise UserError(
            f"--dtype fp32: {src.path} is an fp16 package and its weights cannot be restored to fp32; "
            "export the model again with --dtype fp32"
        )
    return dtype


@contextlib.contextmanager
def _loadable_on_cpu(src: ModelPackage, package: Path, report, scratch_parent: Path):
    """`package`, or a copy with its `onnxopt` custom ops decomposed when it has any (target cuda keeps
    SwiGLU for its CuPy kernel; ORT CPU cannot load domain onnxopt), and how many nodes were decomposed.
    The copy is removed afterwards."""
    import onnx_ir as ir

    from onnxopt.custom_ops import registry

    model = ir.load(package / MODEL_NAME)
    if not registry.custom_nodes(model.graph):
        yield package, 0
        return
    decomposed = registry.decompose(model)
    with tempfile.TemporaryDirectory(prefix=".onnxopt-verify-", dir=scratch_parent) as scratch:
        _write_package(src, model, report, Path(scratch))
        yield Path(scratch), decomposed


def _write_package(src: ModelPackage, model, report, tmp: Path) -> None:
    from onnxopt.export import _save_graph
    from onnxopt.passes.gqa_interface import gqa_nodes, seqlens_k
    from onnxopt.genai_config import write_genai_config
    from onnxopt.passes.last_token_logits import last_token_only

    _save_graph(model, tmp, None)
    for name in _COPIED_FILES:
        if (src.path / name).is_file():
            shutil.copyfile(src.path / name, tmp / name)
    inputs = [v.name for v in model.graph.inputs]
    shared = seqlens_k(model.graph) is not None  # gqa_interface ran: lengths come from attention_mask
    io = {
        **src.io,
        "inputs": inputs,
        "outputs": [v.name for v in model.graph.outputs],
        "position_ids": "position_ids" in inputs,
        # "last": logits [B, 1, V], each row's last position (passes/last_token_logits.py); "all": [B, S, V].
        "logits": "last" if last_token_only(model.graph) else "all",
    }
    if shared:
        # One [B, Hkv, Tmax, D] buffer per KV tensor, bound as both past and present.
        io["kv_cache"] = {"layout": "gqa-shared", "shape": "B,Hkv,Tmax,D", "num_layers": src.dims["num_layers"]}
    genai = write_genai_config(tmp, src, io, model.graph)  # after the tokenizer files are copied
    manifest = {
        **src.manifest,
        "created_by": f"onnxopt {__version__}",
        "optimized_from": {"path": str(src.path), "model_sha256": src.manifest["files"][MODEL_NAME]["sha256"]},
        "io": io,
        "genai": genai,  # {"config": "genai_config.json", ...} when onnxruntime-genai can run the graph
        "dtype": _graph_dtype(model, src.dtype),
        "passes": [
            *src.manifest.get("passes", []),
            {
                "target": report.target,
                "steps": [{"name": s.name, "matches": s.matches, "seconds": round(s.seconds, 4)} for s in report.steps],
                "group_query_attention": len(gqa_nodes(model.graph)),
                "missed": [f"{s.name}: {s.note}" for s in report.missed],
            },
        ],
    }
    manifest.pop("files", None)
    write_manifest(tmp, manifest)


def _graph_dtype(model, default: str) -> str:
    """fp16 when the graph's KV cache is float16 (the runtime allocates its buffers in this dtype)."""
    import onnx_ir as ir

    past = [v for v in model.graph.inputs if v.name.startswith("past_key_values.")]
    if not past:
        return default
    return "fp16" if past[0].dtype == ir.DataType.FLOAT16 else "fp32"


@dataclasses.dataclass
class ForcedTokens:
    """A sampler that returns predetermined tokens: both graphs see the same decode inputs."""

    tokens: np.ndarray  # [steps, B]
    step: int = 0

    @property
    def params(self):
        from onnxopt.runtime.sampling import SamplingParams

        return SamplingParams()

    def __call__(self, logits, history):
        self.step += 1
        return self.tokens[self.step - 1]


def _run(gen, prompts, decode_tokens) -> list[np.ndarray]:
    steps = gen.iter_steps(prompts, max_new_tokens=len(decode_tokens), sampler=ForcedTokens(decode_tokens), stop_at_eos=False)
    return [step.logits.copy() for step in steps]


def compare(reference, candidate, *, seed: int = 0, lengths=_VERIFY_PROMPT_LENGTHS) -> dict:
    """Run two packages on the same random prefill and decode tokens; raise VerificationError when
    their logits differ by more than TOLERANCE. Returns the max differences."""
    from onnxopt.runtime import Generator

    ref = Generator(reference)
    gen = Generator(candidate)
    rng = np.random.default_rng(seed)
    vocab = ref.vocab_size
    lengths = [min(n, ref.max_context // 2) for n in lengths]
    prompts = [rng.integers(0, vocab, n).tolist() for n in lengths]
    decode = rng.integers(0, vocab, (_VERIFY_DECODE_STEPS, len(prompts)))
    dtype = "fp16" if "fp16" in (ref.package.dtype, gen.package.dtype) else "fp32"
    want, got = _run(ref, prompts, decode), _run(gen, prompts, decode)
    diffs = [float(np.abs(a.astype(np.float64) - b).max()) for a, b in zip(want, got)]
    bounds = [tolerance(dtype, a) for a in want]
    result = {"max_abs_diff_prefill": diffs[0], "max_abs_diff_decode": max(diffs[1:], default=0.0), "tolerance": min(bounds)}
    for step, (diff, bound) in enumerate(zip(diffs, bounds)):
        if not diff <= bound:  # also catches NaN
            where = "prefill" if step == 0 else f"decode step {step}"
            raise VerificationError(f"logits differ from the unoptimized graph by {diff:.3g} at {where} (tolerance {bound:.3g}, {dtype})")
    _compare_greedy(ref, gen, prompts[0], dtype)
    return result


def tolerance(dtype: str, reference_logits: np.ndarray) -> float:
    """The bound on max|logits difference| for one step (TOLERANCE: fp32 absolute, fp16 relative)."""
    if dtype == "fp16":
        return TOLERANCE["fp16"] * float(np.abs(reference_logits).max())
    return TOLERANCE[dtype]


def _compare_greedy(ref, gen, prompt, dtype: str, steps: int = _VERIFY_DECODE_STEPS) -> None:
    """Greedy tokens of both graphs from one prompt must agree; they may part only where the reference's
    top-two margin is within twice the tolerance (a near tie the logits bound cannot decide)."""
    pairs = zip(ref.iter_steps([prompt], max_new_tokens=steps, stop_at_eos=False), gen.iter_steps([prompt], max_new_tokens=steps, stop_at_eos=False))
    for step, (a, b) in enumerate(pairs):
        if int(a.tokens[0]) == int(b.tokens[0]):
            continue
        top2 = np.sort(a.logits[0].astype(np.float64))[-2:]
        if top2[1] - top2[0] > 2 * tolerance(dtype, a.logits[0]):
            raise VerificationError(
                f"greedy token {step} is {int(b.tokens[0])}, the unoptimized graph's {int(a.tokens[0])} "
                f"(margin {top2[1] - top2[0]:.3g} over the {dtype} tolerance)"
            )
        return  # a near tie: the two paths part here, later tokens are not comparable


def first_broken_step(src: ModelPackage, target: str, scratch_parent: Path, *, skip=(), dtype: str = "fp32") -> str:
    """Re-run the pipeline from the start, verifying after each step; the first failing step's name.
    Intermediate packages go to a temporary directory in `scratch_parent` and are removed."""
    import onnx_ir as ir

    from onnxopt.passes.pipeline import StepResult, pipeline, run_step
    from onnxopt.passes.report import PipelineReport

    model = ir.load(src.model_path)
    num_layers = src.dims["num_layers"]
    with tempfile.TemporaryDirectory(prefix=".onnxopt-bisect-", dir=scratch_parent) as scratch:
        for i, step in enumerate(s for s in pipeline(target, dtype) if s.name not in skip):
            result: StepResult = run_step(model, step, num_layers, max_context=src.dims.get("max_context"))
            if result.note == "not available" or result.matches == 0:
                continue  # the graph did not change
            if any(node.domain == "ai.onnxruntime._fusion" for node in model.graph):
                continue  # an intermediate SDPA node no runtime has: `gqa` or `sdpa_decompose` replaces it
            report = PipelineReport(target, num_layers, nodes_before={}, steps=[result])
            tmp = Path(scratch) / f"step{i}"
            tmp.mkdir()
            _write_package(src, model, report, tmp)
            try:
                # Rows of equal length: between the `gqa` fusion and `gqa_interface` the graph derives
                # sequence lengths from position_ids and is only exact without padding.
                with _loadable_on_cpu(src, tmp, report, Path(scratch)) as (candidate, _):
                    compare(src, candidate, lengths=(_VERIFY_PROMPT_LENGTHS[0],) * 2)
            except VerificationError:
                return f"step {step.name!r} broke parity"
            except Exception as e:  # an intermediate graph ORT cannot load or run is broken too
                return f"step {step.name!r} broke the graph ({type(e).__name__})"
    return "no single step reproduces the mismatch on unpadded rows (padded batches differ)"
