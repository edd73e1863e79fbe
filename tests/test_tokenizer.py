"""Our tokenizer and chat template against transformers' reading of the same GGUF file."""

from __future__ import annotations

import copy

import pytest
from tokenizers import pre_tokenizers

TEXTS = [
    "The capital of France is Paris.",
    "café naïve façade — “quotes” ¿qué? 日本語のテキスト 한국어 Ελληνικά 🤖🚀 emoji 👩‍👩‍👧",
    "def f(x):\n    return x  **  2\n\n\n\tdone  # comment\r\n",
    "a    b   \n  c  \t\t d",
    "   leading and trailing   ",
    "In 2024, 3.14159 and 1,000,000 people; x=12345;y=67",
    "I'm you'll we've THEY'RE it's",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after a special token<|endoftext|>",
    '{"json": [1, 2, {"k": null}], "url": "https://example.org/a?b=c&d=e"}',
    "",
    "\n",
    "\u00a0non-breaking\u2009thin\u200bzero-width",
]


@pytest.fixture(scope="module")
def smollm_hf_tokenizer(hf_tokenizer):
    """transformers' GGUF tokenizer with SmolLM's published pre-tokenizer (digits split one by one).

    transformers does not know llama.cpp's `smollm` pre-tokenizer name and falls back to plain
    GPT-2 splitting; SmolLM2's own tokenizer.json (and llama.cpp) split every digit first.
    Vocabulary, merges and special tokens stay transformers' own reading of the file.
    """
    tokenizer = copy.deepcopy(hf_tokenizer)
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return tokenizer


@pytest.mark.parametrize("text", [t for t in TEXTS if not any(c.isdigit() for c in t)])
def test_ids_match_unmodified_transformers_where_there_are_no_digits(engine, hf_tokenizer, text):
    assert engine.tokenizer.encode(text) == hf_tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_transformers(engine, smollm_hf_tokenizer, text):
    assert engine.tokenizer.encode(text) == smollm_hf_tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(engine, text):
    tok = engine.tokenizer
    assert tok.decode(tok.encode(text), skip_special=False) == text


def test_digits_are_split_one_by_one(engine):
    ids = engine.tokenizer.encode("12345")
    assert [engine.tokenizer.decode([i]) for i in ids] == list("12345")


def test_special_tokens_are_single_ids_and_skipped_in_output(engine):
    tok = engine.tokenizer
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == tok.encode("<|im_start|>")[0] and len(tok.encode("<|im_start|>")) == 1
    assert ids[-1] == tok.eos_id == 2
    assert tok.decode(ids) == "user\nhi"


def test_stop_tokens(engine):
    tok = engine.tokenizer
    assert tok.stop_ids == {tok.encode("<|im_end|>")[0], tok.encode("<|endoftext|>")[0]}
    assert tok.add_bos is False and tok.bos_id == 1


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "What is the capital of France?"}],
        [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"},
        ],
    ],
)
def test_chat_template_matches_transformers(engine, hf_tokenizer, messages):
    ours = engine.chat_template.render(messages)
    assert ours == hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.endswith("<|im_start|>assistant\n")


def test_chat_template_rejects_malformed_messages(engine):
    from models.chat import ChatTemplateError

    with pytest.raises(ChatTemplateError, match="string 'role'"):
        engine.chat_template.render([{"role": "user"}])
