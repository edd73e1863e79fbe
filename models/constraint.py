"""Constrained decoding: a grammar (a JSON schema, any JSON, a Lark grammar) turned into a token mask that the
sampler applies to each step's logits, so the text always parses.

The grammar engine is llguidance (the one llama.cpp and vLLM use): a schema compiles in about a millisecond and a
step's mask over SmolLM2's 49k tokens costs ~20 us, against ~60 ms and up to ~0.4 ms for outlines-core here, and
xgrammar needs torch at run time (measured in docs/architecture.md). The mask is applied to the logits on the host,
after the head, so it works the same on every backend and under offload.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Protocol

import llguidance
import numpy as np

from models.errors import ModelError
from models.tokenizer import Tokenizer

# Compact JSON with json.dumps' separators and no free whitespace: a small model cannot wander into endless
# newlines, and every string, array and object must close.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}


def closed(schema: Any) -> Any:
    """The schema with no properties beyond those listed wherever it lists some and says nothing of others (OpenAI's
    strict mode): what it admits still validates against the original, and a small model cannot pad an object
    with keys of its own."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) if k in _SUBSCHEMAS else v for k, v in schema.items()}
    for key in ("properties", "$defs", "definitions", "patternProperties"):
        if isinstance(schema.get(key), dict):
            out[key] = {name: closed(s) for name, s in schema[key].items()}
    if "properties" in schema and "additionalProperties" not in schema and "patternProperties" not in schema:
        out["additionalProperties"] = False
    return out


_SUBSCHEMAS = {"items", "prefixItems", "anyOf", "oneOf", "allOf", "not", "additionalProperties", "contains"}


class GrammarError(ModelError):
    """A schema or grammar that cannot be compiled: the request is refused with the reason."""


class Constraint(Protocol):
    """What Generation consults each step (models.engine): the logits with disallowed tokens at -inf, then the
    token sampled from them; `finished` once the grammar admits nothing more (the text is complete)."""

    finished: bool

    def mask(self, logits: np.ndarray) -> np.ndarray: ...
    def accept(self, token: int) -> None: ...


class _Vocabulary:
    """Our tokenizer as llguidance's TokenizerWrapper reads one: each token's bytes, EOS, specials, encode."""

    def __init__(self, tokenizer: Tokenizer, stop_id: int):
        self.eos_token_id = stop_id
        self.bos_token_id = tokenizer.bos_id
        self.tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        self.special_token_ids = sorted(tokenizer.special_ids)
        self._tokenizer = tokenizer

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode(text, add_bos=False, add_eos=False)


class Grammars:
    """Compiles grammars for one model's vocabulary (the llguidance tokenizer is built once, on first use:
    ~0.2 s for 49k tokens) and makes a fresh matcher per generation."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._lock = threading.Lock()
        self._lltok: llguidance.LLTokenizer | None = None

    @property
    def lltokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._lltok is None:
                tok = self.tokenizer
                stop = tok.eos_id if tok.eos_id is not None else min(tok.stop_ids, default=0)
                self._lltok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocabulary(tok, stop)))
            return self._lltok

    def json_schema(self, schema: Any, strict: bool = True) -> str:
        """The grammar of JSON text valid against `schema` (a dict); strict: closed() (OpenAI's strict mode).
        GrammarError says why a schema is refused."""
        if not isinstance(schema, dict):
            raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
        schema = closed(schema) if strict else schema
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_OPTIONS)
        except (ValueError, TypeError) as e:
            raise GrammarError(f"invalid JSON schema: {e}") from e
        return self.checked(grammar)

    def lark(self, source: str) -> str:
        """A Lark grammar (llguidance's dialect: `%json {schema}` embeds a schema)."""
        return self.checked(llguidance.LLMatcher.grammar_from_lark(source))

    def checked(self, grammar: str) -> str:
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.lltokenizer)
        if is_error:
            raise GrammarError(f"invalid JSON schema or grammar: {messages[0] if messages else 'unknown error'}")
        return grammar

    def constraint(self, grammar: str) -> GrammarConstraint:
        return GrammarConstraint(llguidance.LLMatcher(self.lltokenizer, grammar, log_level=0), self.tokenizer)


class GrammarConstraint:
    """One generation's matcher: masks the logits to the tokens the grammar allows next. The EOS it was built
    with stands for every stop token: where the grammar may end, the model's stop tokens are allowed."""

    def __init__(self, matcher: llguidance.LLMatcher, tokenizer: Tokenizer):
        self._matcher = matcher
        self._words = (tokenizer.vocab_size + 31) // 32
        self._bits = np.zeros(self._words, dtype=np.int32)
        self._stops = np.array(sorted(tokenizer.stop_ids), dtype=np.int64)
        self._eos = (
            tokenizer.eos_id if tokenizer.eos_id is not None else (int(self._stops[0]) if self._stops.size else 0)
        )
        self._ending = False  # the last mask allowed ending
        self.finished = False
        self._check()

    def _check(self) -> None:
        if self._matcher.is_error():
            raise GrammarError(f"grammar failed: {self._matcher.get_error()}")

    def mask(self, logits: np.ndarray) -> np.ndarray:
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        self._check()
        allowed = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: logits.shape[-1]].astype(bool)
        self._ending = bool(allowed[self._eos])
        if self._ending:
            allowed[self._stops[self._stops < allowed.size]] = True
        return np.where(allowed, logits, -np.inf).astype(logits.dtype, copy=False)

    def accept(self, token: int) -> None:
        """Advance past the sampled token (a stop token where the grammar may end: it has ended)."""
        if self._ending and token in self._stops:
            self.finished = True
            return
        if not self._matcher.consume_token(int(token)):
            self._check()
            raise GrammarError(f"token {token} is not allowed by the grammar here")
        self.finished = self._matcher.is_stopped()
