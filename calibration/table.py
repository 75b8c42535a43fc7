"""Calibration: stream token windows through a package's graph and keep activation statistics in a
table (a JSON file) that `onnxopt quantize` reads.

    table = calibrate("smollm2", ["emma.txt"], out="smollm2.calib.json")     # 128 windows x 512 tokens

Observed tensors: the A input of every MatMul with a constant weight (onnxopt/quantize.py's
`weight_matmuls`), in the package's own graph (after `optimize`, the fused one), made graph outputs on
a copy of the graph. Each window runs through ONNX Runtime once; its activations update the
observers (calibration/observers.py) and are dropped.

The table records the format version, the package's graph hash, the data files with their hashes,
the window settings and how many windows are done. It is written atomically every `save_every`
windows, so an interrupted run continues with `resume=True` after the last window saved (the reader
skips the windows already seen; observers are sums, extrema and order-independent histograms, so
the result equals an uninterrupted run).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from onnxopt import __version__
from onnxopt.calibration.observers import DEFAULT_BINS, TensorObserver
from onnxopt.errors import UserError
from onnxopt.package import MODEL_NAME, ModelPackage
from onnxopt.progress import bar

logger = logging.getLogger(__name__)

TABLE_FORMAT = "onnxopt-calibration"
TABLE_VERSION = 1
DEFAULT_SAMPLES = 128
DEFAULT_SEQ_LEN = 512
SAVE_EVERY = 8


class TableError(UserError):
    """A calibration table is missing, malformed, incomplete or made for another package."""


def observed_model(package: ModelPackage, model=None):
    """(graph with every weight MatMul's input added as an output, {output name: channels}); the
    package's graph, or `model` (a graph derived from it, e.g. SmoothQuant's smoothed graph)."""
    import onnx_ir as ir

    from onnxopt.quantize import weight_matmuls

    model = ir.load(package.model_path) if model is None else model
    observed: dict[str, int] = {}
    outputs = {v.name for v in model.graph.outputs}
    for mm in weight_matmuls(model.graph):
        value = mm.node.inputs[0]
        if value.name not in observed:
            observed[value.name] = mm.shape[0]
            if value.name not in outputs:
                model.graph.outputs.append(value)
    return model, observed


def _data_entries(paths) -> list[dict]:
    from onnxopt.calibration.reader import check_data_file, file_sha256

    return [{"path": str(Path(p).resolve()), "sha256": file_sha256(check_data_file(p))} for p in paths]


def _save(table: dict, out: Path) -> None:
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(table) + "\n")
    os.replace(tmp, out)


def calibrate(package, data, *, out=None, num_samples: int = DEFAULT_SAMPLES, seq_len: int = DEFAULT_SEQ_LEN,
              resume: bool = False, overwrite: bool = False, save_every: int = SAVE_EVERY, bins: int = DEFAULT_BINS,
              model=None, progress: bool = True) -> dict:
    """Calibrate `package` on the text files `data`; returns the table (also written to `out` if given)."""
    from onnxopt.calibration.forward import WindowRunner
    from onnxopt.calibration.reader import token_windows
    from onnxopt.runtime.tokenizer import TextTokenizer

    package = package if isinstance(package, ModelPackage) else ModelPackage(package)
    data = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    if not data:
        raise UserError("--data: give at least one text file to calibrate on")
    if num_samples < 1:
        raise UserError(f"--samples {num_samples}: must be at least 1")
    if not 2 <= seq_len <= package.dims["max_context"]:
        raise UserError(f"--seq-len {seq_len}: must be 2 to {package.dims['max_context']} (the model's context)")
    out = Path(out) if out is not None else None
    if out is not None and out.exists() and not (resume or overwrite):
        raise UserError(f"{out}: calibration table exists (pass --resume to continue it, or --overwrite)")
    if out is not None and out.is_dir():
        raise UserError(f"{out}: is a directory; the calibration table is a JSON file")
    header = {
        "format": TABLE_FORMAT,
        "version": TABLE_VERSION,
        "created_by": f"onnxopt {__version__}",
        "package": {"path": str(package.path), "model_sha256": package.manifest["files"][MODEL_NAME]["sha256"]},
        "data": _data_entries(data),
        "seq_len": seq_len,
        "num_samples": num_samples,
        "bins": bins,
    }
    model, channels = observed_model(package, model)
    observers = {name: TensorObserver(c, bins=bins) for name, c in channels.items()}
    done = 0
    if resume and out is not None and out.exists():
        previous = load_table(out, package, complete=False)
        for key in ("data", "seq_len", "bins"):
            if previous[key] != header[key]:
                raise TableError(f"{out}: was made with other {key} ({previous[key]!r}); calibrate into a new table")
        observers = {name: TensorObserver.from_json(previous["tensors"][name]) for name in channels}
        done = previous["samples_done"]
    tokenizer = TextTokenizer(package.path, eos_token_ids=[])
    runner = WindowRunner(package, model=model, outputs=list(channels))

    def table() -> dict:
        return {**header, "samples_done": done, "tokens": done * seq_len, "complete": done >= num_samples,
                "tensors": {name: obs.to_json() for name, obs in observers.items()}}

    windows = token_windows(tokenizer, data, seq_len=seq_len, num_samples=num_samples, skip=done)
    with bar(total=num_samples, initial=done, desc="calibrate", unit="sample", disable=not progress) as pbar:
        for window in windows:
            for name, value in runner(window).items():
                observers[name].update(value)
            done += 1
            pbar.update(1)
            if out is not None and done % save_every == 0:
                _save(table(), out)
    if done < num_samples:
        logger.warning("the data ran out after %d of %d windows of %d tokens", done, num_samples, seq_len)
        header["num_samples"] = done  # what the data holds: the table is complete at that
    result = table()
    if out is not None:
        _save(result, out)
    return result


def random_ids_table(package: ModelPackage, *, windows: int, length: int, seed: int = 0) -> dict:
    """The `tensors` part of a table from `windows` windows of `length` random token ids: for
    random-weight benchmark models, which have neither meaningful text nor a perplexity to gate on."""
    import numpy as np

    from onnxopt.calibration.forward import WindowRunner

    model, channels = observed_model(package)
    runner = WindowRunner(package, model=model, outputs=list(channels))
    observers = {name: TensorObserver(c) for name, c in channels.items()}
    rng = np.random.default_rng(seed)
    for _ in range(windows):
        for name, value in runner(rng.integers(0, package.dims["vocab_size"], length)).items():
            observers[name].update(value)
    return {"tensors": {name: obs.to_json() for name, obs in observers.items()}}


def load_table(path, package: ModelPackage | None = None, *, complete: bool = True) -> dict:
    """Read and check a calibration table; with `package`, it must have been made from its graph."""
    path = Path(path)
    if not path.is_file():
        raise TableError(f"{path}: no such calibration table (make one with `onnxopt calibrate`)")
    try:
        table = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TableError(f"{path}: not a calibration table (invalid JSON: {e})") from e
    if not isinstance(table, dict) or table.get("format") != TABLE_FORMAT:
        raise TableError(f"{path}: not an onnxopt calibration table (make one with `onnxopt calibrate`)")
    if table.get("version") != TABLE_VERSION:
        raise TableError(f"{path}: table version {table.get('version')!r} is not supported (this onnxopt reads "
                         f"{TABLE_VERSION}); calibrate again")
    if package is not None:
        want = package.manifest["files"][MODEL_NAME]["sha256"]
        if table["package"]["model_sha256"] != want:
            raise TableError(f"{path}: made for another graph (model sha256 {table['package']['model_sha256'][:12]}..., "
                             f"{package.path} has {want[:12]}...); run `onnxopt calibrate` on this package")
    if complete and not table.get("complete"):
        raise TableError(f"{path}: calibration stopped after {table.get('samples_done')} of {table.get('num_samples')} "
                         "samples; finish it with `onnxopt calibrate ... --resume`")
    return table


def tensor_stats(table: dict, name: str) -> dict | None:
    """abs_mean and mean_square [C] of an observed tensor, or None when the table lacks it."""
    entry = table.get("tensors", {}).get(name)
    if entry is None:
        return None
    obs = TensorObserver.from_json(entry)
    return {"abs_mean": obs.abs_mean, "mean_square": obs.mean_square, "count": obs.count,
            "channel_min": obs.channel_min, "channel_max": obs.channel_max}


def table_sha256(table: dict) -> str:
    """A hash of the table's content (key order normalized), recorded by `quantize`."""
    return hashlib.sha256(json.dumps(table, sort_keys=True).encode()).hexdigest()
