"""Opening GGUF files: weights stay quantized, other Llama files in other formats run right, bad files fail clearly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFWriter

from models.engine import Engine
from models.errors import ModelFileError, UnsupportedModelError
from models.gguf_file import LeanReader, open_gguf
from models.llama import LlamaConfig, Session
from tests.gguf_factory import write_tiny_llama


def test_hyperparameters_from_metadata(model_path):
    cfg = LlamaConfig.from_metadata(open_gguf(model_path).metadata)
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (576, 30, 9, 3, 64)
    assert (cfg.hidden_dim, cfg.vocab_size, cfg.context_length) == (1536, 49152, 8192)
    assert cfg.rope_theta == 100000.0 and cfg.norm_eps == pytest.approx(1e-5)


def test_the_lean_reader_reads_what_the_library_reads(model_path):
    """Every field and tensor as gguf's own reader gives them, still mapped from the file (not copied)."""
    lean, plain = LeanReader(model_path), GGUFReader(model_path)
    assert list(lean.fields) == list(plain.fields)
    for name, field in plain.fields.items():
        assert lean.fields[name].contents() == field.contents(), name
    assert [(t.name, t.tensor_type, t.shape.tolist()) for t in lean.tensors] == [
        (t.name, t.tensor_type, t.shape.tolist()) for t in plain.tensors
    ]
    for a, b in zip(lean.tensors, plain.tensors, strict=True):
        assert np.array_equal(a.data, b.data) and not a.data.flags.owndata and not a.data.flags.writeable


def test_weights_stay_quantized_in_memory(model_path):
    f = open_gguf(model_path)
    kinds = {t.qtype for t in f.tensors.values()}
    assert kinds == {Q.Q4_1, Q.Q8_0, Q.F32}
    q = f.tensors["blk.0.ffn_up.weight"]
    assert q.qtype == Q.Q4_1 and q.raw.dtype == np.uint8 and q.shape == (1536, 576)
    assert q.raw.nbytes == 1536 * 576 // 32 * 20  # 20 bytes per block of 32: Q4_1 as stored
    assert f.quantized_bytes < model_path.stat().st_size


def test_embedding_stays_quantized_after_load(engine):
    """Only the rows a prompt uses are dequantized; the table itself stays Q8_0."""
    assert engine.model.token_embd.qtype == Q.Q8_0 and engine.model.token_embd.raw.dtype == np.uint8


MIXED_FORMATS = {
    "blk.0.attn_q.weight": Q.Q4_0,
    "blk.0.attn_k.weight": Q.Q4_1,
    "blk.0.attn_v.weight": Q.Q5_0,
    "blk.0.attn_output.weight": Q.Q5_1,
    "blk.0.ffn_gate.weight": Q.Q8_0,
    "blk.0.ffn_up.weight": Q.F16,
    "blk.0.ffn_down.weight": Q.F32,
    "blk.1.attn_q.weight": Q.BF16,
}


def test_another_llama_file_in_every_format_matches_transformers(tmp_path, smol_meta):
    path = write_tiny_llama(tmp_path / "tiny.gguf", smol_meta, weight_type=Q.Q4_0, tensor_types=MIXED_FORMATS)
    engine = Engine.load(path, "numpy")  # the file read right: the exact reference against transformers
    assert {t.qtype for t in engine.model.file.tensors.values()} >= set(MIXED_FORMATS.values())
    ids = engine.tokenizer.encode("A tiny random Llama, in every format we read.")
    ours = engine.forward(ids, Session())
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32)
    with torch.inference_mode():
        theirs = hf(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) < 1e-4
    config = engine.model.config
    assert engine.model.lm_head.shape == (config.dim, config.vocab_size)  # its own output.weight, not the embedding


K_MIXED = {
    "blk.0.attn_q.weight": Q.Q4_K,
    "blk.0.attn_k.weight": Q.Q5_K,
    "blk.0.attn_v.weight": Q.Q6_K,
    "blk.0.ffn_down.weight": Q.Q6_K,
    "blk.1.ffn_up.weight": Q.Q4_K,
    "blk.1.attn_output.weight": Q.Q5_K,
}


# Q3_K_M / Q2_K / IQ4_XS-style files: the low-bit K formats and the non-linear 4-bit ones
LOW_BIT_MIXED = {
    "blk.0.attn_q.weight": Q.Q3_K,
    "blk.0.attn_k.weight": Q.Q2_K,
    "blk.0.ffn_gate.weight": Q.IQ4_XS,
    "blk.0.ffn_down.weight": Q.IQ4_NL,
    "blk.1.attn_v.weight": Q.Q3_K,
    "blk.1.ffn_up.weight": Q.Q2_K,
    "blk.1.attn_output.weight": Q.IQ4_XS,
}


@pytest.mark.parametrize("types", [K_MIXED, LOW_BIT_MIXED], ids=["q4_k_m-style", "low-bit"])
def test_k_quant_llama_file_matches_transformers(tmp_path, smol_meta, types):
    """Q4_K_M-style files: K formats in the layers (width 256, one super-block per row); and the
    low-bit and I-quant formats of Q3_K_M, Q2_K and IQ4_XS downloads."""
    path = write_tiny_llama(tmp_path / "k.gguf", smol_meta, weight_type=Q.Q8_0, tensor_types=types, dim=256)
    engine = Engine.load(path, "numpy")  # the file read right: the exact reference against transformers
    ids = engine.tokenizer.encode("K formats, as most downloaded files use.")
    ours = engine.forward(ids, Session())
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="k.gguf", dtype=torch.float32)
    with torch.inference_mode():
        theirs = hf(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert np.isfinite(ours).all()
    assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) < 1e-4


def test_missing_file():
    with pytest.raises(ModelFileError, match="not found"):
        open_gguf("/nonexistent/model.gguf")


def test_not_a_gguf_file(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_text("this is a text file, not a model")
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        open_gguf(p)


@pytest.mark.parametrize("keep", [1000, 50_000_000, 98_362_000])
def test_truncated_file(tmp_path, model_path, keep):
    p = tmp_path / "cut.gguf"
    with model_path.open("rb") as src:
        p.write_bytes(src.read(keep))
    with pytest.raises(ModelFileError, match="truncated"):
        open_gguf(p)


def test_unsupported_architecture_names_the_supported_ones(tmp_path, smol_meta):
    p = write_tiny_llama(tmp_path / "mamba.gguf", smol_meta, arch="mamba")
    with pytest.raises(
        UnsupportedModelError,
        match="'mamba' is not supported; supported: llama, llama with experts, qwen2, qwen3, qwen3moe, gemma2, gemma3, "
        "phi3$",
    ):
        open_gguf(p)


def test_unsupported_tensor_type_names_the_supported_ones(tmp_path):
    p = tmp_path / "k.gguf"
    w = GGUFWriter(str(p), "llama")
    w.add_tensor("blk.0.attn_q.weight", np.zeros((1, 66), dtype=np.uint8), raw_dtype=Q.IQ2_XXS)  # one 256-block
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="blk.0.attn_q.weight is IQ2_XXS; supported: F32, F16"):
        open_gguf(p)


def test_a_vocabulary_without_merges_is_a_clear_error(smol_meta):
    from models.tokenizer import Tokenizer

    meta = {k: v for k, v in smol_meta.items() if k != "tokenizer.ggml.merges"}
    with pytest.raises(ModelFileError, match="vocabulary lacks tokenizer.ggml.merges"):
        Tokenizer(meta)
