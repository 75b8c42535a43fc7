"""onnxruntime-genai runs an optimized package through the genai_config.json that `optimize` writes
(onnxopt/genai_config.py): same logits and greedy tokens as our runtime, same tokenization.

Uses `tiny_text_package` (a random Llama of the `tiny` shape with the SmolLM2 tokenizer).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import needs_torch

pytestmark = needs_torch
og = pytest.importorskip("onnxruntime_genai")

LOGITS_ATOL = 1e-5  # the same graph on the same ORT CPU kernels (seen 0.0)
PROMPTS = ([5, 17, 42, 99, 3, 250, 8], [11, 12, 13], [400, 9000, 31, 7, 7, 7, 120, 44, 1000, 2500, 6])


@pytest.fixture(scope="module")
def optimized(tiny_text_package, tmp_path_factory):
    import onnxopt

    out = tmp_path_factory.mktemp("genai") / "opt"
    onnxopt.optimize(tiny_text_package, out, progress=False)
    return out


def _genai_greedy(model, prompts, max_new_tokens):
    """genai's greedy tokens [B, n] and logits per step [n][B, V]; stops early only at eos."""
    params = og.GeneratorParams(model)
    params.set_search_options(
        do_sample=False, batch_size=len(prompts), max_length=max(map(len, prompts)) + max_new_tokens
    )
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(prompts, dtype=np.int32))
    tokens, logits = [], []
    while not generator.is_done():
        logits.append(generator.get_logits().reshape(len(prompts), -1).copy())
        generator.generate_next_token()
        tokens.append(generator.get_next_tokens().copy())
    return np.array(tokens).T, logits


def _ours(gen, prompts, max_new_tokens):
    steps = list(gen.iter_steps(prompts, max_new_tokens=max_new_tokens, stop_at_eos=False))
    return np.array([s.tokens for s in steps]).T, [s.logits.copy() for s in steps]


def test_genai_config_describes_the_package(optimized, tiny_text_package):
    import onnxopt

    manifest = json.loads((optimized / "onnxopt.json").read_text())
    assert manifest["genai"]["config"] == "genai_config.json" and manifest["genai"]["tokenizer"] is True
    assert "genai_config.json" in manifest["files"]  # hashed like every other file
    config = json.loads((optimized / "genai_config.json").read_text())
    model, dims = config["model"], manifest["dims"]
    decoder = model["decoder"]
    assert model["type"] == "llama" and model["context_length"] == dims["max_context"]
    assert (decoder["num_hidden_layers"], decoder["num_attention_heads"], decoder["num_key_value_heads"]) == (
        dims["num_layers"], dims["num_heads"], dims["num_kv_heads"]
    )
    assert decoder["head_size"] == dims["head_size"] and model["vocab_size"] == dims["vocab_size"]
    assert set(manifest["io"]["inputs"]) == {"input_ids", "attention_mask"} | set(onnxopt.load(optimized)._names["past"])
    assert decoder["inputs"]["attention_mask"] == "attention_mask"
    assert decoder["session_options"]["provider_options"] == []  # CPU
    assert config["search"]["past_present_share_buffer"] is True
    generation = json.loads((tiny_text_package / "generation_config.json").read_text())
    assert (model["bos_token_id"], model["eos_token_id"]) == (generation["bos_token_id"], generation["eos_token_id"])
    assert model["pad_token_id"] == generation["eos_token_id"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_genai_batch_1_equals_our_runtime(optimized, prompt):
    import onnxopt

    theirs, their_logits = _genai_greedy(og.Model(str(optimized)), [prompt], 16)
    ours, our_logits = _ours(onnxopt.load(optimized), [prompt], 16)
    n = theirs.shape[1]
    assert n == 16 or int(theirs[0, -1]) in onnxopt.load(optimized).eos_token_ids  # only eos stops genai early
    assert theirs.tolist() == ours[:, :n].tolist()
    deltas = [float(np.abs(a - b).max()) for a, b in zip(their_logits, our_logits)]
    assert max(deltas) <= LOGITS_ATOL, deltas


def test_genai_batch_of_equal_lengths_equals_our_runtime(optimized):
    """genai left-pads rows of different lengths, which GroupQueryAttention's seqlens_k = ones - 1 reads
    as right padding: its own builder's graph gives the same (wrong) tokens there, so only equal
    lengths are compared (onnxopt/genai_config.py)."""
    import onnxopt

    prompts = [PROMPTS[0], [3, 1000, 20000, 5, 77, 1, 42]]
    theirs, their_logits = _genai_greedy(og.Model(str(optimized)), prompts, 12)
    ours, our_logits = _ours(onnxopt.load(optimized), prompts, 12)
    assert theirs.tolist() == ours[:, : theirs.shape[1]].tolist()
    assert max(float(np.abs(a - b).max()) for a, b in zip(their_logits, our_logits)) <= LOGITS_ATOL


@pytest.fixture(scope="module")
def portable(tiny_text_package, tmp_path_factory):
    import onnxopt

    out = tmp_path_factory.mktemp("genai-portable") / "opt"
    onnxopt.optimize(tiny_text_package, out, target="portable", progress=False)
    return out


def test_genai_runs_the_portable_package(portable):
    """The portable target keeps the export's concat interface (attention_mask, position_ids, present =
    concat(past, new)), which genai drives with past_present_share_buffer false: batch 1 and a batch of
    equal lengths equal our runtime. (Rows of different lengths, left-padded with pad_token_id, do
    not: genai 0.18's logits for them differ from the same prompts alone by up to 1.0 on this model,
    while our runtime's left-padded batch equals the single prompts: tests/test_targets.py.)"""
    import onnxopt

    config = json.loads((portable / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is False
    assert config["model"]["decoder"]["inputs"]["position_ids"] == "position_ids"
    model, ours_gen = og.Model(str(portable)), onnxopt.load(portable)
    for prompts in ([PROMPTS[0]], [PROMPTS[0], [3, 1000, 20000, 5, 77, 1, 42]]):
        theirs, their_logits = _genai_greedy(model, prompts, 12)
        ours, our_logits = _ours(ours_gen, prompts, 12)
        assert theirs.tolist() == ours[:, : theirs.shape[1]].tolist()
        # The same graph on the same ORT CPU kernels (seen 0.0).
        assert max(float(np.abs(a - b).max()) for a, b in zip(their_logits, our_logits)) <= LOGITS_ATOL


def test_genai_tokenizer_encodes_and_decodes_like_ours(optimized):
    import onnxopt

    gen = onnxopt.load(optimized)
    tokenizer = og.Tokenizer(og.Model(str(optimized)))
    bos = gen.tokenizer.encode("", add_special_tokens=True)  # what our tokenizer prepends
    # No newlines: onnxruntime-extensions splits "\n   " from its spaces where the GPT-2 regex keeps
    # them together (onnxruntime-extensions issue #984, whitespace differences with transformers).
    for text in ("The capital of France is", "héllo 東京 🙂 naïve", "def f(x): return x  # two  spaces"):
        ours = gen.tokenizer.encode(text)
        assert bos + tokenizer.encode(text).tolist() == ours  # genai does not prepend BOS itself
        assert tokenizer.decode(np.array(ours[len(bos) :], dtype=np.int32)) == text


def test_byte_level_decoder_rewrite_decodes_every_sequence_the_same(tiny_text_package, tmp_path):
    from tokenizers import Tokenizer

    from onnxopt.genai_config import _plain_byte_level_decoder

    path = tmp_path / "tokenizer.json"
    shutil.copyfile(tiny_text_package / "tokenizer.json", path)
    before = Tokenizer.from_file(str(path))
    assert _plain_byte_level_decoder(path)
    after = Tokenizer.from_file(str(path))
    assert json.loads(path.read_text())["decoder"]["type"] == "ByteLevel"
    vocab = before.get_vocab_size()
    assert all(before.decode([i]) == after.decode([i]) for i in range(vocab))
    rng = np.random.default_rng(0)
    for _ in range(200):
        ids = rng.integers(0, vocab, rng.integers(1, 40)).tolist()
        assert before.decode(ids) == after.decode(ids)
    assert not _plain_byte_level_decoder(path)  # already plain: nothing to do


def test_decoder_kept_when_the_vocabulary_has_sentencepiece_spaces(tiny_text_package, tmp_path):
    from onnxopt.genai_config import _plain_byte_level_decoder

    tokenizer = json.loads((tiny_text_package / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"]["\u2581the"] = len(tokenizer["model"]["vocab"])  # Replace is no identity now
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(tokenizer))
    assert not _plain_byte_level_decoder(path)
    assert json.loads(path.read_text())["decoder"] == tokenizer["decoder"]


def test_concat_genai_config_when_attention_did_not_fuse(tiny_package, tmp_path, monkeypatch):
    """Without GroupQueryAttention the cpu target keeps the export's concat interface: genai gets the
    concat form of the config (position_ids, no shared buffer), as for the portable target."""
    import onnxopt
    from onnxopt.passes import pipeline

    monkeypatch.setitem(pipeline.PIPELINES, "cpu", tuple(s for s in pipeline.CPU if s.name != "sdpa"))
    onnxopt.optimize(tiny_package, tmp_path / "opt", progress=False, verify=False)
    config = json.loads((tmp_path / "opt" / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is False
    assert json.loads((tmp_path / "opt" / "onnxopt.json").read_text())["genai"]["config"] == "genai_config.json"


def test_no_genai_config_for_custom_ops(tiny_package, tmp_path):
    """The cuda target keeps onnxopt.SwiGLU, which a plain ORT session (genai's) cannot load."""
    import onnxopt

    onnxopt.optimize(tiny_package, tmp_path / "opt", target="cuda", progress=False, verify=False)
    assert not (tmp_path / "opt" / "genai_config.json").exists()
    assert json.loads((tmp_path / "opt" / "onnxopt.json").read_text())["genai"] is None


def test_genai_runs_an_fp16_package(tiny_text_package, tmp_path):
    """`optimize --dtype fp16` (cpu target): genai_config.json still describes it, and genai's CPU run
    gives our runtime's greedy tokens and logits (the same fp16 graph on the same ORT CPU kernels)."""
    import onnxopt

    out = tmp_path / "fp16"
    onnxopt.optimize(tiny_text_package, out, dtype="fp16", progress=False)
    ours_gen = onnxopt.load(out)
    assert ours_gen.package.dtype == "fp16"
    theirs, their_logits = _genai_greedy(og.Model(str(out)), [PROMPTS[0]], 12)
    ours, our_logits = _ours(ours_gen, [PROMPTS[0]], 12)
    assert theirs.tolist() == ours[:, : theirs.shape[1]].tolist()
    assert max(float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())
               for a, b in zip(their_logits, our_logits)) <= LOGITS_ATOL
