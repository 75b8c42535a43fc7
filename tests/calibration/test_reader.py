"""Token windows streamed from text files: exact tokens, bounded blocks, resumable skips."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import needs_torch

from onnxopt.calibration import reader
from onnxopt.calibration.reader import DataError, read_tokens, token_windows

DATA = "/work/shared/data/prideprejudice.txt"


@pytest.fixture(scope="module")
def tokenizer(tiny_text_package):
    from onnxopt.runtime.tokenizer import TextTokenizer

    return TextTokenizer(tiny_text_package, eos_token_ids=[])


@needs_torch
def test_blocks_tokenize_like_the_whole_file(tokenizer, monkeypatch):
    monkeypatch.setattr(reader, "BLOCK_CHARS", 4096)  # many cuts in the first 100 KB
    text = open(DATA, encoding="utf-8").read()[:100_000]
    path = DATA
    want = np.asarray(tokenizer.encode(text))
    got = read_tokens(tokenizer, path, max_tokens=len(want) - 50)  # stop before the 100 KB edge
    np.testing.assert_array_equal(got, want[: len(got)])
    assert len(got) == len(want) - 50


@needs_torch
def test_windows_and_skip(tokenizer):
    windows = list(token_windows(tokenizer, [DATA], seq_len=64, num_samples=5))
    assert len(windows) == 5 and all(w.shape == (64,) for w in windows)
    flat = read_tokens(tokenizer, DATA, max_tokens=5 * 64)
    np.testing.assert_array_equal(np.concatenate(windows), flat)
    resumed = list(token_windows(tokenizer, [DATA], seq_len=64, num_samples=5, skip=3))
    assert len(resumed) == 2
    np.testing.assert_array_equal(np.concatenate(resumed), flat[3 * 64 :])


@needs_torch
def test_windows_span_files_and_stop_when_data_runs_out(tokenizer, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("One short paragraph.\n\nAnother one, a little longer than the first.\n")
    n = len(read_tokens(tokenizer, short))
    windows = list(token_windows(tokenizer, [short, short], seq_len=n, num_samples=10))
    assert len(windows) == 2


@needs_torch
def test_bad_files(tokenizer, tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        read_tokens(tokenizer, tmp_path / "missing.txt")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(DataError, match="not UTF-8"):
        read_tokens(tokenizer, binary)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="holds no text"):
        read_tokens(tokenizer, empty)
