"""Optimize a model package: run a target's pass pipeline, verify, write a new package.

    report = onnxopt.optimize("smollm2", "smollm2-opt")      # target "cpu", verified

The fused graph is checked against the unfused one on ONNX Runtime (`verify`, on by default): the
same random prefill and decode tokens go through both, each through its own interface (concat vs
gqa-shared), and the logits must agree within `TOLERANCE`. On a mismatch the pipeline is re-run
step by step to name the first step that broke parity, and nothing is written.
"""

from __future__ import annotations

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

# max |logits(fused) - logits(unfused)|. fp32: the fused kernels only reorder sums (seen 1e-7 on tiny
# models, 7e-5 on SmolLM2). fp16: intermediate results round at different points (seen 5e-4 on tiny).
TOLERANCE = {"fp32": 1e-3, "fp16": 1e-2}
_VERIFY_PROMPT_LENGTHS = (7, 4)  # two rows of different lengths: batched prefill pads one of them
_VERIFY_DECODE_STEPS = 8
_COPIED_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)


class VerificationError(UserError):
    """The optimized graph does not compute what the unoptimized one does."""


def optimize(package, out, *, target: str = "cpu", verify: bool = True, overwrite: bool = False, progress: bool = True):
    """Optimize the model package at `package` into a new package at `out`; returns the PipelineReport."""
    import onnx_ir as ir

    from onnxopt.passes.pipeline import pipeline, run_pipeline

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
    steps = pipeline(target)  # an unknown or unimplemented target fails before any work
    num_layers = src.dims["num_layers"]
    model = ir.load(src.model_path)
    with Steps([s.name for s in steps] + ["save", *(["verify"] if verify else [])], enabled=progress, desc="optimize") as bar:
        report = run_pipeline(model, target, num_layers=num_layers, progress=bar)
        with staging_dir(out, overwrite=overwrite) as tmp:
            bar.next("save")
            _write_package(src, model, report, tmp)
            if verify:
                bar.next("verify")
                try:
                    report.verify = compare(src, tmp)
                except VerificationError as e:
                    raise VerificationError(f"{first_broken_step(src, target, out.parent)}: {e}") from e
    return report


def _write_package(src: ModelPackage, model, report, tmp: Path) -> None:
    from onnxopt.export import _save_graph
    from onnxopt.passes.gqa_interface import gqa_nodes

    _save_graph(model, tmp, None)
    for name in _COPIED_FILES:
        if (src.path / name).is_file():
            shutil.copyfile(src.path / name, tmp / name)
    inputs = [v.name for v in model.graph.inputs]
    shared = "seqlens_k" in inputs
    io = {
        **src.io,
        "inputs": inputs,
        "outputs": [v.name for v in model.graph.outputs],
        "position_ids": "position_ids" in inputs,
    }
    if shared:
        # One [B, Hkv, Tmax, D] buffer per KV tensor, bound as both past and present.
        io["kv_cache"] = {"layout": "gqa-shared", "shape": "B,Hkv,Tmax,D", "num_layers": src.dims["num_layers"]}
    manifest = {
        **src.manifest,
        "created_by": f"onnxopt {__version__}",
        "optimized_from": {"path": str(src.path), "model_sha256": src.manifest["files"][MODEL_NAME]["sha256"]},
        "io": io,
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
    want, got = _run(ref, prompts, decode), _run(gen, prompts, decode)
    diffs = [float(np.abs(a.astype(np.float64) - b).max()) for a, b in zip(want, got)]
    result = {"max_abs_diff_prefill": diffs[0], "max_abs_diff_decode": max(diffs[1:], default=0.0)}
    tolerance = TOLERANCE[ref.package.dtype]
    worst = max(diffs)
    if not worst <= tolerance:  # also catches NaN
        step = int(np.argmax(diffs))
        where = "prefill" if step == 0 else f"decode step {step}"
        raise VerificationError(f"logits differ from the unoptimized graph by {worst:.3g} at {where} (tolerance {tolerance})")
    return result


def first_broken_step(src: ModelPackage, target: str, scratch_parent: Path) -> str:
    """Re-run the pipeline from the start, verifying after each step; the first failing step's name.
    Intermediate packages go to a temporary directory in `scratch_parent` and are removed."""
    import onnx_ir as ir

    from onnxopt.passes.pipeline import StepResult, pipeline, run_step
    from onnxopt.passes.report import PipelineReport

    model = ir.load(src.model_path)
    num_layers = src.dims["num_layers"]
    with tempfile.TemporaryDirectory(prefix=".onnxopt-bisect-", dir=scratch_parent) as scratch:
        for i, step in enumerate(pipeline(target)):
            result: StepResult = run_step(model, step, num_layers)
            if result.note == "not available" or result.matches == 0:
                continue  # the graph did not change
            report = PipelineReport(target, num_layers, nodes_before={}, steps=[result])
            tmp = Path(scratch) / f"step{i}"
            tmp.mkdir()
            _write_package(src, model, report, tmp)
            try:
                # Rows of equal length: between the `gqa` fusion and `gqa_interface` the graph derives
                # sequence lengths from position_ids and is only exact without padding.
                compare(src, tmp, lengths=(_VERIFY_PROMPT_LENGTHS[0],) * 2)
            except VerificationError:
                return f"step {step.name!r} broke parity"
            except Exception as e:  # an intermediate graph ORT cannot load or run is broken too
                return f"step {step.name!r} broke the graph ({type(e).__name__})"
    return "no single step reproduces the mismatch on unpadded rows (padded batches differ)"
