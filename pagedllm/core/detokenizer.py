"""Incremental detokenization that never emits half a multi-byte character, and stop-string checks."""

from __future__ import annotations

from dataclasses import dataclass, field

_REPLACEMENT = "\ufffd"


@dataclass(slots=True)
class IncrementalDetokenizer:
    """Turns a growing list of token ids into text, one step at a time.

    Each step decodes a short window ``ids[prefix_offset:]`` and its prefix ``ids[prefix_offset:
    read_offset]``; the difference is the new text. While the window ends in an incomplete UTF-8
    sequence (the decoder yields U+FFFD), nothing is emitted and the offsets wait.
    """

    tokenizer: object
    skip_special_tokens: bool = True
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def append(self, token_id: int) -> str:
        """Add one token; returns the text it completes (possibly empty) and appends it to ``text``."""
        self.token_ids.append(token_id)
        prefix = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset :])
        if full.endswith(_REPLACEMENT) or len(full) < len(prefix):
            return ""
        new_text = full[len(prefix) :]
        self.text += new_text
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        return new_text

    def flush(self) -> str:
        """Emit whatever is pending at the end (an incomplete sequence is decoded as U+FFFD)."""
        if self.read_offset == len(self.token_ids):
            return ""
        prefix = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset :])
        new_text = full[len(prefix) :]
        self.text += new_text
        self.read_offset = len(self.token_ids)
        return new_text


def find_stop_string(text: str, stop: list[str], num_new_chars: int) -> tuple[str, int] | None:
    """Find the earliest stop string that the last ``num_new_chars`` characters completed.

    Returns ``(stop_string, index)`` where it starts in ``text``, or None.
    """
    best: tuple[str, int] | None = None
    for s in stop:
        start = max(0, len(text) - num_new_chars - len(s) + 1)
        index = text.find(s, start)
        if index != -1 and (best is None or index < best[1]):
            best = (s, index)
    return best
