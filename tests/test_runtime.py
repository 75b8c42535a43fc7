"""Runtime behaviour: sampling against transformers' logits processors, streaming detokenization,
stop strings, and the sandboxed chat template.

Sampler tests need no model; text tests use `tiny_text_package` (a random-weight Llama of the `tiny`
shape carrying the SmolLM2 tokenizer).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import needs_torch

import onnxopt
from onnxopt.errors import GenerationError, PackageError
from onnxopt.runtime import Sampler, SamplingParams
from onnxopt.runtime.detokenize import IncrementalDetokenizer

# -- Sampler ----------------------------------------------------------------------------------------


def _logits(seed: int, batch: int = 4, vocab: int = 1000, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((batch, vocab)) * scale).astype(np.float32)


def test_greedy_is_argmax():
    logits = _logits(0)
    np.testing.assert_array_equal(Sampler(SamplingParams())(logits), logits.argmax(-1))
    half = logits.astype(np.float16)  # what an fp16 package hands the sampler
    np.testing.assert_array_equal(Sampler(SamplingParams())(half), half.argmax(-1))


def test_seeded_sampling_is_reproducible():
    params = dict(temperature=1.0, top_k=50, top_p=0.9)
    a, b, c = (Sampler(SamplingParams(seed=seed, **params)) for seed in (7, 7, 8))
    seq_a = [a(_logits(i)) for i in range(20)]
    seq_b = [b(_logits(i)) for i in range(20)]
    seq_c = [c(_logits(i)) for i in range(20)]
    assert all(np.array_equal(x, y) for x, y in zip(seq_a, seq_b))
    assert not all(np.array_equal(x, y) for x, y in zip(seq_a, seq_c))


def test_sampling_follows_the_softmax():
    """20000 draws from a 5-token distribution: each frequency within 0.015 of its probability
    (5 standard deviations of a binomial frequency at p=0.5 is 0.018)."""
    logits = np.log(np.array([[0.5, 0.25, 0.15, 0.07, 0.03]], dtype=np.float32))
    sampler = Sampler(SamplingParams(temperature=1.0, seed=0))
    counts = np.bincount([int(sampler(logits)[0]) for _ in range(20000)], minlength=5)
    np.testing.assert_allclose(counts / counts.sum(), [0.5, 0.25, 0.15, 0.07, 0.03], atol=0.015)


@pytest.mark.parametrize("seed", range(5))
def test_top_k_1_is_greedy(seed):
    logits = _logits(seed)
    sampler = Sampler(SamplingParams(temperature=1.3, top_k=1, seed=seed))
    np.testing.assert_array_equal(sampler(logits), logits.argmax(-1))


WARPER_CASES = [
    # (temperature, top_k, top_p, repetition_penalty)
    (1.0, 0, 0.9, 1.0),
    (0.7, 0, 0.5, 1.0),
    (1.0, 0, 0.05, 1.0),  # keeps only the first token or two
    (1.0, 20, 1.0, 1.0),
    (1.5, 40, 0.8, 1.0),
    (1.0, 0, 1.0, 1.3),
    (0.8, 10, 0.95, 1.2),
    (1.0, 0, 0.9, 0.7),  # a penalty < 1 favours repeats
]


@needs_torch
@pytest.mark.parametrize("temperature,top_k,top_p,penalty", WARPER_CASES)
def test_warpers_match_transformers(temperature, top_k, top_p, penalty):
    """Our warped logits equal transformers' processors applied in generate()'s order: the same set
    of surviving (finite) tokens, the same values on it."""
    import torch
    from transformers import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = _logits(11, batch=6, vocab=500)
    history = np.random.default_rng(12).integers(0, 500, size=(6, 30))
    ours = Sampler(SamplingParams(temperature, top_k, top_p, penalty, seed=0)).warp(logits, list(history))

    ids, ref = torch.from_numpy(history), torch.from_numpy(logits.copy())
    processors = []
    if penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(penalty))
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k:
        processors.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    for processor in processors:
        ref = processor(ids, ref)
    ref = ref.numpy()

    kept = np.isfinite(ours)
    np.testing.assert_array_equal(kept, np.isfinite(ref))
    assert kept.any(axis=-1).all()
    if top_k or top_p < 1.0:
        assert not kept.all(), "the case should drop some tokens"
    np.testing.assert_allclose(ours[kept], ref[kept], rtol=1e-6)


@pytest.mark.parametrize(
    "option,value",
    [("temperature", -1.0), ("temperature", float("nan")), ("top_k", -1), ("top_p", 0.0), ("top_p", 1.5),
     ("repetition_penalty", 0.0), ("seed", -3)],
)
def test_bad_sampling_values_name_the_option(option, value):
    with pytest.raises(GenerationError, match=option.replace("_", "-")):
        SamplingParams(**{option: value})


# -- text: detokenizer, stop strings, chat template ------------------------------------------------------


@pytest.fixture(scope="module")
def text_gen(tiny_text_package):
    return onnxopt.load(tiny_text_package)


MULTIBYTE = "héllo 東京 🙂 naïve ÅÆØ"


def test_detokenizer_never_emits_replacement_characters(text_gen):
    tok = text_gen.tokenizer
    ids = tok.encode(MULTIBYTE, add_special_tokens=False)
    # The test means something only if some token holds part of a character.
    assert any("\ufffd" in tok.decode([i]) for i in ids), "no token splits a character; pick other text"
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(i) for i in ids]
    pieces.append(detok.flush())
    assert not any("\ufffd" in p for p in pieces), pieces
    assert "".join(pieces) == tok.decode(ids) == MULTIBYTE
    assert detok.text == MULTIBYTE


def test_detokenizer_flush_keeps_a_truly_broken_tail(text_gen):
    tok = text_gen.tokenizer
    ids = tok.encode("東", add_special_tokens=False)
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tok)
    assert [detok.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)  # held back, not emitted as U+FFFD
    assert "\ufffd" in detok.flush()  # the stream ended mid-character: say so at the end only


SAMPLED = dict(temperature=1.0, seed=3, max_new_tokens=24)
PROMPT = "The weather today"


def _stop_across_tokens(gen, token_ids) -> str:
    """A stop string made of the end of one token's text and the start of the next one's."""
    detok = IncrementalDetokenizer(gen.tokenizer)
    pieces = [detok.push(t) for t in token_ids]
    for i in range(6, len(pieces) - 1):
        if len(pieces[i].strip()) >= 2 and len(pieces[i + 1]) >= 2:
            return pieces[i][-2:] + pieces[i + 1][:2]
    pytest.fail(f"no two adjacent multi-character tokens in {pieces}")


def test_stop_string_cuts_generate_and_stream(text_gen):
    full = text_gen.generate(PROMPT, **SAMPLED)
    assert full.finish_reason == "length" and full.new_tokens == SAMPLED["max_new_tokens"]
    stop = _stop_across_tokens(text_gen, full.token_ids)
    expected = full.text[: full.text.index(stop)]

    cut = text_gen.generate(PROMPT, stop=["never-in-this-text", stop], **SAMPLED)
    assert cut.finish_reason == "stop"
    assert cut.text == expected
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)] and cut.new_tokens < full.new_tokens

    stream = text_gen.stream(PROMPT, stop=[stop], **SAMPLED)
    pieces = list(stream)
    # A stream cannot take text back: the concatenation equal to the text before the stop string
    # means no piece ever showed any part of it.
    assert "".join(pieces) == expected
    assert all(pieces), "empty pieces are not yielded"
    assert stream.result.text == expected and stream.result.finish_reason == "stop"


def test_stop_string_absent_and_stream_equals_generate(text_gen):
    full = text_gen.generate(PROMPT, **SAMPLED)
    pieces = list(text_gen.stream(PROMPT, stop=["never-in-this-text"], **SAMPLED))
    assert "".join(pieces) == full.text
    assert text_gen.generate(PROMPT, stop=["never-in-this-text"], **SAMPLED).finish_reason == "length"


def test_stop_strings_in_a_batch_match_single_prompts(text_gen):
    prompts = ["The weather today", "Once upon a time there was"]
    singles = [text_gen.generate(p, max_new_tokens=12) for p in prompts]
    stop = singles[1].text[3:6]
    batch = text_gen.generate(prompts, max_new_tokens=12, stop=[stop])
    for single, row in zip(singles, batch):
        expected = single.text[: single.text.find(stop)] if stop in single.text else single.text
        assert row.text == expected
    assert batch[1].finish_reason == "stop"


# -- chat template sandbox -------------------------------------------------------------------------


def _package_with_template(src, dest, template: str):
    """A copy of `src` whose chat template is `template`, re-hashed: a well-formed hostile package."""
    from onnxopt.package import MANIFEST_NAME, write_manifest

    shutil.copytree(src, dest)
    (dest / "chat_template.jinja").write_text(template)
    write_manifest(dest, json.loads((dest / MANIFEST_NAME).read_text()))
    return dest


def test_chat_template_renders(text_gen):
    messages = [{"role": "user", "content": "Hi!"}]
    text = text_gen.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert "Hi!" in text and text.rstrip().endswith("assistant")
    out = text_gen.generate(messages, max_new_tokens=2)
    assert out.prompt_tokens == len(text_gen.tokenizer.encode(text, add_special_tokens=False))


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os }}",
        "{{ messages.append(1) }}",
        "{% for m in messages %}{{ m.update({'role': 'system'}) }}{% endfor %}",
        "{% set _ = messages.clear() %}",
    ],
)
def test_chat_template_is_sandboxed(tiny_text_package, tmp_path, template):
    pkg = _package_with_template(tiny_text_package, tmp_path / "evil", template)
    gen = onnxopt.load(pkg)
    messages = [{"role": "user", "content": "Hi!"}]
    with pytest.raises(PackageError, match="chat template: refused an unsafe operation"):
        gen.generate(messages, max_new_tokens=1)
    assert messages == [{"role": "user", "content": "Hi!"}]


def test_broken_chat_template_is_a_package_error(tiny_text_package, tmp_path):
    gen = onnxopt.load(_package_with_template(tiny_text_package, tmp_path / "bad", "{% for %}"))
    with pytest.raises(PackageError, match="not a valid Jinja template"):
        gen.generate([{"role": "user", "content": "Hi!"}], max_new_tokens=1)


# -- KV-cache layouts --------------------------------------------------------------------------------


def test_shared_layout_feeds_genai_mask_and_binds_kv_once():
    """gqa-shared: right-padded ids, attention_mask[b, t] = t < (row b's tokens after this step), the
    KV buffers bound once, and the mask rewritten in one preallocated buffer (nothing allocated)."""
    from onnxopt.package import kv_names
    from onnxopt.runtime.kv_cache import make_kv_layout

    kv = make_kv_layout("gqa-shared", kv_names(1), 2, 4, np.float32, position_ids=False)
    input_ids = kv.start([[7, 8, 9], [5]], max_new_tokens=3, pad=0)
    assert input_ids.tolist() == [[7, 8, 9], [5, 0, 0]]
    bound = {}

    def bind(binding, name, array, output=False):
        bound[name, output] = (array.ctypes.data, array.shape, array.copy())

    kv.bind(None, bind)
    assert bound["attention_mask", False][2].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert kv.last_index().tolist() == [2, 0]
    for name in ("past_key_values.0.key", "past_key_values.0.value"):
        assert bound[name, False][1] == (2, 2, 6, 4)  # [B, Hkv, Tmax, D]
    key_in, key_out = bound["past_key_values.0.key", False], bound["present.0.key", True]
    assert key_in[0] == key_out[0]  # past and present share one buffer
    mask_address = bound["attention_mask", False][0]
    for step, want in enumerate(([[1, 1, 1, 1], [1, 1, 0, 0]], [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])):
        kv.advance()
        bound.clear()
        kv.bind(None, bind)
        assert list(bound) == [("attention_mask", False)], "KV buffers are bound once per generation"
        assert bound["attention_mask", False][2].tolist() == want
        assert bound["attention_mask", False][0] == mask_address
        assert kv.last_index().tolist() == [0, 0]


def test_package_of_the_old_seqlens_interface_is_refused(tiny_text_package, tmp_path):
    """Optimized packages of an older onnxopt fed seqlens_k / total_sequence_length: one clear error."""
    from onnxopt.package import MANIFEST_NAME, write_manifest

    old = tmp_path / "old"
    shutil.copytree(tiny_text_package, old)
    manifest = json.loads((old / MANIFEST_NAME).read_text())
    manifest["io"]["kv_cache"]["layout"] = "gqa-shared"
    manifest["io"]["inputs"] = ["input_ids", "seqlens_k", "total_sequence_length"]
    write_manifest(old, manifest)
    with pytest.raises(PackageError, match="older onnxopt .* re-run `onnxopt optimize`"):
        onnxopt.load(old)
