"""Incremental detokenization for streaming: emit text only once it is complete UTF-8.

A byte-level BPE token can hold part of a multi-byte character; decoding it alone gives U+FFFD.
We decode a short window of recent ids and emit only the new suffix, and hold it back while it
ends in U+FFFD (the same offsets scheme as vLLM's and transformers' streamers).
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, *, skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""  # everything emitted so far
        self._prefix = 0  # start of the decode window
        self._read = 0  # ids before this index have been emitted

    def _decode(self, ids) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one id; return the text that became complete (possibly "")."""
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        full_text = self._decode(self.ids[self._prefix :])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            delta = full_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """At the end of generation: whatever is still held back (a truly broken tail stays U+FFFD)."""
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        full_text = self._decode(self.ids[self._prefix :])
        delta = full_text[len(prefix_text) :]
        self._prefix = self._read = len(self.ids)
        self.text += delta
        return delta
