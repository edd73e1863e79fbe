"""Tokenizer and stop tokens from a GGUF file's own metadata, built with `tokenizers`.

GGUF keeps the vocabulary under llama.cpp's key names, in one of two families:

- `tokenizer.ggml.model = gpt2`: byte-level BPE (SmolLM, Llama 3 and 4, Qwen2 and 3, Mistral Nemo).
  The pre-tokenizer is named by `tokenizer.ggml.pre` and must split text exactly as it was split
  when the merges were learned, or ids drift from the model's.
- `tokenizer.ggml.model = llama`: a SentencePiece vocabulary (Llama 2, Mistral v0.1, TinyLlama,
  Gemma): pieces with scores, `<0xNN>` byte tokens for byte fallback, spaces written as `▁` and one
  put in front of the text. llama.cpp encodes it as SentencePiece's BPE does (merge the adjacent pair
  whose joined piece scores highest), which is `tokenizers`' BPE with merges ranked by those scores;
  a vocabulary trained as unigram is encoded that way too (GGUF does not say which it was).
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _Backend

from models.errors import ModelFileError, UnsupportedModelError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # llama.cpp's token types

# Each family's split, as its tokenizer.json has it (llama.cpp's src/llama-vocab.cpp names the families).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # digits one by one
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_TEKKEN_SPLIT = (  # Mistral Nemo's: words split at case changes
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*|\p{{N}}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_GPT4O_SPLIT = (  # o200k's, which Llama 4 has too
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTION}|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTION}"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {"llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "tekken": _TEKKEN_SPLIT, "gpt-4o": _GPT4O_SPLIT}

_BYTE_LEVEL_PRE = {  # tokenizer.ggml.pre -> family, with llama.cpp's aliases
    "default": "gpt2",
    "gpt2": "gpt2",
    "gpt-2": "gpt2",
    "smollm": "smollm",
    "llama-bpe": "llama3",
    "llama3": "llama3",
    "llama-v3": "llama3",
    "qwen2": "qwen2",
    "tekken": "tekken",
    "gpt-4o": "gpt-4o",
    "llama4": "gpt-4o",
}
# What llama.cpp does for these families besides their split: a word that is itself a token is taken
# as is (as Llama 3's tokenizer.json says, `ignore_merges`), and a BOS where the file does not say.
_WHOLE_WORDS = _ADDS_BOS = {"llama3", "tekken"}


def _byte_level_backend(metadata: dict[str, Any], tokens: list[str]) -> _Backend:
    """Byte-level BPE with the split its `tokenizer.ggml.pre` names."""
    if "tokenizer.ggml.merges" not in metadata:
        raise ModelFileError("the file's byte-level BPE vocabulary lacks tokenizer.ggml.merges")
    pre = metadata.get("tokenizer.ggml.pre", "default")
    family = _BYTE_LEVEL_PRE.get(pre)
    if family is None:
        raise UnsupportedModelError(
            f"pre-tokenizer {pre!r} is not supported; supported: {', '.join(sorted(_BYTE_LEVEL_PRE))}"
        )
    merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = _Backend(models.BPE(vocab, merges, ignore_merges=family in _WHOLE_WORDS))
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if family == "smollm":  # every digit on its own, then GPT-2's split (SmolLM's tokenizer.json)
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    elif family in _SPLITS:
        split = pre_tokenizers.Split(Regex(_SPLITS[family]), behavior="isolated")
        bytes_ = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.pre_tokenizer = pre_tokenizers.Sequence([split, bytes_])
    else:
        backend.pre_tokenizer = gpt2
    if family == "qwen2":  # Qwen2's tokenizer.json composes the text (NFC) first
        backend.normalizer = normalizers.NFC()
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_merges(tokens: list[str], scores: list[float], mergeable: set[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's scores: every split of a piece into two pieces, ranked
    by the joined piece's score (higher first), ties as transformers' `generate_merges` breaks them."""
    ids = {t: i for i, t in enumerate(tokens) if i in mergeable}
    ranked = []
    for piece, i in ids.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-scores[i], -len(left), -len(right), i, ids[left], ids[right], left, right))
    return [(left, right) for *_, left, right in sorted(ranked)]


def _sentencepiece_backend(metadata: dict[str, Any], tokens: list[str], types: list[int]) -> _Backend:
    """SentencePiece BPE with byte fallback; the space prefix as the file says (Gemma's is off)."""
    scores = metadata.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise ModelFileError("the file's SentencePiece vocabulary lacks one tokenizer.ggml.scores entry per token")
    if metadata.get("tokenizer.ggml.remove_extra_whitespaces"):
        raise UnsupportedModelError("SentencePiece vocabularies that collapse whitespace runs are not supported")
    mergeable = {i for i, k in enumerate(types) if k == NORMAL}  # the others are never merged into
    unk = metadata.get("tokenizer.ggml.unknown_token_id")
    if unk is None:
        unk = next((i for i, k in enumerate(types) if k == UNKNOWN), None)
    model = models.BPE(
        {t: i for i, t in enumerate(tokens)},
        _sentencepiece_merges(tokens, scores, mergeable),
        unk_token=tokens[int(unk)] if unk is not None else None,
        fuse_unk=True,
        byte_fallback=BYTE in types,
    )
    backend = _Backend(model)
    replace = normalizers.Replace(" ", "▁")
    if metadata.get("tokenizer.ggml.add_space_prefix", True):
        # Prepended to each stretch of text between special tokens, as llama.cpp and SentencePiece do.
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), replace])
    else:
        backend.normalizer = replace
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return backend


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
        if kind not in ("gpt2", "llama"):
            raise UnsupportedModelError(
                f"tokenizer model {kind!r} is not supported; supported: gpt2 (byte-level BPE), llama (SentencePiece)"
            )
        if "tokenizer.ggml.tokens" not in metadata:
            raise ModelFileError("the file's vocabulary lacks tokenizer.ggml.tokens")
        tokens: list[str] = metadata["tokenizer.ggml.tokens"]
        types: list[int] = metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
        if len(types) != len(tokens):
            raise ModelFileError("the file's vocabulary has not one tokenizer.ggml.token_type per token")
        if kind == "gpt2":
            backend = _byte_level_backend(metadata, tokens)
        else:
            backend = _sentencepiece_backend(metadata, tokens, types)
        special_types = (CONTROL, UNKNOWN) if kind == "llama" else (CONTROL,)
        backend.add_special_tokens(
            [
                AddedToken(t, special=True, normalized=False)
                for t, k in zip(tokens, types, strict=True)
                if k in special_types
            ]
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
        # the space SentencePiece put in front of the text, which decoding takes off again
        self._prefix_space = kind == "llama" and bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
        self._sentencepiece = kind == "llama"
        self._byte_tokens = frozenset(i for i, k in enumerate(types) if k == BYTE)  # SentencePiece's <0xNN>

        def special(key: str) -> int | None:
            value = metadata.get(f"tokenizer.ggml.{key}_token_id")
            return int(value) if value is not None else None

        self.bos_id, self.eos_id = special("bos"), special("eos")
        # llama.cpp's defaults where the file does not say: a BOS for SentencePiece and Llama 3
        adds_bos = kind == "llama" or _BYTE_LEVEL_PRE.get(metadata.get("tokenizer.ggml.pre", "")) in _ADDS_BOS
        self.add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", adds_bos))
        self.add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
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

    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool | None = None) -> list[int]:
        """Ids of `text`; special-token texts in it (e.g. `<|im_start|>`) become their single ids.
        BOS and EOS are added as the file says unless told otherwise (a chat template writes its own)."""
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if (self.add_eos if add_eos is None else add_eos) and self.eos_id is not None:
            ids = [*ids, self.eos_id]
        return ids

    def decode(self, ids: list[int], skip_special: bool = True, continuation: bool = False) -> str:
        """The text of `ids`. SentencePiece's leading space is the one encoding put in front and is taken
        off, unless the ids continue earlier text (generated tokens after a prompt), where it is a real space."""
        text = self._backend.decode(list(ids), skip_special_tokens=skip_special)
        if self._prefix_space and not continuation and text.startswith(" "):
            text = text[1:]
        return text

    def save(self, path: str) -> None:
        """As a Hugging Face `tokenizer.json`, for outside tools that count tokens (aiperf)."""
        self._backend.save(path)

    def token_text(self, token_id: int) -> str:
        return self.tokens[token_id]

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (a piece of a UTF-8 character too): byte-level BPE spells
        each byte as one character of GPT-2's table, SentencePiece a space as ▁ and a lone byte as <0xNN>;
        special tokens are their own text."""
        piece = self.tokens[token_id]
        if self._sentencepiece and token_id not in self.special_ids:
            if token_id in self._byte_tokens:
                return bytes([int(piece[3:-1], 16)])
            return piece.replace("\u2581", " ").encode("utf-8")
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
