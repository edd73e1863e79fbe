"""OpenAI's two shapes of `logprobs`, from a Generation's TokenLogprobs (models/logprobs.py).

Chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}`.
Completions (the legacy shape): `{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}`,
where an echoed prompt's first token has no logprob (null). A token's text is the tokenizer's for it alone
(its byte-level piece where it is part of a UTF-8 character; `bytes` are then the raw bytes).
"""

from __future__ import annotations

from collections.abc import Sequence

from models.engine import Generation
from models.logprobs import TokenLogprob
from models.tokenizer import Tokenizer


def chat_logprobs(tok: Tokenizer, lps: Sequence[TokenLogprob]) -> dict:
    def entry(token: int, logprob: float) -> dict:
        return {"token": tok.token_piece(token), "logprob": logprob, "bytes": list(tok.token_bytes(token))}

    return {"content": [{**entry(lp.id, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]} for lp in lps]}


def completion_logprobs(tok: Tokenizer, ids: Sequence[int], lps: Sequence[TokenLogprob | None], offset: int) -> dict:
    """ids with their logprobs (None: the first prompt token's); offset: where the first token's text begins."""
    tokens = [tok.token_piece(i) for i in ids]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [None if lp is None else lp.logprob for lp in lps],
        "top_logprobs": [None if lp is None else {tok.token_piece(i): v for i, v in lp.top} for lp in lps],
        "text_offset": offsets,
    }


class ChoiceLogprobs:
    """One choice's logprobs in its endpoint's shape (None where not asked for), whole or chunk by chunk
    as its text streams: each piece with the tokens it covers, what is left with the finish; a
    completion's text_offset runs on over the chunks."""

    def __init__(self, tok: Tokenizer, gen: Generation, chat: bool):
        self.tok, self.gen, self.chat = tok, gen, chat
        self._pieces, self._taken, self._offset = 0, 0, 0

    def whole(self) -> dict | None:
        g = self.gen
        ids = [lp.id for lp in g.logprobs]
        if g.echo:
            return self._shape([*g.prompt_logprobs, *g.logprobs], [*g.prompt_ids, *ids])
        return self._shape(g.logprobs, ids)

    def prompt(self) -> dict | None:
        return self._shape(self.gen.prompt_logprobs, self.gen.prompt_ids)

    def next_piece(self) -> dict | None:
        if self.gen.n_top is None:
            return None
        end = self.gen.piece_tokens[self._pieces]
        self._pieces += 1
        return self._take(end)

    def rest(self) -> dict | None:
        return None if self.gen.n_top is None else self._take(len(self.gen.logprobs))

    def _take(self, end: int) -> dict | None:
        lps = self.gen.logprobs[self._taken : end]
        self._taken = max(self._taken, end)
        return self._shape(lps, [lp.id for lp in lps]) if lps else None

    def _shape(self, lps: Sequence[TokenLogprob | None], ids: Sequence[int]) -> dict | None:
        if self.gen.n_top is None:
            return None
        if self.chat:
            return chat_logprobs(self.tok, [lp for lp in lps if lp is not None])
        out = completion_logprobs(self.tok, ids, lps, self._offset)
        self._offset += sum(len(t) for t in out["tokens"])
        return out
