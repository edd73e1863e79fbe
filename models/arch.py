"""The architectures the decoder runs, as data: what each one adds to the one Llama block.

Every architecture here is the same pre-norm block (models/llama.py); they differ in a few switches:
biases on the q/k/v projections (Qwen2), an RMSNorm over each q and k head before RoPE (Qwen3, Gemma 3),
which pairs RoPE turns (GGUF keeps Llama's q/k permuted for adjacent pairs; Qwen's, Gemma's and Phi's
rotate the two halves of a head), a mixture of experts in place of the one MLP (Mixtral, Qwen3-MoE), a
sliding attention window where the file declares one (on every layer, or on Gemma's local layers between
its global ones), Gemma's norm after attention and after the MLP, its GELU MLP and its embeddings scaled
by sqrt(width), and Phi-3's q/k/v and gate/up stored as one matrix each. A file is checked against its
architecture's tensors when it is opened, so a layout we do not run is refused at load, by name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from models.errors import UnsupportedModelError

# The tensors of a layer, by LayerWeights field: blk.{i}.<suffix>. The one map the model, the worker and
# the coordinator use, so reordering a dataclass cannot swap wq and wk.
BASE_TENSORS = {
    "attn_norm": "attn_norm.weight",
    "wq": "attn_q.weight",
    "wk": "attn_k.weight",
    "wv": "attn_v.weight",
    "wo": "attn_output.weight",
    "ffn_norm": "ffn_norm.weight",
    "w_gate": "ffn_gate.weight",
    "w_up": "ffn_up.weight",
    "w_down": "ffn_down.weight",
}
BIAS_TENSORS = {"bq": "attn_q.bias", "bk": "attn_k.bias", "bv": "attn_v.bias"}
QK_NORM_TENSORS = {"q_norm": "attn_q_norm.weight", "k_norm": "attn_k_norm.weight"}
# A mixture of experts replaces the MLP: a router [n_experts, D] and each matrix stacked per expert.
EXPERT_TENSORS = {
    "router": "ffn_gate_inp.weight",
    "w_gate_exps": "ffn_gate_exps.weight",
    "w_up_exps": "ffn_up_exps.weight",
    "w_down_exps": "ffn_down_exps.weight",
}
# Gemma's sandwich: each block's output RMS-normed again before it joins the residual stream.
POST_NORM_TENSORS = {"attn_post_norm": "post_attention_norm.weight", "ffn_post_norm": "post_ffw_norm.weight"}
# Phi-3 stores [Wq; Wk; Wv] as one matrix, and [W1; W3] (gate then up) as ffn_up.
FUSED_TENSORS = {"wqkv": "attn_qkv.weight", "w_gate_up": "ffn_up.weight"}
MLP_TENSORS = ("w_gate", "w_up", "w_down")
LAYER_TENSORS = {  # every field any architecture reads
    **BASE_TENSORS,
    **BIAS_TENSORS,
    **QK_NORM_TENSORS,
    **EXPERT_TENSORS,
    **POST_NORM_TENSORS,
    **FUSED_TENSORS,
}


@dataclass(frozen=True)
class ArchSpec:
    name: str  # general.architecture
    models: str  # the families a user knows it by
    qkv_bias: bool = False
    qk_norm: bool = False
    rope_halves: bool = False  # rotate (x[i], x[i + E/2]) ("NeoX"), not adjacent pairs
    experts: bool = False  # a routed mixture of experts (the file's {arch}.expert_count) for the MLP
    post_norms: bool = False  # Gemma: RMSNorm the attention's and the MLP's output before the residual add
    gelu: bool = False  # Gemma: the MLP is down(gelu(gate) * up), GELU's tanh form, not SiLU
    embed_scale: bool = False  # Gemma: embeddings multiplied by sqrt(width)
    swa_pattern: int = 0  # Gemma: with a window, every n-th layer is global and the others windowed
    fused_qkv: bool = False  # Phi-3: one q/k/v matrix and one gate/up matrix

    @property
    def label(self) -> str:
        """How a user names it: Mixtral files say `llama` and carry experts."""
        return f"{self.name} with experts" if self.experts and self.name == "llama" else self.name

    @property
    def tensors(self) -> dict[str, str]:
        """Every tensor of one layer of this architecture, by LayerWeights field."""
        dropped = set(MLP_TENSORS) if self.experts else set()
        if self.fused_qkv:
            dropped |= {"wq", "wk", "wv", "w_gate", "w_up"}
        return {
            **{f: t for f, t in BASE_TENSORS.items() if f not in dropped},
            **(BIAS_TENSORS if self.qkv_bias else {}),
            **(QK_NORM_TENSORS if self.qk_norm else {}),
            **(EXPERT_TENSORS if self.experts else {}),
            **(POST_NORM_TENSORS if self.post_norms else {}),
            **(FUSED_TENSORS if self.fused_qkv else {}),
        }

    @property
    def features(self) -> tuple[str, ...]:
        """What this architecture adds to the plain Llama block (the names backends declare support for)."""
        switches = {
            "qkv_bias": self.qkv_bias,
            "qk_norm": self.qk_norm,
            "rope_halves": self.rope_halves,
            "experts": self.experts,
            "post_norms": self.post_norms,
            "gelu": self.gelu,
            "fused_qkv": self.fused_qkv,
        }
        return tuple(f for f, on in switches.items() if on)


# By (general.architecture, whether the file has experts).
ARCHITECTURES = {
    (spec.name, spec.experts): spec
    for spec in (
        ArchSpec("llama", "Llama 2/3, SmolLM2, Mistral 7B (the converter writes Mistral as llama)"),
        ArchSpec("llama", "Mixtral", experts=True),
        ArchSpec("qwen2", "Qwen2, Qwen2.5", qkv_bias=True, rope_halves=True),
        ArchSpec("qwen3", "Qwen3 (dense)", qk_norm=True, rope_halves=True),
        ArchSpec("qwen3moe", "Qwen3-MoE (30B-A3B, 235B-A22B)", qk_norm=True, rope_halves=True, experts=True),
        ArchSpec("gemma2", "Gemma 2", rope_halves=True, post_norms=True, gelu=True, embed_scale=True, swa_pattern=2),
        ArchSpec(
            "gemma3",
            "Gemma 3 (text)",
            qk_norm=True,
            rope_halves=True,
            post_norms=True,
            gelu=True,
            embed_scale=True,
            swa_pattern=6,
        ),
        ArchSpec("phi3", "Phi-3, Phi-3.5 mini (4k context)", rope_halves=True, fused_qkv=True),
    )
}
ARCH_NAMES = sorted({name for name, _ in ARCHITECTURES})
LLAMA = ARCHITECTURES[("llama", False)]


def supported() -> str:
    return ", ".join(spec.label for spec in ARCHITECTURES.values())


def spec_of(arch: str, experts: bool = False) -> ArchSpec:
    if arch not in ARCH_NAMES:
        raise UnsupportedModelError(f"architecture {arch!r} is not supported; supported: {supported()}")
    if (arch, experts) not in ARCHITECTURES:
        kind = "a mixture of experts" if experts else "a dense MLP"
        raise UnsupportedModelError(f"{arch} with {kind} is not supported; supported: {supported()}")
    return ARCHITECTURES[(arch, experts)]


_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


def check_layout(spec: ArchSpec, n_layers: int, names: Iterable[str]) -> None:
    """Refuse a file whose layers are not exactly this architecture's tensors (a mixture-of-experts file
    declared as llama, a missing bias), naming the first tensor that is wrong."""
    want = spec.tensors.values()
    have: dict[int, set[str]] = {i: set() for i in range(n_layers)}
    for name in names:
        if m := _BLOCK.fullmatch(name):
            layer, suffix = int(m.group(1)), m.group(2)
            if layer >= n_layers or suffix not in want:
                raise UnsupportedModelError(
                    f"{spec.label} file has tensor {name}: this tensor is not supported; supported: {supported()}"
                )
            have[layer].add(suffix)
    for layer, suffixes in have.items():
        for suffix in want:
            if suffix not in suffixes:
                raise UnsupportedModelError(f"{spec.name} file lacks tensor blk.{layer}.{suffix}")


def markdown_table(fused: dict[str, frozenset[str]]) -> str:
    """README's supported table (architectures x backends), from this registry. fused: per backend beside
    the NumPy reference, the features its fused layer pass runs (kernels.cpu_backend.FUSED_FEATURES); a
    model needing more runs on that backend's per-operation path (its matmul, the reference's formulas)."""
    lines = [
        "| architecture | models | adds to the Llama block | `numpy` | " + " | ".join(f"`{b}`" for b in fused) + " |",
        "|" + " --- |" * (4 + len(fused)),
    ]
    for spec in ARCHITECTURES.values():
        cells = ["yes (the reference)"]
        for features in fused.values():
            whole = set(spec.features) <= features
            window = "" if "sliding_window" in features else "; per-op with a sliding window"
            cells.append(f"yes (fused{window})" if whole else "yes (per-op)")
        adds = ", ".join(spec.features) or "nothing"
        lines.append(f"| `{spec.label}` | {spec.models} | {adds} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Each honours `{arch}.attention.sliding_window` where the file declares it.")
    patterned = ", ".join(f"{s.name} {s.swa_pattern}" for s in ARCHITECTURES.values() if s.swa_pattern)
    lines.append(
        f"Gemma also scales embeddings by sqrt(width) and windows all but every n-th layer ({patterned}; Gemma 3's"
    )
    lines.append(
        "windowed layers turn by `rope.freq_base_swa`); Gemma 2 soft-caps attention scores and logits"
        " (`attn_logit_softcapping`, `final_logit_softcapping`). Phi-3's LongRoPE files (128k) are refused."
    )
    return "\n".join(lines)
