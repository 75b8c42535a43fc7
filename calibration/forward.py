"""One prefill forward pass of a package's graph over a token window, with logits at every position.

    run = WindowRunner(package)                                # or WindowRunner(package, model=observed_ir_model)
    out = run(ids)                                             # {"logits": [1, S, V], ...extra outputs}

The feeds come from the runtime's KV-cache layouts (onnxopt/runtime/kv_cache.py), so this works on
the exported graph (`concat`) and on the optimizer's (`gqa-shared`) alike, with an empty cache: one
row, no padding, position 0 onwards. `model` may be an onnx-ir Model derived from the package's graph
(the calibration graph with extra outputs): it is handed to ONNX Runtime as bytes, its external data
read in place from the package directory, so no copy of the weights is written. A `--target cuda`
graph's `onnxopt` nodes are replaced by their standard-op decompositions (custom_ops/registry.py) first:
calibration and perplexity run on ORT's CPU kernels, whatever target the package was optimized for.

A package whose graph computes logits for the last position only (manifest `logits: "last"`, from the
optimizer's last-token-logits step) cannot be scored position by position and is refused.
"""

from __future__ import annotations

import numpy as np

from onnxopt.errors import UserError
from onnxopt.package import ModelPackage, kv_names

_NP_DTYPES = {"fp32": np.float32, "fp16": np.float16}


class LastTokenLogitsError(UserError):
    """The package's graph returns logits for the last position only."""


def logits_mode(package: ModelPackage) -> str:
    """'all' or 'last': which positions the package's graph returns logits for."""
    mode = package.manifest.get("logits") or package.io.get("logits") or "all"
    return "last" if mode == "last" else "all"


def require_full_logits(package: ModelPackage) -> None:
    if logits_mode(package) == "last":
        raise LastTokenLogitsError(
            f"{package.path}: the graph returns last-token logits only (manifest logits: last), so perplexity "
            "cannot be computed; evaluate the exported package, or optimize with --full-logits"
        )


class _Feeds:
    """Collects what a KV layout binds as graph inputs (outputs are left to ONNX Runtime)."""

    def __init__(self):
        self.inputs: dict[str, np.ndarray] = {}

    def __call__(self, binding, name, array, *, output: bool = False) -> None:
        if not output:
            self.inputs[name] = array


def _decompose(package: ModelPackage, model) -> bool:
    """Replace `model`'s `onnxopt` nodes (a `--target cuda` graph) by their standard-op decompositions,
    in place, so that ORT CPU runs it; its MatMuls and their input names stay as they are, so
    calibration observes the same values. Whether there were any."""
    from onnxopt.custom_ops import registry

    if not registry.custom_nodes(model.graph):
        return False
    try:
        registry.decompose(model)
    except ValueError as e:
        raise UserError(f"{package.model_path}: cannot run on ONNX Runtime's CPU kernels ({e})") from e
    return True


def _decomposed(package: ModelPackage):
    """The package's graph with its `onnxopt` nodes decomposed (external data left in the package), or
    None when it has none (ORT then loads the file itself)."""
    import onnx_ir as ir

    model = ir.load(package.model_path)
    return model if _decompose(package, model) else None


class WindowRunner:
    """Runs windows of token ids through a package's graph (or a graph derived from it, whose `onnxopt`
    nodes are decomposed in place) on ORT CPU."""

    def __init__(self, package: ModelPackage, *, model=None, outputs=("logits",), session_options=None, providers=None):
        import onnxruntime as ort

        from onnxopt.runtime.kv_cache import LAYOUTS, make_kv_layout

        require_full_logits(package)
        self.package = package
        layout = package.io.get("kv_cache", {}).get("layout")
        if layout not in LAYOUTS:
            raise UserError(f"{package.path}: KV-cache layout {layout!r} is not supported")
        dims = package.dims
        self._make_layout = lambda: make_kv_layout(
            layout, kv_names(dims["num_layers"]), dims["num_kv_heads"], dims["head_size"],
            _NP_DTYPES[package.dtype], position_ids=package.io.get("position_ids", True),
        )
        self.outputs = list(outputs)
        self.max_context = dims["max_context"]
        so = session_options or ort.SessionOptions()
        providers = providers or ["CPUExecutionProvider"]
        if model is None:
            model = _decomposed(package)
        else:
            _decompose(package, model)
        try:
            if model is None:
                self.session = ort.InferenceSession(str(package.model_path), so, providers=providers)
            else:
                import onnx_ir as ir

                # External data stays where it is: ORT resolves its locations against the package.
                so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(package.path))
                self.session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), so, providers=providers)
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types
            raise UserError(f"{package.model_path}: ONNX Runtime cannot load the graph ({e})") from e

    def __call__(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        ids = np.asarray(ids, dtype=np.int64)
        if not 1 <= len(ids) <= self.max_context:
            raise UserError(f"window of {len(ids)} tokens: must be 1 to {self.max_context} (the model's context)")
        kv = self._make_layout()
        feeds = _Feeds()
        input_ids = kv.start([ids.tolist()], 1, 0)  # [1, S]: one row, nothing padded
        kv.bind(None, feeds)
        feeds.inputs["input_ids"] = input_ids
        values = self.session.run(self.outputs, feeds.inputs)
        result = dict(zip(self.outputs, values))
        logits = result.get("logits")
        if logits is not None and logits.shape[1] != len(ids):
            raise LastTokenLogitsError(
                f"{self.package.path}: the graph returned logits for {logits.shape[1]} of {len(ids)} positions; "
                "perplexity needs every position (optimize with --full-logits)"
            )
        return result
