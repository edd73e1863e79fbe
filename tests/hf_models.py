"""Model files made the way a user's are: a transformers model, written as GGUF by llama.cpp's own
`convert_hf_to_gguf.py` (from the llama-cpp-python sdist the Makefile builds llama-bench from).

No real checkpoint of these architectures can be had here, so the weights are random, scaled like a
trained model's so that logits are far from uniform (transformers' own init, std 0.02, gives nearly
uniform ones that any bug would still "match").
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LLAMA_CPP_VERSION = "0.3.36"  # the Makefile's LLAMA_CPP_VERSION
SOURCES = REPO / ".venv" / "llama-src"  # where the Makefile unpacks the same sdist


def llama_cpp_dir() -> Path:
    """llama.cpp's source tree inside the llama-cpp-python sdist, downloaded and unpacked once."""
    found = sorted(SOURCES.glob(f"llama_cpp_python-{LLAMA_CPP_VERSION}/vendor/llama.cpp/convert_hf_to_gguf.py"))
    if found:
        return found[0].parent
    SOURCES.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
        + [f"llama-cpp-python=={LLAMA_CPP_VERSION}", "-d", str(SOURCES)],
        check=True,
    )
    with tarfile.open(next(SOURCES.glob(f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz"))) as sdist:
        sdist.extractall(SOURCES, filter="data")
    return llama_cpp_dir()


def save_smollm2_tokenizer(model_path: Path, folder: Path) -> Path:
    """SmolLM2's tokenizer (read by transformers from the default model file) as tokenizer.json: a
    vocabulary the converter recognises (pre-tokenizer `smollm`)."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name).save_pretrained(folder)
    return folder


def sentencepiece_tokenizer(folder: Path) -> Path:
    """A small SentencePiece BPE vocabulary (tokenizer.model, as Gemma 2 and Llama 2 folders have), trained
    once into `folder` on a few lines of text: what the converter reads for SentencePiece-only models."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    if not (folder / "tokenizer.model").exists():
        folder.mkdir(parents=True, exist_ok=True)
        text = [f"The appliance runs large language models at home; {i} times the family asks it." for i in range(300)]
        (folder / "corpus.txt").write_text("\n".join(text))
        spm.SentencePieceTrainer.train(
            input=str(folder / "corpus.txt"),
            model_prefix=str(folder / "tokenizer"),
            model_type="bpe",
            vocab_size=300,
            byte_fallback=True,
            hard_vocab_limit=False,
            minloglevel=2,
        )
        (folder / "corpus.txt").unlink()
        LlamaTokenizer.from_pretrained(folder).save_pretrained(folder)
    return folder


def scale_like_trained(model, seed: int = 0) -> None:
    """Weights of unit-variance outputs: N(0, 1/fan_in) matrices, N(0, 1) embeddings, norms near 1."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (2 if "lm_head" in name else 1) / math.sqrt(p.shape[1]))


def random_model(
    folder: Path, tokenizer_dir: Path, arch: str = "Llama", seed: int = 0, model_class: str | None = None, **config
):
    """A small random transformers model saved in `folder` (config, safetensors and the tokenizer): the
    model, in eval mode. arch names the classes, `{arch}Config` and `{arch}ForCausalLM` ("Qwen3Moe"), or
    model_class the second where it is named otherwise (Gemma3TextConfig, Gemma3ForCausalLM)."""
    import torch
    import transformers

    vocab = len(transformers.AutoTokenizer.from_pretrained(tokenizer_dir))
    defaults = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg = getattr(transformers, f"{arch}Config")(**{**defaults, **config})
    torch.manual_seed(seed)
    model = getattr(transformers, model_class or f"{arch}ForCausalLM")(cfg).to(torch.float32)
    scale_like_trained(model, seed)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    for f in tokenizer_dir.iterdir():
        if f.is_file() and f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, folder / f.name)
    return model.eval()


def random_llama(folder: Path, tokenizer_dir: Path, rope_scaling: dict | None = None, seed: int = 0, **config):
    """A small random Llama (random_model), with the RoPE scaling given."""
    return random_model(folder, tokenizer_dir, "Llama", seed, rope_scaling=rope_scaling, **config)


# The converter, run as `python convert_hf_to_gguf.py` runs it, with two lookups changed and the rest its own
# code. transformers 5 loads a qwen2 folder's tokenizer as Qwen2Tokenizer whatever tokenizer_config.json
# says (MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS), which rebuilds the pre-tokenizer, so the converter would
# not recognise the tokenizer.json saved there: that override is lifted. And with `pre`, its pre-tokenizer
# lookup answers `pre` (see convert).
_RUN_CONVERTER = """
import os, runpy, sys
from transformers.models.auto import tokenization_auto
tokenization_auto.MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS.discard("qwen2")
script, pre = sys.argv[1], sys.argv[2]
sys.path[:0] = [os.path.dirname(script), os.path.join(os.path.dirname(script), "gguf-py")]
if pre:
    from conversion.base import TextModel
    TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv = [script, *sys.argv[3:]]
runpy.run_path(script, run_name="__main__")
"""


def convert(hf_dir: Path, out: Path, outtype: str = "f32", pre: str | None = None) -> Path:
    """convert_hf_to_gguf.py, as a user runs it; a failure shows its output.

    The converter names a byte-level BPE vocabulary's pre-tokenizer by hashing the ids it gives a fixed
    text, which only the published vocabularies match; `pre` names it for a home-made vocabulary (its
    `get_vocab_base_pre` answers `pre`, the rest of the conversion is unchanged)."""
    script = llama_cpp_dir() / "convert_hf_to_gguf.py"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _RUN_CONVERTER,
            str(script),
            pre or "",
            str(hf_dir),
            "--outfile",
            str(out),
            "--outtype",
            outtype,
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, f"convert_hf_to_gguf.py failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return out


def with_metadata(src: Path, out: Path, **keys: int | str) -> Path:
    """A copy of a GGUF file with more or other keys, integers or strings (e.g. llama.attention.sliding_window,
    which the converter does not write for Mistral; another chat template), copied the way gguf-py's
    gguf_new_metadata.py copies."""
    import gguf

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(out, reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF.") or field.name in keys:
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
    for name, value in keys.items():
        kind = gguf.GGUFValueType.STRING if isinstance(value, str) else gguf.GGUFValueType.UINT32
        writer.add_key_value(name, value, kind)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data)
    writer.close()
    return out


def hf_logits(hf, ids: list[int]):
    """transformers' logits [T, vocab] for ids, as NumPy."""
    import torch

    with torch.inference_mode():
        return hf(input_ids=torch.tensor([ids])).logits[0].numpy()


def rel_err(a, b) -> float:
    """Relative L2 error of a against b."""
    import numpy as np

    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_lora(hf, folder: Path, seed: int = 0, rank: int = 4, alpha: float = 8.0, targets=LORA_TARGETS):
    """A PEFT LoRA adapter on `hf` with random A and B (PEFT's own init leaves B zero: a no-op that any
    bug would still "match"), sized so it moves the logits clearly; saved in `folder`. Returns the
    PEFT model (eval mode) on a copy of `hf`, which stays as it was; `merged_logits` gives
    transformers' answer with the adapter merged."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(hf), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5 / math.sqrt(p.shape[1]))
    model.save_pretrained(folder)
    return model.eval()


def merged_logits(peft_model, ids: list[int]):
    """transformers' logits with the adapter merged into a copy of the base weights."""
    import copy

    return hf_logits(copy.deepcopy(peft_model).merge_and_unload(), ids)


def log_softmax(logits):
    """log softmax over the last axis, in float64 (what the API's logprobs are)."""
    import numpy as np

    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def convert_lora(adapter_dir: Path, base_dir: Path, out: Path, outtype: str = "f32") -> Path:
    """llama.cpp's convert_lora_to_gguf.py, as a user runs it (the base's config from `base_dir`)."""
    script = llama_cpp_dir() / "convert_lora_to_gguf.py"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _RUN_CONVERTER,
            str(script),
            "",
            str(adapter_dir),
            "--base",
            str(base_dir),
            "--outfile",
            str(out),
            "--outtype",
            outtype,
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, f"convert_lora_to_gguf.py failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return out
