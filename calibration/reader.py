"""Token streams from text files, in bounded memory.

    for window in token_windows(tokenizer, ["emma.txt"], seq_len=512, num_samples=128): ...   # [seq_len] int64
    ids = read_tokens(tokenizer, "prideprejudice.txt", max_tokens=16384)                     # [<= max_tokens]

A file is read in blocks of about `BLOCK_CHARS` characters, each cut before its last blank line (a
paragraph boundary) and tokenized on its own, so neither the text nor its tokens are ever held in
full. For byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM2) a cut there gives exactly the tokens of
the whole file (tests/calibration/test_reader.py checks it on the evaluation text). The first block gets the tokenizer's special tokens (BOS where
the model has one); the rest do not. Both `eval` and `calibrate` read through here, so the two see
text tokenized the same way.

Chat-formatted data (JSON lines of `{"messages": [...]}`) is rendered through the package's chat
template first (`.jsonl` files).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from onnxopt.errors import UserError

BLOCK_CHARS = 1 << 16


class DataError(UserError):
    """A calibration or evaluation data file cannot be used."""


def check_data_file(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file (pass a UTF-8 text file, e.g. ../shared/data/emma.txt)")
    return path


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


# A cut goes between a paragraph's last character and the blank line after it: pre-tokenizers of the
# GPT-2 family split whitespace runs by what follows them ("\n\nHad" -> "\n", "\n", "Had" but a
# trailing "\n\n" -> "\n\n"), so the whitespace must stay with the text that follows it.
_PARAGRAPH_END = re.compile(r"\S(?=\n\n)")


def _text_blocks(path: Path) -> Iterator[str]:
    """Blocks of the file cut before a blank line; the last block holds whatever is left."""
    pending = ""
    try:
        with open(path, encoding="utf-8") as f:
            while chunk := f.read(BLOCK_CHARS):
                pending += chunk
                last = None
                for last in _PARAGRAPH_END.finditer(pending, max(0, len(pending) - len(chunk) - 2)):
                    pass
                if last is None:
                    continue  # no paragraph boundary yet: read on
                cut = last.end()
                yield pending[:cut]
                pending = pending[cut:]
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); pass a UTF-8 text file") from e
    if pending:
        yield pending


def _chat_blocks(path: Path, tokenizer) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                messages = json.loads(line)["messages"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"{path}:{lineno}: expected a JSON object with 'messages' ({e})") from e
            yield tokenizer.apply_chat_template(messages, add_generation_prompt=False)


def token_stream(tokenizer, path) -> Iterator[np.ndarray]:
    """Token ids of one file, block by block (int64 arrays)."""
    path = check_data_file(path)
    chat = path.suffix == ".jsonl"
    blocks = _chat_blocks(path, tokenizer) if chat else _text_blocks(path)
    first = True
    for text in blocks:
        # A rendered chat template already holds its special tokens.
        ids = tokenizer.encode(text, add_special_tokens=first and not chat)
        first = False
        if ids:
            yield np.asarray(ids, dtype=np.int64)


def read_tokens(tokenizer, path, *, max_tokens: int | None = None) -> np.ndarray:
    """The first `max_tokens` token ids of a file (all of them when None)."""
    parts, total = [], 0
    for ids in token_stream(tokenizer, path):
        parts.append(ids)
        total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    if not parts:
        raise DataError(f"{path}: holds no text")
    tokens = np.concatenate(parts)
    return tokens[:max_tokens] if max_tokens is not None else tokens


def token_windows(
    tokenizer, paths: Sequence[os.PathLike | str], *, seq_len: int, num_samples: int, skip: int = 0
) -> Iterator[np.ndarray]:
    """Up to `num_samples` non-overlapping windows of `seq_len` tokens, drawn from the files in order;
    the first `skip` windows are read past (a resumed calibration run). Stops early when the data
    runs out; a shorter tail is dropped."""
    buffer = np.empty(0, dtype=np.int64)
    produced = 0
    for path in paths:
        for ids in token_stream(tokenizer, path):
            buffer = np.concatenate([buffer, ids])
            while len(buffer) >= seq_len:
                window, buffer = buffer[:seq_len], buffer[seq_len:]
                if produced >= skip:
                    yield window
                produced += 1
                if produced >= num_samples:
                    return
