"""A synthetic model with Llama-3.2-1B's shapes and random Q4_0 weights, for benchmarks beyond a 135M model.

    python -m models.synthetic OUT.gguf        # ~0.7 GB, seconds: blocks are random bytes, not quantized floats

Its text is noise; its bytes per token and its shapes are those of the real model, which is what a
speed measurement needs. `TINY` is the same recipe at 2 layers of width 128: small enough for the
CUDA kernels' emulator to serve it in the tests.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFWriter
from gguf import GGMLQuantizationType as Q

LLAMA_3_2_1B = dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192, vocab=128256)
TINY = dict(dim=128, n_layers=2, n_heads=2, n_kv_heads=1, hidden_dim=256, vocab=512)


def random_q4_0(rng: np.random.Generator, rows: int, cols: int, std: float) -> np.ndarray:
    """Random nibbles (std ~4.6 around 8) with the f16 scale that gives weights of about `std`."""
    _, block_bytes = GGML_QUANT_SIZES[Q.Q4_0]
    raw = rng.integers(0, 256, size=(rows, cols // 32, block_bytes), dtype=np.uint8)
    scale = np.full((rows, cols // 32), std / 4.6, dtype=np.float16)
    raw[..., 0:2] = scale[..., None].view(np.uint8).reshape(rows, cols // 32, 2)
    return raw.reshape(rows, -1)


def write_llama_1b_q4_0(path: Path, seed: int = 0, context: int = 4096, shapes: dict = LLAMA_3_2_1B) -> Path:
    s = shapes
    D, F, H, G, L, V = s["dim"], s["hidden_dim"], s["n_heads"], s["n_kv_heads"], s["n_layers"], s["vocab"]
    E = D // H
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), "llama")
    w.add_name("synthetic Llama-3.2-1B shapes, random Q4_0" if s is LLAMA_3_2_1B else f"synthetic {s}, random Q4_0")
    w.add_block_count(L)
    w.add_context_length(context)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(G)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(E)
    w.add_vocab_size(V)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"<{i}>" for i in range(V - 3)] + ["a", "b", "ab"])
    w.add_token_merges(["a b"])  # gguf-py writes no merges key for an empty list, and the tokenizer needs one
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)

    def q4(name: str, rows: int, cols: int) -> None:
        w.add_tensor(
            name, random_q4_0(rng, rows, cols, cols**-0.5), raw_shape=(rows, cols // 32 * 18), raw_dtype=Q.Q4_0
        )

    def norm(name: str) -> None:
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(D)).astype(np.float32))

    q4("token_embd.weight", V, D)
    for i in range(L):
        norm(f"blk.{i}.attn_norm.weight")
        q4(f"blk.{i}.attn_q.weight", D, D)
        q4(f"blk.{i}.attn_k.weight", G * E, D)
        q4(f"blk.{i}.attn_v.weight", G * E, D)
        q4(f"blk.{i}.attn_output.weight", D, D)
        norm(f"blk.{i}.ffn_norm.weight")
        q4(f"blk.{i}.ffn_gate.weight", F, D)
        q4(f"blk.{i}.ffn_up.weight", F, D)
        q4(f"blk.{i}.ffn_down.weight", D, F)
    norm("output_norm.weight")  # tied head: Llama-3.2-1B reuses the embedding
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    write_llama_1b_q4_0(parser.parse_args().out)
