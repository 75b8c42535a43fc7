"""genai_config.json: what onnxruntime-genai needs to run an optimized package as its own model.

    config = genai_config(package, io, graph)        # dict, or None when genai cannot run this graph
    write_genai_config(directory, package, io, graph)

The fields follow onnxruntime-genai's model builder (src/python/py/models/builders/base.py,
`make_genai_config`) and its reader (src/config.cpp). The graph must have one of genai's decoder
interfaces: the shared-buffer one passes/gqa_interface.py gives it (targets cpu),

    inputs   input_ids [B, S], attention_mask [B, T], past_key_values.%d.key|value [B, Hkv, Tmax, D]
    outputs  logits [B, S or 1, V], present.%d.key|value (the same buffers: past_present_share_buffer)

or the export's concat one (target portable, or cpu when attention did not fuse), which adds
position_ids and returns present = concat(past, new) [B, Hkv, T, D] (past_present_share_buffer
false). On the concat form genai's batch-1 and equal-length logits equal ours (tests/test_genai.py);
its left-padded rows of different lengths did not match the same prompts alone (our runtime's do).

genai feeds one prompt per row and a mask of ones that grows by one column per token, so at batch 1
the graph sees seqlens_k = T - 1, as from our runtime. Batches: genai 0.18 left-pads rows of
different lengths (mask = ids != pad_token_id), while GroupQueryAttention's seqlens_k = ones - 1
assumes right padding, so only rows of equal length match single prompts; genai's own model builder
graph (the same mask subgraph) gives the same tokens as ours there. The family's genai model type
comes from models/*.py (`Family.genai_model_type`); token ids from generation_config.json, then
config.json.

genai's tokenizer (onnxruntime-extensions) reads GENAI_TOKENIZER_FILES from the package. It takes a
decoder that replaces '\u2581' (the SentencePiece space) as a SentencePiece model and then maps most
text to id -1; transformers writes such a decoder (ByteFallback, Fuse, Replace '\u2581', ByteLevel)
for byte-level BPE vocabularies converted from GGUF, SmolLM2's among them. When no vocabulary entry
holds '\u2581' or is a byte-fallback token <0xNN>, the first three decoders are the identity on every
token and the decoder equals plain ByteLevel, so `write_genai_config` writes that (`tokenizers`
decodes every id sequence to the same text before and after). onnxruntime-extensions does not run
tokenizer.json's TemplateProcessing: a BOS token that our tokenizer prepends, a genai caller
prepends itself. It also splits a newline from the spaces after it where the GPT-2 regex keeps them
in one piece (onnxruntime-extensions issue #984), so text with such runs tokenizes differently there.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from onnxopt.models import FAMILIES
from onnxopt.package import MODEL_NAME, ModelPackage

logger = logging.getLogger(__name__)

GENAI_CONFIG_NAME = "genai_config.json"
GENAI_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_REQUIRED_INPUTS = ("input_ids", "attention_mask")
_ORT_DOMAINS = {"", "ai.onnx", "com.microsoft"}


def genai_config(package: ModelPackage, io: dict, graph) -> dict | None:
    """The genai_config.json of `package` whose new graph (an onnx_ir.Graph) has I/O `io` (the
    manifest's io section), or None when genai cannot run it (the reason is logged)."""
    family = FAMILIES.get(package.manifest.get("family", ""))
    model_type = family.genai_model_type if family is not None else ""
    missing = [name for name in _REQUIRED_INPUTS if name not in io.get("inputs", ())]
    if not model_type:
        family_name = package.manifest.get("family")
        logger.info("no genai_config.json: family %r declares no onnxruntime-genai model type", family_name)
        return None
    layout = io.get("kv_cache", {}).get("layout")
    shared = layout == "gqa-shared"
    if missing or not (shared or (layout == "concat" and "position_ids" in io.get("inputs", ()))):
        logger.info("no genai_config.json: neither the shared-buffer attention_mask interface (GroupQueryAttention) "
                    "nor the export's concat interface with position_ids")
        return None
    foreign = sorted({n.domain for n in graph} - _ORT_DOMAINS)
    if foreign:  # e.g. onnxopt.SwiGLU kept for our CUDA runtime: plain ORT sessions cannot load it
        logger.info("no genai_config.json: the graph has ops of domain %s, which onnxruntime cannot load", foreign)
        return None
    dims = package.dims
    config = package.read_json("config.json") or {}
    generation = package.read_json("generation_config.json") or {}

    def token(key):  # generation_config.json first, as genai's builder reads them
        value = generation.get(key)
        return value if value is not None else config.get(key)

    eos = token("eos_token_id")
    if eos is None:
        eos = list(package.manifest.get("eos_token_ids") or [])
    pad = token("pad_token_id")
    if pad is None:  # genai pads finished rows with it; the first eos, as our runtime does
        pad = eos[0] if isinstance(eos, list) and eos else eos
    context = int(dims["max_context"])
    return {
        "model": {
            "bos_token_id": token("bos_token_id"),
            "context_length": context,
            "decoder": {
                # CPU: genai's default provider; an application adds CUDA etc. in its own copy.
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_NAME,
                "head_size": dims["head_size"],
                "hidden_size": dims["hidden_size"],
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    **({} if shared else {"position_ids": "position_ids"}),
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": dims["num_heads"],
                "num_hidden_layers": dims["num_layers"],
                "num_key_value_heads": dims["num_kv_heads"],
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": model_type,
            "vocab_size": dims["vocab_size"],
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            # GroupQueryAttention reads and writes one [B, Hkv, Tmax, D] buffer per KV tensor; the
            # concat interface returns present = concat(past, new), a new [B, Hkv, T, D] each step.
            "past_present_share_buffer": shared,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 50,
            "top_p": 1.0,
        },
    }


def write_genai_config(directory: Path, package: ModelPackage, io: dict, graph) -> dict | None:
    """Write genai_config.json into `directory` (a package being built) when genai can run the graph.
    Returns the manifest's `genai` entry, or None."""
    config = genai_config(package, io, graph)
    if config is None:
        return None
    (Path(directory) / GENAI_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    tokenizer = all((Path(directory) / name).is_file() for name in GENAI_TOKENIZER_FILES)
    entry = {"config": GENAI_CONFIG_NAME, "model_type": config["model"]["type"], "tokenizer": tokenizer}
    if not tokenizer:
        logger.info("genai can run %s from token ids only: no %s", directory, " / ".join(GENAI_TOKENIZER_FILES))
    elif _plain_byte_level_decoder(Path(directory) / "tokenizer.json"):
        entry["tokenizer_decoder"] = "ByteLevel (was a SentencePiece-style sequence; same text)"
    return entry


_SPM_SPACE = "\u2581"
_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _plain_byte_level_decoder(path: Path) -> bool:
    """Rewrite tokenizer.json's decoder to plain ByteLevel when that provably decodes every id
    sequence to the same text (module docstring); returns whether it did."""
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    decoder = tokenizer.get("decoder") or {}
    steps = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else []
    if not steps or steps[-1].get("type") != "ByteLevel" or (tokenizer.get("model") or {}).get("type") != "BPE":
        return False
    if not any(step.get("type") == "Replace" for step in steps):  # nothing that misleads onnxruntime-extensions
        return False
    for step in steps[:-1]:  # identity on our vocabulary only in these forms
        kind = step.get("type")
        if kind == "Replace" and (step.get("pattern", {}).get("String") != _SPM_SPACE or step.get("content") != " "):
            return False
        if kind not in ("ByteFallback", "Fuse", "Replace"):
            return False
    added = [t["content"] for t in tokenizer.get("added_tokens", [])]
    vocab = [*((tokenizer.get("model") or {}).get("vocab") or {}), *added]
    if any(_SPM_SPACE in token or _BYTE_FALLBACK.fullmatch(token) for token in vocab):
        return False
    tokenizer["decoder"] = steps[-1]
    path.write_text(json.dumps(tokenizer, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return True
