"""Small GGUF files written with gguf-py's writer: a tiny random Llama in assorted formats, and bad files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFWriter, quants
from gguf import GGMLQuantizationType as Q

# K and I formats: gguf-py cannot quantize to them, so their blocks are random bytes with small f16 scales
# (byte offsets of the f16 fields, and a scale giving values of roughly the intended size).
K_FORMATS = {
    Q.Q2_K: ((80, 82), 1 / 50),
    Q.Q3_K: ((108,), 1 / 120),
    Q.Q4_K: ((0, 2), 1 / 400),
    Q.Q5_K: ((0, 2), 1 / 800),
    Q.Q6_K: ((208,), 1 / 1200),
    Q.IQ4_NL: ((0,), 1 / 250),
    Q.IQ4_XS: ((0,), 1 / 8000),
}


def random_k_blocks(rng: np.random.Generator, shape: tuple[int, ...], qtype: Q, scale: float) -> np.ndarray:
    block_values, block_bytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(shape[0], shape[1] // block_values, block_bytes), dtype=np.uint8)
    offsets, k = K_FORMATS[qtype]
    for o in offsets:
        halves = (rng.uniform(0.5, 1.0, size=raw.shape[:2]) * scale * k).astype(np.float16)
        raw[..., o : o + 2] = halves[..., None].view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(shape[0], -1)


def byte_vocab() -> dict[str, Any]:
    """A byte-level BPE vocabulary of the 256 bytes and three ChatML control tokens, no merges: a model
    file with it loads in a fraction of a second (SmolLM2's 49k-token vocabulary takes gguf-py ~6 s to read),
    for tests that start many servers."""
    from models.chat import FALLBACK_TEMPLATE

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    byte_chars = [chr(b) if b in printable else chr(next(extra)) for b in range(256)]  # GPT-2's byte map
    merged = ["Ġt", "he"]  # one merge each: gguf-py writes no merges key for an empty list
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    return {
        "tokenizer.ggml.tokens": byte_chars + merged + specials,
        "tokenizer.ggml.token_type": [1] * (256 + len(merged)) + [3] * len(specials),
        "tokenizer.ggml.merges": ["Ġ t", "h e"],
        "tokenizer.ggml.pre": "gpt2",
        "tokenizer.ggml.bos_token_id": 258,
        "tokenizer.ggml.eos_token_id": 260,
        "tokenizer.chat_template": FALLBACK_TEMPLATE,
    }


def write_tiny_llama(
    path: Path,
    tokenizer_meta: dict[str, Any],
    arch: str = "llama",
    weight_type: Q = Q.Q4_0,
    seed: int = 0,
    tensor_types: dict[str, Q] | None = None,
    dim: int = 64,
) -> Path:
    """A 2-layer Llama (width `dim`, 4 query heads, 2 key/value heads) with SmolLM2's tokenizer.

    Weights are random but scaled like a trained model's so that logits stay in a sane range;
    `output.weight` is its own tensor (untied), unlike SmolLM2's.
    """
    rng = np.random.default_rng(seed)
    D, F, H, G, L = dim, dim * 3 // 2 if dim < 256 else 2 * dim, 4, 2, 2
    V = len(tokenizer_meta["tokenizer.ggml.tokens"])
    w = GGUFWriter(str(path), arch)
    w.add_block_count(L)
    w.add_context_length(256)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(G)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(D // H)
    w.add_vocab_size(V)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tokenizer_meta["tokenizer.ggml.pre"])
    w.add_token_list(tokenizer_meta["tokenizer.ggml.tokens"])
    w.add_token_types(tokenizer_meta["tokenizer.ggml.token_type"])
    w.add_token_merges(tokenizer_meta["tokenizer.ggml.merges"])
    w.add_bos_token_id(tokenizer_meta["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(tokenizer_meta["tokenizer.ggml.eos_token_id"])
    w.add_add_bos_token(False)
    w.add_chat_template(tokenizer_meta["tokenizer.chat_template"])

    def add(name: str, shape: tuple[int, ...], qtype: Q, scale: float) -> None:
        qtype = (tensor_types or {}).get(name, qtype)
        data = (rng.standard_normal(shape) * scale).astype(np.float32)
        if name.endswith("norm.weight"):
            data = 1.0 + 0.1 * data
        if qtype == Q.F32:
            w.add_tensor(name, data)
        elif qtype == Q.F16:
            w.add_tensor(name, data.astype(np.float16))
        elif qtype in K_FORMATS:
            w.add_tensor(name, random_k_blocks(rng, shape, qtype, scale), raw_dtype=qtype)
        else:
            w.add_tensor(name, quants.quantize(data, qtype).view(np.uint8), raw_dtype=qtype)

    add("token_embd.weight", (V, D), Q.Q8_0, 1.0)
    for i in range(L):
        add(f"blk.{i}.attn_norm.weight", (D,), Q.F32, 1.0)
        add(f"blk.{i}.attn_q.weight", (D, D), weight_type, D**-0.5)
        add(f"blk.{i}.attn_k.weight", (D // H * G, D), weight_type, D**-0.5)
        add(f"blk.{i}.attn_v.weight", (D // H * G, D), weight_type, D**-0.5)
        add(f"blk.{i}.attn_output.weight", (D, D), weight_type, D**-0.5)
        add(f"blk.{i}.ffn_norm.weight", (D,), Q.F32, 1.0)
        add(f"blk.{i}.ffn_gate.weight", (F, D), weight_type, D**-0.5)
        add(f"blk.{i}.ffn_up.weight", (F, D), weight_type, D**-0.5)
        add(f"blk.{i}.ffn_down.weight", (D, F), weight_type, F**-0.5)
    add("output_norm.weight", (D,), Q.F32, 1.0)
    add("output.weight", (V, D), Q.F16, D**-0.5)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
