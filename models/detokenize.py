"""The text of a growing list of token ids, at a constant cost per token.

Decoding every id again after each new one costs O(n) a token, O(n^2) a generation. Here each step
decodes only a short window: the ids since the last complete piece of text, with that piece's own
ids in front of them so that what depends on context (a SentencePiece space prefix, a multi-byte
character split over tokens) comes out as in the whole text. What the new ids add is the window's
text past the prefix's. The window ends where the text is complete (no dangling UTF-8), so it never
grows past a few ids.
"""

from __future__ import annotations

from collections.abc import Callable

REPLACEMENT = "\ufffd"  # what an unfinished UTF-8 sequence decodes to


class IncrementalDecoder:
    def __init__(self, decode: Callable[[list[int]], str]):
        """decode: ids to text (the tokenizer's, as a continuation of the prompt)."""
        self.decode = decode
        self.ids: list[int] = []
        self.text = ""  # the complete text so far; equals tokenizer.decode(ids) once `pending` is empty
        self._prefix = 0  # ids[_prefix:_read] decoded to the last complete piece
        self._read = 0  # ids before this are in `text`

    @property
    def pending(self) -> bool:
        """Whether ids past `text` are waiting for the rest of a character."""
        return self._read < len(self.ids)

    def add(self, token: int) -> str:
        """Take one id; return the text it completes ("" while a character is unfinished)."""
        self.ids.append(token)
        before = self.decode(self.ids[self._prefix : self._read])
        after = self.decode(self.ids[self._prefix :])
        if not after.endswith(REPLACEMENT) and not after.startswith(before):  # context changed the prefix's
            before, after = self.text, self.decode(self.ids)  # text (rare): take the whole instead
        if after.endswith(REPLACEMENT) or not after.startswith(before):
            return ""  # unfinished: wait for the next id (or `final` at the end)
        piece = after[len(before) :]
        self.text += piece
        self._prefix, self._read = self._read, len(self.ids)
        return piece

    def final(self) -> str:
        """The whole text, unfinished characters included (as REPLACEMENT): the generation has ended."""
        if self.pending:
            self.text = self.decode(self.ids)
            self._prefix = self._read = len(self.ids)
        return self.text
