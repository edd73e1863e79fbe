"""The tokenizer families of the models people run at home, on files made as a user's are made.

No published vocabulary can be had here, so each family's is home-made the way its authors made theirs,
then saved by transformers beside a tiny random model and written as GGUF by llama.cpp's own
`convert_hf_to_gguf.py`:

- SentencePiece (Llama 2, Mistral v0.1, TinyLlama): models trained with the `sentencepiece` library,
  BPE and unigram (byte fallback, digits split, no normalization, as Llama 2's was trained), wrapped
  in transformers' LlamaTokenizer. The converter reads `tokenizer.model` itself.
- Byte-level BPE (Llama 3, Qwen2, Mistral Nemo's tekken, o200k's gpt-4o): trained with `tokenizers`
  on each family's exact split regex and wrapped in PreTrainedTokenizerFast. The converter names the
  pre-tokenizer by hashing the ids of a fixed text, which only the published vocabularies match, so
  it is run with that one lookup answering the family's name (`hf_models.convert(pre=...)`) rather
  than writing the keys ourselves: the tokens, types, merges and special tokens in the file are its
  own `_set_vocab_gpt2`'s.

Our ids are compared, on a fixed list and on generated strings, with each family's reference:
SentencePiece's own encoder (spm-bpe); for a unigram vocabulary, whose Viterbi segmentation GGUF does
not record (llama.cpp merges by score, as we do), transformers' own reading of the GGUF file; and the
saved transformers tokenizer for the byte-level ones. transformers 5's LlamaTokenizer puts no second
`▁` before text that starts with a space (its Metaspace), so it is given the prefix space itself.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.chat import ChatTemplate
from models.engine import Engine
from models.errors import UnsupportedModelError
from models.tokenizer import Tokenizer
from tests import hf_models

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
ZEPHYR_TEMPLATE = (  # TinyLlama-1.1B-Chat's
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}"
    "\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}"
    "\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}"
    "\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Each byte-level family: its split regex (from its tokenizer.json), special tokens, BOS and template.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "[INST]{{ message['content'] }}[/INST]{% elif message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
LLAMA4_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|header_start|>{{ m['role'] }}<|header_end|>\n\n"
    "{{ m['content'] | trim }}<|eot|>{% endfor %}"
    "{% if add_generation_prompt %}<|header_start|>assistant<|header_end|>\n\n{% endif %}"
)
UPPER, LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
BPE_FAMILIES = {
    "llama-bpe": dict(
        architecture="llama",
        split=LLAMA3_SPLIT,
        nfc=False,
        ignore_merges=True,
        specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        template=LLAMA3_TEMPLATE,
    ),
    "qwen2": dict(
        architecture="qwen2",
        split=LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}"),
        nfc=True,
        ignore_merges=False,
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        bos=None,
        eos="<|im_end|>",
        template=QWEN2_TEMPLATE,
    ),
    "tekken": dict(  # Mistral Nemo
        architecture="llama",
        split=rf"[^\r\n\p{{L}}\p{{N}}]?{UPPER}*{LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{UPPER}+{LOWER}*|\p{{N}}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        nfc=False,
        ignore_merges=True,
        specials=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
        bos="<s>",
        eos="</s>",
        template=MISTRAL_TEMPLATE,
    ),
    "gpt-4o": dict(  # o200k's split, as Llama 4's
        architecture="llama",
        split=rf"[^\r\n\p{{L}}\p{{N}}]?{UPPER}*{LOWER}+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
        rf"|[^\r\n\p{{L}}\p{{N}}]?{UPPER}+{LOWER}*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
        r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        nfc=False,
        ignore_merges=False,
        specials=["<|begin_of_text|>", "<|end_of_text|>", "<|header_start|>", "<|header_end|>", "<|eot|>"],
        bos="<|begin_of_text|>",
        eos="<|eot|>",
        template=LLAMA4_TEMPLATE,
    ),
}

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": " Hi there "},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye, 日本語 🤖"},
    ],
]

TEXTS = [
    "The capital of France is Paris.",
    "café naïve façade — “quotes” ¿qué? 日本語のテキスト 한국어 Ελληνικά 🤖🚀 emoji 👩‍👩‍👧",
    "def f(x):\n    return x  **  2\n\n\n\tdone  # comment\r\n",
    "a    b   \n  c  \t\t d",
    "   leading and trailing   ",
    " one leading space",
    "trailing space ",
    "In 2024, 3.14159 and 1,000,000 people; x=12345;y=67 and 123456789012345678901234567890",
    "I'm you'll we've THEY'RE it's",
    '{"json": [1, 2, {"k": null}], "url": "https://example.org/a?b=c&d=e"}',
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }  // dot",
    "",
    " ",
    "\n",
    "\n\n\n",
    "\u00a0non-breaking\u2009thin\u200bzero-width",
    "Приве́т, мир! ÅÄÖ åäö ß Œuvre",
    "e\u0301 (e and a combining acute) vs é",
    "中文，标点。「引号」！？ 漢字かな交じり文",
    "tabs\tand\ttabs\t\t\t",
    "\U0001f600\U0001f601\U0001f602 \U0001f9d1\u200d\U0001f4bb",
    "x" * 300,
    "HelloWorld camelCase XMLHttpRequest iPhone ÉtéÀ DON'T don't We'Ve a'lL",
    "path/to/file.txt\n/usr/bin/env -- python3 a//b",
    "🦙🦙 3 33 333 3333 33333 333333 3.3 3..3 3...3 ------======= '''''' ```````",
]

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "his",
    "her",
    "it",
    "an",
    "be",
    "this",
    "which",
    "or",
    "are",
    "not",
    "but",
    "had",
    "have",
    "capital",
    "France",
    "Paris",
    "London",
    "river",
    "mountain",
    "computer",
    "language",
    "model",
    "token",
    "server",
    "home",
    "network",
    "memory",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "hello",
    "world",
    "I'm",
    "you'll",
    "we've",
    "they're",
    "it's",
    "don't",
    "THE",
    "AND",
    "Hello",
    "World",
]
FOREIGN = [
    "café",
    "naïve",
    "façade",
    "Привет",
    "мир",
    "пример",
    "текста",
    "Ελληνικά",
    "γλώσσα",
    "日本語",
    "テキスト",
    "東京",
    "中文",
    "北京",
    "你好",
    "世界",
    "한국어",
    "서울",
    "안녕하세요",
    "español",
    "niño",
    "señor",
    "Straße",
    "Übermaß",
]
CODE = [
    "def f(x):\n    return x + 1\n",
    "for (int i = 0; i < n; i++) {\n\tsum += a[i];\n}\n",
    'print("hello", end="")\n',
    '{"key": [1, 2, 3], "nested": {"a": null}}',
    "SELECT name FROM users WHERE id = 42;",
    "    if err != nil {\n        return err\n    }\n",
]
EMOJI = ["🤖", "🚀", "🦙", "😀", "👍", "🎉", "❤️", "✅"]


def corpus(seed: int = 0, lines: int = 6000) -> list[str]:
    """Varied text: prose, made-up words, foreign scripts, code, numbers, emoji and whitespace, one sample a line."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"]

    def made_up() -> str:
        word = "".join(rng.choice(syllables) for _ in range(rng.randint(1, 4)))
        return word.capitalize() if rng.random() < 0.2 else word

    def script(start: int, size: int) -> str:  # CJK ideographs, Hangul syllables, Cyrillic
        return "".join(chr(start + rng.randrange(size)) for _ in range(rng.randint(1, 4)))

    out = []
    for _ in range(lines):
        parts = []
        for _ in range(rng.randint(4, 24)):
            r = rng.random()
            if r < 0.4:
                parts.append(rng.choice(WORDS))
            elif r < 0.6:
                parts.append(made_up())
            elif r < 0.7:
                parts.append(rng.choice(FOREIGN))
            elif r < 0.76:
                parts.append(script(*rng.choice([(0x4E00, 800), (0xAC00, 400), (0x0430, 32)])))
            elif r < 0.86:
                parts.append(str(rng.randint(0, 10 ** rng.randint(1, 8))))
            elif r < 0.9:
                parts.append(rng.choice(EMOJI))
            else:
                parts.append(rng.choice([",", ".", "!", "?", ";", ":", "-", "(", ")", "'", '"']))
        line = " ".join(parts)
        if rng.random() < 0.2:
            line += " " + rng.choice(CODE)
        out.append(line)
    return out


def read_metadata(path: Path) -> dict:
    from gguf import GGUFReader

    return {name: f.contents() for name, f in GGUFReader(path).fields.items() if not name.startswith("GGUF.")}


def tiny_model(hf_dir: Path, tokenizer_dir: Path, out: Path, architecture="llama", pre=None, **config) -> dict:
    """The tokenizer beside a 1-layer random model, converted; the GGUF file's metadata."""
    hf_models.random_model(
        hf_dir,
        tokenizer_dir,
        {"llama": "Llama", "qwen2": "Qwen2"}[architecture],
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        **config,
    )
    return read_metadata(hf_models.convert(hf_dir, out, pre=pre)) | {"path": out}


class Family:
    """One converted file: our tokenizer on it, the reference tokenizers, and the chat template."""

    def __init__(self, name: str, meta: dict, hf, stretch=None):
        self.name, self.meta, self.hf, self.stretch = name, meta, hf, stretch
        self.ours = Tokenizer(meta)
        self.path = meta["path"]
        tok = self.ours
        self.template = ChatTemplate(
            meta.get("tokenizer.chat_template"),
            bos_token=tok.token_text(tok.bos_id) if tok.bos_id is not None else "",
            eos_token=tok.token_text(tok.eos_id) if tok.eos_id is not None else "",
        )
        specials = [t for t in hf.all_special_tokens if t] + list(hf.get_added_vocab())
        self._special = re.compile("(" + "|".join(re.escape(t) for t in sorted(set(specials), key=len)[::-1]) + ")")

    def reference(self, text: str) -> list[int]:
        """The ids the family's own tokenizer gives `text`, special-token texts as their ids, no BOS/EOS."""
        if self.stretch is None:
            return self.hf(text, add_special_tokens=False)["input_ids"]
        # A SentencePiece vocabulary: each stretch between special tokens is encoded on its own, with its
        # own space prefix, as llama.cpp does (and Llama 2's tokenizer.json).
        ids = []
        for i, part in enumerate(self._special.split(text)):
            if i % 2:
                ids.append(self.hf.convert_tokens_to_ids(part))
            elif part:
                ids.extend(self.stretch(part))
        return ids


def with_space_prefix(hf):
    """transformers 5's SentencePiece tokenizers put `▁` in front only where the text has no space
    already (Metaspace); SentencePiece always does. Given one space, both have the same text to split."""
    return lambda part: hf(" " + part, add_special_tokens=False)["input_ids"]


def sentencepiece_family(tmp: Path, model_type: str) -> Family:
    """BPE: the reference is SentencePiece itself. Unigram: SentencePiece picks the likeliest pieces
    (Viterbi), which GGUF does not record; llama.cpp merges by score as for BPE, and so do we, so the
    reference is transformers' own reading of the GGUF file, an implementation independent of ours."""
    import sentencepiece as spm
    from transformers import AutoTokenizer, LlamaTokenizer

    (tmp / "corpus.txt").write_text("\n".join(corpus()))
    tok_dir = tmp / "tokenizer"
    tok_dir.mkdir()
    spm.SentencePieceTrainer.train(
        input=str(tmp / "corpus.txt"),
        model_prefix=str(tok_dir / "tokenizer"),
        model_type=model_type,
        vocab_size=3000,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        character_coverage=0.9995,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    if model_type == "bpe":  # Llama 2's tokenizer_config.json: a BOS, no EOS
        saved = dict(chat_template=LLAMA2_TEMPLATE, add_bos_token=True, add_eos_token=False)
    else:  # and the other way round, to see the file's keys obeyed
        saved = dict(chat_template=ZEPHYR_TEMPLATE, add_bos_token=False, add_eos_token=True)
    hf = LlamaTokenizer.from_pretrained(tok_dir, **saved)
    hf.save_pretrained(tok_dir)
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())  # transformers 5 leaves these out
    config.update(add_bos_token=saved["add_bos_token"], add_eos_token=saved["add_eos_token"])
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config))
    name = f"spm-{model_type}"
    meta = tiny_model(tmp / "hf", tok_dir, tmp / f"{name}.gguf")
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    if model_type == "bpe":
        return Family(name, meta, hf, stretch=sp.encode)
    from_gguf = AutoTokenizer.from_pretrained(tmp, gguf_file=f"{name}.gguf")
    family = Family(name, meta, hf, stretch=with_space_prefix(from_gguf))
    family.sp = sp
    return family


def byte_level_family(tmp: Path, pre: str) -> Family:
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from tokenizers import Tokenizer as Backend
    from transformers import PreTrainedTokenizerFast

    fam = BPE_FAMILIES[pre]
    backend = Backend(models.BPE(ignore_merges=fam["ignore_merges"]))
    if fam["nfc"]:
        backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(fam["split"]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=3000, special_tokens=fam["specials"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(corpus(), trainer)
    if fam["bos"]:
        bos = fam["bos"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))]
        )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=fam["bos"], eos_token=fam["eos"], chat_template=fam["template"]
    )
    tok_dir = tmp / "tokenizer"
    hf.save_pretrained(tok_dir)
    ids = {t: backend.token_to_id(t) for t in fam["specials"]}
    meta = tiny_model(
        tmp / "hf",
        tok_dir,
        tmp / f"{pre}.gguf",
        architecture=fam["architecture"],
        pre=pre,
        bos_token_id=ids.get(fam["bos"]),
        eos_token_id=ids[fam["eos"]],
    )
    return Family(pre, meta, PreTrainedTokenizerFast.from_pretrained(tok_dir))


SPM_FAMILIES = ["spm-bpe", "spm-unigram"]
FAMILIES = [*SPM_FAMILIES, *BPE_FAMILIES]
_made: dict[str, Family] = {}


def _family(name: str, tmp_path_factory) -> Family:
    """Each family's files are made once for the module, whichever fixture asks first."""
    if name not in _made:
        tmp = tmp_path_factory.mktemp(name)
        made = sentencepiece_family(tmp, name.removeprefix("spm-")) if name in SPM_FAMILIES else None
        _made[name] = made or byte_level_family(tmp, name)
    return _made[name]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory) -> Family:
    return _family(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=SPM_FAMILIES)
def spm_family(request, tmp_path_factory) -> Family:
    return _family(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=list(BPE_FAMILIES))
def bpe_family(request, tmp_path_factory) -> Family:
    return _family(request.param, tmp_path_factory)


def test_the_file_is_what_the_converter_writes_for_the_family(family):
    meta = family.meta
    assert family.ours.vocab_size >= 2000  # a few thousand pieces, as trained
    if family.name.startswith("spm-"):
        assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.pre"] == "default"
        assert "tokenizer.ggml.merges" not in meta and len(meta["tokenizer.ggml.scores"]) == family.ours.vocab_size
        assert meta["tokenizer.ggml.token_type"].count(6) == 256  # <0x00> ... <0xFF>
    else:
        assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == family.name


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_the_reference(family, text):
    assert family.ours.encode(text, add_bos=False, add_eos=False) == family.reference(text)


SNIPPETS = [*WORDS[:40], *FOREIGN, *CODE, *EMOJI, " ", "  ", "   ", "\n", "\n\n", "\t", "\r\n", "0", "42", "3.14"]
STRINGS = st.one_of(
    st.lists(st.sampled_from(SNIPPETS), max_size=30).map("".join),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40),
    st.lists(st.one_of(st.sampled_from(SNIPPETS), st.integers(0, 10**12).map(str)), max_size=12).map(" ".join),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=STRINGS)
def test_ids_match_the_reference_on_generated_strings(family, text):
    assert family.ours.encode(text, add_bos=False, add_eos=False) == family.reference(text)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.one_of(STRINGS, st.sampled_from(["<s>", "</s>", "<|im_start|>", "<|eot_id|>"])), max_size=6))
def test_special_tokens_in_text_are_their_ids(family, parts):
    text = "".join(parts)
    assert family.ours.encode(text, add_bos=False, add_eos=False) == family.reference(text)


@pytest.mark.parametrize("text", TEXTS)
def test_the_split_is_the_family_s(bpe_family, text):
    """The pre-tokenizer alone, vocabulary aside: a vocabulary trained on one split often gives the
    same ids under a coarser one, so the ids alone would not show a wrong split."""
    theirs = bpe_family.hf.backend_tokenizer
    ours = bpe_family.ours._backend
    normalized = theirs.normalizer.normalize_str(text) if theirs.normalizer else text
    assert (ours.normalizer.normalize_str(text) if ours.normalizer else text) == normalized
    assert ours.pre_tokenizer.pre_tokenize_str(normalized) == theirs.pre_tokenizer.pre_tokenize_str(normalized)


def test_bos_and_eos_as_the_file_says(family):
    ours, meta = family.ours, family.meta
    ids = ours.encode("Hello world")
    if family.name == "spm-bpe":  # as Llama 2's: a BOS, no EOS
        assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_eos_token"] is False
        assert ids[0] == ours.bos_id == meta["tokenizer.ggml.bos_token_id"] and ids[-1] != ours.eos_id
    elif family.name == "spm-unigram":
        assert meta["tokenizer.ggml.add_bos_token"] is False and meta["tokenizer.ggml.add_eos_token"] is True
        assert ids[0] != ours.bos_id and ids[-1] == ours.eos_id == meta["tokenizer.ggml.eos_token_id"]
    else:  # transformers adds what the tokenizer's post-processor says, and the converter wrote that down
        assert ids == family.hf("Hello world")["input_ids"]
        assert ours.add_bos == (BPE_FAMILIES[family.name]["bos"] is not None)
    assert ours.eos_id in ours.stop_ids
    assert ours.encode("Hello world", add_bos=False, add_eos=False) == family.reference("Hello world")
    assert ours.encode("Hello world", add_bos=True, add_eos=True)[-1] == ours.eos_id


def test_sentencepiece_and_transformers_agree_given_the_space_prefix(spm_family):
    """What makes SentencePiece's own encoder and transformers' one reference (spm-bpe) or the other (spm-unigram)."""
    family = spm_family
    if family.name == "spm-bpe":
        for text in TEXTS:
            assert family.stretch(text) == with_space_prefix(family.hf)(text) if text else True
    else:  # unigram: its likeliest pieces are not always what merging by score finds
        assert any(family.sp.encode(t) != family.ours.encode(t, add_bos=False, add_eos=False) for t in TEXTS)


@pytest.mark.parametrize("text", [t for t in TEXTS if t])
def test_decode_round_trips(family, text):
    ours = family.ours
    if family.name == "qwen2":  # Qwen2 composes text (NFC) before splitting it
        import unicodedata

        text = unicodedata.normalize("NFC", text)
    assert ours.decode(ours.encode(text)) == text
    assert ours.decode(ours.encode(text, add_bos=False, add_eos=False), skip_special=False) == text


@pytest.mark.parametrize("text", [t for t in TEXTS if t])
def test_token_bytes_spell_the_text(family, text):
    """What a grammar's token mask (models/constraint.py) and OpenAI's logprob bytes read: each token's bytes."""
    ours = family.ours
    ids = ours.encode(text, add_bos=False, add_eos=False)
    expected = ours.decode(ids, skip_special=False, continuation=True).encode()
    assert b"".join(ours.token_bytes(i) for i in ids) == expected


@pytest.mark.parametrize("text", [t for t in TEXTS if t])
def test_decode_matches_the_reference(family, text):
    ids = family.reference(text)
    assert family.ours.decode(ids) == family.hf.decode(ids, skip_special_tokens=True)


def test_generated_ids_keep_their_leading_space(family):
    """A continuation's first token may be SentencePiece's `▁Paris`: after a prompt, that space is the model's."""
    ours = family.ours
    ids = ours.encode("Paris", add_bos=False)
    spm = family.name.startswith("spm-")
    assert ours.decode(ids) == "Paris"
    assert ours.decode(ids, continuation=True) == (" Paris" if spm else "Paris")


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_renders_as_transformers(family, messages):
    ours = family.template.render(messages)
    assert ours == family.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_an_unknown_pre_tokenizer_is_refused_naming_the_supported_ones(bpe_family):
    with pytest.raises(UnsupportedModelError, match=r"pre-tokenizer 'jais' is not supported; supported: .*qwen2"):
        Tokenizer({**bpe_family.meta, "tokenizer.ggml.pre": "jais"})


def test_the_space_prefix_as_the_file_says(spm_family):
    """Gemma's files say `add_space_prefix = false`: no `▁` is put in front, and none taken off."""
    family = spm_family
    plain = Tokenizer({**family.meta, "tokenizer.ggml.add_space_prefix": False})
    for text in ("Hello world", " Hello", "日本語 🤖", "a  b\n"):
        ids = plain.encode(text, add_bos=False, add_eos=False)
        assert plain.encode(" " + text, add_bos=False, add_eos=False) == family.ours.encode(
            text, add_bos=False, add_eos=False
        )
        assert plain.token_text(ids[0])[0] != "▁" or text[0] == " "
        assert plain.decode(ids) == text == plain.decode(ids, continuation=True)


def test_a_sentencepiece_vocabulary_that_collapses_whitespace_is_refused(spm_family):
    with pytest.raises(UnsupportedModelError, match="collapse whitespace"):
        Tokenizer({**spm_family.meta, "tokenizer.ggml.remove_extra_whitespaces": True})


def test_an_unknown_tokenizer_model_is_refused():
    with pytest.raises(UnsupportedModelError, match=r"'t5' is not supported; supported: gpt2 .*llama"):
        Tokenizer({"tokenizer.ggml.model": "t5", "tokenizer.ggml.tokens": ["a"]})


def test_a_model_file_with_the_vocabulary_generates(family):
    """The whole path: prompt ids as the file says, streamed pieces that add up to the text, and a
    continuation that reads on from the prompt (SentencePiece's `▁` becomes the space it is)."""
    engine = Engine.load(family.path, backend="numpy")
    prompt = "The capital of France is"
    ids = engine.prompt_ids(prompt)
    assert ids == family.ours.encode(prompt)
    gen = engine.generate(ids, max_tokens=12, ignore_eos=True)
    pieces = list(gen)
    assert len(gen.token_ids) == 12 and "".join(pieces) == gen.text
    assert family.ours.decode(ids + gen.token_ids) == prompt + gen.text
    rendered = engine.chat_template.render(CONVERSATIONS[1])
    assert engine.chat_ids(CONVERSATIONS[1]) == family.reference(rendered)


@pytest.fixture(scope="module")
def llama_cpp_vocab(family):
    """llama.cpp's own tokenizer on the same file, through llama-cpp-python (the bench extra)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (built by `make bench`) is not installed")
    return llama_cpp.Llama(str(family.path), vocab_only=True, verbose=False)


def _as_llama_cpp_reads_it(family, text: str) -> str:
    """Text on which llama.cpp means what the family's tokenizer.json means. Qwen2's composes text first
    (NFC, as we do) and llama.cpp does not, so it is given composed text. tekken's and gpt-4o's split
    words at a capital (`\\p{Lu}`); llama.cpp's regex engine lacks the classes and counts only A-Z as
    capitals, so capitals outside A-Z are lowered."""
    import unicodedata

    if family.name == "qwen2":
        return unicodedata.normalize("NFC", text)
    if family.name in ("tekken", "gpt-4o"):
        return "".join(
            c.lower() if unicodedata.category(c) in ("Lu", "Lt") and not "A" <= c <= "Z" else c for c in text
        )
    return text


def test_ids_and_text_match_llama_cpp(family, llama_cpp_vocab):
    """Every fixed string (one test per family: where llama-cpp-python is absent, one skip says so)."""
    for text in TEXTS:
        text = _as_llama_cpp_reads_it(family, text)
        ids = family.ours.encode(text, add_bos=False, add_eos=False)
        assert ids == llama_cpp_vocab.tokenize(text.encode(), add_bos=False, special=True), text
        # llama.cpp's pieces, as it streams them: SentencePiece's leading `▁` is a space there
        pieces = llama_cpp_vocab.detokenize(ids).decode("utf-8", "replace")
        assert family.ours.decode(ids, continuation=True) == pieces, text


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.one_of(STRINGS, st.sampled_from(["<s>", "</s>", "<|im_start|>", "<|eot_id|>"])), max_size=6))
def test_ids_match_llama_cpp_on_generated_strings(family, llama_cpp_vocab, parts):
    text = _as_llama_cpp_reads_it(family, "".join(parts))
    ids = family.ours.encode(text)
    assert ids == llama_cpp_vocab.tokenize(text.encode(), add_bos=family.ours.add_bos, special=True) + (
        [family.ours.eos_id] if family.ours.add_eos else []
    )
