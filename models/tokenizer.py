"""Tokenizer and stop tokens from a GGUF file's own metadata, built with `tokenizers`.

GGUF keeps the vocabulary, merges and token types under llama.cpp's key names; the pre-tokenizer
is named by `tokenizer.ggml.pre` and must split text exactly as it was split when the merges were
learned, or ids drift from the model's.
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _Backend

from models.errors import ModelFileError, UnsupportedModelError

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The split for llama.cpp's `tokenizer.ggml.pre` names of byte-level BPE vocabularies."""
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # every digit on its own, then GPT-2's split (SmolLM's tokenizer.json)
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    if pre in ("llama-bpe", "llama3", "llama-v3"):
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre in ("default", "gpt2", "gpt-2"):
        return gpt2
    raise UnsupportedModelError(
        f"pre-tokenizer {pre!r} is not supported; supported: smollm, llama-bpe, llama3, default, gpt2"
    )


# Token texts llama.cpp also treats as end of generation when the file marks them as control tokens.
_END_OF_GENERATION = {
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<EOS_TOKEN>",
}


class Tokenizer:
    """Text <-> token ids, plus the model's special and stop tokens."""

    def __init__(self, metadata: dict[str, Any]):
        kind = metadata.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise UnsupportedModelError(f"tokenizer model {kind!r} is not supported; supported: gpt2 (byte-level BPE)")
        missing = [k for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges") if k not in metadata]
        if missing:
            raise ModelFileError(f"the file's byte-level BPE vocabulary lacks {', '.join(missing)}")
        tokens: list[str] = metadata["tokenizer.ggml.tokens"]
        types: list[int] = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]

        backend = _Backend(models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=False))
        backend.pre_tokenizer = _byte_level_pre_tokenizer(metadata.get("tokenizer.ggml.pre", "default"))
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types, strict=True) if k == CONTROL]
        )
        backend.add_tokens(
            [
                AddedToken(t, special=False, normalized=False)
                for t, k in zip(tokens, types, strict=True)
                if k == USER_DEFINED
            ]
        )
        self._backend = backend
        self.tokens = tokens
        self.vocab_size = len(tokens)

        def special(key: str) -> int | None:
            value = metadata.get(f"tokenizer.ggml.{key}_token_id")
            return int(value) if value is not None else None

        self.bos_id, self.eos_id = special("bos"), special("eos")
        self.add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False))
        named_stops = {special("eos"), special("eot"), special("eom")} - {None}
        self.stop_ids = frozenset(
            named_stops
            | {
                i
                for i, (t, k) in enumerate(zip(tokens, types, strict=True))
                if k == CONTROL and t in _END_OF_GENERATION
            }
        )
        self.special_ids = frozenset(i for i, k in enumerate(types) if k == CONTROL)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Ids of `text`; special-token texts in it (e.g. `<|im_start|>`) become their single ids."""
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special)

    def save(self, path: str) -> None:
        """As a Hugging Face `tokenizer.json`, for outside tools that count tokens (aiperf)."""
        self._backend.save(path)

    def token_text(self, token_id: int) -> str:
        return self.tokens[token_id]

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (a piece of a UTF-8 character too): byte-level BPE spells
        each byte as one character of GPT-2's table; special tokens are their own text."""
        piece = self.tokens[token_id]
        if token_id in self.special_ids or any(ch not in _BYTE_OF for ch in piece):
            return piece.encode("utf-8")
        return bytes(_BYTE_OF[ch] for ch in piece)

    def token_piece(self, token_id: int) -> str:
        """A token's text as decoded alone; a token that is part of a UTF-8 character is its piece."""
        text = self.decode([token_id], skip_special=False)
        return self.tokens[token_id] if "\ufffd" in text and "\ufffd" not in self.tokens[token_id] else text


def _gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE's alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_OF = {ch: b for b, ch in _gpt2_bytes_to_unicode().items()}
