"""On-device LoRA fine-tuning: a device trains an adapter on its own text, on its own CPU.

The `.[train]` extra (torch, PEFT); nothing on the serving path imports this module (tests/test_layering.py).
The base model is the served GGUF file, dequantized by transformers' GGUF loader into a float32
transformers model; the text files of a folder are tokenized with the file's own tokenizer (the one
the appliance serves with) and cut into fixed-length examples; PEFT trains LoRA matrices on them.
`lora_pairs` gives the trained A and B by (layer, LayerWeights field), which `models.lora.write_adapter`
writes as the GGUF LoRA file the appliance serves.

    python -m offload.train MODEL.gguf CORPUS_DIR OUT.gguf [--steps 60 --rank 8]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from models.gguf_file import open_gguf
from models.llama import LlamaConfig
from models.lora import write_adapter
from models.tokenizer import Tokenizer

# transformers' module names -> LayerWeights fields
HF_PARTS = {
    "q_proj": "wq",
    "k_proj": "wk",
    "v_proj": "wv",
    "o_proj": "wo",
    "gate_proj": "w_gate",
    "up_proj": "w_up",
    "down_proj": "w_down",
}


def base_model(gguf_path: str | Path):
    """The GGUF file as a float32 transformers model (its weights dequantized), in training mode."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.train()


def examples(gguf_path: str | Path, folder: str | Path, length: int = 32) -> list[list[int]]:
    """Every *.txt file under `folder`, tokenized as the appliance tokenizes, in chunks of `length` ids."""
    tokenizer = Tokenizer(open_gguf(gguf_path).metadata)
    out = []
    for text_file in sorted(Path(folder).rglob("*.txt")):
        ids = tokenizer.encode(text_file.read_text(encoding="utf-8"))
        out += [ids[i : i + length] for i in range(0, len(ids) - 1, length) if len(ids[i : i + length]) > 1]
    if not out:
        raise ValueError(f"no text to train on in {folder} (it takes *.txt files)")
    return out


def with_lora(model, rank: int = 8, alpha: float = 16.0, targets=tuple(HF_PARTS), seed: int = 0):
    """The model with fresh LoRA matrices (PEFT's init: B = 0, so it starts as the base)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0))


def train(peft_model, data: list[list[int]], steps: int = 60, lr: float = 3e-3, batch: int = 8, seed: int = 0) -> float:
    """Next-token cross-entropy on `data` with AdamW for `steps` steps; returns the last batch's loss."""
    import torch

    gen = np.random.default_rng(seed)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        picked = [data[i] for i in gen.choice(len(data), size=min(batch, len(data)), replace=False)]
        width = min(len(x) for x in picked)
        ids = torch.tensor([x[:width] for x in picked])
        loss = peft_model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


def lora_pairs(peft_model) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]:
    """(layer, field) -> (A [r, in], scale-free B [out, r]) in transformers' layout, as float32 arrays."""
    pairs = {}
    for name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in getattr(module, "lora_A", {}):
            continue
        parts = name.split(".")
        layer, part = int(parts[parts.index("layers") + 1]), HF_PARTS[parts[-1]]
        a = module.lora_A["default"].weight.detach().numpy().astype(np.float32)
        b = module.lora_B["default"].weight.detach().numpy().astype(np.float32)
        pairs[(layer, part)] = (a, b)
    return pairs


def save(gguf_path: str | Path, pairs: dict, alpha: float, out: str | Path) -> Path:
    """The pairs as the GGUF LoRA file for this base model."""
    config = LlamaConfig.from_file(open_gguf(gguf_path))
    return write_adapter(out, config.arch, config.spec, (config.n_heads, config.n_kv_heads), alpha, pairs)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train a LoRA adapter on the text files of a folder, on this CPU.")
    p.add_argument("model")
    p.add_argument("corpus")
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=3e-3)
    args = p.parse_args(argv)
    data = examples(args.model, args.corpus)
    peft_model = with_lora(base_model(args.model), args.rank, args.alpha)
    loss = train(peft_model, data, args.steps, args.lr)
    save(args.model, lora_pairs(peft_model), args.alpha, args.out)
    print(f"{len(data)} examples, {args.steps} steps, last loss {loss:.3f}: {args.out}")


if __name__ == "__main__":
    main()
