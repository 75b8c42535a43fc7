"""Decode throughput of onnxopt, onnxruntime-genai and transformers (eager) on the same weights.

    python scripts/bench_decode.py --model smollm2-135m --device cpu [--json] [--append docs/BENCHMARKS.md]
    python scripts/bench_decode.py --model llama-1b --device cuda --new-tokens 128   # scripts/bench_decode_cuda.py

Method. Each engine generates greedily for one prompt (batch 1) of exactly 128 token ids, and is made
to produce exactly 64 new tokens (EOS does not stop it); --prompt-tokens and --new-tokens change
both. t(k) is the wall time at which the k-th new token is available to the caller, counted from the
start of the generate call, so t(1) holds the prefill. The decode rate is

    rate = (n - 1) / (t(n) - t(1))        tokens/s, n = number of new tokens

i.e. the mean cost of the n - 1 single-token decode steps, prefill excluded. Each engine runs once to
warm up, then `--repeats` rounds (default 3) in which every engine runs once in turn (interleaved, so
drift of a shared machine hits all alike); each engine's median rate is reported (ms/token = 1000 / rate).
The CPU time other processes took during the timed runs is reported too (the machine may be shared).

Engines, all in this one process, all fp32, all with the same thread count (every core we may use):
- onnxopt: the package `onnxopt optimize --target cpu` makes of the export (`--graph exported`: the
  export itself; or the package given), run by `Generator.iter_steps`.
- onnxruntime-genai: its model builder (`onnxruntime_genai.models.builder -p fp32 -e cpu`) run on a
  Hugging Face checkpoint of the same weights (`onnxopt.checkpoint.write_hf_checkpoint`), then
  og.Generator with min_length = max_length so that it cannot stop early.
- transformers: AutoModelForCausalLM from that checkpoint, attn_implementation="eager", a manual loop
  over a DynamicCache.
- ceiling (not an engine, a bound): every MatMul weight of the onnxopt package, fed a batch-1 row, in
  one ORT session with the same threads; nothing else (no attention, norms, sampling or Python loop).
  A decode step reads each of these weights once whatever graph runs it, and fp32 batch-1 decode is
  bound by that read, so no engine on these weights decodes faster than this rate. It is timed like
  the engines (one "token" = one run of the session, interleaved in the same rounds).

The prompt is the start of ../shared/data/sensesensibility.txt, tokenized and cut to 128 ids
(seeded random ids when the model has no tokenizer or the text is missing). Every expensive artifact
(onnxopt export, Hugging Face checkpoint, genai model) is cached under $ONNXOPT_CACHE or
~/.cache/onnxopt/bench/<model>/; delete that directory to rebuild. Logs go to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights are local; never reach for a hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402

logger = logging.getLogger("bench_decode")

REPO = Path(__file__).resolve().parents[1]
PROMPT_TEXT = REPO.parent / "shared" / "data" / "sensesensibility.txt"
ENGINES = ("onnxopt", "genai", "hf", "ceiling")
LABELS = {"onnxopt": "onnxopt", "genai": "onnxruntime-genai", "hf": "transformers eager",
          "ceiling": "MatMul-only ceiling"}
TABLE_HEADER = (
    "| date | machine | threads | model | dtype | prompt + new | onnxopt tok/s (ms/tok) "
    "| genai tok/s (ms/tok) | transformers eager tok/s (ms/tok) | versions | MatMul-only ceiling tok/s (ms/tok) |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
)

# onnxruntime-genai 0.18's builder imports two transformers 5 classes at module level
# (models/builders/base.py, `from transformers import (... Qwen3_5ForConditionalGeneration ...)`);
# with transformers 4.57 that import fails before any model is looked at. Llama never uses them,
# so the builder runs with inert stand-ins bound to those names.
_BUILDER_SHIM = """
import runpy, sys, transformers
for name in ("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration"):
    if not hasattr(transformers, name):
        setattr(transformers, name, type(name, (), {}))
sys.argv = ["builder", *sys.argv[1:]]
runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
"""


class BenchError(Exception):
    """Something in the environment (not the user's input) stopped the benchmark."""


class OtherCpu:
    """CPU time that other processes used while a block ran, in cores (0.5 = half a core on average).

    The machine may be shared: busy time from /proc/stat (all processes) minus this process's own
    CPU time. Our own threads count in the load average, so that cannot tell contention apart.
    """

    def __enter__(self) -> "OtherCpu":
        self.cores = None
        self._start = (time.perf_counter(), _machine_busy_s(), _own_cpu_s())
        return self

    def __exit__(self, *exc) -> None:
        wall0, busy0, own0 = self._start
        wall, busy, own = time.perf_counter() - wall0, _machine_busy_s(), _own_cpu_s() - own0
        if busy is not None and busy0 is not None and wall > 0:
            self.cores = max(0.0, (busy - busy0 - own) / wall)


def _machine_busy_s() -> float | None:
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user..steal; guest is inside user


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


# -- preparing the three models ------------------------------------------------------------------


def cache_root(model: str) -> Path:
    base = Path(os.environ.get("ONNXOPT_CACHE") or Path.home() / ".cache" / "onnxopt") / "bench"
    path = Path(model)
    if not path.exists():
        return base / path.name  # an alias (resolve_source has checked it)
    resolved = str(path.resolve())
    return base / f"{path.stem}-{hashlib.sha256(resolved.encode()).hexdigest()[:8]}"


def resolve_model(model: str) -> tuple[str, Path | None]:
    """(source for export and checkpoint, existing onnxopt package or None)."""
    from onnxopt.errors import PackageError
    from onnxopt.package import MANIFEST_NAME, ModelPackage
    from onnxopt.sources import DEFAULT_MODEL

    path = Path(model)
    if not (path.is_dir() and (path / MANIFEST_NAME).is_file()):
        return model, None
    # Hashes are checked when the onnxopt engine loads the package; here only the manifest is read.
    described = ModelPackage(path, verify_hashes=False).manifest.get("source") or {}
    if described.get("name") == DEFAULT_MODEL:
        return DEFAULT_MODEL, path  # the alias: shares its cache with `--model smollm2-135m`
    source = described.get("path")
    if not source or not Path(source).exists():
        raise PackageError(
            f"{model}: the package's source {source!r} (manifest `source.path`) is not on this machine; "
            "the genai and transformers engines need those weights"
        )
    return source, path


def onnxopt_package(src: str, cache: Path, graph: str) -> Path:
    """The exported package of `src` (cached), and with graph "optimized" its `optimize --target cpu` result."""
    import onnxopt

    out = cache / "onnxopt-fp32"
    manifest = out / "onnxopt.json"
    recorded = json.loads(manifest.read_text()).get("source", {}).get("path") if manifest.is_file() else None
    wanted = str(Path(src).resolve()) if Path(src).exists() else None
    if manifest.is_file() and (wanted is None or recorded == wanted):
        logger.info("reusing onnxopt package %s", out)
    else:
        logger.info("exporting %s with onnxopt (fp32) to %s", src, out)
        onnxopt.export(src, out, dtype="fp32", overwrite=True, progress=True)
    if graph == "exported":
        return out
    optimized = cache / "onnxopt-fp32-cpu"
    opt_manifest = optimized / "onnxopt.json"
    exported_hash = json.loads(manifest.read_text())["files"]["model.onnx"]["sha256"]
    if opt_manifest.is_file():
        from onnxopt.passes.pipeline import pipeline

        opt = json.loads(opt_manifest.read_text())
        parent = opt.get("optimized_from", {})
        steps = [s["name"] for run in opt.get("passes", []) for s in run.get("steps", [])]
        # A re-export, or a pipeline that changed since (new steps, a new graph interface), invalidates it.
        if parent.get("model_sha256") == exported_hash and steps == [s.name for s in pipeline("cpu")]:
            logger.info("reusing optimized package %s", optimized)
            return optimized
    logger.info("optimizing %s for cpu into %s", out, optimized)
    onnxopt.optimize(out, optimized, target="cpu", overwrite=True, progress=True)
    return optimized


def genai_model(hf_dir: Path, cache: Path) -> Path:
    """Run onnxruntime-genai's model builder on `hf_dir` once; later calls reuse its output."""
    out = cache / "genai-fp32"
    weights = sorted(hf_dir.glob("*.safetensors"))
    # Rebuilt when the checkpoint's weight files change (name, size, mtime).
    stamp = {
        "hf_dir": str(hf_dir.resolve()),
        "weights": [[w.name, w.stat().st_size, w.stat().st_mtime_ns] for w in weights],
    }
    marker = out / "onnxopt-bench.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        logger.info("reusing onnxruntime-genai model %s", out)
        return out
    staging = cache / "genai-fp32.tmp"
    _rmtree(staging)
    view = _builder_input(hf_dir, cache / "genai-input")
    log = cache / "genai-builder.log"
    cmd = [sys.executable, "-c", _BUILDER_SHIM, "-i", str(view), "-o", str(staging),
           "-p", "fp32", "-e", "cpu", "-c", str(cache / "genai-builder-cache")]
    logger.info("building the onnxruntime-genai model (log: %s)", log)
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0 or not (staging / "genai_config.json").is_file():
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise BenchError(f"onnxruntime-genai model builder failed ({tail[0]}); full log: {log}")
    (staging / marker.name).write_text(json.dumps(stamp))
    _rmtree(out)
    staging.rename(out)
    return out


def _builder_input(hf_dir: Path, view: Path) -> Path:
    """A view of `hf_dir` (symlinks) whose config.json the genai builder can read.

    The builder (models/builders/base.py, `make_config_init`) iterates `config.rope_scaling`, which
    transformers 5 omits for plain RoPE but transformers 4.x sets to None. Plain RoPE is spelled
    {"rope_type": "default"} here, which transformers 4.x reads the same way.
    """
    _rmtree(view)
    view.mkdir(parents=True)
    for item in hf_dir.iterdir():
        if item.name != "config.json":
            (view / item.name).symlink_to(item.resolve())
    config = json.loads((hf_dir / "config.json").read_text())
    if config.get("rope_scaling") is None:
        config["rope_scaling"] = {"rope_type": "default"}
    (view / "config.json").write_text(json.dumps(config, indent=2))
    return view


def _rmtree(path: Path) -> None:
    import shutil

    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def prompt_ids(hf_dir: Path, n: int, vocab_size: int) -> tuple[list[int], str]:
    """Exactly `n` token ids, and where they came from."""
    if not (hf_dir / "tokenizer.json").is_file() and not (hf_dir / "tokenizer_config.json").is_file():
        logger.warning("%s has no tokenizer; using random ids", hf_dir)
    elif not PROMPT_TEXT.is_file():
        logger.warning("%s is missing; using random ids", PROMPT_TEXT)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
        text = PROMPT_TEXT.read_text(encoding="utf-8")[: 40 * n]  # ~4 characters a token; 10x margin
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n]
        if len(ids) == n:
            return ids, f"{PROMPT_TEXT.name}, first {n} tokens"
        logger.warning("%s gives only %d tokens; using random ids", PROMPT_TEXT, len(ids))
    rng = np.random.default_rng(0)
    return rng.integers(0, vocab_size, size=n).tolist(), f"random ids (seed 0, vocab {vocab_size})"


# -- the three timed loops: each returns (t(k) for k = 1..n, tokens) ----------------------------------


def make_onnxopt(package: Path, threads: int):
    import onnxruntime as ort

    import onnxopt

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    gen = onnxopt.load(package, session_options=options)

    def run(prompt: list[int], n: int):
        times, tokens = [], []
        start = time.perf_counter()
        for step in gen.iter_steps([prompt], max_new_tokens=n, stop_at_eos=False):
            tokens.append(int(step.tokens[0]))
            times.append(time.perf_counter() - start)
        return times, tokens

    return run


def _constant_weight(value) -> np.ndarray | None:
    """A MatMul weight as ORT sees it after constant folding: an initializer, or a Transpose of one (the
    export's tied LM head reads the embedding table transposed)."""
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Transpose" and producer.inputs[0].const_value is not None:
        perm = producer.attributes.get_ints("perm", None)
        return np.ascontiguousarray(np.transpose(producer.inputs[0].const_value.numpy(), perm))
    return None


def make_ceiling(package: Path, cache: Path, threads: int):
    """The MatMul-only bound (module docstring): the package's MatMul weights alone, one ORT session;
    None (with a warning) for a package whose weights are not float32 MatMul initializers."""
    import onnx_ir as ir
    import onnxruntime as ort

    source = package / "model.onnx"
    digest = hashlib.sha256(str(source.stat().st_mtime_ns).encode() + str(source.resolve()).encode()).hexdigest()[:8]
    path = cache / f"ceiling-{digest}" / "matmuls.onnx"
    if not path.is_file():
        model = ir.load(source)
        weights = {}  # [K, N] weights, each once
        for node in model.graph.all_nodes():
            if node.op_type == "MatMul" and node.domain == "":
                weight = _constant_weight(node.inputs[1])
                if weight is None or weight.dtype != np.float32 or weight.ndim != 2:
                    logger.warning("ceiling skipped: MatMul %s of %s has no float32 [K, N] constant weight", node.name, package)
                    return None
                weights[id(node.inputs[1])] = weight
            elif node.op_type in ("MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul"):
                logger.warning("ceiling skipped: %s is quantized (%s); the bound is for float32 weights", package, node.op_type)
                return None
        if not weights:
            logger.warning("ceiling skipped: %s has no MatMul with a constant weight", package)
            return None
        weights = list(weights.values())
        rows = {w.shape[0]: ir.Value(name=f"x_{w.shape[0]}", shape=ir.Shape([1, w.shape[0]]),
                                     type=ir.TensorType(ir.DataType.FLOAT)) for w in weights}
        nodes, outputs = [], []
        for i, w in enumerate(weights):
            weight = ir.Value(name=f"w{i}", shape=ir.Shape(w.shape), type=ir.TensorType(ir.DataType.FLOAT),
                              const_value=ir.tensor(w, name=f"w{i}"))
            node = ir.node("MatMul", [rows[w.shape[0]], weight], num_outputs=1)
            node.outputs[0].name = f"y{i}"
            nodes.append(node)
            outputs.append(node.outputs[0])
        graph = ir.Graph(list(rows.values()), outputs, nodes=nodes,
                         initializers=[n.inputs[1] for n in nodes], opset_imports={"": 17}, name="matmul_ceiling")
        path.parent.mkdir(parents=True, exist_ok=True)
        ir.save(ir.Model(graph, ir_version=10), path, external_data=path.name + ".data")
        logger.info("ceiling: %d MatMul weights, %.1f MB, in %s", len(weights), sum(w.nbytes for w in weights) / 1e6, path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {i.name: rng.standard_normal(i.shape, dtype=np.float32) for i in session.get_inputs()}
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_cpu_input(name, value)
    for o in session.get_outputs():
        binding.bind_output(o.name, "cpu")  # [1, N] each: small next to the weights

    def run(prompt: list[int], n: int):
        times, start = [], time.perf_counter()
        for _ in range(n):  # one "token": every weight read once
            session.run_with_iobinding(binding)
            times.append(time.perf_counter() - start)
        return times, []

    return run


def make_genai(model_dir: Path, threads: int):
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    session = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
    model = og.Model(config)

    def run(prompt: list[int], n: int):
        params = og.GeneratorParams(model)
        total = len(prompt) + n
        # min_length = max_length masks EOS until the budget is spent, so all n tokens come.
        params.set_search_options(max_length=total, min_length=total, do_sample=False, batch_size=1)
        times, tokens = [], []
        start = time.perf_counter()
        generator = og.Generator(model, params)
        generator.append_tokens(np.asarray([prompt], dtype=np.int32))  # runs the prefill
        for _ in range(n):
            generator.generate_next_token()  # picks token k (and runs the forward pass it needs)
            tokens.append(int(generator.get_next_tokens()[0]))
            times.append(time.perf_counter() - start)
        del generator
        return times, tokens

    return run


def make_hf(hf_dir: Path, threads: int):
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(
        str(hf_dir), dtype=torch.float32, attn_implementation="eager", local_files_only=True
    ).eval()

    @torch.inference_mode()
    def run(prompt: list[int], n: int):
        times, tokens = [], []
        start = time.perf_counter()
        cache = DynamicCache(config=model.config)
        input_ids = torch.tensor([prompt], dtype=torch.long)  # [1, S]
        for _ in range(n):
            # logits_to_keep=1, as generate() does: the prefill projects only the last position.
            out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            token = int(out.logits[0, -1].argmax())  # logits: [1, 1, V]
            tokens.append(token)
            times.append(time.perf_counter() - start)
            input_ids = torch.tensor([[token]], dtype=torch.long)  # [1, 1]
        return times, tokens

    return run


def measure(runs: dict, prompt: list[int], n: int, repeats: int) -> dict[str, dict]:
    """Warm every engine up, then time `repeats` rounds, each running every engine once in turn
    (interleaved, so that a shared machine's drift hits all engines alike)."""
    for name, run in runs.items():
        logger.info("%s: warm-up", LABELS[name])
        run(prompt, n)
    rates = {name: [] for name in runs}
    first = {name: [] for name in runs}
    tokens: dict[str, list[int]] = {}
    others = {name: [] for name in runs}
    for r in range(repeats):
        for name, run in runs.items():
            with OtherCpu() as busy:
                times, tokens[name] = run(prompt, n)
            if len(times) != n:
                raise BenchError(f"{LABELS[name]} produced {len(times)} tokens, expected {n}")
            rates[name].append((n - 1) / (times[-1] - times[0]))
            first[name].append(times[0])
            if busy.cores is not None:
                others[name].append(busy.cores)
            logger.info("%s: round %d/%d: %.2f tok/s", LABELS[name], r + 1, repeats, rates[name][-1])
    results = {}
    for name in runs:
        cores = max(others[name]) if others[name] else None
        if cores is not None and cores > 0.2:
            logger.warning("%s: other processes used %.1f cores meanwhile; its numbers are low", LABELS[name], cores)
        rate = statistics.median(rates[name])
        results[name] = {
            "other_cpu_cores": None if cores is None else round(cores, 2),
            "tok_s": round(rate, 2),
            "ms_per_token": round(1000.0 / rate, 2),
            "first_token_ms": round(1000.0 * statistics.median(first[name]), 1),
            "runs_tok_s": [round(x, 2) for x in rates[name]],
            "tokens": tokens[name],
        }
    return results


# -- reporting --------------------------------------------------------------------------------------


def machine() -> tuple[str, int]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cpu, cores


def onnxopt_checkout() -> Path:
    """The source tree the imported onnxopt comes from (an editable install may point elsewhere)."""
    import onnxopt

    return Path(onnxopt.__file__).resolve().parents[1]


def versions() -> dict:
    import onnxruntime
    import onnxruntime_genai
    import torch
    import transformers

    import onnxopt

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(onnxopt_checkout()), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    return {
        "onnxopt": onnxopt.__version__ + (f" ({commit})" if commit else ""),
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime-genai": onnxruntime_genai.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def markdown_row(r: dict) -> str:
    def cell(name: str) -> str:
        if r.get(f"{name}_tok_s") is None:
            return "–"
        return f"{r[f'{name}_tok_s']:.1f} ({r[f'{name}_ms_per_token']:.1f})"

    v = r["versions"]
    vers = (f"onnxopt {v['onnxopt']}, ORT {v['onnxruntime']}, genai {v['onnxruntime-genai']}, "
            f"torch {v['torch']}, transformers {v['transformers']}")
    others = [r.get(f"{name}_other_cpu_cores") for name in r["engines"]]
    others = [x for x in others if x is not None]
    busy = f" (others ≤ {max(others):.1f} cores)" if others else ""
    return (f"| {r['date'][:10]} | {r['machine']}, {r['cores']} cores | {r['threads']}{busy} | {r['model']} (onnxopt: {r.get('onnxopt_graph', 'exported')}) "
            f"| {r['dtype']} | {r['prompt_tokens']} + {r['new_tokens']} | {cell('onnxopt')} | {cell('genai')} "
            f"| {cell('hf')} | {vers} | {cell('ceiling')} |\n")


def append_row(path: Path, row: str) -> None:
    text = path.read_text() if path.is_file() else ""
    with open(path, "a") as f:
        if "| date | machine |" not in text:
            f.write(("\n" if text and not text.endswith("\n\n") else "") + TABLE_HEADER)
        f.write(row)


def print_table(r: dict) -> None:
    print(f"{r['model']} ({r['dtype']}), batch 1, {r['prompt_tokens']} prompt + {r['new_tokens']} new tokens, "
          f"{r['threads']} threads on {r['machine']} ({r['cores']} cores)")
    print(f"{'engine':<20} {'tok/s':>8} {'ms/token':>9} {'first token ms':>15} {'other processes':>16}")
    for name in r["engines"]:
        others = r[f"{name}_other_cpu_cores"]
        print(f"{LABELS[name]:<20} {r[f'{name}_tok_s']:>8.2f} {r[f'{name}_ms_per_token']:>9.2f} "
              f"{r[f'{name}_first_token_ms']:>15.1f} {'?' if others is None else f'{others:.2f} cores':>16}")


# -- main -------------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m",
                   help="alias, .gguf, Hugging Face directory, or an onnxopt model package directory")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: fp16 on one GPU, random-init shapes (scripts/bench_decode_cuda.py)")
    p.add_argument("--out", type=Path, help="(cuda) write the JSON report into this directory")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--append", metavar="MARKDOWN", type=Path, help="append a table row to this file")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per engine after one warm-up")
    p.add_argument("--batch", type=int, default=1, help="cuda: rows decoded together (equal-length random prompts)")
    p.add_argument("--threads", type=int, default=machine()[1], help="threads for every engine (default: all cores)")
    p.add_argument("--graph", choices=["optimized", "exported"], default="optimized",
                   help="onnxopt runs the `optimize --target cpu` package (default) or the plain export")
    p.add_argument("--engines", default=",".join(ENGINES),
                   help=f"comma-separated subset of {','.join(ENGINES)} (ceiling: the onnxopt package's MatMul "
                        "weights alone, an upper bound for fp32 decode on these weights)")
    p.add_argument("--packages", metavar="PKG,PKG,...",
                   help="instead of the engines: onnxopt on each of these packages (e.g. fp32 and its "
                        "quantized children), in one run, rounds interleaved; speed-up vs the first")
    return p.parse_args(argv)


def compare_packages(args) -> int:
    """`--packages A,B,...`: the same decode measurement on several onnxopt packages in one process.
    Runs are interleaved (A, B, ..., A, B, ...) so that drift of a shared machine hits all alike;
    each package's rate is the median of its runs, and the speed-up is against the first package."""
    packages = [Path(x) for x in args.packages.split(",") if x.strip()]
    missing = [str(x) for x in packages if not (x / "onnxopt.json").is_file()]
    if missing:
        print(f"error: --packages: not a model package: {', '.join(missing)}", file=sys.stderr)
        return 2
    vocab = json.loads((packages[0] / "onnxopt.json").read_text())["dims"]["vocab_size"]
    prompt = list(np.random.default_rng(0).integers(0, vocab, args.prompt_tokens))
    runs = [make_onnxopt(p, args.threads) for p in packages]
    for run in runs:
        run(prompt, args.new_tokens)  # warm-up
    rates: list[list[float]] = [[] for _ in packages]
    for _ in range(args.repeats):
        for i, run in enumerate(runs):
            times, _ = run(prompt, args.new_tokens)
            rates[i].append((len(times) - 1) / (times[-1] - times[0]))
    cpu, cores = machine()
    rows = []
    for path, r in zip(packages, rates):
        manifest = json.loads((path / "onnxopt.json").read_text())
        quant = manifest.get("quantization") or {}
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        rows.append({"package": str(path), "scheme": quant.get("scheme", manifest.get("dtype", "fp32")),
                     "disk_mb": round(size / 1e6, 1), "tok_s": round(statistics.median(r), 2),
                     "runs_tok_s": [round(x, 2) for x in r]})
    base = rows[0]["tok_s"]
    for row in rows:
        row["speedup"] = round(row["tok_s"] / base, 2)
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": cpu, "cores": cores, "threads": args.threads, "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens, "repeats": args.repeats, "packages": rows}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"{'scheme':<12} {'disk MB':>8} {'tok/s':>8} {'speed-up':>9}  package")
        for row in rows:
            print(f"{row['scheme']:<12} {row['disk_mb']:>8.1f} {row['tok_s']:>8.2f} {row['speedup']:>8.2f}x  {row['package']}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    if args.device == "cuda":  # its own engines and method: scripts/bench_decode_cuda.py
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bench_decode_cuda

        for noisy in ("onnxscript", "onnx_ir", "torch.onnx", "transformers"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        return bench_decode_cuda.main(args)
    if args.batch != 1:
        print("error: --batch: the CPU benchmark decodes one prompt (batch 1); --batch is for --device cuda", file=sys.stderr)
        return 2
    quiet = ("onnxscript", "onnx_ir", "torch.onnx", "torch.onnx._internal.exporter._registration", "transformers")
    for noisy in quiet:
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.packages:
        return compare_packages(args)
    if onnxopt_checkout() != REPO:
        logger.warning("onnxopt is imported from %s, not from this checkout (%s)", onnxopt_checkout(), REPO)
    try:
        from onnxopt.checkpoint import write_hf_checkpoint
    except ImportError:
        print(f"error: the installed onnxopt ({onnxopt_checkout()}) has no onnxopt.checkpoint; "
              f"install this checkout with `pip install -e {REPO}`", file=sys.stderr)
        return 1
    from onnxopt.errors import UserError
    from onnxopt.sources import resolve_source

    try:
        engines = [e.strip() for e in args.engines.split(",") if e.strip()]
        bad = [e for e in engines if e not in ENGINES]
        if bad or not engines:
            raise UserError(f"--engines {args.engines!r}: expected a comma-separated subset of {','.join(ENGINES)}")
        if args.prompt_tokens < 1 or args.new_tokens < 2 or args.repeats < 1 or args.threads < 1:
            raise UserError("--prompt-tokens, --repeats, --threads must be >= 1 and --new-tokens >= 2")
        if args.append is not None and not args.append.parent.is_dir():
            raise UserError(f"--append {args.append}: directory {args.append.parent} does not exist")
        src, package = resolve_model(args.model)
        resolve_source(src)  # refuse a bad --model before anything is written
        cache = cache_root(src)
        cache.mkdir(parents=True, exist_ok=True)
        hf_dir = write_hf_checkpoint(src, cache / "hf", dtype="fp32")
        vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
        prompt, prompt_source = prompt_ids(hf_dir, args.prompt_tokens, vocab)
        builders = {
            "onnxopt": lambda: make_onnxopt(package or onnxopt_package(src, cache, args.graph), args.threads),
            "genai": lambda: make_genai(genai_model(hf_dir, cache), args.threads),
            "hf": lambda: make_hf(hf_dir, args.threads),
            "ceiling": lambda: make_ceiling(package or onnxopt_package(src, cache, args.graph), cache, args.threads),
        }
        cpu, cores = machine()
        logger.info("settings: model %s, fp32, batch 1, prompt %d tokens (%s), %d new tokens, %d threads, "
                    "1 warm-up + %d runs per engine, cpu %s (%d cores)", args.model, args.prompt_tokens,
                    prompt_source, args.new_tokens, args.threads, args.repeats, cpu, cores)
        runs = {name: builders[name]() for name in engines}
        engines = [name for name in engines if runs[name] is not None]  # the ceiling may not apply
        results = measure({name: runs[name] for name in engines}, prompt, args.new_tokens, args.repeats)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    report = {f"{name}_tok_s": results.get(name, {}).get("tok_s") for name in ENGINES}
    onnxopt_dtype = "fp32"
    if package is not None:
        onnxopt_dtype = json.loads((package / "onnxopt.json").read_text()).get("dtype", "fp32")
    report.update({
        "model": args.model,
        "onnxopt_package": str(package or cache / ("onnxopt-fp32-cpu" if args.graph == "optimized" else "onnxopt-fp32")),
        "onnxopt_graph": "given package" if package else args.graph,
        "dtype": "fp32" if onnxopt_dtype == "fp32" else f"fp32 (onnxopt {onnxopt_dtype})",
        "device": args.device,
        "batch": 1,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "prompt": prompt_source,
        "repeats": args.repeats,
        "threads": args.threads,
        "machine": cpu,
        "cores": cores,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "engines": engines,
    })
    report["token_reference"] = "hf" if "hf" in results else next((e for e in engines if e != "ceiling"), None)
    reference = results[report["token_reference"]]["tokens"] if report["token_reference"] else []
    for name, res in results.items():
        report[f"{name}_ms_per_token"] = res["ms_per_token"]
        report[f"{name}_first_token_ms"] = res["first_token_ms"]
        report[f"{name}_runs_tok_s"] = res["runs_tok_s"]
        # Other processes on a shared machine take cores from the engine: > 0.2 makes numbers low.
        report[f"{name}_other_cpu_cores"] = res["other_cpu_cores"]
        # Same weights and greedy decoding: the tokens should agree; fp32 rounding may flip a near-tie.
        if name != "ceiling":  # the bound generates no tokens
            same = next((i for i, (a, b) in enumerate(zip(res["tokens"], reference)) if a != b), len(reference))
            report[f"{name}_tokens_agreeing"] = same
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    if args.append is not None:
        append_row(args.append, markdown_row(report))
        logger.info("appended a row to %s", args.append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
